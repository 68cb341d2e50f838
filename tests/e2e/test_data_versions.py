"""The data half end to end with real git + DVC: repro, ingest two weeks, versions, restore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components import versioning
from components.errors import VersioningError
from tests.helpers import make_project, rsllm, sh, synthetic_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def dvc(args: list[str], cwd: Path):
    return sh([str(Path(versioning.sys.executable).parent / "dvc"), *args], cwd)


@pytest.fixture
def repo(tmp_path) -> Path:
    project = make_project(tmp_path / "project", synthetic_params(tmp_path / "source"))
    dvc(["repro", "prepare"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first repro"], project)
    return project


def test_repro_twice_is_a_noop_the_second_time(repo):
    out = dvc(["repro", "prepare"], repo).stdout
    assert "Running stage" not in out
    assert "up to date" in out
    assert sh(["git", "status", "--porcelain"], repo).stdout.strip() == ""


def test_ingest_two_weeks_then_restore_the_first_version(repo):
    rsllm(["replay-week"], repo)
    first = json.loads(rsllm(["ingest"], repo).stdout.splitlines()[-1])
    assert first["version"]["version"] == "data/v1" and len(first["accepted"]) == 1
    raw_v1 = (repo / "data/raw/interactions.parquet").read_bytes()

    rsllm(["replay-week"], repo)
    second = json.loads(rsllm(["ingest"], repo).stdout.splitlines()[-1])
    assert second["version"]["version"] == "data/v2"
    assert second["version"]["rows"] > first["version"]["rows"]
    assert (repo / "data/raw/interactions.parquet").read_bytes() != raw_v1

    # each version is a commit touching only the data record, by the fixed identity, on a tag
    changed = sh(["git", "show", "--name-only", "--format=%an", "data/v2^{commit}"], repo).stdout.split()
    assert changed[0] == "rsllm-ops"
    assert set(changed[1:]) <= set(versioning.VERSIONED_FILES)
    assert "data/dvc.lock" in changed and "dvc.lock" not in changed  # the data stages' lock only
    versions = versioning.list_versions(repo)
    assert [v["version"] for v in versions] == ["data/v1", "data/v2"]
    assert versions[0]["rows"] == first["version"]["rows"]

    # readable later through dvc.api at that tag, and restorable into the work tree
    assert versioning.read_version_file(repo, "data/v1", "data/raw/interactions.parquet") == raw_v1
    restored = json.loads(rsllm(["data", "restore", "data/v1"], repo).stdout.splitlines()[-1])
    assert restored["rows"] == first["version"]["rows"]
    assert (repo / "data/raw/interactions.parquet").read_bytes() == raw_v1
    assert sorted(p.name for p in (repo / "data/accepted").iterdir()) == [first["accepted"][0]["drop"]]
    # the data reached the remote (a local folder by default)
    assert any((repo / ".dvc-storage").rglob("*"))


def test_version_refused_when_pipeline_definition_has_local_edits(repo):
    with open(repo / "params.yaml", "a") as fh:
        fh.write("\n# local edit\n")
    rsllm(["replay-week"], repo)
    proc = rsllm(["ingest"], repo, check=False)
    assert proc.returncode == 1
    assert "VersioningError" in proc.stderr and "params.yaml" in proc.stderr
    assert list((repo / "data/incoming").iterdir())  # the drop still waits; nothing moved
    assert versioning.existing_tags(repo) == []
    with pytest.raises(VersioningError, match="unknown data version"):
        versioning.restore(repo, "data/v9")


def test_a_failed_stage_gets_its_last_good_outputs_back(repo):
    from components.pipeline import StageFailed, repro_stage
    from tests.helpers import tree_digest

    before = tree_digest(repo / "data/prepared")
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("num_candidates: 20", "num_candidates: 1000"))
    with pytest.raises(StageFailed, match="stage 'prepare' failed; its last good outputs were restored"):
        repro_stage(repo, "prepare")  # dvc deleted data/prepared before running the stage
    assert tree_digest(repo / "data/prepared") == before
