"""Ablation of RSLLM's stage 2 on the same test users and candidates.

Variants, each trained from the same stage 1 with the same budget, then scored like `rsllm evaluate`:
  stage 2                     L_lm + a * L_user_item + b * L_id_text (params.yaml)
  without L_user_item         a = 0
  without L_id_text           b = 0
  title-only prompts          no projector: stage 1 (text-only) trained on stage 1 + stage 2's samples

Run from the repo root after `dvc repro llm_stage1` (it reads models/ and data/prepared/):
    python bench/ablation.py [--users 20] [--params params.yaml] [--reuse-stage2]
`--reuse-stage2` scores the pipeline's models/llm/stage2 as the "stage 2" row instead of retraining
it (same params, same seed: the same model), which saves one of the four trainings.
Prints a table and, as its last line, one JSON object with every variant's figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from components.config import deep_merge, parse_settings
from components.evaluate import score_llm, summarise
from components.llm.train import train_stage
from components.recommender import load_item_embeddings

VARIANTS = {
    "stage 2": {},
    "without L_user_item": {"loss": {"user_item": 0.0}},
    "without L_id_text": {"loss": {"id_text": 0.0}},
    "title-only prompts": None,  # no projector: text-only training with the same total budget
}


def run_variant(name: str, override: dict | None, raw: dict, args, work: Path) -> dict:
    """Train one variant into `work` (or reuse the pipeline's stage 2) and score it on the test users."""
    out = work / name.replace(" ", "_")
    started = time.perf_counter()
    if override == {} and args.reuse_stage2:
        out, settings = args.stage2, parse_settings(raw)  # the pipeline's own stage 2, these params
        trained = json.loads((out / "config.json").read_text())["train"]["seconds"]
    elif override is None:
        base = parse_settings(raw)
        budget = base.llm.stage1.samples + base.llm.stage2.samples
        settings = parse_settings(deep_merge(raw, {"llm": {"stage1": {"samples": budget}}}))
        train_stage(1, settings, args.prepared, args.base, out)
        trained = time.perf_counter() - started
    else:
        settings = parse_settings(deep_merge(raw, {"llm": override}))
        train_stage(
            2,
            settings,
            args.prepared,
            args.base,
            out,
            stage1_dir=args.stage1,
            item_table=load_item_embeddings(args.sasrec),
        )
        trained = time.perf_counter() - started
    frame = score_llm(name, args.base, out, args.prepared, settings)
    return summarise(frame, settings.seed) | {"train_seconds": round(trained, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--stage1", type=Path, default=Path("models/llm/stage1"))
    parser.add_argument("--stage2", type=Path, default=Path("models/llm/stage2"))
    parser.add_argument("--sasrec", type=Path, default=Path("models/sasrec"))
    parser.add_argument("--reuse-stage2", action="store_true", help="score --stage2 instead of retraining it")
    parser.add_argument("--users", type=int, default=None, help="evaluated users (default: llm.eval_users)")
    args = parser.parse_args()
    raw = yaml.safe_load(args.params.read_text())
    if args.users:
        raw = deep_merge(raw, {"llm": {"eval_users": args.users}})
    results = {}
    with tempfile.TemporaryDirectory(prefix="rsllm-ablation-") as work:
        for name, override in VARIANTS.items():
            results[name] = run_variant(name, override, raw, args, Path(work))
    table = Table(title="Stage 2 ablation (same users, same 20 candidates)")
    for col in ("variant", "users", "HR@1 [95% CI]", "HR@5", "NDCG@5", "ValidRatio gen", "train s"):
        table.add_column(col)
    for name, m in results.items():
        lo, hi = m["hr@1_ci95"]
        gen = "n/a" if m["valid_ratio_generation"] is None else f"{m['valid_ratio_generation']:.2f}"
        table.add_row(
            name,
            str(m["users"]),
            f"{m['hr@1']:.3f} [{lo:.2f}, {hi:.2f}]",
            f"{m['hr@5']:.3f}",
            f"{m['ndcg@5']:.3f}",
            gen,
            f"{m['train_seconds']:.0f}",
        )
    Console().print(table)
    print(json.dumps({"ablation": results}, sort_keys=True))


if __name__ == "__main__":
    main()
