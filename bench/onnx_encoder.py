"""Latency of the SASRec ID encoder: ONNX Runtime vs torch eager, batch 1 and batch 64, in one run.

    python bench/onnx_encoder.py [--model-dir models/sasrec] [--prepared data/prepared]

Uses models/sasrec when it exists; otherwise an untrained model of the configured shape (params.yaml
`sasrec`; latency depends on the shapes, not on the weights). Inputs are real test histories
(data/prepared, the full prefix up to max_len) when present, else random full-length histories.
Both sides compute the user vector [batch, D] from [batch, max_len] histories; the item table is
fetched once at service start and is not part of a request. Prints a table, then as its LAST line a
JSON object with p50/p95 per engine and batch and `onnx_over_torch_b1`, `onnx_over_torch_b64` (p50 ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.config import DEFAULT_PARAMS, SasrecSettings, load_settings  # noqa: E402
from components.export import OUTPUTS, _export_graph, check_parity, make_session, onnx_providers  # noqa: E402
from components.prepare import load_prepared  # noqa: E402
from components.recommender import load_sasrec, model_config, pad_left  # noqa: E402
from components.sasrec import SASRec  # noqa: E402


def _model(model_dir: Path, cfg: SasrecSettings, n_items: int) -> tuple[SASRec, str]:
    if (model_dir / "model.safetensors").exists():
        return load_sasrec(model_dir)[0], str(model_dir)
    torch.manual_seed(0)
    return SASRec(model_config(cfg, n_items)).eval(), f"untrained, {n_items} items (no {model_dir})"


def _inputs(prepared: Path, max_len: int, n_items: int, n: int) -> tuple[np.ndarray, str]:
    if (prepared / "sequences.parquet").exists():
        data = load_prepared(prepared)
        prefixes = [data.sequences[int(u)][:-1] for u in data.test["user_idx"]]
        rows = pad_left(prefixes, max_len)
        reps = int(np.ceil(n / len(rows)))
        return np.tile(rows, (reps, 1))[:n], f"real test histories from {prepared}"
    rng = np.random.default_rng(0)
    return rng.integers(1, n_items + 1, size=(n, max_len), dtype=np.int64), "random full-length histories"


def _time(fn, batches: list[np.ndarray], warmup: int) -> list[float]:
    for b in batches[:warmup]:
        fn(b)
    out = []
    for b in batches:
        t = time.perf_counter_ns()
        fn(b)
        out.append((time.perf_counter_ns() - t) / 1e3)  # microseconds
    return out


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="default: params paths.sasrec")
    ap.add_argument("--prepared", type=Path, default=None, help="default: params paths.prepared")
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    ap.add_argument("--iters-b1", type=int, default=500)
    ap.add_argument("--iters-b64", type=int, default=100)
    ap.add_argument(
        "--ort-threads", type=int, default=None, help="ONNX Runtime intra-op threads (params: export)"
    )
    ap.add_argument("--n-items", type=int, default=1349, help="catalogue size of an untrained model")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = ap.parse_args()
    paths = load_settings(args.params).paths
    args.model_dir, args.prepared = args.model_dir or paths.sasrec, args.prepared or paths.prepared
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    settings = load_settings(args.params) if Path(args.params).exists() else None
    scfg = settings.sasrec if settings else SasrecSettings()
    threads = (
        args.ort_threads
        if args.ort_threads is not None
        else (settings.export.intra_op_threads if settings else 1)
    )
    model, source = _model(args.model_dir, scfg, args.n_items)
    cfg = model.cfg
    pool, input_source = _inputs(args.prepared, cfg.max_len, cfg.n_items, 64 * 8)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "encoder.onnx"
        _export_graph(model, onnx_path, settings.export.opset if settings else 18)
        session = make_session(onnx_path, intra_op_threads=threads)
        check_parity(model, session, [pool[:64], pool[:1]], 1e-4, str(onnx_path))

        def run_onnx(b: np.ndarray) -> np.ndarray:
            return session.run([OUTPUTS[0]], {"item_ids": b})[0]

        def run_torch(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model.user_vector(torch.from_numpy(b)).numpy()

        results = {}
        for bs, iters in ((1, args.iters_b1), (64, args.iters_b64)):
            batches = [pool[(i * bs) % len(pool) :][:bs] for i in range(iters)]
            batches = [b if len(b) == bs else pool[:bs] for b in batches]
            for name, fn in (("torch", run_torch), ("onnx", run_onnx)):
                times = _time(fn, batches, warmup=min(50, iters))
                results[f"{name}_b{bs}"] = {
                    "p50_us": _p(times, 50),
                    "p95_us": _p(times, 95),
                    "mean_us": statistics.fmean(times),
                }

    table = Table(
        title=escape(
            f"SASRec encoder latency, input [batch, {cfg.max_len}] -> user vector [batch, {cfg.hidden}]"
        )
    )
    for col in ("batch", "engine", "p50 (µs)", "p95 (µs)", "p50 ratio onnx/torch"):
        table.add_column(col, justify="right")
    summary: dict = {
        "model": source,
        "inputs": input_source,
        "torch_threads": torch.get_num_threads(),
        "ort_intra_op_threads": threads,
        "ort_providers": session.get_providers(),
        "cpu_count": os.cpu_count(),
        "max_len": cfg.max_len,
        "hidden": cfg.hidden,
    }
    for bs in (1, 64):
        t, o = results[f"torch_b{bs}"], results[f"onnx_b{bs}"]
        ratio = o["p50_us"] / t["p50_us"]
        summary[f"onnx_over_torch_b{bs}"] = round(ratio, 3)
        summary[f"onnx_over_torch_b{bs}_p95"] = round(o["p95_us"] / t["p95_us"], 3)
        for engine, r in (("torch eager", t), ("onnxruntime", o)):
            summary[f"{'torch' if engine.startswith('torch') else 'onnx'}_b{bs}_p50_us"] = round(
                r["p50_us"], 1
            )
            summary[f"{'torch' if engine.startswith('torch') else 'onnx'}_b{bs}_p95_us"] = round(
                r["p95_us"], 1
            )
            table.add_row(
                str(bs),
                engine,
                f"{r['p50_us']:.0f}",
                f"{r['p95_us']:.0f}",
                f"{ratio:.2f}x" if engine == "onnxruntime" else "",
            )
    console = Console()
    console.print(table)
    console.print(
        f"model: {source}; inputs: {input_source}; torch threads {summary['torch_threads']}, "
        f"ORT intra-op threads {threads} on {summary['ort_providers'][0]}; "
        "target: ONNX <= 0.5x torch at batch 1"
    )
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    onnx_providers()  # decide once, quietly, before anything else touches ONNX Runtime
    raise SystemExit(main())
