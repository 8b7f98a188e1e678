"""The one `rtrain` command, run as `python -m rtrain` from this checkout (the installed console
script calls the same `rtrain.cli:main`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from rtrain import cli

ROOT = Path(__file__).resolve().parents[1]


def rtrain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rtrain", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command():
    out = rtrain("--help")
    assert out.returncode == 0, out.stderr
    listed = [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    for name in ("fit", "tune", "evaluate", "predict", "export", "visualize", "compare", "shard", "models"):
        assert name in listed


def test_models_prints_the_variant_table():
    out = rtrain("models")
    assert out.returncode == 0, out.stderr
    assert "variants, 80 classes." in out.stdout and "compact_n" in out.stdout


def test_shard_runs_data_prep_shard():
    out = rtrain("shard", "--help")
    assert out.returncode == 0, out.stderr
    assert "data_prep.shard" in out.stdout and "--format" in out.stdout
    bad = rtrain("shard", "--format", "coco")  # the same flags, the same one-line error
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_unknown_or_missing_command_is_one_line_and_exit_2():
    for args in (["bogus"], []):
        out = rtrain(*args)
        assert out.returncode == 2
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert out.stderr.startswith("rtrain: error:")
        assert out.stdout == ""
    assert "unknown command 'bogus'" in rtrain("bogus").stderr


def test_flags_pass_through_to_the_command():
    out = rtrain("fit", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_console_script_is_declared_and_every_command_has_a_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"rtrain": "rtrain.cli:main"}
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main), module
