"""Does stage 2 know something SASRec does not? An ensemble of their candidate scores, tuned on valid.

Reported as the ensemble, never as the LLM: it uses SASRec's scores at inference. What it measures is
whether stage 2's scores carry information complementary to SASRec's: if no mix of the two beats SASRec
on test, the LLM adds nothing SASRec lacks, whatever the training; if one does, the LLM has something to
add and the method's job is to make the LLM use it alone.

Each model's scores over a user's 20 candidates become log-softmax probabilities (so the two scales
compare); the ensemble scores (1 - w) * SASRec + w * stage 2. w is chosen on the first N valid users
(grid 0, 0.05, ..., 1; best HR@1, ties by NDCG@5, then the smaller w) and applied once to the first N
test users. Paired tests against SASRec on the test users.

Run from the repo root after `dvc repro evaluate`:
    python bench/ensemble.py [--users N]
    python bench/ensemble.py --stage2 W/title_only --label title-only   # any other trained LLM folder
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from _common import add_pipeline_paths, pipeline_paths, read_params, resolved_params
from rich.console import Console
from rich.table import Table
from scipy.special import log_softmax

from components.config import deep_merge, parse_settings
from components.evaluate import eval_users, paired_test, per_user_frame, sasrec_candidate_scores, summarise
from components.metrics import target_ranks

GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def llm_scores(args, settings, split: str, users: int) -> pd.DataFrame:
    """The LLM's (--stage2 folder's) candidate scores on a split's first `users` users (no generation)."""
    from components.llm.rank import evaluate_split

    ranked = evaluate_split(
        args.base,
        args.stage2,
        args.prepared,
        split=split,
        users=users,
        generation_users=0,
        batch_users=settings.llm.eval_batch_users,
        dtype=settings.llm.dtype,
    )
    return ranked.sort_values("user_idx", kind="stable").reset_index(drop=True)


def frame(name: str, rows: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """Per-user metrics of candidate scores [U, C]."""
    cands = np.array(rows["candidates"].tolist(), dtype=np.int64)
    cols = np.argmax(cands == rows["target"].to_numpy()[:, None], axis=1)
    return per_user_frame(name, rows["user_idx"], target_ranks(scores, cols))


def mix(sasrec: np.ndarray, llm: np.ndarray, w: float) -> np.ndarray:
    return (1 - w) * log_softmax(sasrec, axis=1) + w * log_softmax(llm, axis=1)


def scores_for(args, settings, split: str, users: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rows = eval_users(args.prepared, users, split)
    ranked = llm_scores(args, settings, split, users)
    if list(ranked["user_idx"]) != list(rows["user_idx"]):
        raise SystemExit(f"{split}: {args.stage2} ranked other users than the split's first {users}")
    if any(list(a) != list(b) for a, b in zip(ranked["candidates"], rows["candidates"], strict=True)):
        raise SystemExit(f"{split}: {args.stage2}'s candidates differ from {split}.parquet's")
    s = sasrec_candidate_scores(args.sasrec, args.prepared, rows, split)
    return rows, s, np.array(ranked["scores"].tolist(), dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pipeline_paths(parser)
    parser.add_argument("--users", type=int, default=None, help="users per split (default: llm.eval_users)")
    parser.add_argument("--label", default="stage 2", help="the LLM row's name (with --stage2 DIR)")
    args = pipeline_paths(parser.parse_args())
    params = read_params(args.params)
    raw = resolved_params(params)
    if args.users:
        raw = deep_merge(raw, {"llm": {"eval_users": args.users}})
    settings = parse_settings(raw)
    n = settings.llm.eval_users

    v_rows, v_sas, v_llm = scores_for(args, settings, "valid", n)
    fits = []
    for w in GRID:
        f = frame("mix", v_rows, mix(v_sas, v_llm, w))
        fits.append((float(f["hr@1"].mean()), float(f["ndcg@5"].mean()), -w))
    hr, nd, neg_w = max(fits)
    w = -neg_w

    t_rows, t_sas, t_llm = scores_for(args, settings, "test", n)
    frames = {
        "sasrec": frame("sasrec", t_rows, t_sas),
        args.label: frame("llm", t_rows, t_llm),
        f"ensemble (w={w:.2f})": frame("ensemble", t_rows, mix(t_sas, t_llm, w)),
    }
    results = {}
    for name, f in frames.items():
        block = summarise(f, settings.seed)
        if name != "sasrec":
            block["vs_sasrec"] = paired_test(f, frames["sasrec"])
        results[name] = block
    table = Table(title=f"SASRec + {args.label} on the first {n} test users (w tuned on {n} valid users)")
    for col in ("model", "HR@1 [95% CI]", "NDCG@5", "vs SASRec HR@1 W/L (McNemar p)"):
        table.add_column(col)
    for name, m in results.items():
        lo, hi = m["hr@1_ci95"]
        vs = m.get("vs_sasrec")
        table.add_row(
            name,
            f"{m['hr@1']:.4f} [{lo:.3f}, {hi:.3f}]",
            f"{m['ndcg@5']:.4f}",
            f"{vs['hr@1_wins']}/{vs['hr@1_losses']} ({vs['mcnemar_p']:.3g})" if vs else "",
        )
    Console().print(table)
    valid_curve = {f"{g:.2f}": round(h, 4) for g, (h, _, _) in zip(GRID, fits, strict=True)}
    print(
        json.dumps(
            {
                "ensemble": results,
                "w": w,
                "valid": {"hr@1_at_w": round(hr, 4), "ndcg@5_at_w": round(nd, 4), "hr@1_by_w": valid_curve},
                "users": n,
                "profile": params.get("profile"),
            },
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
