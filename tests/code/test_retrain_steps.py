"""Steps of the retrain after the DVC stages: re-mapping a stored model onto a newer snapshot, reports."""

import json

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

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
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_id_items"] == 4 and cfg["cold_items"] == [2]
    original = load_file(str(stage / "item_embeddings.safetensors"))["item_embeddings"]
    assert original.shape == (4, 2)  # the stored model is untouched
