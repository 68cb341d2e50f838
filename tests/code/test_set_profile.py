"""The retrain flow's `profile` parameter: only a name under `profiles`, checked before any change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.config import load_settings
from components.errors import ConfigError
from components.pipeline import set_profile
from tests.helpers import ROOT, sh


@pytest.fixture
def repo(tmp_path) -> Path:
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    sh(["git", "init", "-q", "-b", "main"], tmp_path)
    sh(["git", "add", "params.yaml"], tmp_path)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "params"], tmp_path)
    return tmp_path


def commits(repo: Path) -> int:
    return int(sh(["git", "rev-list", "--count", "HEAD"], repo).stdout)


@pytest.mark.parametrize(
    "profile",
    ["full\ngate: {min: {}, tolerance: {}}", "nonexistent", "demo # comment", "medium\n", "profiles", ""],
)
def test_anything_but_a_profile_name_is_rejected_before_params_change(repo, profile):
    before = (repo / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match="is not one of profiles") as info:
        set_profile(repo, profile)
    assert "params.yaml" in str(info.value) and "'medium'" in str(info.value)  # names the valid ones
    assert (repo / "params.yaml").read_bytes() == before and commits(repo) == 1


def test_a_profile_name_is_switched_and_committed(repo):
    gate = load_settings(repo / "params.yaml").gate
    assert set_profile(repo, "medium") is True
    settings = load_settings(repo / "params.yaml")
    assert settings.profile == "medium" and settings.gate != gate and settings.gate.min  # medium's own gate
    assert commits(repo) == 2 and sh(["git", "status", "--porcelain"], repo).stdout == ""
    assert set_profile(repo, "medium") is False and commits(repo) == 2
