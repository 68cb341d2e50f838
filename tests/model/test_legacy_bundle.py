"""A bundle made before the stable item index (format v0: tests/fixtures/bundle_v0, made by main at
00c60f4) still loads and serves, and is re-scored on a newer snapshot through the remap loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.llm.loading import load_ranker, make_builder
from components.llm.rank import score_users
from components.llm.stage_folder import load_stage_config
from components.rescore import production_stage
from components.serving.engine import Engine

FIXTURE = Path(__file__).parents[1] / "fixtures" / "bundle_v0"


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A private copy (a test must never write into the committed fixture)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "bundle_v0"))


def test_a_v0_bundle_loads_and_serves(bundle):
    engine = Engine(bundle, bundle / "base", {}, dtype="float32")
    c = engine.catalogue
    assert c.rows == 41 and c.n_known == 40 and len(c) == 43  # 40 items 1..40, three cold catalogue items
    idx, cold = engine.parse_history(["i3", "901", "i4"])
    assert cold == ["901"]
    top, scores, how = engine.retrieve(idx, 10)
    assert how == "encoder" and len(top) == 10 and all(c.is_known(i) for i in top) and not set(top) & set(idx)
    assert scores == sorted(scores, reverse=True)
    (llm,) = engine.reranker.score_jobs([engine.reranker.job(idx, top)])
    assert len(llm) == 10 and np.isfinite(llm).all() and len(set(llm)) > 1


def test_a_v0_bundle_is_remapped_onto_the_stable_index_and_scores_the_same(bundle, tmp_path):
    """Today's index holds the v0 items at other indexes, plus a new item: after the remap, the same
    users and items (in today's numbering) get the same scores as in the bundle's own numbering."""
    old = pd.read_parquet(bundle / "items.parquet")
    rng = np.random.default_rng(0)
    new_idx = rng.permutation(np.arange(1, 41)) + 1  # 2..41; index 1 is an item the bundle never saw
    now = pd.concat(
        [
            pd.DataFrame({"item_idx": [1], "item_id": ["new"], "title": ["Brand New"], "trained": [True]}),
            old.assign(item_idx=new_idx.astype("int32"), trained=True)[
                ["item_idx", "item_id", "title", "trained"]
            ],
        ]
    ).sort_values("item_idx")
    stage, how = production_stage(bundle, now, tmp_path / "remap")
    assert how == "remap"
    to_new = dict(zip(old["item_idx"], new_idx, strict=True))

    def scores(stage_dir: Path, items: pd.DataFrame, hist: list[int], cands: list[int]) -> torch.Tensor:
        model, tok, cfg = load_ranker(bundle / "base", stage_dir, "cpu", "float32")
        titles = [""] * (int(items["item_idx"].max()) + 1)
        for i, t in zip(items["item_idx"], items["title"], strict=True):
            titles[int(i)] = str(t)
        out, _, _ = score_users(model, make_builder(tok, titles, cfg), cfg, [hist], [cands], [hist])
        return out[0]

    hist, cands = [3, 4, 5, 6], [7, 8, 9, 10, 11]
    before = scores(bundle / "llm", old, hist, cands)
    after = scores(stage, now, [to_new[i] for i in hist], [to_new[i] for i in cands])
    torch.testing.assert_close(before, after, atol=1e-4, rtol=1e-4)
    cfg = load_stage_config(stage)  # the v0 folder, remapped, is saved typed
    assert cfg.n_id_items == 41 and cfg.cold_items == [1]  # the item the bundle never saw
    assert json.loads((stage / "config.json").read_text())["format_version"] == 1
    mapping = json.loads((stage / "sasrec" / "items.json").read_text())  # its [USER] encoder follows
    assert {int(k): v for k, v in mapping.items()} == dict(zip(new_idx.tolist(), old["item_id"], strict=True))


def test_a_stored_stage_reads_items_newer_than_its_tables_as_cold(bundle):
    """The plain load on a larger index: items beyond the stored tables are rendered by title alone and
    left out of the [USER] encoder's prefix, whether in the history or among the candidates."""
    model, tok, cfg = load_ranker(bundle / "base", bundle / "llm", "cpu", "float32")
    items = pd.read_parquet(bundle / "items.parquet")
    titles = ["", *items["title"].astype(str), "Brand New", "Newer Still"]  # 41, 42: after the table
    builder = make_builder(tok, titles, cfg)
    prompt = builder.prompt([3, 41, 4], [42, 7])
    assert prompt.item_idx == [3, 4, 7] and len(prompt.cand_pos) == 2
    enc = cfg.user_encoder
    torch.testing.assert_close(enc([[3, 41, 4, 42]]), enc([[3, 4]]))
    scores, _, _ = score_users(model, builder, cfg, [[3, 41, 4]], [[42, 7]], [[3, 41, 4]])
    assert torch.isfinite(scores).all() and scores.shape == (1, 2)
    assert (bundle / "llm" / "config.json").read_text() == (FIXTURE / "llm" / "config.json").read_text()
