"""Alerts end to end on a real `prefect server start` (tests/prefect_server.py), no mocks of Prefect:
the drift-check deployment from prefect.yaml, `rsllm alerts setup`, the rsllm-drift flow on a normal and a
shifted ml-100k week, a small HTTP listener as the person's webhook, and the weekly-retrain deployment.

flows/retrain.py (issue 5) is not required here: a placeholder flow named `rsllm` is deployed as
`weekly-retrain`; the automation only needs the deployment's name, and a failing run of flow `rsllm`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import alerts
from tests.data.test_drift import shifted_week
from tests.helpers import ROOT, make_project, rsllm
from tests.prefect_server import PrefectServer, prefect_server  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLACEHOLDER = '''"""Placeholder of flows/retrain.py: a flow named `rsllm` deployed as `weekly-retrain`."""
import sys
from pathlib import Path

from prefect import flow


@flow(name="rsllm")
def retrain(fail: bool = False) -> None:
    if fail:
        raise RuntimeError("gate rejected the candidate (placeholder)")


if __name__ == "__main__":
    if sys.argv[1:] == ["deploy"]:
        retrain.from_source(source=str(Path(__file__).parent), entrypoint="placeholder.py:retrain").deploy(
            name="weekly-retrain", work_pool_name="rsllm-pool", print_next_steps=False
        )
    else:
        retrain(fail=True)
'''


class Listener:
    """The person's webhook: an HTTP server on a free port that keeps every JSON body POSTed to it
    (while `down`, it answers 503 and keeps nothing, as a webhook in an outage would)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.down = False
        received, listener = self.received, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if listener.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rsllm-alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(check: Callable[[], object], what: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


PY = sys.executable
PREFECT = str(Path(sys.executable).parent / "prefect")


def run(cmd: list[str], cwd: Path, server: PrefectServer, check: bool = True) -> subprocess.CompletedProcess:
    """A subprocess that talks to the test server (the server's environment)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=server.env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    hook = Listener()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server, listener) -> Path:  # noqa: F811 (fixture)
    """ml-100k weekly project with one replayed week waiting, prefect.yaml's drift-check deployed, a
    placeholder weekly-retrain deployed, and `rsllm alerts setup` done with auto-retrain on."""
    root = tmp_path_factory.mktemp("alerts")
    params = {"drift": {"auto_retrain": True, "alerts": {"webhook_url": listener.url}}}
    project = make_project(root / "project", params)
    shutil.copy2(ROOT / "prefect.yaml", project / "prefect.yaml")
    shutil.copytree(ROOT / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["fetch"], ["merge"], ["replay-week"]):
        rsllm(args, project)
    run([PREFECT, "work-pool", "create", "rsllm-pool", "--type", "process"], project, prefect_server)
    run([PREFECT, "--no-prompt", "deploy", "--name", "drift-check"], project, prefect_server)
    placeholder = root / "retrain"
    placeholder.mkdir()
    (placeholder / "placeholder.py").write_text(PLACEHOLDER)
    run([PY, "placeholder.py", "deploy"], placeholder, prefect_server)
    setup = last_json(run([PY, "-m", "components.cli", "alerts", "setup"], project, prefect_server))
    assert setup["auto_retrain"] is True and setup["block"]["type"] == "custom-webhook"
    assert {name: a["action"] for name, a in setup["automations"].items()} == {
        alerts.RETRAIN_FAILED_ALERT: "created",
        alerts.AUTO_RETRAIN: "created",
    }
    return project


def automations(server: PrefectServer) -> list[str]:
    return sorted(a["name"] for a in server.post("/automations/filter").json())


def drift_events(server: PrefectServer) -> list[dict]:
    body = {"filter": {"event": {"name": [alerts.DRIFT_EVENT]}}, "limit": 50}
    return server.post("/events/filter", body).json()["events"]


def retrain_runs(server: PrefectServer) -> list[dict]:
    body = {"deployments": {"name": {"any_": ["weekly-retrain"]}}}
    return server.post("/flow_runs/filter", body).json()


def run_drift_flow(project: Path, server: PrefectServer, path: Path) -> dict:
    return last_json(run([PY, "-m", "flows.drift", str(path)], project, server))


def test_drift_check_deployment_from_prefect_yaml_has_a_daily_schedule(project, prefect_server):  # noqa: F811
    deployment = prefect_server.get("/deployments/name/rsllm-drift/drift-check").json()
    assert deployment["entrypoint"] == "flows/drift.py:drift_check"
    crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
    assert crons == ["0 6 * * *"]


def test_alerts_setup_again_updates_in_place(project, prefect_server):  # noqa: F811
    again = last_json(run([PY, "-m", "components.cli", "alerts", "setup"], project, prefect_server))
    assert {a["action"] for a in again["automations"].values()} == {"updated"}
    assert automations(prefect_server) == sorted([alerts.AUTO_RETRAIN, alerts.RETRAIN_FAILED_ALERT])


def test_normal_week_leads_to_no_event_no_notification_no_retrain(project, prefect_server, listener):  # noqa: F811
    week = sorted((project / "data/incoming").glob("week-*.parquet"))[-1]
    result = run_drift_flow(project, prefect_server, week)
    assert result["drift"] is False and result["event"] is False
    time.sleep(10)  # give the server's trigger and action services time to (not) act
    assert drift_events(prefect_server) == []
    assert listener.received == []
    assert retrain_runs(prefect_server) == []
    artifacts = prefect_server.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["drift-verdict"]}}})
    assert any("No drift" in a["data"] for a in artifacts.json())


def test_shifted_week_leads_to_event_notification_and_retrain_run(project, prefect_server, listener):  # noqa: F811
    week = sorted((project / "data/incoming").glob("week-*.parquet"))[-1]
    items = pd.read_parquet(project / "data/raw/items.parquet")
    raw = pd.read_parquet(project / "data/raw/interactions.parquet")
    shifted = project / "shifted.parquet"
    shifted_week(pd.read_parquet(week), items, raw).to_parquet(shifted, index=False)

    result = run_drift_flow(project, prefect_server, shifted)
    assert result["drift"] is True and result["event"] is True
    assert result["sent"] == [str(shifted)] and result["undelivered"] == []
    assert {"genre_mix", "item_popularity"} <= set(result["tripped"])

    events = wait_for(lambda: drift_events(prefect_server), "the rsllm.data.drift event")
    payload = events[0]["payload"]
    assert payload["drift"] is True and payload["figures"]["genre_mix"]["drift"] is True
    message = wait_for(lambda: listener.received, "the webhook notification")[0]
    assert "genre_mix" in message["subject"] and "genre_mix" in message["body"]
    runs = wait_for(lambda: retrain_runs(prefect_server), "a weekly-retrain flow run")
    assert runs[0]["state"]["type"] in {"SCHEDULED", "PENDING", "RUNNING"}
    artifacts = prefect_server.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["drift-verdict"]}}})
    assert any("**DRIFT**" in a["data"] for a in artifacts.json())

    # the same drop again: no second event (the ledger in reports/drift/alerts.jsonl)
    again = run_drift_flow(project, prefect_server, shifted)
    assert again["drift"] is True and again["event"] is False and again["sent"] == []


def alert_status(project: Path, server: PrefectServer) -> dict:
    status = last_json(run([PY, "-m", "components.cli", "alerts", "status"], project, server))
    return {Path(a["source"]).name: a for a in status["alerts"]} | {"undelivered": status["undelivered"]}


def test_undelivered_alert_is_recorded_and_sent_by_the_next_run(project, prefect_server, listener):  # noqa: F811
    shifted = project / "shifted.parquet"
    second = project / "shifted-2.parquet"
    pd.read_parquet(shifted).iloc[1:].to_parquet(second, index=False)  # another drop, as drifted
    before = len(listener.received)
    listener.down = True
    try:
        proc = run([PY, "-m", "flows.drift", str(second)], project, prefect_server, check=False)
    finally:
        listener.down = False
    assert proc.returncode == 1 and "alerts not delivered for" in proc.stderr
    status = alert_status(project, prefect_server)
    assert status["undelivered"] == [str(second)]
    assert (
        status["shifted-2.parquet"]["status"] == "undelivered"
        and "503" in status["shifted-2.parquet"]["error"]
    )
    assert status["shifted.parquet"]["status"] == "delivered"
    time.sleep(5)
    assert len(listener.received) == before  # nothing reached the person

    # the webhook is back: the next run, on a week without drift, delivers the pending alert
    week = sorted((project / "data/incoming").glob("week-*.parquet"))[-1]
    result = run_drift_flow(project, prefect_server, week)
    assert result["drift"] is False and result["sent"] == [str(second)] and result["undelivered"] == []
    assert len(listener.received) == before + 1 and "genre_mix" in listener.received[-1]["subject"]
    status = alert_status(project, prefect_server)
    assert status["undelivered"] == []
    assert (
        status["shifted-2.parquet"]["status"] == "delivered" and status["shifted-2.parquet"]["attempts"] == 2
    )
    # and nothing is pending for `rsllm alerts resend`
    resent = last_json(run([PY, "-m", "components.cli", "alerts", "resend"], project, prefect_server))
    assert resent == {"sent": [], "undelivered": []}


def test_failed_retrain_run_notifies_the_same_person(project, prefect_server, listener):  # noqa: F811
    before = len(listener.received)
    placeholder = project.parent / "retrain"
    proc = run([PY, "placeholder.py"], placeholder, prefect_server, check=False)
    assert proc.returncode != 0  # the placeholder fails, as a gate rejection would
    wait_for(lambda: len(listener.received) > before, "the failed-retrain notification")
    message = listener.received[-1]
    assert "weekly retrain" in message["subject"] and "Failed" in message["subject"]
    assert "gate rejected the candidate" in message["body"]  # the run's state message, rendered


def test_auto_retrain_off_removes_the_trigger(project, prefect_server, tmp_path):  # noqa: F811
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["drift"]["auto_retrain"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    off = last_json(
        run(
            [PY, "-m", "components.cli", "alerts", "setup", "--params", str(tmp_path / "params.yaml")],
            project,
            prefect_server,
        )
    )
    assert off["automations"][alerts.AUTO_RETRAIN]["action"] == "deleted"
    assert automations(prefect_server) == [alerts.RETRAIN_FAILED_ALERT]
