"""Loading a ranker: the base LLM (zero-shot, text-only) or a trained stage folder, LoRA merged, in a dtype.

A stage folder's config.json is a `StageFolder` (components/folders.py: typed, versioned), written by
`save_stage_config` and read by `load_stage_config`. A config without `format_version` is v0: read as
before typed folders, and one without `prompt_format` is from before the head ranker (LEGACY: format 1,
likelihood ranking). `load_ranker` returns (model, tokenizer, RankerConfig); `make_builder` the prompt
builder the model was trained with. Scoring with the loaded model is components.llm.rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from components.errors import ModelError
from components.folders import FolderConfig, load_config, save_config
from components.llm.model import RsllmModel
from components.llm.prompts import PromptBuilder


class UserEncoder:
    """SASRec's user vector after a prefix of item indexes (the copy a `[USER]` model carries).

    Items it has no trained row for (newer than the model, or without data when it was trained) are
    left out of the prefix, as the service's retrieval leaves out cold history items."""

    def __init__(self, sasrec_dir: Path):
        from components.recommender import load_item_ids, load_sasrec

        self.model, self.cfg = load_sasrec(sasrec_dir)
        self.known = frozenset(load_item_ids(sasrec_dir))

    @torch.inference_mode()
    def __call__(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:  # -> [B, D]
        from components.recommender import pad_left

        kept = [[i for i in p if int(i) in self.known] for p in prefixes]
        return self.model.user_vector(torch.from_numpy(pad_left(kept, self.cfg.max_len))).float()


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


@dataclass(frozen=True)
class RankerConfig:
    """A loaded ranker: its stage's config and how it runs here."""

    stage: StageFolder
    rank: str  # "head" | "likelihood": the stage's own mode unless load_ranker was told otherwise
    dtype: str  # "float32" | "bfloat16"
    user_encoder: UserEncoder | None = None  # SASRec's user vectors for `[USER]` (stage.user_token)


PLAIN = RankerConfig(BASE_STAGE, "likelihood", "float32")  # likelihood ranking, no `[USER]`


def load_ranker(
    base_dir: Path,
    stage_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    rank: str | None = None,
):
    """The base LLM (zero-shot, text-only) or a trained stage, LoRA merged for inference, in `dtype`
    (auto: components.llm.base.llm_dtype, as the service).

    Returns (model, tokenizer, RankerConfig). `rank` overrides the stored ranking mode (the ablation
    scores one format-2 model both ways).
    """
    from safetensors.torch import load_file

    from components.llm.base import llm_dtype, load_base
    from components.llm.model import load_head, load_lora, load_projector

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = llm_dtype(dtype, device)
    base, tok = load_base(base_dir, dtype=torch.float32)
    stage = BASE_STAGE
    projector, table, head, user_projector = None, None, None, None
    if stage_dir is not None:
        stage_dir = Path(stage_dir)
        stage = load_stage_config(stage_dir)
        base = load_lora(base, stage_dir / "adapter", trainable=False).merge_and_unload()
        if stage.mode == "unified":
            projector = load_projector(stage_dir / "projector.safetensors")
            table = load_file(str(stage_dir / "item_embeddings.safetensors"))["item_embeddings"]
        if stage.prompt_format >= 2:
            head = load_head(stage_dir / "head.safetensors")
        if stage.user_token:
            user_projector = load_projector(stage_dir / "user_projector.safetensors")
    model = RsllmModel(base, projector, table, head, user_projector).to(device)
    model.to(getattr(torch, dtype))
    model.eval()
    if rank == "head" and head is None:
        raise ModelError(f"{stage_dir}: no score head (prompt format 1): it ranks by likelihood only")
    encoder = UserEncoder(stage_dir / "sasrec") if stage.user_token else None
    return model, tok, RankerConfig(stage, rank or stage.rank, dtype, encoder)


def make_builder(
    tok, titles: Sequence[str], cfg: RankerConfig, cold_items: Sequence[int] = ()
) -> PromptBuilder:
    """The prompt builder a loaded ranker was trained with."""
    st = cfg.stage
    return PromptBuilder(
        tok,
        titles,
        unified=st.mode == "unified",
        n_id_items=st.n_id_items,
        cold_items=[*st.cold_items, *cold_items],
        max_prompt_tokens=st.max_prompt_tokens,
        marked=st.prompt_format >= 2,
        user_token=st.user_token,
        titles_in_prompt=st.prompt_titles,
        user_at_end=st.prompt_format >= 3,
    )
