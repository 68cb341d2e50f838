"""Intake as a transaction, with real git + DVC (and a real local DVC remote) in temp folders: a kill
or a failure at each step is rolled back or completed, a failed push leaves no tag, DVC's own lock is
waited for, a mixed batch, the manifest's order, and a fresh clone that runs `dvc repro` as it is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import transaction, versioning
from components.config import load_settings
from components.data import replay_week
from components.ingest import ingest
from tests.helpers import make_project, rsllm, sh, synthetic_params, tool_env, tree_digest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def versioned(tmp_path_factory) -> Path:
    """A checkout whose data stages ran through `dvc repro` and were committed (built once)."""
    root = tmp_path_factory.mktemp("versioned")
    project = make_project(root / "project", synthetic_params(root / "source"))
    sh([DVC, "repro", "-q", "prepare"], project)
    sh(["git", "add", "-A"], project)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first repro"], project)
    return project


@pytest.fixture
def repo(versioned, tmp_path) -> Path:
    dest = tmp_path / "project"
    shutil.copytree(versioned, dest, symlinks=True)
    return dest


def week(repo: Path, name: str | None = None) -> Path:
    """The next held-back week as a drop in data/incoming (renamed to `name` if given)."""
    s = load_settings(repo / "params.yaml")
    out = replay_week(s, repo / "data/fetched", repo / "data/raw", repo / "data/incoming")
    path = repo / out["drop"]
    return path.rename(path.with_name(name)) if name else path


def record(repo: Path) -> dict:
    """What must be exactly as before after a rollback: the data, the data record, git's HEAD and tags."""
    files = {f: (repo / f).read_bytes() for f in versioning.VERSIONED_FILES if (repo / f).exists()}
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout
    return tree_digest(repo / "data/raw", repo / "data/accepted") | files | {"head": head, "tags": tags(repo)}


def tags(repo: Path) -> list[str]:
    return versioning.existing_tags(repo)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.splitlines()[-1])


def ingest_with_fault(repo: Path, fault: str) -> subprocess.CompletedProcess:
    env = tool_env() | {transaction.FAULT_ENV: fault}
    return subprocess.run(
        [sys.executable, "-m", "components.cli", "ingest"], cwd=repo, capture_output=True, text=True, env=env
    )


def test_a_kill_before_the_push_is_rolled_back_and_the_drop_accepted_by_the_next_run(repo):
    drop = week(repo)
    before = record(repo)
    killed = ingest_with_fault(repo, "kill:merged")
    assert killed.returncode == -9, killed.stderr
    assert transaction.pending(repo)["step"] == "merged"  # half done: staged, merged, not pushed
    assert drop.exists() and (repo / "data/accepted" / f"{drop.stem}.parquet").exists()

    again = last_json(rsllm(["ingest"], repo))
    assert again["recovered"] == {"action": "rolled back", "drops": [drop.name], "step": "merged"}
    assert again["version"]["version"] == "data/v1" and [a["drop"] for a in again["accepted"]] == [drop.name]
    assert not drop.exists() and (repo / "data/archive" / drop.name).exists()
    assert transaction.pending(repo) is None and record(repo) != before
    lines = (repo / "data/manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["drop"] for line in lines] == [drop.name]  # once, not twice


def test_a_kill_after_the_push_is_completed_by_the_next_run(repo):
    drop = week(repo)
    killed = ingest_with_fault(repo, "kill:pushed")
    assert killed.returncode == -9 and tags(repo) == []  # pushed, neither committed nor tagged
    assert drop.exists()  # still waiting: not versioned yet
    again = last_json(rsllm(["ingest"], repo))
    assert again["recovered"] == {"action": "completed", "drops": [drop.name], "version": "data/v1"}
    assert again["accepted"] == [] and again["message"].startswith("no drops waiting")
    assert tags(repo) == ["data/v1"] and not drop.exists()
    changed = sh(["git", "show", "--name-only", "--format=", "data/v1^{commit}"], repo).stdout.split()
    assert "data/manifest.jsonl" in changed and set(changed) <= set(versioning.VERSIONED_FILES)
    assert sh(["git", "status", "--porcelain", "--", *versioning.VERSIONED_FILES], repo).stdout == ""


def test_a_failure_after_the_commit_is_undone_and_the_drop_waits(repo, monkeypatch):
    drop = week(repo)
    before = record(repo)
    monkeypatch.setenv(transaction.FAULT_ENV, "fail:committed")
    result = ingest(load_settings(repo / "params.yaml"), None, repo)
    assert result["waiting"] == [drop.name] and result["accepted"] == [] and result["version"] is None
    assert "injected failure after step 'committed'" in result["error"]
    assert record(repo) == before  # the commit was undone, the data record and data/raw as they were
    assert drop.exists() and not (repo / "data/archive").exists() and transaction.pending(repo) is None


def test_a_failed_push_leaves_no_tag_a_clear_error_and_the_drop_waiting(repo, tmp_path):
    not_a_folder = tmp_path / "remote-is-a-file"
    not_a_folder.write_text("not a folder\n")
    sh([DVC, "remote", "modify", "--local", "local", "url", str(not_a_folder)], repo)
    drop = week(repo)
    before = record(repo)
    proc = rsllm(["ingest"], repo, check=False)
    assert proc.returncode == 1
    assert "the data is not in the DVC remote, so no version was recorded" in proc.stderr
    result = last_json(proc)
    assert result["waiting"] == [drop.name] and result["version"] is None
    assert tags(repo) == [] and record(repo) == before and drop.exists()


def test_dvc_lock_held_by_another_process_is_waited_for_within_params_lock_dvc(repo):
    drop = week(repo)
    holder = hold_dvc_lock(
        repo, "after-staged"
    )  # released 8 s after ingest staged: DVC alone gives up at 3 s
    result = last_json(rsllm(["ingest"], repo))  # params lock.dvc is 300 s
    holder.wait(timeout=60)
    assert result["version"]["version"] == "data/v1" and not drop.exists()

    params = yaml.safe_load((repo / "params.yaml").read_text()) | {"lock": {"dvc": 1}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "lock.dvc 1"], repo)
    drop = week(repo)
    before = record(repo)
    holder = hold_dvc_lock(repo, "until-killed")
    try:
        proc = rsllm(["ingest"], repo, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1 and "held DVC's lock for over 1 s (params lock.dvc)" in proc.stderr
    assert last_json(proc)["waiting"] == [drop.name] and record(repo) == before and drop.exists()


HOLD_DVC_LOCK = """
import json, sys, time, zc.lockfile
lock = zc.lockfile.LockFile(".dvc/tmp/lock")
print("held", flush=True)
if sys.argv[1] == "until-killed":
    time.sleep(3600)
for _ in range(3000):  # until the ingest has staged its drop and is about to call DVC
    time.sleep(0.1)
    try:
        if json.load(open("data/incoming/.intake/journal.json"))["step"] == "staged":
            break
    except (OSError, ValueError):
        pass
time.sleep(8)
"""


def hold_dvc_lock(repo: Path, how: str) -> subprocess.Popen:
    """Another process holding DVC's own repository lock (as a second `dvc` command would)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, how],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        env=tool_env(),
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_mixed_batch_versions_the_good_drop_and_merge_follows_the_manifest(repo):
    late = week(repo, "z-late.parquet")  # sorts last by name, but is accepted first
    bad = pd.read_parquet(late).head(20).assign(rating=7.0)
    bad.to_csv(repo / "data/incoming/bad.csv", index=False)
    proc = rsllm(["ingest"], repo, check=False)
    assert proc.returncode == 1  # a drop was quarantined
    result = last_json(proc)
    assert [a["drop"] for a in result["accepted"]] == ["z-late.parquet"]
    assert [r["drop"] for r in result["rejected"]] == ["bad.csv"] and result["version"][
        "version"
    ] == "data/v1"
    assert list((repo / "data/quarantine").glob("*bad.reason.json"))

    early = week(repo, "a-early.parquet")
    assert last_json(rsllm(["ingest"], repo))["version"]["version"] == "data/v2"
    entries = [json.loads(line) for line in (repo / "data/manifest.jsonl").read_text().splitlines()]
    assert [e["drop"] for e in entries] == ["z-late.parquet", early.name]
    assert all(len(e["sha256"]) == 64 and e["rows"] > 0 and e["accepted_at"] for e in entries)
    merged = json.loads((repo / "reports/merge.json").read_text())["drops"]
    assert [d["drop"] for d in merged] == ["z-late.parquet", "a-early.parquet"]  # manifest order
    assert tags(repo) == ["data/v1", "data/v2"]
    assert sh(["git", "status", "--porcelain", "--", *versioning.VERSIONED_FILES], repo).stdout == ""


def test_a_content_fault_first_seen_at_merge_quarantines_the_drop_at_fault(repo):
    """Two drops that each pass judging, but together with data/raw one breaks the whole-data suite
    (validate.max_rows): it is quarantined, the other versioned, and nothing is left waiting."""
    rows = len(pd.read_parquet(repo / "data/raw/interactions.parquet"))
    small = week(repo, "a-small.parquet")
    pd.read_parquet(small).head(3).to_parquet(small, index=False)
    big = week(repo, "b-big.parquet")
    assert len(pd.read_parquet(big)) > 3
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["validate"]["max_rows"] = rows + 3  # room for the small drop only
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "max_rows"], repo)

    proc = rsllm(["ingest"], repo, check=False)
    assert proc.returncode == 1  # a drop was quarantined
    result = last_json(proc)
    assert [a["drop"] for a in result["accepted"]] == ["a-small.parquet"]
    assert [r["drop"] for r in result["rejected"]] == ["b-big.parquet"] and result["waiting"] == []
    assert result["version"]["version"] == "data/v1" and tags(repo) == ["data/v1"]
    reason = json.loads(next((repo / "data/quarantine").glob("*b-big.reason.json")).read_text())
    assert reason["expectation"] == "drop merges" and "rejected when merged" in reason["message"]
    assert not big.exists() and not small.exists() and transaction.pending(repo) is None
    assert rows < len(pd.read_parquet(repo / "data/raw/interactions.parquet")) <= rows + 3
    entries = [json.loads(line)["drop"] for line in (repo / "data/manifest.jsonl").read_text().splitlines()]
    assert entries == ["a-small.parquet"]


def test_a_fresh_clone_runs_dvc_repro_as_it_is_and_gets_the_data_docs(versioned, tmp_path):
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(versioned), str(clone)], tmp_path)
    assert not (clone / "data/accepted").exists() and not (clone / "reports/validation/docs").exists()
    out = sh([DVC, "repro", "prepare"], clone).stdout
    assert "missing data" not in out
    assert "Running stage 'data/dvc.yaml:validate'" in out
    assert (clone / "reports/validation/docs/index.html").exists()
    assert (clone / "data/prepared/test.parquet").exists()
    # a drop judged afterwards writes its docs beside them, not over them (the stage owns docs/)
    drop = week(clone)
    rsllm(["validate", str(drop.relative_to(clone))], clone)
    assert (clone / "reports/validation/drops/index.html").exists()
    assert (clone / "reports/validation/docs/index.html").exists()


HOLD_REPO_LOCK = """
import time
from pathlib import Path
from components.lock import repo_lock
with repo_lock(Path("."), "retrain", timeout=0):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_waits_its_timeout_then_fails_naming_the_holder(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["lock"] = {"ingest": 1, "restore": 1, "promote": 1}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    drop = week(repo)
    before = record(repo)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_REPO_LOCK], cwd=repo, stdout=subprocess.PIPE, text=True, env=tool_env()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for args, command in (
            (["ingest"], "ingest"),
            (["data", "restore", "data/v1"], "restore"),
            (["promote", "rsllm:x"], "promote"),
        ):
            proc = rsllm(args, repo, check=False)
            assert proc.returncode == 1 and "LockError" in proc.stderr, proc.stderr
            assert f"pid {holder.pid} (rsllm retrain, since" in proc.stderr
            assert f"`rsllm {command}` waited 1 s (params lock.{command})" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert drop.exists() and record(repo) == before and transaction.pending(repo) is None
