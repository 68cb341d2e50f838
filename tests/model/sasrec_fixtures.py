"""A small synthetic data/prepared/ folder where the next item is predictable, and small SASRec settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.config import SasrecSettings

N_ITEMS = 40
N_USERS = 80
CANDIDATES = 20


def synthetic_sequences(n_users: int = N_USERS, n_items: int = N_ITEMS, seed: int = 0) -> list[list[int]]:
    """Each user walks the catalogue in steps of +1 (wrapping around) from a random start, 8 to 16 items:
    the next item is always the last item + 1, so a working sequential model gets it right."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(1, n_items + 1)), int(rng.integers(8, 17))
        seqs.append([(start - 1 + k) % n_items + 1 for k in range(length)])
    return seqs


def write_prepared(
    out: Path,
    seqs: list[list[int]] | None = None,
    n_items: int = N_ITEMS,
    history_len: int = 10,
    seed: int = 0,
    untrained: int = 0,
) -> Path:
    """Write the prepared format (items, users, sequences, valid, test) into `out`; `untrained` more
    catalogue items follow the walk's items without any interaction (trained False)."""
    seqs = seqs if seqs is not None else synthetic_sequences(n_items=n_items, seed=seed)
    rng = np.random.default_rng(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    size = n_items + untrained
    items = pd.DataFrame(
        {
            "item_idx": np.arange(1, size + 1, dtype=np.int32),
            "item_id": [f"i{k}" for k in range(1, size + 1)],
            "title": [f"Movie {k}" for k in range(1, size + 1)],
            "year": 1995,
            "genres": "Drama",
            "trained": np.arange(1, size + 1) <= n_items,
        }
    )
    users = pd.DataFrame(
        {"user_idx": np.arange(len(seqs), dtype=np.int32), "user_id": [f"u{u}" for u in range(len(seqs))]}
    )
    sequences = pd.DataFrame({"user_idx": users["user_idx"], "items": seqs})
    splits = {}
    for name, offset in (("valid", 2), ("test", 1)):
        rows = []
        for u, seq in enumerate(seqs):
            end = len(seq) - offset
            pool = np.setdiff1d(np.arange(1, n_items + 1), seq)
            cands = np.concatenate([[seq[end]], rng.choice(pool, CANDIDATES - 1, replace=False)]).astype(
                np.int32
            )
            rng.shuffle(cands)
            rows.append((u, seq[max(0, end - history_len) : end], seq[end], cands.tolist()))
        splits[name] = pd.DataFrame(rows, columns=["user_idx", "history", "target", "candidates"]).astype(
            {"user_idx": "int32", "target": "int32"}
        )
    items.to_parquet(out / "items.parquet", index=False)
    users.to_parquet(out / "users.parquet", index=False)
    sequences.to_parquet(out / "sequences.parquet", index=False)
    for name, df in splits.items():
        df.to_parquet(out / f"{name}.parquet", index=False)
    return out


def small_settings(**overrides) -> SasrecSettings:
    """A SASRec small enough to train on the synthetic set in seconds on one CPU core."""
    base = dict(
        max_len=16,
        hidden=32,
        layers=1,
        heads=2,
        inner=64,
        dropout=0.1,
        attn_dropout=0.1,
        lr=5e-3,
        batch_size=32,
        train_stride=8,
        max_epochs=30,
        patience=3,
        device="cpu",
    )
    base.update(overrides)
    return SasrecSettings(**base)
