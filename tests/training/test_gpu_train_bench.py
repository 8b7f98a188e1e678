"""benchmarks/gpu_train.py runs end to end (CPU smoke) without Ray, pycocotools or PyYAML, and
reports its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The GPU benchmark machine has torch, torchvision and pyarrow but no Ray, no pycocotools and
# perhaps no PyYAML: make sure the benchmark needs none of them.
HIDE_MODULES = textwrap.dedent("""
    import sys
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "pycocotools", "yaml"):
                raise ImportError(name + " hidden for this test")
    sys.meta_path.insert(0, _Hide())
""")


@pytest.mark.parametrize("augment_in", ["thread", "loop"])
def test_gpu_train_smoke_on_cpu_without_ray(tmp_path, augment_in):
    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_train.py", "--device", "cpu", "--smoke", "--augment-in", augment_in],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any("img/s" in line for line in lines[:-1])  # the table comes first
    result = json.loads(lines[-1])
    assert result["device"] == "cpu" and result["smoke"] is True and result["augment_in"] == augment_in
    assert result["data_path"]["img_s"] > 0
    assert set(result["models"]) == {"compact_s", "ssdlite320_mobilenet_v3_large"}
    for name, m in result["models"].items():
        assert m["steps"] == result["steps"] and m["img_s"] > 0, name
        assert 0.0 <= m["queue_wait_frac"] <= m["data_wait_frac"] <= 1.0, name
        assert m["host_syncs_per_step"] is None and m["peak_mem_gib"] is None, name  # n/a on CPU
        assert m["loss"] == m["loss"] and m["loss"] > 0, name  # finite, not NaN
