"""ONNX export of the SASRec ID encoder, its parity check, and the ONNX Runtime session the service uses.

models/onnx/ (written atomically):
  encoder.onnx  input  item_ids         int64 [batch, length]  histories, LEFT-padded with 0, oldest first,
                                                                1 <= length <= max_len (keep the last max_len)
                outputs user_vector      float [batch, D]       the user representation
                        item_embeddings  float [N+1, D]         the item table (row 0 = padding)
                Top-k over the whole catalogue without torch: scores = user_vector @ item_embeddings.T,
                column 0 (padding) and the user's own history masked out. A later output (the LLM's
                projected ID embeddings) is added beside these by name; readers select outputs by name.
  items.json    item_idx -> item_id (copied from models/sasrec)
  meta.json     names, shapes, max_len, opset, the parity figures
"""

from __future__ import annotations

import logging
import shutil
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from components.config import ExportSettings
from components.errors import ExportError, ModelError
from components.folders import FolderConfig, load_config, save_config
from components.io import atomic_dir
from components.prepare import load_prepared
from components.recommender import load_sasrec, pad_left
from components.sasrec import SASRec

ONNX_FORMAT = "rsllm-onnx-encoder/1"  # meta.json's "format" before typed folders (v0)
INPUT = "item_ids"
META = "meta.json"


class OnnxFolder(FolderConfig):
    """models/onnx/meta.json: the encoder's interface and how it was checked."""

    kind: Literal["onnx_encoder"] = "onnx_encoder"
    input: str = INPUT  # int64 [batch, length] item indexes, left-padded with 0, oldest item first
    max_length: int  # the longest history the encoder reads (SASRec's max_len)
    n_items: int  # outputs: user_vector [batch, hidden], item_embeddings [n_items + 1, hidden]
    hidden: int
    scoring: str = "user_vector @ item_embeddings.T; mask column 0 (padding) and the user's history"
    opset: int
    source: str = ""  # records below: for people, never read back
    providers_at_export: list[str] = []
    parity: dict[str, Any] = {}


def _legacy_onnx(raw: dict) -> OnnxFolder:
    """v0: {"format": "rsllm-onnx-encoder/1", "input": {..., "max_length"}, "outputs": {...}, ...}."""
    hidden = raw["outputs"]["user_vector"][1]
    return OnnxFolder(
        format_version=1,
        max_length=raw["input"]["max_length"],
        n_items=raw["n_items"],
        hidden=hidden,
        opset=raw["opset"],
        source=raw.get("source", ""),
        providers_at_export=raw.get("providers_at_export", []),
        parity=raw.get("parity", {}),
    )


def save_onnx_config(onnx_dir: Path, config: OnnxFolder) -> None:
    """Write models/onnx/meta.json."""
    save_config(onnx_dir, config, META)


def load_onnx_config(onnx_dir: Path) -> OnnxFolder:
    """Read models/onnx/meta.json (v0 through its legacy reader); ModelError naming the file."""
    return load_config(onnx_dir, OnnxFolder, _legacy_onnx, META)


OUTPUTS = ("user_vector", "item_embeddings")


class EncoderGraph(nn.Module):
    """What the ONNX graph computes: histories -> (user vector, item embedding table)."""

    def __init__(self, model: SASRec):
        super().__init__()
        self.model = model

    def forward(self, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # item_ids: [B, L] int64, left-padded -> user_vector [B, D], item_embeddings [N+1, D]
        return self.model.user_vector(item_ids), self.model.item_emb.weight * 1.0


# ----------------------------------------------------------------------------------- runtime


def _cuda_driver_devices() -> int:
    """Number of CUDA devices the driver reports, without touching ONNX Runtime (0 if no driver)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


@lru_cache(maxsize=1)
def onnx_providers() -> list[str]:
    """CUDA then CPU when CUDA is really usable for ONNX Runtime, else ["CPUExecutionProvider"] alone.

    onnxruntime-gpu lists CUDAExecutionProvider even on a machine without a GPU, and asking for it there
    logs an error; so we ask for it only when ORT was built with it AND the CUDA driver reports a device
    (torch.cuda.is_available() or a direct libcuda probe), and a tiny probe session really gets it
    (its logging silenced, so a machine with a driver but no usable CUDA libraries stays quiet too).
    """
    import onnxruntime as ort

    cpu = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return cpu
    if not (torch.cuda.is_available() or _cuda_driver_devices() > 0):
        return cpu
    try:
        from onnx import TensorProto, helper

        node = helper.make_node("Identity", ["x"], ["y"])
        graph = helper.make_graph(
            [node],
            "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # fatal only: the probe itself must not print errors...
        ort.set_default_logger_severity(4)  # ...nor the provider loader, which logs to the default logger
        try:
            sess = ort.InferenceSession(
                probe.SerializeToString(), sess_options=opts, providers=["CUDAExecutionProvider", *cpu]
            )
        finally:
            ort.set_default_logger_severity(2)  # ORT's default: warnings and above
        if "CUDAExecutionProvider" in sess.get_providers():
            return ["CUDAExecutionProvider", *cpu]
    except Exception:  # noqa: BLE001 - any failure means CUDA is not usable for ORT here
        pass
    return cpu


def make_session(onnx_path: Path, intra_op_threads: int = 1, providers: list[str] | None = None):
    """An ONNX Runtime session tuned for small, latency-bound requests (full graph optimisation,
    sequential execution, `intra_op_threads` threads, no thread spinning between calls)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    if intra_op_threads > 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=providers or onnx_providers()
        )
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"{onnx_path}: ONNX Runtime cannot load it: {e}") from None


# ------------------------------------------------------------------------------------ export


def _export_graph(model: SASRec, path: Path, opset: int) -> None:
    """torch.export-based ONNX export with dynamic batch and length."""
    graph = EncoderGraph(model).eval()
    example = torch.randint(1, model.cfg.n_items + 1, (2, min(model.cfg.max_len, 8)), dtype=torch.long)
    example[0, :3] = 0  # a padded row
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    length = torch.export.Dim("length", min=1, max=model.cfg.max_len)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT],
                output_names=list(OUTPUTS),
                dynamic_shapes={"item_ids": {0: batch, 1: length}},
                verbose=False,
                optimize=True,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds
            raise ExportError(f"{path}: torch.onnx.export failed: {type(e).__name__}: {e}") from None
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def parity_inputs(prepared_dir: Path, max_len: int, n_users: int) -> list[np.ndarray]:
    """Real inputs from data/prepared/test.parquet: the 10-item histories a service receives, and the
    full test prefixes (up to max_len) from sequences.parquet, batched, plus a batch of one."""
    data = load_prepared(prepared_dir)
    test = data.test.head(n_users)
    short = pad_left([np.asarray(h) for h in test["history"]], max(len(h) for h in test["history"]))
    full = pad_left([data.sequences[int(u)][:-1] for u in test["user_idx"]], max_len)
    return [short, full, full[:1], short[:1, -1:]]


def check_parity(model: SASRec, session, batches: list[np.ndarray], tolerance: float, where: str) -> dict:
    """Max abs difference between torch and ONNX Runtime on each batch; raise ExportError above tolerance."""
    worst_user, worst_table = 0.0, 0.0
    with torch.no_grad():
        table = model.item_emb.weight.numpy()
        for batch in batches:
            want = model.user_vector(torch.from_numpy(batch)).numpy()
            got_user, got_table = session.run(list(OUTPUTS), {INPUT: batch})
            if got_user.shape != want.shape or got_table.shape != table.shape:
                raise ExportError(
                    f"{where}: output shapes {got_user.shape}, {got_table.shape} != torch's "
                    f"{want.shape}, {table.shape} for input {batch.shape}"
                )
            worst_user = max(worst_user, float(np.abs(got_user - want).max()))
            worst_table = max(worst_table, float(np.abs(got_table - table).max()))
    worst = max(worst_user, worst_table)
    if not np.isfinite(worst) or worst > tolerance:
        raise ExportError(
            f"{where}: ONNX output differs from torch by {worst:.3g} "
            f"(user_vector {worst_user:.3g}, item_embeddings {worst_table:.3g}) > "
            f"export.parity_tolerance={tolerance:g}"
        )
    return {
        "max_abs_diff_user_vector": worst_user,
        "max_abs_diff_item_embeddings": worst_table,
        "batches": [list(b.shape) for b in batches],
        "tolerance": tolerance,
    }


def export_onnx(model_dir: Path, prepared_dir: Path, out_dir: Path, cfg: ExportSettings) -> dict:
    """Export models/sasrec to models/onnx (atomically) and check parity on real test histories."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    try:
        model, mcfg = load_sasrec(model_dir)
    except ModelError as e:
        raise ExportError(str(e)) from None
    batches = parity_inputs(Path(prepared_dir), mcfg.max_len, cfg.parity_users)
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "encoder.onnx"
        _export_graph(model, onnx_path, cfg.opset)
        session = make_session(onnx_path, cfg.intra_op_threads)
        parity = check_parity(model, session, batches, cfg.parity_tolerance, str(out_dir / "encoder.onnx"))
        shutil.copyfile(model_dir / "items.json", tmp / "items.json")
        meta = OnnxFolder(
            format_version=1,
            source=str(model_dir),
            max_length=mcfg.max_len,
            n_items=mcfg.n_items,
            hidden=mcfg.hidden,
            opset=cfg.opset,
            providers_at_export=session.get_providers(),
            parity=parity,
        )
        save_onnx_config(tmp, meta)
        size = onnx_path.stat().st_size
    return {
        "onnx": str(out_dir / "encoder.onnx"),
        "bytes": size,
        "parity": parity,
        "providers": meta.providers_at_export,
    }
