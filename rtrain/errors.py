"""The one base of rtrain's errors, and the rule every CLI applies to them.

Every error rtrain raises on purpose is an `RtrainError` whose message is one line naming the
file (or option) and the fault. The concrete classes keep their historical bases as well
(ConfigError is also a ValueError, FitError also a RuntimeError, ...), so `except ValueError`
in callers keeps working.

The CLI rule (`rtrain.cli.run_cli` applies it): an RtrainError, or a data_prep DatasetError,
prints one line `PROG: error: MESSAGE` on stderr and exits with the error's `exit_code`:
2 for bad input (the default), 1 for a run that started and then failed, 75 for a training run
stopped by a preemption (SIGTERM) that `--resume` continues.
"""

from __future__ import annotations

BAD_INPUT = 2  # the input (arguments, config, files) is unusable; nothing ran
FAILED = 1  # the work started and failed
PREEMPTED = 75  # stopped on request (SIGTERM) to be continued with --resume (EX_TEMPFAIL: retry)


class RtrainError(Exception):
    """Base of rtrain's one-line errors; `exit_code` is what a CLI exits with."""

    exit_code: int = BAD_INPUT
