"""Evaluation protocol: k-core filter, chronological leave-one-out, fixed candidate sets.

Input: data/raw/interactions.parquet (user_id, item_id, rating, timestamp), data/raw/items.parquet and
data/raw/item_index.parquet (the stable item index merge writes: item_idx never changes between weeks).
Output, data/prepared/ (every model is scored on these exact files):

  items.parquet      item_idx (int32, the stable index; 0 is padding), item_id (str), title, year,
                     genres, trained (bool: the item survives the k-core filter, so models learn a row
                     for it; other rows of a model's table stay untrained and are never recommended)
  users.parquet      user_idx (int32, 0..U-1), user_id (str)
  sequences.parquet  user_idx, items (list<int32>): the user's whole chronological sequence.
                     train = items[:-2], valid target = items[-2], test target = items[-1]
  valid.parquet      user_idx, history (list<int32>, last `history_len` items before the target,
  test.parquet       oldest first), target (int32), candidates (list<int32>, `num_candidates`
                     items: the target + seeded negatives the user never interacted with, shuffled)
  stats.json         users, items, interactions, sparsity, history lengths (also metrics/data.json)

Ties: ml-100k has many equal timestamps, so order is (timestamp, row order in data/raw), a stable sort.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import PrepareSettings
from components.errors import DataValidationError, ModelError
from components.io import atomic_dir, write_json_atomic


def kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively keep users and items with at least k interactions."""
    while True:
        n = len(df)
        item_counts = df["item_id"].map(df["item_id"].value_counts())
        user_counts = df["user_id"].map(df["user_id"].value_counts())
        df = df[(item_counts >= k) & (user_counts >= k)]
        if len(df) == n:
            return df


def chronological(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by (user, timestamp, original row order): a stable, documented tie-break."""
    df = df.assign(_row=np.arange(len(df)))
    return df.sort_values(["user_id", "timestamp", "_row"], kind="stable").drop(columns="_row")


def sample_candidates(
    target: int, seen: set[int], pool: np.ndarray, n: int, rng: np.random.Generator
) -> list[int]:
    """The target plus n-1 distinct items of `pool` (the trained items) the user never interacted
    with, shuffled."""
    if len(pool) - len(seen) < n - 1:
        raise DataValidationError(
            f"prepare: a user has seen {len(seen)} of {len(pool)} items; cannot sample {n - 1} negatives"
        )
    negatives: list[int] = []
    chosen: set[int] = set()
    while len(negatives) < n - 1:
        for item in pool[rng.integers(0, len(pool), size=2 * n)].tolist():
            if item not in seen and item not in chosen:
                chosen.add(item)
                negatives.append(item)
                if len(negatives) == n - 1:
                    break
    cands = np.array([target, *negatives], dtype=np.int32)
    rng.shuffle(cands)
    return cands.tolist()


def build_splits(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    cfg: PrepareSettings,
    seed: int,
    index: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame | dict]:
    """Pure function: raw tables -> the prepared tables and their statistics.

    index: the stable item index (item_id, item_idx) merge wrote; None numbers `items` in order."""
    df = kcore(interactions[["user_id", "item_id", "timestamp"]], cfg.kcore)
    user_len = df.groupby("user_id").size()
    df = df[df["user_id"].isin(user_len[user_len >= cfg.min_user_interactions].index)]
    if df.empty:
        raise DataValidationError(
            f"prepare: no interactions left after the {cfg.kcore}-core filter "
            f"(prepare.kcore={cfg.kcore}, prepare.min_user_interactions={cfg.min_user_interactions})"
        )
    df = chronological(df)

    # Every catalogue item at its stable index; `trained`: it has interactions after the filter.
    if index is None:
        from components.data import item_index

        index = item_index([items["item_id"].tolist()])
    to_idx = dict(zip(index["item_id"].astype(str), index["item_idx"].astype(int), strict=True))
    missing = sorted(set(items["item_id"].astype(str)) - to_idx.keys())
    if missing:
        raise DataValidationError(
            f"prepare: item_index.parquet lacks {len(missing)} catalogue item(s), e.g. {missing[:5]}; "
            "run `rsllm merge` again"
        )
    item_table = items.assign(
        item_idx=items["item_id"].astype(str).map(to_idx).astype("int32"),
        trained=items["item_id"].isin(set(df["item_id"])),
    )
    item_table = item_table[["item_idx", "item_id", "title", "year", "genres", "trained"]]
    item_table = item_table.sort_values("item_idx").reset_index(drop=True)
    pool = item_table.loc[item_table["trained"], "item_idx"].to_numpy(np.int64)  # negatives come from here

    user_ids = sorted(df["user_id"].unique(), key=_natural_key)
    user_table = pd.DataFrame({"user_idx": np.arange(len(user_ids), dtype=np.int32), "user_id": user_ids})
    to_uidx = dict(zip(user_table["user_id"], user_table["user_idx"], strict=True))

    seqs = df.groupby("user_id", sort=False)["item_id"].agg(list)
    rng = np.random.default_rng(seed)
    n_items = len(pool)
    sequences, valid, test = [], [], []
    for user_id in user_ids:
        seq = [to_idx[i] for i in seqs[user_id]]
        u = to_uidx[user_id]
        seen = set(seq)
        sequences.append((u, seq))
        for rows, end in ((valid, len(seq) - 2), (test, len(seq) - 1)):
            history = seq[max(0, end - cfg.history_len) : end]
            cands = sample_candidates(seq[end], seen, pool, cfg.num_candidates, rng)
            rows.append((u, history, seq[end], cands))

    def split_frame(rows: list) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=["user_idx", "history", "target", "candidates"]).astype(
            {"user_idx": "int32", "target": "int32"}
        )

    seq_frame = pd.DataFrame(sequences, columns=["user_idx", "items"]).astype({"user_idx": "int32"})
    lengths = seq_frame["items"].map(len)
    hist = split_frame(test)["history"].map(len)
    stats = {
        "users": int(len(user_table)),
        "items": int(n_items),
        "index_size": int(item_table["item_idx"].max()),
        "interactions": int(len(df)),
        "sparsity": round(1.0 - len(df) / (len(user_table) * n_items), 6),
        "seq_len_mean": round(float(lengths.mean()), 3),
        "seq_len_median": float(lengths.median()),
        "seq_len_min": int(lengths.min()),
        "seq_len_max": int(lengths.max()),
        "test_history_len_mean": round(float(hist.mean()), 3),
        "test_history_full_share": round(float((hist == cfg.history_len).mean()), 4),
        "dropped_by_kcore": int(len(interactions) - len(df)),
    }
    return {
        "items": item_table,
        "users": user_table,
        "sequences": seq_frame,
        "valid": split_frame(valid),
        "test": split_frame(test),
        "stats": stats,
    }


def _natural_key(value: str) -> tuple:
    return (0, int(value), "") if str(value).isdigit() else (1, 0, str(value))


def prepare(raw_dir: Path, out_dir: Path, metrics_path: Path, cfg: PrepareSettings, seed: int) -> dict:
    """Read data/raw, write data/prepared atomically and the statistics to metrics_path."""
    from components.data import INDEX_FILE

    interactions = pd.read_parquet(raw_dir / "interactions.parquet")
    items = pd.read_parquet(raw_dir / "items.parquet")
    if not (raw_dir / INDEX_FILE).exists():
        raise DataValidationError(f"{raw_dir / INDEX_FILE}: not found; run `rsllm merge` first")
    out = build_splits(interactions, items, cfg, seed, pd.read_parquet(raw_dir / INDEX_FILE))
    with atomic_dir(out_dir) as tmp:
        for name in ("items", "users", "sequences", "valid", "test"):
            out[name].to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "stats.json").write_text(json.dumps(out["stats"], indent=2) + "\n")
    write_json_atomic(metrics_path, out["stats"])
    return out["stats"]


# ---------------------------------------------------------------- reading data/prepared back


def trained_flags(items: pd.DataFrame) -> np.ndarray:
    """items.parquet's `trained` column as bools; a table from before the stable item index (format
    v0) has none: all of its items were trained."""
    return items["trained"].to_numpy(bool) if "trained" in items else np.ones(len(items), bool)


@dataclass
class Prepared:
    """The parts of data/prepared/ SASRec needs."""

    n_items: int  # the index size: items.parquet's largest item_idx (rows 1..n_items of the table)
    item_ids: list[str]  # item_ids[i - 1] is the id of item_idx i ("" where the index has a gap)
    trained: np.ndarray  # bool [n_items + 1]: the item has interactions (row 0, gaps: False)
    sequences: dict[int, np.ndarray]  # user_idx -> the whole chronological sequence (int64)
    valid: pd.DataFrame  # user_idx, history, target, candidates
    test: pd.DataFrame


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise ModelError(f"{path}: not found (run `rsllm prepare` first)")
    df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ModelError(f"{path}: missing column(s) {missing}")
    return df


def load_prepared(prepared_dir: Path) -> Prepared:
    """Read items, sequences, valid and test from data/prepared/ and check they agree."""
    prepared_dir = Path(prepared_dir)
    items = _read(prepared_dir / "items.parquet", ["item_idx", "item_id"]).sort_values("item_idx")
    idx = items["item_idx"].to_numpy(np.int64)
    if len(idx) == 0 or idx[0] < 1 or (np.diff(idx) < 1).any():
        raise ModelError(f"{prepared_dir / 'items.parquet'}: item_idx must be distinct and >= 1")
    n_items = int(idx[-1])
    item_ids = [""] * n_items
    for i, item_id in zip(idx.tolist(), items["item_id"].astype(str).tolist(), strict=True):
        item_ids[i - 1] = item_id
    trained = np.zeros(n_items + 1, dtype=bool)
    # a prepared folder from before the stable index has no `trained` column: all its items were trained
    trained[idx[trained_flags(items)]] = True
    seqs = _read(prepared_dir / "sequences.parquet", ["user_idx", "items"])
    sequences = {
        int(u): np.asarray(s, dtype=np.int64) for u, s in zip(seqs["user_idx"], seqs["items"], strict=True)
    }
    splits = {}
    for name, offset in (("valid", 2), ("test", 1)):
        path = prepared_dir / f"{name}.parquet"
        df = _read(path, ["user_idx", "history", "target", "candidates"])
        for u, t in zip(df["user_idx"].tolist(), df["target"].tolist(), strict=True):
            seq = sequences.get(int(u))
            if seq is None or len(seq) < 3 or int(seq[-offset]) != int(t):
                raise ModelError(
                    f"{path}: target of user_idx {u} is not items[-{offset}] of sequences.parquet"
                )
        splits[name] = df.reset_index(drop=True)
    for seq in sequences.values():
        if seq.size and (seq.min() < 1 or seq.max() > n_items or not trained[seq].all()):
            raise ModelError(
                f"{prepared_dir / 'sequences.parquet'}: items: ids must be trained items of items.parquet"
            )
    return Prepared(n_items, item_ids, trained, sequences, splits["valid"], splits["test"])


def trained_ids(data: Prepared) -> dict[int, str]:
    """item_idx -> item_id of the items with training data (the rows a model learns)."""
    return {i: data.item_ids[i - 1] for i in np.flatnonzero(data.trained).tolist()}
