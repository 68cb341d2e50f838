"""The evaluation protocol: k-core, chronological leave-one-out with ties, fixed candidate sets."""

import numpy as np
import pandas as pd
import pytest

from components.config import PrepareSettings
from components.data import item_index
from components.errors import DataValidationError
from components.prepare import build_splits, kcore, prepare
from tests.helpers import tree_digest


def frame(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=4.0)


def catalogue(n):
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, n + 1)],
            "title": [f"T{i}" for i in range(1, n + 1)],
            "year": pd.array([2000] * n, dtype="Int64"),
            "genres": ["Drama"] * n,
        }
    )


def test_kcore_iterates_until_stable():
    # item 9 has 1 interaction; dropping it leaves user u2 with 1 -> u2 goes too -> item 8 drops below 2.
    df = frame(
        [
            ("u1", "1", 1),
            ("u1", "2", 2),
            ("u3", "1", 3),
            ("u3", "2", 4),
            ("u2", "9", 5),
            ("u2", "8", 6),
            ("u4", "8", 7),
            ("u4", "1", 8),
        ]
    )
    out = kcore(df, 2)
    assert set(out["user_id"]) == {"u1", "u3"}
    assert set(out["item_id"]) == {"1", "2"}


def test_leave_one_out_breaks_ties_by_row_order():
    n = 40
    rows = []
    for u in range(5):
        # every item at the same timestamp: order must follow the rows of the source
        rows += [(f"u{u}", str(i), 100) for i in range(1, 13)]
    rows += [(f"z{i % 7}", str(i), 50) for i in range(13, n + 1)]  # enough other items for 19 negatives
    out = build_splits(frame(rows), catalogue(n), PrepareSettings(kcore=1), seed=0)
    items = out["items"].set_index("item_id")["item_idx"]
    test = out["test"].iloc[0]
    valid = out["valid"].iloc[0]
    assert test["target"] == items["12"] and valid["target"] == items["11"]
    assert list(test["history"]) == [items[str(i)] for i in range(2, 12)]  # last 10 before the target
    assert list(valid["history"]) == [items[str(i)] for i in range(1, 11)]


def test_candidates_are_target_plus_unseen_negatives():
    rng = np.random.default_rng(1)
    rows = [
        (f"u{u}", str(i), int(t))
        for u in range(40)
        for t, i in enumerate(rng.choice(np.arange(1, 61), size=15, replace=False))
    ]
    out = build_splits(frame(rows), catalogue(60), PrepareSettings(kcore=1), seed=3)
    seqs = out["sequences"].set_index("user_idx")["items"]
    for split in ("valid", "test"):
        for r in out[split].itertuples():
            cands = list(r.candidates)
            assert len(cands) == 20 and len(set(cands)) == 20 and r.target in cands
            seen = set(seqs[r.user_idx])
            assert set(cands) - {r.target} <= set(out["items"]["item_idx"]) - seen
    # the target is not always in the same slot (candidates are shuffled)
    slots = {list(r.candidates).index(r.target) for r in out["test"].itertuples()}
    assert len(slots) > 5


def test_same_seed_same_bytes_other_seed_other_candidates(tmp_path, base_project):
    cfg = PrepareSettings()
    raw = base_project / "data/raw"
    prepare(raw, tmp_path / "a", tmp_path / "a.json", cfg, seed=7)
    prepare(raw, tmp_path / "b", tmp_path / "b.json", cfg, seed=7)
    prepare(raw, tmp_path / "c", tmp_path / "c.json", cfg, seed=8)
    da, db = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert list(da.values()) == list(db.values())
    a = pd.read_parquet(tmp_path / "a/test.parquet")
    c = pd.read_parquet(tmp_path / "c/test.parquet")
    assert (a["target"] == c["target"]).all()
    assert any(list(x) != list(y) for x, y in zip(a["candidates"], c["candidates"], strict=True))


def test_too_few_items_for_candidates_is_a_clear_error():
    rows = [(f"u{u}", str(i), i) for u in range(3) for i in range(1, 11)]
    with pytest.raises(DataValidationError, match="cannot sample 19 negatives"):
        build_splits(frame(rows), catalogue(10), PrepareSettings(kcore=1), seed=0)


def test_stats_describe_the_prepared_data(base_project):
    import json

    stats = json.loads((base_project / "metrics/data.json").read_text())
    seq = pd.read_parquet(base_project / "data/prepared/sequences.parquet")
    assert stats["users"] == len(seq)
    assert stats["interactions"] == int(seq["items"].map(len).sum())
    assert 0 < stats["sparsity"] < 1


def test_the_item_index_never_renumbers_and_appends_new_items():
    week1 = item_index([["10", "11", "12"], ["13", "11"]])
    week2 = item_index([["10", "11", "12"], ["13", "11"], [None, "14", "10", "14"]])
    assert week1.set_index("item_id")["item_idx"].to_dict() == {"10": 1, "11": 2, "12": 3, "13": 4}
    assert week2.set_index("item_id")["item_idx"].to_dict() == {"10": 1, "11": 2, "12": 3, "13": 4, "14": 5}


def test_prepare_keeps_the_stable_index_and_draws_negatives_from_trained_items():
    """Items the k-core filter drops keep their index but are marked untrained and never sampled."""
    rng = np.random.default_rng(2)
    rows = [
        (f"u{u}", str(i), int(t))
        for u in range(40)
        for t, i in enumerate(rng.choice(np.arange(1, 41), size=15, replace=False))
    ]
    rows += [("u0", "41", 100)]  # one interaction: dropped by the 2-core filter
    index = item_index([[str(i) for i in range(60, 0, -1)]])  # ids in reverse: idx != id
    out = build_splits(frame(rows), catalogue(60), PrepareSettings(kcore=2), seed=0, index=index)
    items = out["items"].set_index("item_id")
    assert items["item_idx"].to_dict() == index.set_index("item_id")["item_idx"].to_dict()
    trained = set(items.loc[items["trained"], "item_idx"])
    assert trained == {61 - i for i in range(1, 41)}  # ids 41..60: no (kept) interactions
    assert out["stats"]["items"] == 40 and out["stats"]["index_size"] == 60
    for split in ("valid", "test"):
        for r in out[split].itertuples():
            assert set(r.candidates) <= trained
    assert set(np.concatenate(out["sequences"]["items"].to_numpy())) <= trained


def test_prepare_names_a_catalogue_item_the_index_lacks():
    rows = [(f"u{u}", str(i), i) for u in range(3) for i in range(1, 31)]
    with pytest.raises(DataValidationError, match="item_index.parquet lacks 1 catalogue item"):
        build_splits(
            frame(rows),
            catalogue(30),
            PrepareSettings(kcore=1),
            seed=0,
            index=item_index([["1"]] + [[str(i) for i in range(1, 30)]]),
        )
