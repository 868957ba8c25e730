"""Atomic writes by value: the old file or the whole new one, no temporary left behind on failure,
flushed to disk before the rename, and the JSON format of every record e2kd writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from e2kd import storage


@pytest.mark.parametrize(
    "write, read",
    [
        (lambda p, v: storage.atomic_write_bytes(p, v.encode()), lambda p: p.read_text()),
        (lambda p, v: storage.atomic_write_text(p, v), lambda p: p.read_text()),
        (lambda p, v: storage.atomic_torch_save({"v": v}, p), lambda p: torch.load(p)["v"]),
    ],
    ids=["bytes", "text", "torch"],
)
def test_atomic_writes_leave_the_old_file_and_no_temporary_when_they_fail(tmp_path, monkeypatch, write, read):
    path = tmp_path / "sub" / "dir" / "file"  # folders made as needed
    write(path, "old")
    assert read(path) == "old" and sorted(p.name for p in path.parent.iterdir()) == ["file"]

    def failing_replace(src, dst):
        assert Path(src).parent == path.parent and Path(src).name.startswith(".file.") and src.endswith(".tmp")
        assert Path(src).is_file()  # the whole new content is written before it replaces the old
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write(path, "new")
    assert read(path) == "old" and sorted(p.name for p in path.parent.iterdir()) == ["file"]


def test_atomic_bytes_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    storage.atomic_write_bytes(tmp_path / "f", b"x")
    assert events == ["fsync", "replace"] and (tmp_path / "f").read_bytes() == b"x"


def test_json_is_indented_in_insertion_order_with_paths_as_text(tmp_path):
    storage.atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [Path("/x/y")]})
    assert (tmp_path / "a.json").read_text() == '{\n  "b": 1,\n  "a": [\n    "/x/y"\n  ]\n}\n'
