"""Shard writer: exact schema, determinism, resume after an interrupted run, refusing to mix outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import shard, writer

IDS = [f"BloodImage_{i:05d}" for i in (1, 3, 4, 5, 8, 10, 11, 13, 14, 15)]


@pytest.fixture
def split(tmp_path) -> Path:
    p = tmp_path / "ids.txt"
    p.write_text("\n".join(IDS) + "\n")
    return p


def run(root, split, out, *extra) -> int:
    return shard.main(["--format", "voc", "--root", str(root), "--split-file", str(split), "--out", str(out),
                       "--size", "96", "--rows-per-shard", "4", *map(str, extra)])


def table(out: Path) -> pa.Table:
    m = json.loads((out / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["file"]) for s in m["shards"]])


def test_schema_is_the_contract(shared_data, split, tmp_path):
    out = tmp_path / "out"
    assert run(shared_data / "bccd", split, out, "--workers", 2) == 0
    schema = pq.read_schema(out / "part-00000.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("image_id", "int64"), ("file_name", "string"), ("jpeg", "binary"), ("width", "int32"),
        ("height", "int32"), ("orig_width", "int32"), ("orig_height", "int32"),
        ("boxes", "list<element: float>"), ("labels", "list<element: int32>"),
        ("iscrowd", "list<element: bool>")]
    m = json.loads((out / "manifest.json").read_text())
    assert m["shards"] == [{"file": f"part-0000{k}.parquet", "rows": n} for k, n in enumerate([4, 4, 2])]
    assert m["options"] == {"size": 96, "rows_per_shard": 4, "jpeg_quality": 90, "classes_from": None}
    assert m["source"]["format"] == "voc" and m["source"]["split_file"] == str(split)
    assert m["image_size"]["orig_width"] == {"min": 640, "max": 640, "mean": 640.0}
    assert not [p for p in out.rglob("*.tmp")]


def test_deterministic_and_independent_of_workers(shared_data, split, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(shared_data / "bccd", split, a, "--workers", 2) == 0
    assert run(shared_data / "bccd", split, b, "--workers", 1) == 0
    assert table(a).equals(table(b))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma == mb


def test_resume_after_interruption_gives_same_rows(shared_data, split, tmp_path):
    out = tmp_path / "out"
    assert run(shared_data / "bccd", split, out, "--workers", 2) == 0
    before = table(out)
    manifest = (out / "manifest.json").read_text()
    # Simulate a kill: last shard and its stats gone, middle shard truncated without stats,
    # leftover temp files, no manifest.
    (out / "part-00002.parquet").unlink()
    (out / writer.STATS_DIR / "part-00002.json").unlink()
    data = (out / "part-00001.parquet").read_bytes()
    (out / "part-00001.parquet").write_bytes(data[: len(data) // 3])
    (out / writer.STATS_DIR / "part-00001.json").unlink()
    (out / ".part-00002.parquet.tmp").write_bytes(b"half")
    (out / writer.STATS_DIR / ".part-00002.json.x.tmp").write_text("{")
    (out / "manifest.json").unlink()
    stamp = (out / "part-00000.parquet").stat().st_mtime_ns
    assert run(shared_data / "bccd", split, out, "--workers", 2) == 0
    assert table(out).equals(before)
    assert (out / "manifest.json").read_text() == manifest
    assert (out / "part-00000.parquet").stat().st_mtime_ns == stamp  # finished shard not redone
    assert not [p for p in out.rglob("*.tmp")]


def replicated_voc(bccd: Path, out: Path, copies: int) -> list[str]:
    """A VOC tree of `copies` renamed copies of every BCCD train image (real JPEG bytes, real XML
    with <filename> renamed): as many images as the full BCCD train split, from the fixture's few."""
    (out / "Annotations").mkdir(parents=True)
    (out / "JPEGImages").mkdir()
    ids = []
    for k in range(copies):
        for name in (bccd / "ImageSets" / "Main" / "train.txt").read_text().split():
            new = f"{name}_copy{k:02d}"
            xml = (bccd / "Annotations" / f"{name}.xml").read_text()
            assert f"<filename>{name}.jpg</filename>" in xml
            (out / "Annotations" / f"{new}.xml").write_text(
                xml.replace(f"<filename>{name}.jpg</filename>", f"<filename>{new}.jpg</filename>"))
            shutil.copyfile(bccd / "JPEGImages" / f"{name}.jpg", out / "JPEGImages" / f"{new}.jpg")
            ids.append(new)
    return ids


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_shards(shared_data, tmp_path):
    """A real `kill -9` of `python -m data_prep.shard` (and its workers) while it writes shards."""
    names = replicated_voc(shared_data / "bccd", tmp_path / "voc", copies=20)
    assert len(names) >= 200  # 25+ shards of 8: the run is still writing when the 3rd appears
    ids = tmp_path / "all.txt"
    ids.write_text("\n".join(names) + "\n")
    cmd = [sys.executable, "-m", "data_prep.shard", "--format", "voc", "--root", str(tmp_path / "voc"),
           "--split-file", str(ids), "--size", "160", "--rows-per-shard", "8", "--workers", "2"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(reference)], check=True, capture_output=True)

    proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its pool, as an OOM kill or kill -9 would
    proc.wait(timeout=30)
    written = len(list(killed.glob("part-*.parquet")))
    assert not (killed / "manifest.json").exists() and written < len(list(reference.glob("part-*.parquet")))

    subprocess.run([*cmd, "--out", str(killed)], check=True, capture_output=True)
    assert table(killed).equals(table(reference))
    assert (killed / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    assert not [p for p in killed.rglob("*.tmp")]


def test_refuses_other_options_or_foreign_shards(shared_data, split, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(shared_data / "bccd", split, out, "--workers", 1) == 0
    before = table(out)
    capsys.readouterr()
    assert shard.main(["--format", "voc", "--root", str(shared_data / "bccd"), "--split-file", str(split),
                       "--out", str(out), "--size", "128", "--rows-per-shard", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another source or with other options" in err
    assert table(out).equals(before)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-00000.parquet").write_bytes(b"x")
    assert run(shared_data / "bccd", split, foreign) == 2
    assert "unknown origin" in capsys.readouterr().err
    assert (foreign / "part-00000.parquet").read_bytes() == b"x"


def test_changed_records_under_same_config_refused(shared_data, split, tmp_path, capsys):
    """A stats file whose input digest differs (annotations edited under a kept config) is not reused."""
    out = tmp_path / "out"
    assert run(shared_data / "bccd", split, out, "--workers", 1) == 0
    stats = out / writer.STATS_DIR / "part-00001.json"
    s = json.loads(stats.read_text())
    s["digest"] = "0" * 64
    stats.write_text(json.dumps(s))
    capsys.readouterr()
    assert run(shared_data / "bccd", split, out, "--workers", 1) == 2
    assert "part-00001 was made from different input records" in capsys.readouterr().err
