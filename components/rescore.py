"""Re-scoring the production bundle on the current candidate sets (the gate compares it with the
candidate): its ID table is remapped onto today's item_idx space first (bundles are keyed by the
item_idx of the week they were trained on)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from components.evaluate import score_model_dirs
from components.paths import outputs


def remap_stage(stage_dir: Path, model_items: pd.DataFrame, prepared_items: pd.DataFrame, out: Path) -> Path:
    """A copy of a stored stage whose ID-embedding table follows the current item_idx space.

    Items the stored model never saw get a zero row and are listed as cold (title only). A `[USER]`
    model's SASRec copy (its user encoder) gets the same remapped item table.
    """
    from safetensors.torch import load_file, save_file

    from components.recommender import MODEL_FORMAT

    shutil.copytree(stage_dir, out)
    table = load_file(str(stage_dir / "item_embeddings.safetensors"))["item_embeddings"]
    old_idx = dict(zip(model_items["item_id"].astype(str), model_items["item_idx"], strict=True))
    new = table.new_zeros((len(prepared_items) + 1, table.shape[1]))
    cold = []
    for idx, item_id in zip(prepared_items["item_idx"], prepared_items["item_id"].astype(str), strict=True):
        j = old_idx.get(item_id)
        if j is None or j >= table.shape[0]:
            cold.append(int(idx))
        else:
            new[int(idx)] = table[int(j)]
    save_file({"item_embeddings": new.contiguous()}, str(out / "item_embeddings.safetensors"))
    if (out / "sasrec").is_dir():  # a `[USER]` model's user encoder reads prefixes in the same numbering
        weights = load_file(str(out / "sasrec" / "model.safetensors"))
        weights["item_emb.weight"] = new.to(weights["item_emb.weight"].dtype).contiguous()
        save_file(weights, str(out / "sasrec" / "model.safetensors"), metadata={"format": MODEL_FORMAT})
        sasrec_cfg = json.loads((out / "sasrec" / "config.json").read_text())
        sasrec_cfg["model"]["n_items"] = len(prepared_items)
        (out / "sasrec" / "config.json").write_text(json.dumps(sasrec_cfg, indent=2))
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_id_items"] = len(prepared_items)
    cfg["cold_items"] = cold
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def score_production(repo: Path) -> str | None:
    """Re-score the production model on the current candidate sets -> metrics/production.json."""
    from components import registry
    from components.config import load_settings

    pointer = registry.read_production(repo)
    out = outputs(repo)["production_eval"]
    if pointer is None:
        out.unlink(missing_ok=True)
        return None
    settings = load_settings(repo / "params.yaml")
    model = registry.get_model(pointer["model_tag"])
    base = registry.get_model(pointer["base_tag"])
    stored = Path(model.path)
    prepared = outputs(repo)["prepared"]
    with tempfile.TemporaryDirectory() as tmp:
        stage = remap_stage(
            stored / "llm",
            pd.read_parquet(stored / "items.parquet"),
            pd.read_parquet(prepared / "items.parquet"),
            Path(tmp) / "stage",
        )
        score_model_dirs(settings, prepared, Path(base.path), stage, "production", out)
    return str(out)
