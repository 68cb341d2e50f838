"""Re-scoring the production bundle on the current candidate sets (the gate compares it with the
candidate).

Item indexes are stable (components.data.item_index): a bundle made since then (its items.parquet has
`trained`) scores today's data by a plain load, items newer than it being cold by index. A bundle from
before (format v0, items renumbered every week), or one whose index disagrees with today's, is remapped
onto today's item_idx first (remap_stage)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from components.evaluate import score_model_dirs
from components.paths import outputs

log = logging.getLogger(__name__)


def remap_stage(stage_dir: Path, model_items: pd.DataFrame, prepared_items: pd.DataFrame, out: Path) -> Path:
    """A copy of a stored stage whose ID-embedding table follows the current item_idx space.

    Items the stored model never saw get a zero row and are listed as cold (title only). A `[USER]`
    model's SASRec copy (its user encoder) gets the same remapped item table.
    """
    from safetensors.torch import load_file, save_file

    from components.llm.stage_folder import load_stage_config, save_stage_config
    from components.recommender import MODEL_FORMAT, load_sasrec_config, save_sasrec_config

    shutil.copytree(stage_dir, out)
    table = load_file(str(stage_dir / "item_embeddings.safetensors"))["item_embeddings"]
    cfg = load_stage_config(out)  # a v0 folder is read through the legacy reader and saved typed
    old_cold = set(cfg.cold_items)  # rows the stored model has no training data for
    old_idx = dict(zip(model_items["item_id"].astype(str), model_items["item_idx"], strict=True))
    size = int(prepared_items["item_idx"].max())
    new = table.new_zeros((size + 1, table.shape[1]))
    cold, known = [], {}
    for idx, item_id in zip(prepared_items["item_idx"], prepared_items["item_id"].astype(str), strict=True):
        j = old_idx.get(item_id)
        if j is None or j >= table.shape[0] or int(j) in old_cold:
            cold.append(int(idx))
        else:
            new[int(idx)] = table[int(j)]
            known[int(idx)] = item_id
    cold += [i for i in range(1, size + 1) if i not in known and i not in cold]  # gaps in the index
    save_file({"item_embeddings": new.contiguous()}, str(out / "item_embeddings.safetensors"))
    if (out / "sasrec").is_dir():  # a `[USER]` model's user encoder reads prefixes in the same numbering
        weights = load_file(str(out / "sasrec" / "model.safetensors"))
        weights["item_emb.weight"] = new.to(weights["item_emb.weight"].dtype).contiguous()
        save_file(weights, str(out / "sasrec" / "model.safetensors"), metadata={"format": MODEL_FORMAT})
        sasrec_cfg = load_sasrec_config(out / "sasrec")
        model = dataclasses.replace(sasrec_cfg.model, n_items=size)
        save_sasrec_config(out / "sasrec", sasrec_cfg.model_copy(update={"model": model}))
        mapping = {str(i): item_id for i, item_id in sorted(known.items())}
        (out / "sasrec" / "items.json").write_text(json.dumps(mapping, indent=1) + "\n")
    save_stage_config(out, cfg.model_copy(update={"n_id_items": size, "cold_items": sorted(cold)}))
    return out


def same_index(model_items: pd.DataFrame, prepared_items: pd.DataFrame) -> bool:
    """True when the stored model's items are on today's stable index: it has `trained` (made since the
    stable index) and every item it knows has the same item_idx today."""
    if "trained" not in model_items:
        return False

    def pairs(items: pd.DataFrame) -> set[tuple[str, int]]:
        return set(zip(items["item_id"].astype(str), items["item_idx"].astype(int), strict=True))

    then, now = pairs(model_items), pairs(prepared_items)
    ids_now, idx_now = {i for i, _ in now}, {j for _, j in now}
    # an item known to both at another index, or an index holding another item: not the same index
    shared = {(i, j) for i, j in then if i in ids_now or j in idx_now}
    return shared <= now


def production_stage(stored: Path, prepared_items: pd.DataFrame, tmp: Path) -> tuple[Path, str]:
    """The stored bundle's LLM stage, ready for today's candidate sets, and how it got there: "plain" (the
    stored folder itself) or "remap" (a remapped copy under tmp: a v0 bundle, or a changed index)."""
    model_items = pd.read_parquet(stored / "items.parquet")
    if same_index(model_items, prepared_items):
        return stored / "llm", "plain"
    return remap_stage(stored / "llm", model_items, prepared_items, tmp / "stage"), "remap"


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
        stage, how = production_stage(stored, pd.read_parquet(prepared / "items.parquet"), Path(tmp))
        log.info("production %s: scored on today's item index (%s)", pointer["model_tag"], how)
        score_model_dirs(
            settings, prepared, Path(base.path), stage, "production", out, extra={"item_index": how}
        )
    return str(out)
