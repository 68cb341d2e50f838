"""Data versions with DVC + git, the way DVC's docs teach.

A version is a git commit that touches only the data record (VERSIONED_FILES: the data stages' own
lock data/dvc.lock, the data/accepted.dvc pointer, the acceptance manifest and the two small stage
reports), made with a fixed author identity so it works in a clean clone with no git user
configured, and tagged `data/vN` (annotated; its message is a JSON line with the figures) only after
its data is in the DVC remote. Any version reads back later with
`dvc.api.open(path, rev="data/vN")` or is restored into the work tree with `restore`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from components.errors import RsllmError, VersioningError
from components.lock import lock_settings, repo_lock

log = logging.getLogger(__name__)

# The data stages' lock, the .dvc pointer, the manifest, and the small reports merge and validate write.
VERSIONED_FILES = (
    "data/dvc.lock",
    "data/accepted.dvc",
    "data/manifest.jsonl",
    "reports/merge.json",
    "reports/validation/summary.json",
)
DATA_STAGES = "data/dvc.yaml"  # fetch, merge, validate: `dvc repro data/dvc.yaml:validate` runs them
# A version is only restorable if the pipeline definition it ran with is committed too.
MUST_BE_COMMITTED = ("dvc.yaml", DATA_STAGES, "params.yaml")
DVC_LOCKED = "Unable to acquire lock"  # DVC's message when another DVC process holds its lock
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


def run(cmd: list[str], repo: Path, *, extra_env: dict | None = None, combined: bool = False) -> str:
    """Run git or dvc in `repo`; a failure raises VersioningError with the tool's own message.
    `combined`: stderr joins stdout (a `dvc repro` whose stage output should stay in order).

    A DVC call that finds DVC's own lock held tries again for up to params `lock.dvc` seconds
    (DVC itself gives up after 3 s; its `--wait-for-lock` would wait forever). Call DVC without
    `-q`: that hides its error messages too (the output is captured anyway)."""
    exe = [sys.executable, "-m", "dvc", *cmd[1:]] if cmd[0] == "dvc" else cmd
    deadline, wait = None, 0.0
    while True:
        proc = subprocess.run(
            exe,
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if combined else subprocess.PIPE,
            text=True,
            env=tool_env() | (extra_env or {}),
        )
        if proc.returncode == 0:
            return proc.stdout
        err = proc.stderr or ""
        tail = (err.strip() or proc.stdout.strip())[-1500:]
        if cmd[0] == "dvc" and DVC_LOCKED in err + proc.stdout:
            if deadline is None:
                wait = lock_settings(repo).dvc
                deadline = time.monotonic() + wait
            if time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise VersioningError(
                f"`{' '.join(cmd)}` in {repo}: another DVC process held DVC's lock for over "
                f"{wait:g} s (params lock.dvc): {tail}"
            )
        raise VersioningError(f"`{' '.join(cmd)}` failed in {repo}: {tail}")


def check_committable(repo: Path) -> None:
    """Refuse to version when the pipeline definition or the tracked data pointer has local edits."""
    watched = [*MUST_BE_COMMITTED, "data/accepted.dvc", "data/manifest.jsonl"]
    status = run(["git", "status", "--porcelain", "--untracked-files=no", "--", *watched], repo)
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


def next_tag(repo: Path) -> str:
    """The next free data/vN."""
    tags = existing_tags(repo)
    return f"{TAG_PREFIX}{int(tags[-1][len(TAG_PREFIX) :]) + 1 if tags else 1}"


def push_data(repo: Path) -> None:
    """`dvc push` of the data only (accepted drops + the data stages' outputs); a clear error if not."""
    try:
        run(["dvc", "push", "data/accepted.dvc", DATA_STAGES], repo)
    except VersioningError as e:
        raise VersioningError(f"the data is not in the DVC remote, so no version was recorded: {e}") from None


def commit_version(repo: Path, info: dict) -> None:
    """Commit VERSIONED_FILES (the data record only), when they changed, by the fixed identity."""
    files = [f for f in VERSIONED_FILES if (repo / f).exists()]
    run(["git", "add", "--", *files], repo)
    if run(["git", "diff", "--cached", "--name-only", "--", *files], repo).split():
        message = f"data: {info['version']} ({info['rows']} interactions)"
        run(["git", "commit", "--no-verify", "-q", "-m", message, "--", *files], repo, extra_env=IDENTITY)


def tag_version(repo: Path, info: dict) -> None:
    """The annotated tag data/vN on HEAD; its message is the version's figures as one JSON line."""
    run(
        ["git", "tag", "-a", info["version"], "-m", json.dumps(info, sort_keys=True)],
        repo,
        extra_env=IDENTITY,
    )


def version_info(repo: Path, tag: str, note: str) -> dict:
    return snapshot_figures(repo) | {
        "version": tag,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "note": note,
    }


def record_version(repo: Path, note: str = "", push: bool = True, check: bool = True) -> dict:
    """Push the data, commit the data record, then tag it data/vN (so a tag's data is in the remote).

    `check=False` when the caller checked before it changed the data record itself. `push=False`
    (`rsllm data record --no-push`) is for a checkout without a remote: that version is local only.
    """
    repo = Path(repo)
    with repo_lock(repo, "ingest"):
        if check:
            check_committable(repo)
        info = version_info(repo, next_tag(repo), note)
        if push:
            push_data(repo)
        commit_version(repo, info)
        tag_version(repo, info)
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
    with repo_lock(repo, "restore"):
        return _restore(repo, version)


def _restore(repo: Path, version: str) -> dict:
    _known(repo, version)
    files = [
        f for f in VERSIONED_FILES if run(["git", "ls-tree", "--name-only", version, "--", f], repo).strip()
    ]
    run(["git", "checkout", version, "--", *files], repo)
    run(["git", "reset", "-q", "--", *files], repo)  # leave them as plain work-tree edits, nothing staged
    try:
        run(["dvc", "checkout", "data/accepted.dvc", f"{DATA_STAGES}:merge"], repo)
    except VersioningError:
        run(["dvc", "pull", "data/accepted.dvc", f"{DATA_STAGES}:merge"], repo)
    return {"restored": version} | snapshot_figures(repo)


def _known(repo: Path, version: str) -> None:
    if version not in existing_tags(repo):
        raise VersioningError(f"unknown data version {version!r}; known: {existing_tags(repo) or 'none'}")


# ---------------------------------------------------------------- the checkout's data version


def current_data_version(repo: Path) -> str | None:
    """The newest data/vN tag that points at HEAD or an ancestor of it (None before the first)."""
    for tag in reversed(existing_tags(repo)):
        proc = subprocess.run(["git", "merge-base", "--is-ancestor", tag, "HEAD"], cwd=repo)
        if proc.returncode == 0:
            return tag
    return None


def ensure_data_version(repo: Path) -> str | None:
    """The current data version; when there is none yet (first run), record the snapshot as one.

    Refused (logged, None returned) when the checkout has uncommitted pipeline edits.
    """
    version = current_data_version(repo)
    if version is None:
        try:
            version = record_version(repo, note="initial snapshot")["version"]
        except RsllmError as e:
            log.warning("the snapshot was not recorded as a data version: %s", e)
    return version


def git_commit(repo: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() or None
