"""A real Prefect server for tests: `prefect server start` on 127.0.0.1, a free port, a temp PREFECT_HOME
and a SQLite database inside it. Session-scoped: started once, stopped at the end.

Use it from any test module:

    from tests.prefect_server import prefect_server  # noqa: F401  (the fixture)

    def test_something(prefect_server):
        subprocess.run([...], env=prefect_server.env)     # CLI / flows in subprocesses talk to it
        prefect_server.post("/flow_runs/filter", {...})   # REST calls from the test itself
        with prefect_server.settings():                   # in-process Prefect client calls
            ...

The server's log is in `prefect_server.log` (printed when it fails to start).

Each test module that imports the fixture gets a server of its own (pytest registers the fixture per
module): modules deploy the same deployment names and automations, which must not meet. Keep it so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectServer:
    url: str  # the API URL, e.g. http://127.0.0.1:PORT/api
    home: Path
    env: dict  # os.environ plus PREFECT_API_URL / PREFECT_HOME: pass to subprocesses
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, body: dict | None = None) -> httpx.Response:
        response = httpx.post(self.url + path, json=body or {}, timeout=30)
        response.raise_for_status()
        return response

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point in-process Prefect clients at this server for the duration of the block."""
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.url, PREFECT_HOME: str(self.home)}):
            yield


def server_env(home: Path, url: str) -> dict:
    """The environment of the server and of every Prefect process that talks to it."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
    )
    env.pop("PREFECT_PROFILE", None)
    return env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """Start `prefect server start` on a free port with its own home and database; stop it at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(home, url)
    log = home / "server.log"
    prefect = str(Path(sys.executable).parent / "prefect")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield PrefectServer(url=url, home=home, env=env, log=log)
    finally:  # the server runs uvicorn in child processes: stop its whole process group (ours alone)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
