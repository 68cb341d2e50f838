"""An LLM stage folder's config (models/llm/stage{1,2}, a bundle's llm/): typed and versioned
(components/folders.py), written by `save_stage_config` (llm/train.py) and read by `load_stage_config`
(llm/loading.py, rescore.py).

A config without `format_version` is v0: read as before typed folders; one without `prompt_format` is
from before the head ranker (LEGACY: format 1, likelihood ranking).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from components.errors import ModelError
from components.folders import FolderConfig, load_config, save_config


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
