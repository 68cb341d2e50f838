"""The weekly retrain end to end on real parts: a `prefect server start`, a process worker, `prefect deploy`
from a temporary git clone of this repo (versions are committed there, never on the developer's branch),
`prefect deployment run rsllm/weekly-retrain`, real `dvc repro` of every stage on a tiny project
(synthetic data, tiny SASRec, tiny random Llama) and the BentoML store of the test session.

The scenarios share one deployment and run in order: first run promotes; no new data trains nothing;
a bad drop fails the run; a strict gate fails the run; a worker killed mid-training resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import psutil
import pytest
import yaml

from components import registry
from tests.helpers import ROOT, deep_merge, sh, tiny_params, tree_digest
from tests.prefect_server import PrefectServer, prefect_server  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def commit_all(repo: Path, message: str) -> None:
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message], repo)


class Deployment:
    """A deployed weekly-retrain with its worker, in a clone, against the test's Prefect server."""

    def __init__(self, clone: Path, server: PrefectServer):
        self.clone, self.server = clone, server
        self.env = server.env | {
            "BENTOML_HOME": os.environ["BENTOML_HOME"],
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }  # flow runs ship their INFO logs
        self.worker: subprocess.Popen | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            cwd=self.clone,
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    def start_worker(self) -> None:
        log = open(self.clone.parent / "worker.log", "a")  # noqa: SIM115 (closed with the process)
        self.worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "rsllm-pool"],
            cwd=self.clone,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_worker(self) -> None:
        """SIGKILL the worker and every process under it (its flow runs, their dvc and training): a crash."""
        if self.worker and self.worker.poll() is None:
            children = psutil.Process(self.worker.pid).children(recursive=True)
            tree = [self.worker.pid, *(c.pid for c in children)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.worker.wait()

    def run(self, **parameters) -> str:
        args = ["deployment", "run", "rsllm/weekly-retrain"]
        for k, v in parameters.items():
            args += ["--param", f"{k}={json.dumps(v)}"]
        out = self.cli(*args).stdout
        return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)

    def state(self, run_id: str) -> dict:
        return self.server.get(f"/flow_runs/{run_id}").json()["state"]

    def wait(self, run_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state["type"] in TERMINAL:
                return state
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not finished after {timeout}s: {self.state(run_id)}")

    def task_names(self, run_id: str) -> list[str]:
        runs = self.server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}}).json()
        return [r["name"] for r in runs]

    def logs(self, run_id: str) -> str:
        """Every log line of a flow run, as the UI shows them (from the server's API)."""
        messages, offset = [], 0
        while True:
            page = self.server.post(
                "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "offset": offset, "limit": 200}
            ).json()
            messages += [m["message"] for m in page]
            if len(page) < 200:
                return "\n".join(messages)
            offset += 200

    def artifact(self, run_id: str, key: str) -> str:
        arts = self.server.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}}
        ).json()
        return arts[0]["data"] if arts else ""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, prefect_server):  # noqa: F811 (fixture)
    root = tmp_path_factory.mktemp("retrain")
    clone = root / "clone"
    sh(["git", "clone", "-q", str(ROOT), str(clone)], root)
    params = deep_merge(yaml.safe_load((clone / "params.yaml").read_text()), tiny_params(root))
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clone / "data/accepted").mkdir(parents=True, exist_ok=True)
    commit_all(clone, "tiny params")
    d = Deployment(clone, prefect_server)
    d.cli("work-pool", "create", "rsllm-pool", "--type", "process", "--overwrite")
    d.cli("deploy", "--name", "weekly-retrain")
    d.start_worker()
    yield d
    d.kill_worker()


def test_first_run_trains_and_promotes(deployment):
    run_id = deployment.run()
    state = deployment.wait(run_id)
    assert state["type"] == "COMPLETED", state
    pointer = registry.read_production(deployment.clone)
    assert pointer is not None and pointer["data_version"] == "data/v1"
    model = bentoml.models.get(pointer["model_tag"])
    assert (Path(model.path) / "onnx").is_dir() and (Path(model.path) / "llm/adapter").is_dir()
    assert bentoml.models.get(pointer["base_tag"]).info.metadata  # the base LLM, referenced by tag
    report = deployment.artifact(run_id, "retrain-report")
    assert "Gate: PASSED" in report and "stage2" in report
    # the version commit landed in the clone, never in the developer's repository
    assert "data/v1" in sh(["git", "tag"], deployment.clone).stdout
    assert "data/v1" not in sh(["git", "tag"], ROOT).stdout


def test_second_run_without_new_data_trains_nothing(deployment):
    before = registry.read_production(deployment.clone)
    run_id = deployment.run()
    state = deployment.wait(run_id)
    status = sh([sys.executable, "-m", "dvc", "status"], deployment.clone).stdout
    assert state["type"] == "COMPLETED" and "no new data" in (state["message"] or ""), (state, status)
    assert not any(n.startswith("dvc-repro") for n in deployment.task_names(run_id))
    assert registry.read_production(deployment.clone) == before


def test_bad_drop_fails_the_run_and_changes_nothing(deployment):
    clone = deployment.clone
    before = registry.read_production(clone)
    digest = tree_digest(clone / "data/raw", clone / "data/prepared", clone / "models")
    (clone / "data/incoming").mkdir(exist_ok=True)
    (clone / "data/incoming/bad.csv").write_text("user_id,item_id,rating,timestamp\n1,2,9,883700000\n")
    run_id = deployment.run()
    state = deployment.wait(run_id)
    assert state["type"] == "FAILED"
    assert "bad.csv" in state["message"] and "rating" in state["message"]
    assert registry.read_production(clone) == before
    assert tree_digest(clone / "data/raw", clone / "data/prepared", clone / "models") == digest
    assert list((clone / "data/quarantine").glob("*bad.reason.json"))


def test_gate_rejection_fails_the_run_and_keeps_production(deployment):
    clone = deployment.clone
    before = registry.read_production(clone)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["gate"]["min"] = {"hr@1": 1.01}  # impossible
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(clone, "strict gate")
    try:
        run_id = deployment.run(force=True)
        state = deployment.wait(run_id)
        assert state["type"] == "FAILED" and "gate rejected" in state["message"]
        assert registry.read_production(clone) == before
        gate = json.loads((clone / "reports/gate.json").read_text())
        assert gate["passed"] is False and "minimum 1.01" in gate["failed"][0]
        assert "Gate: REJECTED" in deployment.artifact(run_id, "retrain-report")
    finally:
        params["gate"]["min"] = {"valid_ratio": 1.0}
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        commit_all(clone, "gate back")


def test_worker_killed_mid_training_resumes(deployment):
    clone = deployment.clone
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["llm"]["stage1"]["samples"] = 64  # 16 steps: long enough to be killed in the middle
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_all(clone, "longer stage 1")
    sh([str(BIN / "rsllm"), "replay-week"], clone)
    run_id = deployment.run()
    checkpoints = clone / ".cache/checkpoints"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(checkpoints.glob("stage1-*/step-*")):
        time.sleep(0.5)
    assert list(checkpoints.glob("stage1-*/step-*")), "stage 1 never wrote a checkpoint"
    deployment.kill_worker()
    # an operator marks the orphaned run crashed (it holds the deployment's concurrency slot)
    deployment.server.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CRASHED"}, "force": True})
    deployment.start_worker()
    again = deployment.run()
    state = deployment.wait(again)
    assert state["type"] == "COMPLETED", state
    pointer = registry.read_production(clone)
    assert pointer["data_version"] == "data/v2"
    # production (trained on data/v1) scored the replayed week on the stable item index: no remapping
    production = json.loads((clone / "metrics/production.json").read_text())["production"]
    assert production["item_index"] == "plain", production
    assert "stage 1: resumed from" in deployment.logs(again)  # the stage's own output, in the run's log
    assert not list((clone / "models").rglob(".*.tmp-*"))  # no half-written model anywhere
