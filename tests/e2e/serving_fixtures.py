"""A tiny promoted model for the service: real stages on a small synthetic set, promoted through the registry.

SASRec (components.recommender) on the synthetic walk data of tests/model/sasrec_fixtures (the next item
is always the last + 1, so the encoder's top item is predictable), its ONNX export, a tiny random Llama
as the base, both LLM stages for a few steps, the projected table, then registry.save_base /
save_candidate / promote into the BENTOML_HOME of the calling process. Three catalogue items are unknown
to the encoder (cold start), and one more (UNTRAINED) is in its index without any interaction: it has a
row in every table but no training data, so it is cold too and never retrieved. Used by
tests/e2e/test_service.py and `bench/serve_load.py --tiny`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

COLD = {"901": "Cold Open", "902": "Frozen Planet", "903": "Unseen Harbour"}  # numeric ids: ints accepted
UNTRAINED = "i41"  # item_idx 41 of the stable index: no interactions


def build_promoted(root: Path) -> dict:
    """Build every part under `root` and promote it; returns tags, the repo holding the pointer, paths."""
    from components import registry
    from components.config import ExportSettings
    from components.export import export_onnx
    from components.llm.model import export_projected
    from components.llm.train import train_stage
    from components.recommender import train_sasrec
    from tests.model.llm_fixtures import llm_settings, tiny_model
    from tests.model.sasrec_fixtures import small_settings, write_prepared

    root = Path(root)
    prepared = write_prepared(root / "prepared", untrained=1)
    items = pd.read_parquet(prepared / "items.parquet")
    catalogue = pd.concat(
        [
            items.drop(columns=["item_idx", "trained"]),
            pd.DataFrame(
                {"item_id": list(COLD), "title": list(COLD.values()), "year": 2001, "genres": "Drama"}
            ),
        ],
        ignore_index=True,
    )
    catalogue.to_parquet(root / "catalogue.parquet", index=False)

    train_sasrec(
        prepared,
        root / "sasrec",
        root / "sasrec_metrics.json",
        root / "sasrec_curve.json",
        small_settings(max_epochs=12),
        seed=0,
    )
    export_onnx(root / "sasrec", prepared, root / "onnx", ExportSettings(parity_users=16))

    titles = ["", *items["title"].astype(str)]
    model, tok = tiny_model([*titles, *COLD.values()])
    model.save_pretrained(root / "base", safe_serialization=True)
    tok.save_pretrained(root / "base")
    settings = llm_settings(root, samples=8, batch_size=4)
    train_stage(1, settings, prepared, root / "base", root / "stage1")
    train_stage(
        2,
        settings,
        prepared,
        root / "base",
        root / "stage2",
        stage1_dir=root / "stage1",
        item_table=root / "sasrec",
    )
    export_projected(root / "stage2", root / "projected" / "items.safetensors")

    repo = root / "repo"
    repo.mkdir(exist_ok=True)
    base_tag = registry.save_base(root / "base")
    parts = {
        "onnx": root / "onnx",
        "llm": root / "stage2",
        "projected": root / "projected",
        "items.parquet": prepared / "items.parquet",
        "catalogue.parquet": root / "catalogue.parquet",
        "sample_users.parquet": prepared / "test.parquet",
        "sasrec.json": root / "sasrec" / "config.json",
    }
    # the gate's decision for a model whose LLM rerank measured worse than retrieval: promotable, rerank off
    from components.config import GateSettings
    from components.gate import decide

    rr = {
        "users": 8,
        "k": 10,
        "retrieval": {"ndcg@10": 0.30},
        "rerank": {"ndcg@10": 0.25},
        "gain_ndcg@10": -0.05,
    }
    decision = decide(
        {"stage2": {"hr@1": 0.5, "valid_ratio": 1.0}, "rerank_on_retrieval": rr}, GateSettings()
    )
    assert decision.passed and not decision.rerank
    metadata = {
        "metrics": {"hr@1": 0.5},
        "data_version": "data/v1",
        "git_commit": "test",
        "base_tag": base_tag,
        "profile": "test",
        "rerank_default": decision.rerank,
        "rerank_reason": decision.rerank_reason,
    }
    tag = registry.save_candidate(parts, metadata)
    pointer = registry.promote(tag, repo, reason="test")
    return {"model_tag": tag, "base_tag": base_tag, "repo": repo, "pointer": pointer, "prepared": prepared}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, log_path: Path, timeout: float = 180.0):
    """`bentoml serve components.serving.service:RsllmService` on 127.0.0.1:port; waits for /readyz.

    Returns the Popen (its own process group: stop it with stop_server). Raises with the log's tail when
    the server exits or is not ready in time."""
    import subprocess
    import sys
    import time

    import httpx

    root = Path(__file__).resolve().parents[2]
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen(
        [
            str(bentoml_cli),
            "serve",
            "components.serving.service:RsllmService",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_path).read_text()[-4000:]
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{Path(log_path).read_text()[-4000:]}")


def stop_server(proc) -> None:
    """SIGTERM to the server's process group (its workers included), SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
