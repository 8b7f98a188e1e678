"""data_prep.atomic: whole file or old file, hidden temp name, nothing left behind on errors."""

import os
import stat

import pytest

from data_prep.atomic import atomic_file, atomic_path, write_bytes_atomic, write_text_atomic


def test_writes_replace_and_leave_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    write_text_atomic(path, "one")
    write_bytes_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_error_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    seen = []
    with pytest.raises(error), atomic_file(path) as fh:
        fh.write(b"half")
        seen.extend(os.listdir(tmp_path))
        raise error
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    assert any(n.startswith(".a.bin.") and n.endswith(".tmp") for n in seen)


def test_atomic_path_for_writers_that_want_a_name(tmp_path):
    out = tmp_path / "model.onnx"
    with atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_bytes(b"graph")
    assert out.read_bytes() == b"graph" and os.listdir(tmp_path) == ["model.onnx"]
