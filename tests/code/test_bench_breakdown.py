"""bench/breakdown.py: users grouped by history length and target popularity, paired wins per group."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

BENCH = Path(__file__).parents[2] / "bench" / "breakdown.py"
spec = importlib.util.spec_from_file_location("breakdown", BENCH)
breakdown_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(breakdown_mod)


def test_groups_from_prepared_data_and_wins_per_quartile(tmp_path):
    # 8 users; user u's sequence has u + 3 items; item 1 is in every training part, item 9 in none
    seqs = [[1] * (u + 1) + [2, 9 if u < 4 else 1] for u in range(8)]
    pd.DataFrame({"user_idx": range(8), "items": seqs}).to_parquet(tmp_path / "sequences.parquet")
    targets = [s[-1] for s in seqs]
    pd.DataFrame({"user_idx": range(8), "target": targets}).to_parquet(tmp_path / "test.parquet")
    groups = breakdown_mod.user_groups(tmp_path, pd.Index(range(8)))
    assert groups["history length"].tolist() == [u + 1 for u in range(8)]
    assert groups["target popularity"].tolist() == [0] * 4 + [36] * 4  # 1 + 2 + ... + 8 training items
    hits = pd.DataFrame(
        {"sasrec": [1, 1, 0, 0, 1, 1, 1, 1], "stage2": [0, 0, 0, 1, 1, 1, 1, 0]}, index=range(8)
    )
    rows = breakdown_mod.breakdown(hits, groups, "history length")
    assert [r["group"] for r in rows] == ["1-2", "3-4", "5-6", "7-8"]
    assert [(r["stage2_wins"], r["stage2_losses"]) for r in rows] == [(0, 2), (1, 0), (0, 0), (0, 1)]
    assert [r["sasrec"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    by_pop = breakdown_mod.breakdown(hits, groups, "target popularity")  # two distinct values: two groups
    assert [r["users"] for r in by_pop] == [4, 4] and by_pop[0]["stage2"] == 0.25
