"""The repository lock: re-entrant across the threads of one process, exclusive between processes,
and a waiter that gives up names the holder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from components.errors import LockError
from components.lock import HOLDER_FILE, holder, repo_lock
from tests.helpers import ROOT


def test_threads_of_the_holding_process_enter_again_without_waiting(tmp_path):
    entered = []

    def task() -> None:  # a Prefect task on a worker thread calling ingest in-process
        with repo_lock(tmp_path, "ingest", timeout=0):
            entered.append(holder(tmp_path)["command"])

    with repo_lock(tmp_path, "retrain", timeout=0):
        thread = threading.Thread(target=task)
        thread.start()
        thread.join(timeout=10)
        assert entered == ["rsllm retrain"]  # the sidecar still names the outer holder
    assert not (tmp_path / HOLDER_FILE).exists()


def test_another_process_waits_then_fails_naming_the_holder_and_gets_it_once_free(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from components.lock import repo_lock\n"
        "with repo_lock(Path(sys.argv[1]), 'gc', timeout=0):\n"
        "    print('held', flush=True); sys.stdin.readline()\n"
    )
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"pid {other.pid} \(rsllm gc, since .*waited 0.2 s"):
            repo_lock(tmp_path, "ingest", timeout=0.2).__enter__()
    finally:
        other.communicate("\n", timeout=30)
    with repo_lock(tmp_path, "ingest", timeout=5):
        assert holder(tmp_path)["pid"] == os.getpid()
