"""Atomic output: a file is either its old content or its whole new content, never half-written."""

import json
import os
import stat

import pytest

from nerco_dist.atomic import atomic_path, write_json


def test_write_json_creates_missing_folders(tmp_path):
    target = tmp_path / "results" / "sweep" / "a.json"
    write_json(target, {"f1": 0.5, "语料": "微博"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"f1": 0.5, "语料": "微博"}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    write_json(tmp_path / "atomic.json", {})
    (tmp_path / "plain.json").write_text("{}")
    assert (tmp_path / "atomic.json").stat().st_mode == (tmp_path / "plain.json").stat().st_mode


def test_file_is_synced_before_the_rename_and_its_folder_after(tmp_path, monkeypatch):
    """Without the syncs a crash of the machine can leave the new name on an empty file."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recording_replace(src, dst):
        events.append("replace")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_json(tmp_path / "a.json", {"f1": 0.5})
    assert events == ["fsync file", "replace", "fsync folder"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"f1": 0.5}
