"""ONNX export of the SASRec encoder: files, dynamic shapes, parity, loud failure, provider choice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from components import export
from components.config import ExportSettings
from components.errors import ExportError
from components.export import (
    OUTPUTS,
    check_parity,
    export_onnx,
    load_onnx_config,
    make_session,
    onnx_providers,
)
from components.recommender import load_sasrec, model_config, pad_left, save_model
from components.sasrec import SASRec
from tests.model.sasrec_fixtures import N_ITEMS, small_settings, write_prepared

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """An (untrained, randomly initialised) SASRec saved like `rsllm train-sasrec`, then exported."""
    tmp = tmp_path_factory.mktemp("export")
    prepared = write_prepared(tmp / "prepared")
    torch.manual_seed(0)
    model = SASRec(model_config(small_settings(), N_ITEMS)).eval()
    save_model(model, {k: f"i{k}" for k in range(1, N_ITEMS + 1)}, tmp / "sasrec")
    summary = export_onnx(tmp / "sasrec", prepared, tmp / "onnx", ExportSettings(parity_users=64))
    return {"tmp": tmp, "summary": summary, "prepared": prepared}


@pytest.mark.slow
def test_export_writes_the_graph_and_its_description(exported):
    out = exported["tmp"] / "onnx"
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "items.json", "meta.json"]
    assert json.loads((out / "meta.json").read_text())["format_version"] == 1
    meta = load_onnx_config(out)
    assert meta.input == "item_ids" and meta.max_length == 16
    assert (meta.n_items, meta.hidden) == (N_ITEMS, 32)
    assert meta.parity["max_abs_diff_user_vector"] <= 1e-4
    assert exported["summary"]["parity"]["tolerance"] == 1e-4
    assert not list(exported["tmp"].glob(".onnx.tmp-*"))  # the temp folder was renamed into place


@pytest.mark.slow
def test_dynamic_batch_and_length_match_torch(exported):
    model, _ = load_sasrec(exported["tmp"] / "sasrec")
    session = make_session(exported["tmp"] / "onnx" / "encoder.onnx")
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (1, 16), (3, 5), (17, 16), (64, 9)):
        hists = [rng.integers(1, N_ITEMS + 1, size=rng.integers(1, length + 1)) for _ in range(batch)]
        x = pad_left(hists, length)
        user, table = session.run(list(OUTPUTS), {"item_ids": x})
        with torch.no_grad():
            want = model.user_vector(torch.from_numpy(x)).numpy()
        assert user.shape == (batch, 32) and table.shape == (N_ITEMS + 1, 32)
        np.testing.assert_allclose(user, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(table, model.item_emb.weight.detach().numpy(), atol=0, rtol=0)
    # top-k over the whole catalogue needs nothing but the two outputs
    scores = user @ table.T
    assert scores.shape == (64, N_ITEMS + 1)


@pytest.mark.slow
def test_parity_failure_is_loud(exported):
    model, _ = load_sasrec(exported["tmp"] / "sasrec")
    session = make_session(exported["tmp"] / "onnx" / "encoder.onnx")
    with torch.no_grad():
        model.blocks[0].ff[0].weight.mul_(2.0)  # the torch model no longer matches the graph
    batch = pad_left([[1, 2, 3], [4, 5]], 16)
    with pytest.raises(ExportError, match="parity_tolerance"):
        check_parity(model, session, [batch], 1e-4, "encoder.onnx")


def test_export_names_a_missing_model(tmp_path):
    prepared = write_prepared(tmp_path / "prepared")
    with pytest.raises(ExportError, match="model.safetensors"):
        export_onnx(tmp_path / "nope", prepared, tmp_path / "onnx", ExportSettings())
    assert not (tmp_path / "onnx").exists()


def test_providers_without_cuda_are_cpu_only(monkeypatch):
    onnx_providers.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(export, "_cuda_driver_devices", lambda: 0)
    try:
        assert onnx_providers() == ["CPUExecutionProvider"]
    finally:
        onnx_providers.cache_clear()


_NO_ERRORS = """
import sys
import components.export as e
if sys.argv[1] == "probe":
    e._cuda_driver_devices = lambda: 1  # pretend a driver is there: the probe session itself must stay quiet
providers = e.onnx_providers()
session = e.make_session(sys.argv[2])
print(providers, session.get_providers())
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "probe"])
def test_provider_choice_logs_no_errors(exported, mode):
    onnx_path = str(exported["tmp"] / "onnx" / "encoder.onnx")
    run = subprocess.run(
        [sys.executable, "-c", _NO_ERRORS, mode, onnx_path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "[E:" not in run.stderr and "error" not in run.stderr.lower(), run.stderr
    if not torch.cuda.is_available():
        assert "['CPUExecutionProvider'] ['CPUExecutionProvider']" in run.stdout


@pytest.mark.slow
def test_naive_cuda_request_would_log_an_error(exported):
    """Negative control: on a machine where onnxruntime-gpu lists CUDA but cannot use it, asking for CUDA
    blindly logs an error line, which the provider choice above avoids (skipped where CUDA works)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu on a machine without usable CUDA")
    code = (
        "import onnxruntime as ort, sys; "
        "ort.InferenceSession(sys.argv[1], providers=['CUDAExecutionProvider', 'CPUExecutionProvider'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(exported["tmp"] / "onnx" / "encoder.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if export._cuda_driver_devices() > 0:
        pytest.skip("a CUDA driver is present; the naive request may succeed")
    assert "[E:" in run.stderr
