import os

import pytest

from megatiny.fsutil import atomic_path, atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_text(str(path), "old")
    atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_text() == "new"
    assert os.listdir(path.parent) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_text(str(path), "complete")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(str(path), crash)
    assert path.read_text() == "complete"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_path(str(path)) as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"png")
    assert path.read_bytes() == b"png"
