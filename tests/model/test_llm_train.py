"""Both training stages on the tiny model: outputs, resume (stop + kill), `accelerate launch`, evaluation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from components.llm.checkpoints import latest_checkpoint
from components.llm.model import export_projected
from components.llm.rank import evaluate_split, ranks_from
from components.llm.stage_folder import load_stage_config
from components.llm.train import train_stage
from tests.model.llm_fixtures import (
    ROOT,
    llm_params,
    llm_settings,
    write_base,
    write_item_table,
    write_params,
    write_prepared,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("llm")
    titles = write_prepared(tmp / "prepared")
    write_base(tmp / "base", titles)
    write_item_table(tmp / "item_emb.safetensors", len(titles) - 1)
    return tmp


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_two_stages_write_outputs_and_evaluate(inputs, tmp_path):
    s = llm_settings(tmp_path, samples=12, batch_size=4)
    one = train_stage(1, s, inputs / "prepared", inputs / "base", tmp_path / "s1")
    assert one["steps"] == one["steps_done"] == 3 and one["seconds_per_step"] > 0 and one["samples_per_s"] > 0
    losses = [r["loss"] for r in json.loads((tmp_path / "s1" / "train_log.json").read_text())]
    assert (one["loss_first_tenth"], one["loss_last_tenth"]) == (round(losses[0], 4), round(losses[-1], 4))
    two = train_stage(
        2,
        s,
        inputs / "prepared",
        inputs / "base",
        tmp_path / "s2",
        stage1_dir=tmp_path / "s1",
        item_table=inputs / "item_emb.safetensors",
    )
    for stage_dir in (tmp_path / "s1", tmp_path / "s2"):
        assert (stage_dir / "adapter" / "adapter_config.json").exists()
        assert not list(stage_dir.rglob("*.bin")) and not list(stage_dir.rglob("*.pt"))  # no pickles
    assert not (tmp_path / "s1" / "projector.safetensors").exists()
    cfg = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert cfg["mode"] == "unified" and cfg["projector"]["d_in"] == 8 and cfg["n_id_items"] == 40
    assert cfg["format_version"] == 1 and load_stage_config(tmp_path / "s2").n_id_items == 40
    log = json.loads((tmp_path / "s2" / "train_log.json").read_text())
    assert len(log) == two["steps"] and all(r["id_text"] > 0 and r["user_item"] > 0 for r in log)
    # stage 2 started from stage 1's adapter: same keys, and training moved it
    s1, s2 = _adapter(tmp_path / "s1"), _adapter(tmp_path / "s2")
    assert s1.keys() == s2.keys() and any(not torch.equal(s1[k], s2[k]) for k in s1)
    # projected ID embeddings for serving: one row per item, equal to the projector's output
    info = export_projected(tmp_path / "s2", tmp_path / "projected.safetensors")
    projected = load_file(str(tmp_path / "projected.safetensors"))["projected_items"]
    assert info["items"] == 40 and projected.shape == (41, 32) and info["max_abs_diff"] <= 1e-4
    assert projected[0].abs().sum() == 0 and projected[1:].abs().sum() > 0
    # finished runs leave no checkpoint behind
    assert not Path(one["checkpoint_dir"]).exists()
    # evaluation of each model on the same users: a valid candidate score for each
    for stage_dir in (None, tmp_path / "s1", tmp_path / "s2"):
        df = evaluate_split(inputs / "base", stage_dir, inputs / "prepared", users=4, generation_users=2)
        assert list(df["user_idx"]) == [0, 1, 2, 3]
        assert np.isfinite(np.array(df["scores"].tolist())).all()
        assert set(ranks_from(df)) <= set(range(20))
        assert df["valid"].notna().sum() == 2


def test_stopped_run_resumes_and_ends_identically(inputs, tmp_path):
    args = (inputs / "prepared", inputs / "base")
    ref = train_stage(1, llm_settings(tmp_path / "a", samples=16, batch_size=4), *args, tmp_path / "ref")
    s = llm_settings(tmp_path / "b", samples=16, batch_size=4)
    part = train_stage(1, s, *args, tmp_path / "out", stop_after=2)
    assert part["steps_done"] == 2 and not (tmp_path / "out").exists()
    assert latest_checkpoint(Path(part["checkpoint_dir"])).name == "step-00000002"
    done = train_stage(1, s, *args, tmp_path / "out")
    assert done["resumed_from"] == 2 and done["steps_done"] == ref["steps"] == 4
    _assert_same_weights(_adapter(tmp_path / "ref"), _adapter(tmp_path / "out"))
    ref_log = json.loads((tmp_path / "ref" / "train_log.json").read_text())
    out_log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert [r["loss"] for r in ref_log] == [r["loss"] for r in out_log]


def _cli(params: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "components.cli",
        "train-llm",
        "--stage",
        "1",
        "--params",
        str(params),
        "--prepared",
        str(inputs / "prepared"),
        "--base",
        str(inputs / "base"),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(inputs, tmp_path):
    # ~70 samples x 4 epochs, batch 2: ~140 steps, a checkpoint after every step
    raw = llm_params(tmp_path, samples=0, epochs=4, batch_size=2, checkpoint_every=1)
    params = write_params(tmp_path / "params.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, *_cli(params, inputs, tmp_path / "out")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "ckpt").glob("stage1-*/step-*"))
        if found and int(sorted(found)[-1].name.split("-")[1]) >= 5:
            ckpt = sorted(found)[-1]
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt is not None and not (tmp_path / "out").exists()
    killed_at = int(latest_checkpoint(ckpt.parent).name.split("-")[1])
    done = subprocess.run(
        [sys.executable, *_cli(params, inputs, tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == killed_at >= 5 and summary["steps_done"] == summary["steps"]
    assert "resumed from" in done.stderr
    # the same run without a kill ends with the same weights
    ref = train_stage(
        1,
        llm_settings(tmp_path / "ref", samples=0, epochs=4, batch_size=2),
        inputs / "prepared",
        inputs / "base",
        tmp_path / "ref_out",
    )
    assert ref["steps"] == summary["steps"]
    _assert_same_weights(_adapter(tmp_path / "ref_out"), _adapter(tmp_path / "out"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_processes(inputs, tmp_path):
    params = write_params(tmp_path / "params.yaml", llm_params(tmp_path, samples=8, batch_size=4))
    # accelerate 1.x: `--cpu` starts several processes only through mpirun; `--multi_gpu` on a machine
    # without GPUs starts 2 torchrun processes, which Accelerate runs on CPU with the gloo backend
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *_cli(params, inputs, tmp_path / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # one summary, from rank 0
    summary = json.loads(lines[0])
    assert summary["processes"] == 2 and summary["steps_done"] == summary["steps"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    log = pd.read_json(tmp_path / "out" / "train_log.json")
    assert len(log) == 2 and np.isfinite(log["loss"]).all()


def test_stage2_with_head_id_skip_trains_the_skip_and_resumes_exactly(inputs, tmp_path):
    """llm.head_id_skip: stage 2 adds the zero-started skip to stage 1's head, trains it, saves it with the
    folder (evaluation reads it back) and a stopped run resumes to the same head."""
    from safetensors.torch import load_file

    from components.config import deep_merge, parse_settings
    from tests.model.llm_fixtures import llm_params

    args = (inputs / "prepared", inputs / "base")
    train_stage(1, llm_settings(tmp_path / "r1", samples=8, batch_size=4), *args, tmp_path / "s1")
    kw = {"stage1_dir": tmp_path / "s1", "item_table": inputs / "item_emb.safetensors"}

    def settings(tmp: Path):
        raw = llm_params(tmp, samples=12, batch_size=4)
        return parse_settings(deep_merge(raw, {"llm": {"head_id_skip": True}}))

    ref = train_stage(2, settings(tmp_path / "a"), *args, tmp_path / "ref", **kw)
    head = load_file(str(tmp_path / "ref" / "head.safetensors"))
    assert head["skip.weight"].shape == (head["item.weight"].shape[0], 8)  # head dim x SASRec dim
    assert head["skip.weight"].abs().sum() > 0  # it started at zero and trained
    assert "skip.weight" not in load_file(str(tmp_path / "s1" / "head.safetensors"))
    s = settings(tmp_path / "b")
    part = train_stage(2, s, *args, tmp_path / "out", stop_after=1, **kw)
    done = train_stage(2, s, *args, tmp_path / "out", **kw)
    assert part["steps_done"] == 1 and done["resumed_from"] == 1 and done["steps_done"] == ref["steps"]
    _assert_same_weights(head, load_file(str(tmp_path / "out" / "head.safetensors")))
    df = evaluate_split(inputs / "base", tmp_path / "out", inputs / "prepared", users=4)
    assert np.isfinite(np.array(df["scores"].tolist())).all()
