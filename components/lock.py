"""One file lock for every writer of the repository (ingest, the retrain flow, restore, promote,
rollback, gc), re-entrant within a process.

`.rsllm.lock` at the repo root is held with `filelock` (an OS lock: a killed holder releases it).
Its holder writes pid, command and start time into `.rsllm.lock.holder`, so a second writer that
gives up after its timeout (params `lock.<command>`) names who holds it. The lock is shared by every
thread of the holding process (`thread_local=False`): the flow holds it while Prefect runs its tasks
on other threads, and an ingest called from the flow enters again instead of waiting on itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, Field

from components.errors import LockError

LOCK_FILE = ".rsllm.lock"
HOLDER_FILE = ".rsllm.lock.holder"
_locks: dict[str, FileLock] = {}
_guard = threading.Lock()


class LockSettings(BaseModel):
    """Seconds a writer waits for the repository lock before it fails naming the holder (params `lock`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ingest: float = Field(900.0, ge=0, description="an ingest waits out another ingest or a restore")
    retrain: float = Field(7800.0, ge=0, description="a retrain waits out another retrain (~2 h)")
    restore: float = Field(60.0, ge=0)
    promote: float = Field(60.0, ge=0, description="promote and rollback")
    gc: float = Field(60.0, ge=0)
    dvc: float = Field(300.0, ge=0, description="a DVC call waits this long for DVC's own lock")


def lock_settings(repo: Path) -> LockSettings:
    """The `lock` section of the repo's params.yaml (defaults when there is no params.yaml)."""
    from components.config import load_settings

    params = Path(repo) / "params.yaml"
    return load_settings(params).lock if params.exists() else LockSettings()


def holder(repo: Path) -> dict:
    """What the holder wrote into the sidecar file ({} when none or unreadable)."""
    try:
        return json.loads((Path(repo) / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _lock_for(repo: Path) -> FileLock:
    path = str((Path(repo) / LOCK_FILE).resolve())
    with _guard:
        if path not in _locks:
            _locks[path] = FileLock(path, thread_local=False)
        return _locks[path]


@contextlib.contextmanager
def repo_lock(repo: Path, command: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the repository lock for `command`; wait up to `timeout` (default: params `lock.<command>`),
    then raise LockError naming the holder. Entering again in the same process never waits."""
    lock = _lock_for(repo)
    if not lock.is_locked:
        wait = getattr(lock_settings(repo), command) if timeout is None else timeout
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            h = holder(repo)
            who = f"pid {h.get('pid')} ({h.get('command')}, since {h.get('since')})" if h else "unknown"
            raise LockError(
                f"{Path(repo) / LOCK_FILE}: another writer holds the repository lock: {who}; "
                f"`rsllm {command}` waited {wait:g} s (params lock.{command}); try again when it is done"
            ) from None
    else:
        lock.acquire()
    try:
        if lock.lock_counter == 1:
            info = {
                "pid": os.getpid(),
                "command": f"rsllm {command}",
                "argv": " ".join(sys.argv)[:200],
                "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            (Path(repo) / HOLDER_FILE).write_text(json.dumps(info) + "\n")
        yield
    finally:
        if lock.lock_counter == 1:
            with contextlib.suppress(OSError):
                (Path(repo) / HOLDER_FILE).unlink()
        lock.release()
