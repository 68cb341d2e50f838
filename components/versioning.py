"""Data versions with DVC + git, the way DVC's docs teach.

A version is a git commit that touches only `dvc.lock` and `data/accepted.dvc`, tagged `data/vN`
(annotated; its message is a JSON line with the figures), made with a fixed author identity so it
works in a clean clone with no git user configured, and pushed to the DVC remote. Any version reads
back later with `dvc.api.open(path, rev="data/vN")` or is restored into the work tree with `restore`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from components.errors import VersioningError

# dvc.lock + the .dvc pointer, plus the small git-tracked reports the merge and validate stages write.
VERSIONED_FILES = ("dvc.lock", "data/accepted.dvc", "reports/merge.json", "reports/validation/summary.json")
# A version is only restorable if the pipeline definition it ran with is committed too.
MUST_BE_COMMITTED = ("dvc.yaml", "params.yaml")
TAG_PREFIX = "data/v"
IDENTITY = {
    "GIT_AUTHOR_NAME": "rsllm-ops",
    "GIT_AUTHOR_EMAIL": "rsllm-ops@localhost",
    "GIT_COMMITTER_NAME": "rsllm-ops",
    "GIT_COMMITTER_EMAIL": "rsllm-ops@localhost",
}


def tool_env() -> dict:
    """Environment for git/dvc subprocesses: the venv's bin first, so dvc stages find `rsllm`."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run(cmd: list[str], repo: Path, *, extra_env: dict | None = None) -> str:
    """Run git or dvc in `repo`; a failure raises VersioningError with the tool's own message."""
    exe = [sys.executable, "-m", "dvc", *cmd[1:]] if cmd[0] == "dvc" else cmd
    proc = subprocess.run(exe, cwd=repo, capture_output=True, text=True, env=tool_env() | (extra_env or {}))
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise VersioningError(f"`{' '.join(cmd)}` failed in {repo}: {tail}")
    return proc.stdout


def check_committable(repo: Path) -> None:
    """Refuse to version when the pipeline definition or the tracked data pointer has local edits."""
    status = run(["git", "status", "--porcelain", "--", *MUST_BE_COMMITTED, "data/accepted.dvc"], repo)
    dirty = [line[3:] for line in status.splitlines() if line.strip()]
    if dirty:
        raise VersioningError(
            f"uncommitted local changes in {', '.join(dirty)}: commit or revert them first, so that the "
            "data version records a pipeline definition that can be checked out again"
        )


def existing_tags(repo: Path) -> list[str]:
    out = run(["git", "tag", "--list", f"{TAG_PREFIX}*"], repo)
    return sorted(
        (t for t in out.split() if t[len(TAG_PREFIX) :].isdigit()), key=lambda t: int(t[len(TAG_PREFIX) :])
    )


def snapshot_figures(repo: Path) -> dict:
    """Rows, users and items of data/raw, for the version's record."""
    inter = pd.read_parquet(repo / "data/raw/interactions.parquet", columns=["user_id", "item_id"])
    return {
        "rows": len(inter),
        "users": int(inter["user_id"].nunique()),
        "items": int(inter["item_id"].nunique()),
    }


def record_version(repo: Path, note: str = "", push: bool = True, check: bool = True) -> dict:
    """Commit dvc.lock + data/accepted.dvc, tag the commit data/vN, and push the data to the remote.

    `check=False` when the caller (ingest) checked before it changed data/accepted.dvc itself.
    """
    if check:
        check_committable(repo)
    tags = existing_tags(repo)
    tag = f"{TAG_PREFIX}{int(tags[-1][len(TAG_PREFIX) :]) + 1 if tags else 1}"
    info = snapshot_figures(repo) | {
        "version": tag,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": note,
    }
    files = [f for f in VERSIONED_FILES if (repo / f).exists()]
    run(["git", "add", "--", *files], repo)
    staged = run(["git", "diff", "--cached", "--name-only", "--", *files], repo).split()
    if staged:
        run(
            [
                "git",
                "commit",
                "--no-verify",
                "-q",
                "-m",
                f"data: {tag} ({info['rows']} interactions)",
                "--",
                *files,
            ],
            repo,
            extra_env=IDENTITY,
        )
    run(["git", "tag", "-a", tag, "-m", json.dumps(info, sort_keys=True)], repo, extra_env=IDENTITY)
    if push:
        run(["dvc", "push", "-q"], repo)
    info["commit"] = run(["git", "rev-parse", "HEAD"], repo).strip()
    return info


def list_versions(repo: Path) -> list[dict]:
    """Every data/vN tag with the figures recorded in its message."""
    versions = []
    for tag in existing_tags(repo):
        message = run(["git", "tag", "-l", "--format=%(contents)", tag], repo).strip()
        try:
            info = json.loads(message.splitlines()[0])
        except (json.JSONDecodeError, IndexError):
            info = {"version": tag, "note": message}
        info["commit"] = run(["git", "rev-list", "-n", "1", tag], repo).strip()
        versions.append(info)
    return versions


def print_versions(versions: list[dict]) -> None:
    table = Table(title="data versions")
    for col in ("version", "date", "rows", "users", "items", "commit", "note"):
        table.add_column(col)
    for v in versions:
        table.add_row(
            *(
                str(v.get(c, ""))[:12] if c == "commit" else str(v.get(c, ""))
                for c in ("version", "date", "rows", "users", "items", "commit", "note")
            )
        )
    Console().print(table)


def read_version_file(repo: Path, version: str, path: str) -> bytes:
    """The bytes of a DVC-tracked file (e.g. data/raw/interactions.parquet) as of `version`."""
    import dvc.api

    _known(repo, version)
    with dvc.api.open(path, repo=str(repo), rev=version, mode="rb") as fh:
        return fh.read()


def restore(repo: Path, version: str) -> dict:
    """Put data/accepted and data/raw of `version` back into the work tree (pulling if needed)."""
    _known(repo, version)
    files = [
        f for f in VERSIONED_FILES if run(["git", "ls-tree", "--name-only", version, "--", f], repo).strip()
    ]
    run(["git", "checkout", version, "--", *files], repo)
    run(["git", "reset", "-q", "--", *files], repo)  # leave them as plain work-tree edits, nothing staged
    try:
        run(["dvc", "checkout", "-q", "data/accepted.dvc", "merge"], repo)
    except VersioningError:
        run(["dvc", "pull", "-q", "data/accepted.dvc", "merge"], repo)
    return {"restored": version} | snapshot_figures(repo)


def _known(repo: Path, version: str) -> None:
    if version not in existing_tags(repo):
        raise VersioningError(f"unknown data version {version!r}; known: {existing_tags(repo) or 'none'}")
