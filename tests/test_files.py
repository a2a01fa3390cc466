"""minivl/files.py: an atomic text write leaves the old file or the whole new one, never a part or a stray temporary."""
import os

import pytest

from minivl.files import write_text_atomic


def test_writes_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "page.html"  # a missing directory is made
    assert write_text_atomic(path, "first é\n") == os.fspath(path)
    write_text_atomic(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert os.listdir(path.parent) == ["page.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # an ordinary new file's mode, as open() gives


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "vectors.json"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"not text")  # fails inside the write, after the temporary exists
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["vectors.json"]
