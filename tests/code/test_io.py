"""Atomic writes: all or nothing, ordinary permissions, stale temp folders cleaned."""

import os
import stat

import pytest

from components.io import atomic_dir, atomic_file, write_json_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o055  # readable by others, not 0700


def test_stale_temp_folder_of_a_killed_writer_is_removed(tmp_path):
    (tmp_path / ".model.tmp-dead").mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_file_and_json(tmp_path):
    with pytest.raises(ValueError), atomic_file(tmp_path / "a.bin") as fh:
        fh.write(b"partial")
        raise ValueError
    assert not (tmp_path / "a.bin").exists() and not list(tmp_path.iterdir())
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert stat.S_IMODE(os.stat(tmp_path / "m.json").st_mode) & 0o044


def test_stale_temp_file_of_a_killed_writer_is_removed(tmp_path):
    stale = tmp_path / ".pointer.json.tmp-killed"
    stale.write_text('{"half": ')  # what SIGKILL mid-write leaves
    other = tmp_path / ".other.json.tmp-keep"  # another target's temp file is not touched
    other.write_text("{}")
    write_json_atomic(tmp_path / "pointer.json", {"ok": True})
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-keep", "pointer.json"]
