"""LLM training and ranking speed by dtype (float32 vs bfloat16 autocast), and what bf16 costs in scores.

Rows:
  train stage k, <dtype>   a few real steps of `train_stage` (the pipeline's settings, a temp checkpoint
                           folder): seconds per step, samples/s, tokens/s
  rank <mode>, <dtype>     the trained stage 2 on the first N test users: seconds per user, HR@1, and the
                           largest score difference from float32 (the tolerance between evaluation and
                           serving when they run in different dtypes)
bfloat16 rows only where the CPU has native bf16 (AVX512-BF16 or AMX) or on CUDA.

Run from the repo root after `dvc repro evaluate` (it reads models/, data/prepared/, params.yaml):
    python bench/llm_speed.py [--steps 6] [--users 100]
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import add_pipeline_paths, pipeline_paths, read_params, resolved_params
from rich.console import Console
from rich.table import Table

from components.config import deep_merge, parse_settings
from components.llm.base import cpu_has_bf16
from components.llm.rank import evaluate_split, ranks_from
from components.llm.train import train_stage


def dtypes() -> list[str]:
    """float32, and bfloat16 where it is native (CUDA, AVX512-BF16, AMX)."""
    return ["float32", "bfloat16"] if torch.cuda.is_available() or cpu_has_bf16() else ["float32"]


def train_rows(raw: dict, args, work: Path, dtype: str) -> list[dict]:
    """`args.steps` steps of each stage in `dtype` (one dtype per process: Accelerate's mixed precision
    is fixed once per process)."""
    rows = []
    for stage in (1, 2):
        batch = getattr(parse_settings(raw).llm, f"stage{stage}").batch_size
        override = {
            "dtype": dtype,
            "checkpoint_dir": str(work / f"ckpt-{dtype}-{stage}"),
            f"stage{stage}": {"samples": args.steps * batch, "checkpoint_every": 0},
        }
        settings = parse_settings(deep_merge(raw, {"llm": override}))
        kw = {"stage1_dir": args.stage1, "item_table": args.sasrec} if stage == 2 else {}
        s = train_stage(stage, settings, args.prepared, args.base, work / f"out-{dtype}-{stage}", **kw)
        rows.append(
            {
                "row": f"train stage {stage}, {dtype}",
                "seconds_per_step": s["seconds_per_step"],
                "samples_per_s": s["samples_per_s"],
                "tokens_per_s": s["tokens_per_s"],
            }
        )
    return rows


def train_in_subprocess(args, dtype: str) -> list[dict]:
    """train_rows in a fresh process (its last stdout line is the rows as JSON)."""
    cmd = [
        sys.executable,
        __file__,
        "--train-dtype",
        dtype,
        "--steps",
        str(args.steps),
        "--params",
        str(args.params),
    ]
    for name in ("prepared", "base", "stage1", "sasrec"):
        cmd += [f"--{name}", str(getattr(args, name))]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def rank_rows(args) -> list[dict]:
    """The trained stage 2 on the first `args.users` test users: head in each dtype, likelihood in the
    fastest."""
    rows, reference = [], None
    modes = [("head", d) for d in dtypes()] + [("likelihood", dtypes()[-1])]
    for mode, dtype in modes:
        t0 = time.perf_counter()
        df = evaluate_split(
            args.base, args.stage2, args.prepared, users=args.users, batch_users=8, dtype=dtype, rank=mode
        )
        seconds = (time.perf_counter() - t0) / len(df)
        scores = np.array(df["scores"].tolist())
        row = {
            "row": f"rank {mode}, {dtype}",
            "seconds_per_user": round(seconds, 3),
            "hr@1": round(float((ranks_from(df) == 0).mean()), 4),
        }
        if mode == "head":
            reference = scores if reference is None else reference
            row["max_score_diff_vs_float32"] = float(np.abs(scores - reference).max())
            row["same_top1_share"] = float((scores.argmax(1) == reference.argmax(1)).mean())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_paths(parser)
    parser.add_argument("--steps", type=int, default=6, help="training steps per stage and dtype")
    parser.add_argument("--users", type=int, default=100, help="test users ranked per mode and dtype")
    parser.add_argument(
        "--train-dtype", default=None, help=argparse.SUPPRESS
    )  # internal: one dtype's train rows
    args = pipeline_paths(parser.parse_args())
    raw = resolved_params(read_params(args.params))
    if args.train_dtype:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(train_rows(raw, args, Path(tmp), args.train_dtype)))
        return
    rows = [r for d in dtypes() for r in train_in_subprocess(args, d)] + rank_rows(args)

    keys = ["seconds_per_step", "samples_per_s", "tokens_per_s", "seconds_per_user", "hr@1"]
    keys += ["max_score_diff_vs_float32", "same_top1_share"]
    table = Table(
        title=f"LLM speed by dtype ({torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()})"
    )
    table.add_column("row")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(r["row"], *[f"{r[k]:.4g}" if k in r and r[k] is not None else "" for k in keys])
    Console().print(table)
    print(json.dumps({"threads": torch.get_num_threads(), "native_bf16": cpu_has_bf16(), "rows": rows}))


if __name__ == "__main__":
    main()
