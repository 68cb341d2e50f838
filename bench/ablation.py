"""Ablation of RSLLM on the same test users and candidates: which part makes the difference.

Rows (each scored like `rsllm evaluate`, 95% bootstrap CIs, paired tests vs SASRec and vs stage 2):
  popularity, SASRec, base zero-shot, stage 1, stage 2   the pipeline's own models (models/, data/prepared)
  no-LLM control      the same score head, L_user_item and samples over projected SASRec vectors, no LLM
  IDs-only            stage 2 trained and scored with items as their [ITEM] alone (titles removed)
  likelihood rank     the pipeline's stage 2 ranked by title log-likelihood instead of the head
  with/without USER   stage 2 with `llm.user_token` flipped (trained)
  head from stage 1   stage 2 with `llm.head_init` flipped: stage 1's head instead of SASRec's geometry
  with KL             stage 2 with `llm.loss.distill` = 0.5 (trained)
  ID skip             stage 2 with `llm.head_id_skip` on: the head's item side also reads the candidate's
                      SASRec embedding (trained)
  title-only          stage 1 (text only) trained on stage 1 + stage 2's samples
  from the base       stage 2 without stage 1: from the base model, untrained LoRA and a fresh head
Trained variants start from the pipeline's stage 1 (from the base: see above) with stage 2's budget.

Run from the repo root after `dvc repro evaluate` (it reads models/, data/prepared/, params.yaml):
    python bench/ablation.py [--variants control ids_only likelihood] [--users N] [--valid]
--valid also scores SASRec, stage 2 and every trained variant on the first N valid users: the split a
switch's default is chosen on (the test rows are still scored once per configuration).
Prints a table (two with --valid) and, as its last line, one JSON object with every row's figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from _common import add_pipeline_paths, pipeline_paths, read_params, resolved_params
from rich.console import Console
from rich.table import Table

from components.config import deep_merge, parse_settings
from components.evaluate import (
    eval_users,
    paired_test,
    per_user_frame,
    score_llm,
    score_popularity,
    score_sasrec,
    summarise,
)

TRAINED = {
    "ids_only": {"prompt_titles": False},
    "user_flip": None,  # {"user_token": not the default}, set in main
    "head_flip": None,  # {"head_init": the other one}, set in main
    "kl": {"loss": {"distill": 0.5}},
    "id_skip": {"head_id_skip": True},
    "from_base": {},
}
ALL = [
    "control",
    "ids_only",
    "likelihood",
    "user_flip",
    "head_flip",
    "kl",
    "title_only",
    "id_skip",
    "from_base",
]
LABELS = {
    "ids_only": "IDs-only",
    "kl": "stage 2 + KL",
    "title_only": "title-only",
    "id_skip": "stage 2 + ID skip",
    "from_base": "stage 2 from the base (no stage 1)",
}


def untrained_stage1(settings, base_dir: Path, out: Path) -> Path:
    """A stage-1 folder holding fresh LoRA adapters (seeded as stage 1 seeds them; LoRA's B starts at zero,
    so the model is the base model) and no score head: stage 2 started from it trains from the base
    model with a fresh head, which is what stage 1 adds measured away."""
    import torch

    from components.llm.base import load_base
    from components.llm.model import add_lora

    base, _ = load_base(base_dir)
    torch.manual_seed(settings.seed)
    lora = settings.llm.lora
    llm = add_lora(base, lora.r, lora.alpha, lora.dropout, list(lora.target_modules))
    llm.save_pretrained(str(out / "adapter"))
    return out


def train_variant(name: str, override: dict, raw: dict, args, work: Path):
    """Stage 2 (or, for title_only, stage 1) with `override` merged into llm; returns (dir, settings, s)."""
    from components.llm.train import train_stage

    out = work / name
    started = time.perf_counter()
    if name == "title_only":
        base = parse_settings(raw)
        budget = base.llm.stage1.samples + base.llm.stage2.samples
        settings = parse_settings(deep_merge(raw, {"llm": {"stage1": {"samples": budget}}}))
        train_stage(1, settings, args.prepared, args.base, out)
    else:
        settings = parse_settings(deep_merge(raw, {"llm": override}))
        start = args.stage1
        if name == "from_base":
            start = untrained_stage1(settings, args.base, work / "untrained_stage1")
        train_stage(2, settings, args.prepared, args.base, out, stage1_dir=start, item_table=args.sasrec)
    return out, settings, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_paths(parser)
    parser.add_argument("--variants", nargs="*", default=["control", "ids_only", "likelihood"], choices=ALL)
    parser.add_argument("--users", type=int, default=None, help="evaluated users (default: llm.eval_users)")
    parser.add_argument("--valid", action="store_true", help="also score the valid split (for tuning)")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the trained variants' folders here (default: a temp dir)",
    )
    parser.add_argument(
        "--per-user-out", type=Path, default=None, help="write every test row's per-user ranks (Parquet)"
    )
    parser.add_argument(
        "--from-eval",
        type=Path,
        default=None,
        help="reports/eval/per_user.parquet of `rsllm evaluate` on the same users: reuse the pipeline's "
        "rows instead of scoring them again",
    )
    args = pipeline_paths(parser.parse_args())
    params = read_params(args.params)
    profile = params.get("profile")  # resolved_params drops the key
    raw = resolved_params(params)  # variants keep the profile's sizes under overrides
    if args.users:
        raw = deep_merge(raw, {"llm": {"eval_users": args.users}})
    settings = parse_settings(raw)
    rows = eval_users(args.prepared, settings.llm.eval_users)
    if args.from_eval:  # the pipeline's names in per_user.parquet -> this table's labels
        names = {"popularity": "popularity", "sasrec": "sasrec", "base": "base zero-shot"}
        names |= {"stage1": "stage 1", "stage2": "stage 2"}
        stored = pd.read_parquet(args.from_eval)
        frames = {label: stored[stored["model"] == m].sort_values("user_idx") for m, label in names.items()}
        if any(list(f["user_idx"]) != list(rows["user_idx"]) for f in frames.values()):
            raise SystemExit(f"{args.from_eval}: not the {len(rows)} evaluated users of these params")
    else:
        frames = {
            "popularity": score_popularity(args.prepared, rows),
            "sasrec": score_sasrec(args.sasrec, args.prepared, rows),
            "base zero-shot": score_llm("base", args.base, None, args.prepared, settings),
            "stage 1": score_llm("stage1", args.base, args.stage1, args.prepared, settings),
            "stage 2": score_llm("stage2", args.base, args.stage2, args.prepared, settings),
        }
    seconds = {}
    valid = {}
    if args.valid:
        v_rows = eval_users(args.prepared, settings.llm.eval_users, "valid")
        valid["sasrec"] = score_sasrec(args.sasrec, args.prepared, v_rows, "valid")
        valid["stage 2"] = score_llm("stage2", args.base, args.stage2, args.prepared, settings, split="valid")
    with tempfile.TemporaryDirectory(prefix="rsllm-ablation-") as tmp:
        work = args.work or tmp
        for name in args.variants:
            started = time.perf_counter()
            if name == "control":
                from components.llm.control import control_ranks, train_control

                model, info = train_control(settings, args.prepared, args.sasrec)
                ranks = control_ranks(model, args.sasrec, args.prepared, rows)
                frames["no-LLM control"] = per_user_frame("control", rows["user_idx"], ranks)
                seconds["no-LLM control"] = time.perf_counter() - started
                continue
            if name == "likelihood":
                frame = score_llm(
                    "likelihood", args.base, args.stage2, args.prepared, settings, rank="likelihood"
                )
                frames["stage 2, likelihood rank"] = frame
                seconds["stage 2, likelihood rank"] = time.perf_counter() - started
                continue
            override = TRAINED.get(name) or {}
            label = LABELS.get(name)
            if name == "user_flip":
                override = {"user_token": not settings.llm.user_token}
                label = "stage 2 + [USER]" if not settings.llm.user_token else "stage 2 without [USER]"
            if name == "head_flip":
                other = "stage1" if settings.llm.head_init == "recommender" else "recommender"
                override = {"head_init": other}
                label = f"stage 2, head from {other}"
            out, var_settings, trained = train_variant(name, override, raw, args, Path(work))
            frames[label] = score_llm(name, args.base, out, args.prepared, var_settings)
            seconds[label] = trained
            if args.valid:
                valid[label] = score_llm(name, args.base, out, args.prepared, var_settings, split="valid")
    if args.per_user_out:  # bench/breakdown.py --per-user reads it
        pd.concat(list(frames.values()), ignore_index=True).to_parquet(args.per_user_out)
    results = summarise_rows(frames, seconds, settings.seed)
    print_table(results, f"Ablation on {len(rows)} test users, same 20 candidates (profile {profile})")
    report = {"ablation": results, "users": len(rows), "profile": profile}
    if valid:
        report["valid"] = summarise_rows(valid, {}, settings.seed)
        print_table(report["valid"], f"The same models on the first {len(v_rows)} valid users (tuning split)")
    print(json.dumps(report, sort_keys=True))


def summarise_rows(frames: dict[str, pd.DataFrame], seconds: dict[str, float], seed: int) -> dict:
    """Each row's figures with paired tests against SASRec and stage 2 (frames hold both)."""
    results = {}
    for name, frame in frames.items():
        block = summarise(frame, seed)
        if name != "sasrec":
            block["vs_sasrec"] = paired_test(frame, frames["sasrec"])
        if name not in ("stage 2", "sasrec"):
            block["stage2_vs_this"] = paired_test(frames["stage 2"], frame)
        if name in seconds:
            block["seconds"] = round(seconds[name], 1)
        results[name] = block
    return results


def print_table(results: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("model", "HR@1 [95% CI]", "NDCG@5", "vs SASRec W/L (p)", "stage 2 vs it W/L (p)", "s"):
        table.add_column(col)
    for name, m in results.items():
        lo, hi = m["hr@1_ci95"]
        vs = m.get("vs_sasrec")
        st = m.get("stage2_vs_this")
        table.add_row(
            name,
            f"{m['hr@1']:.4f} [{lo:.3f}, {hi:.3f}]",
            f"{m['ndcg@5']:.4f}",
            f"{vs['hr@1_wins']}/{vs['hr@1_losses']} ({vs['mcnemar_p']:.3g})" if vs else "",
            f"{st['hr@1_wins']}/{st['hr@1_losses']} ({st['mcnemar_p']:.3g})" if st else "",
            f"{m['seconds']:.0f}" if "seconds" in m else "",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
