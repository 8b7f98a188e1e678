"""rtrain.errors / rtrain.cli: one error base, one CLI rule (one line `prog: error: ...`, exit 2 or 1)."""

import pytest

from data_prep.shard_format import ShardError
from rtrain.cli import run_cli
from rtrain.config import ConfigError
from rtrain.deploy.exporter import ExportError
from rtrain.deploy.sources import SourceError
from rtrain.errors import RtrainError
from rtrain.runs.checkpoint import CheckpointError, IncompatibleCheckpointError
from rtrain.runs.compare import CompareError
from rtrain.runs.feature_maps import VisualizeError
from rtrain.search.spec import SweepError
from rtrain.training.guard import NonFiniteLossError
from rtrain.training.runner import FitError


@pytest.mark.parametrize("cls, old_base", [
    (ConfigError, ValueError), (SourceError, ValueError), (VisualizeError, ValueError),
    (SweepError, ValueError), (CompareError, ValueError), (FitError, RuntimeError),
    (ExportError, RuntimeError), (NonFiniteLossError, RuntimeError), (CheckpointError, Exception),
    (IncompatibleCheckpointError, CheckpointError),
])
def test_every_error_is_an_rtrain_error_and_keeps_its_old_base(cls, old_base):
    assert issubclass(cls, RtrainError) and issubclass(cls, old_base)


def _cli(exc):
    @run_cli("rtrain.x")
    def main():
        raise exc
    return main


def test_run_cli_maps_errors_to_one_line_and_the_exit_code(capsys):
    assert _cli(ConfigError("a.yaml: bad\nmore"))() == 2
    assert capsys.readouterr().err == "rtrain.x: error: a.yaml: bad\n"
    assert _cli(ShardError("d: shard directory not found"))() == 2  # data_prep's errors too
    assert "rtrain.x: error: d: shard directory not found" in capsys.readouterr().err
    try:
        raise FitError("training failed: boom") from OSError("boom")
    except FitError as exc:
        failed = exc
    assert _cli(failed)() == 1 and _cli(FitError("refused"))() == 2
    with pytest.raises(KeyError):  # anything else is a bug: a traceback, as before
        _cli(KeyError("x"))()


def test_output_into_a_closed_pipe_ends_without_a_traceback():
    import subprocess
    import sys

    # The reader is gone before the child prints its table (importing torch takes it a second).
    child = subprocess.Popen([sys.executable, "-m", "rtrain.models"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
