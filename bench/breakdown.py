"""Where does stage 2 lose to SASRec? HR@1 of every evaluated model by user group, from the evaluation.

Groups (quartiles over the evaluated users, so each holds about a quarter of them):
  history length     items before the test target in the user's sequence
  target popularity  how often the test target occurs in the training part of every sequence (the counts
                     the popularity baseline ranks by)
In each group: every model's HR@1 and stage 2's paired wins / losses against SASRec. No model is run:
it reads `rsllm evaluate`'s per-user ranks (reports/eval/per_user.parquet) and data/prepared.

Run from the repo root after `dvc repro evaluate`:
    python bench/breakdown.py [--per-user reports/eval/per_user.parquet]
(or the per-user file of bench/ablation.py --per-user-out, whose variants get columns of their own)
Prints a table per grouping and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from components.config import load_settings
from components.evaluate import training_counts

MODELS = ["popularity", "sasrec", "base", "stage1", "stage2"]


def user_groups(prepared: Path, users: pd.Index) -> pd.DataFrame:
    """Per evaluated user: history length, target popularity, and the quartile of each."""
    seqs = pd.read_parquet(prepared / "sequences.parquet").set_index("user_idx")["items"]
    test = pd.read_parquet(prepared / "test.parquet").set_index("user_idx")["target"]
    counts = training_counts(prepared, int(test.max()) + 1)  # popularity's scores
    frame = pd.DataFrame(index=users)
    frame["history length"] = [len(seqs[u]) - 2 for u in users]  # the last two: valid and test targets
    frame["target popularity"] = [int(counts[test[u]]) for u in users]
    return frame


def breakdown(hits: pd.DataFrame, groups: pd.DataFrame, column: str) -> list[dict]:
    """HR@1 per model and stage 2 vs SASRec wins / losses in each quartile of `column`."""
    bins = pd.qcut(groups[column], 4, duplicates="drop")
    out = []
    for interval, idx in groups.groupby(bins, observed=True).groups.items():
        h = hits.loc[idx]
        lo, hi = int(np.floor(interval.left)) + 1, int(np.floor(interval.right))  # integer values in (l, r]
        row = {"group": f"{lo}-{hi}", "users": len(h)}
        row |= {m: round(float(h[m].mean()), 4) for m in hits.columns}
        if {"stage2", "sasrec"} <= set(hits.columns):
            row["stage2_wins"] = int(((h["stage2"] == 1) & (h["sasrec"] == 0)).sum())
            row["stage2_losses"] = int(((h["stage2"] == 0) & (h["sasrec"] == 1)).sum())
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--per-user", type=Path, default=None, help="default: paths.eval_reports/per_user.parquet"
    )
    args = parser.parse_args()
    paths = load_settings(args.params).paths
    per_user = pd.read_parquet(args.per_user or paths.eval_reports / "per_user.parquet")
    hits = per_user.pivot(index="user_idx", columns="model", values="hr@1")
    hits = hits[[m for m in MODELS if m in hits.columns] + [m for m in hits.columns if m not in MODELS]]
    groups = user_groups(paths.prepared, hits.index)
    results = {c: breakdown(hits, groups, c) for c in groups.columns}
    for column, rows in results.items():
        table = Table(title=f"HR@1 by {column} ({len(hits)} evaluated users, quartiles)")
        for col in (column, "users", *hits.columns, "stage 2 vs SASRec W/L"):
            table.add_column(col)
        for r in rows:
            wl = f"{r['stage2_wins']}/{r['stage2_losses']}" if "stage2_wins" in r else ""
            table.add_row(r["group"], str(r["users"]), *(f"{r[m]:.3f}" for m in hits.columns), wl)
        Console().print(table)
    print(json.dumps({"breakdown": results, "users": len(hits)}, sort_keys=True))


if __name__ == "__main__":
    main()
