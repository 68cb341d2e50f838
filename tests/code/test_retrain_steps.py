"""Steps of the retrain after the DVC stages: re-mapping a stored model onto a newer snapshot, reports."""

import json

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from components.llm.stage_folder import load_stage_config
from components.rescore import remap_stage


def test_stored_stage_follows_the_new_item_index_and_lists_unknown_items_as_cold(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    table = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2)  # rows: padding, items a, b, c
    save_file({"item_embeddings": table}, str(stage / "item_embeddings.safetensors"))
    (stage / "config.json").write_text(json.dumps({"mode": "unified", "n_id_items": 3}))
    old = pd.DataFrame({"item_idx": [1, 2, 3], "item_id": ["a", "b", "c"]})
    new = pd.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["c", "new", "a", "b"]})  # re-indexed + 1 new

    out = remap_stage(stage, old, new, tmp_path / "remapped")

    remapped = load_file(str(out / "item_embeddings.safetensors"))["item_embeddings"]
    assert remapped.shape == (5, 2)
    assert torch.equal(remapped[1], table[3]) and torch.equal(remapped[3], table[1])
    assert torch.equal(remapped[4], table[2]) and torch.equal(remapped[2], torch.zeros(2))
    cfg = load_stage_config(out)  # the v0 config (no format_version) was read by the legacy reader
    assert cfg.n_id_items == 4 and cfg.cold_items == [2] and cfg.mode == "unified"
    original = load_file(str(stage / "item_embeddings.safetensors"))["item_embeddings"]
    assert original.shape == (4, 2)  # the stored model is untouched


def test_a_user_token_models_sasrec_copy_is_remapped_with_it(tmp_path):
    """A `[USER]` model carries SASRec (its user encoder): after the remap, the same items in the new
    numbering give the same user vector as in the old one."""
    from components.recommender import load_sasrec, save_model
    from components.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(n_items=3, max_len=4, hidden=8, layers=1, heads=1, inner=16))
    stage = tmp_path / "stage"
    save_model(sasrec, {1: "a", 2: "b", 3: "c"}, stage / "sasrec")
    save_file(
        {"item_embeddings": sasrec.item_emb.weight.detach().clone()},
        str(stage / "item_embeddings.safetensors"),
    )
    (stage / "config.json").write_text(json.dumps({"mode": "unified", "n_id_items": 3, "user_token": True}))
    old = pd.DataFrame({"item_idx": [1, 2, 3], "item_id": ["a", "b", "c"]})
    new = pd.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["c", "new", "a", "b"]})

    out = remap_stage(stage, old, new, tmp_path / "remapped")

    before, _ = load_sasrec(stage / "sasrec")
    after, cfg = load_sasrec(out / "sasrec")
    assert cfg.n_items == 4
    with torch.no_grad():  # items a, b, c: 1, 2, 3 before and 3, 4, 1 after
        u_old = before.user_vector(torch.tensor([[0, 1, 2, 3]]))
        u_new = after.user_vector(torch.tensor([[0, 3, 4, 1]]))
    torch.testing.assert_close(u_old, u_new)


def _stored(tmp_path, items: pd.DataFrame, cold: list[int]):
    stored = tmp_path / "bundle"
    (stored / "llm").mkdir(parents=True)
    table = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)  # rows: padding + items 1..4
    save_file({"item_embeddings": table}, str(stored / "llm" / "item_embeddings.safetensors"))
    cfg = {"mode": "unified", "n_id_items": 4, "cold_items": cold}
    (stored / "llm" / "config.json").write_text(json.dumps(cfg))
    items.to_parquet(stored / "items.parquet")
    return stored, table


def test_a_bundle_on_the_stable_index_scores_a_newer_snapshot_without_remapping(tmp_path):
    from components.rescore import production_stage

    then = pd.DataFrame(
        {"item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"], "trained": [True, True, False, True]}
    )
    stored, _ = _stored(tmp_path, then, cold=[3])
    now = pd.DataFrame(  # a week later: c has data now, e is new (appended), d left the catalogue
        {"item_idx": [1, 2, 3, 5], "item_id": ["a", "b", "c", "e"], "trained": [True, True, True, True]}
    )
    stage, how = production_stage(stored, now, tmp_path / "tmp")
    assert how == "plain" and stage == stored / "llm"
    assert not (tmp_path / "tmp").exists()


def test_an_index_that_gave_a_row_to_another_item_is_not_the_same_index(tmp_path):
    from components.rescore import same_index

    then = pd.DataFrame({"item_idx": [1, 2], "item_id": ["a", "x"], "trained": [True, True]})
    assert same_index(then, then.assign(trained=False))
    assert same_index(then, pd.concat([then, pd.DataFrame({"item_idx": [3], "item_id": ["y"]})]))
    assert not same_index(then, pd.DataFrame({"item_idx": [1, 2], "item_id": ["a", "y"]}))  # x gone, y at 2
    assert not same_index(then, pd.DataFrame({"item_idx": [1, 3], "item_id": ["a", "x"]}))  # x moved


def test_a_v0_bundle_or_a_changed_index_is_remapped_and_keeps_its_cold_rows_cold(tmp_path):
    from components.rescore import production_stage

    v0 = pd.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"]})  # before the index
    stored, _ = _stored(tmp_path, v0, cold=[])
    now = pd.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"], "trained": [True] * 4})
    assert production_stage(stored, now, tmp_path / "t0")[1] == "remap"  # no `trained`: format v0

    then = v0.assign(trained=[True, True, False, True])
    stored, table = _stored(tmp_path / "x", then, cold=[3])
    moved = pd.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["b", "a", "c", "d"], "trained": [True] * 4})
    stage, how = production_stage(stored, moved, tmp_path / "t1")
    assert how == "remap"
    remapped = load_file(str(stage / "item_embeddings.safetensors"))["item_embeddings"]
    assert torch.equal(remapped[1], table[2]) and torch.equal(remapped[2], table[1])
    assert json.loads((stage / "config.json").read_text())["cold_items"] == [3]  # untrained then: cold now
