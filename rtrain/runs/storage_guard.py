"""A Ray Train callback (in the Train controller) that ends a run whose storage is full, without retries.

Rank 0 raises `rtrain.runs.run_dir.StorageFullError` when a write of the epoch's files finds the disk
full (`rtrain.training.train_loop._write_outputs`). Ray Train would restart the worker group up to
`run.max_failures` times, and each restart would train an epoch only to hit the same full
disk. `after_exception` sees the workers' errors first: raising from it is a controller error,
which Ray Train does not retry, so the run ends at once and `rtrain.training.runner.fit` turns the
error into one line naming the file and the `--resume` command.
"""

from __future__ import annotations

from ray.train import UserCallback

from rtrain.runs.run_dir import StorageFullError, storage_full_line


class StopWhenStorageFull(UserCallback):
    """Raise the first full-disk error among the workers' errors (see the module doc)."""

    def after_exception(self, run_context, worker_exceptions) -> None:
        for exc in worker_exceptions.values():
            try:
                line = storage_full_line(exc) if isinstance(exc, BaseException) else None
            except Exception:  # noqa: BLE001 - an error raised here would end the run: never for other faults
                line = None
            if line is not None:
                if isinstance(exc, StorageFullError):
                    raise exc
                raise RuntimeError(line)
