"""An LLM stage folder's config (models/llm/stage{1,2}, a bundle's llm/): typed and versioned
(components/folders.py). `save_stage` writes a trained folder (llm/train.py), `save_stage_config` its
config alone; `load_stage_config` reads it (llm/loading.py, rescore.py).

A config without `format_version` is v0: read as before typed folders; one without `prompt_format` is
from before the head ranker (LEGACY: format 1, likelihood ranking).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from components.errors import ModelError
from components.folders import FolderConfig, load_config, record, save_config
from components.io import atomic_dir, write_json_atomic

PROMPT_FORMAT = 3  # components.llm.prompts: a marker after every candidate, canonical order, `[USER]` last


class StageFolder(FolderConfig):
    """An LLM stage folder's config.json (models/llm/stage{1,2}, a bundle's llm/)."""

    kind: Literal["llm_stage"] = "llm_stage"
    stage: int  # 1: text-only prompts, 2: unified prompts; 0: the base model zero-shot (never saved)
    mode: Literal["text", "unified"]  # unified: items carry their projected ID embedding at `[ITEM]`
    prompt_format: int  # components.llm.prompts' format it was trained with (1: no markers, likelihood only)
    rank: Literal["head", "likelihood"]  # how it ranks unless the caller overrides it
    user_token: bool  # the prompt ends with `[USER]` (the folder then has user_projector + sasrec/)
    prompt_titles: bool  # false: items with an ID are their `[ITEM]` alone (the IDs-only ablation)
    history_len: int | None  # history items in the prompt (None: all given)
    max_prompt_tokens: int | None
    n_id_items: int  # items 1..n_id_items have a row in item_embeddings.safetensors
    cold_items: list[int] = []  # rows without training data: title only
    base_dir: str = ""  # records below: for people, never read back
    seed: int | None = None
    projector: dict[str, int] | None = None
    llm: dict[str, Any] = {}
    train: dict[str, Any] = {}


LEGACY = {"prompt_format": 1, "rank": "likelihood", "user_token": False, "prompt_titles": True}
BASE_STAGE = StageFolder(  # the base LLM zero-shot, text-only, ranked by likelihood
    format_version=1, stage=0, mode="text", history_len=None, max_prompt_tokens=None, n_id_items=0, **LEGACY
)


def _legacy_stage(raw: dict) -> StageFolder:
    """v0: the untyped dict of stage folders before typed folders (keys this reader knows; a history
    length never written is the protocol's 10)."""
    known = {k: v for k, v in raw.items() if k in StageFolder.model_fields and v is not None}
    return StageFolder(
        **{**BASE_STAGE.model_dump(), "history_len": 10, **LEGACY, **known, "format_version": 1}
    )


def save_stage_config(stage_dir: Path, config: StageFolder) -> None:
    """Write a stage folder's config.json."""
    save_config(stage_dir, config)


def load_stage_config(stage_dir: Path) -> StageFolder:
    """Read a stage folder's config.json (v0 through its legacy reader); ModelError naming the file."""
    if not (Path(stage_dir) / "config.json").exists():
        raise ModelError(f"{stage_dir}: no trained stage (config.json missing)")
    return load_config(stage_dir, StageFolder, _legacy_stage)


def save_stage(
    out_dir: Path,
    stage: int,
    model,
    settings,
    builder,
    base_dir: Path,
    summary: dict,
    log: list[dict],
    sasrec_dir: Path | None = None,
) -> None:
    """Write a trained stage folder atomically (llm/train.py): adapter/ (peft, safetensors), head,
    projector + item table (stage 2), user projector + sasrec/ (`[USER]`), config.json, train_log.json."""
    from safetensors.torch import save_file

    from components.llm.model import save_head, save_projector

    llm_s = settings.llm
    with atomic_dir(Path(out_dir)) as tmp:
        model.llm.save_pretrained(str(tmp / "adapter"), safe_serialization=True, save_embedding_layers=False)
        if model.unified:
            save_projector(model.projector, tmp / "projector.safetensors")
            table = model.item_table.detach().float().cpu().contiguous()
            save_file({"item_embeddings": table}, str(tmp / "item_embeddings.safetensors"))
        save_head(model.head, tmp / "head.safetensors")
        if model.user_projector is not None:
            save_projector(model.user_projector, tmp / "user_projector.safetensors")
            shutil.copytree(sasrec_dir, tmp / "sasrec")  # the user vectors' encoder travels with the model
        config = StageFolder(
            format_version=1,
            stage=stage,
            mode="unified" if model.unified else "text",
            prompt_format=PROMPT_FORMAT,
            rank=llm_s.rank,
            user_token=model.user_projector is not None,
            prompt_titles=builder.titles_in_prompt,
            history_len=llm_s.history_len,
            max_prompt_tokens=builder.max_prompt_tokens,
            n_id_items=builder.n_id_items,
            cold_items=sorted(builder.cold_items),  # table rows without training data: title only
            base_dir=str(base_dir),
            seed=settings.seed,
            projector=model.projector.config() if model.unified else None,
            llm=llm_s.model_dump(mode="json"),
            train=record(summary),  # numpy numbers as JSON
        )
        save_stage_config(tmp, config)
        write_json_atomic(tmp / "train_log.json", log)
