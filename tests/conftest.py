"""Shared fixtures: the read-only real datasets, and one Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: BCCD and raccoon (VOC), coco128 (COCO). Read-only: never write here."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole test session and always shut it down.

    4 logical CPUs on a 2-core machine: Ray Data's file listing needs a whole CPU
    and Train removes its workers' CPUs from Ray Data's budget, so with 2 logical
    CPUs a 2-worker run deadlocks (../shared/RAY_NOTES.md).
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
