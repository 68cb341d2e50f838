"""Loading a ranker: the base LLM (zero-shot, text-only) or a trained stage folder, LoRA merged, in a dtype.

A stage folder's config.json is a `StageFolder` (components/llm/stage_folder.py). `load_ranker` returns
(model, tokenizer, RankerConfig); `make_builder` the prompt builder the model was trained with. Scoring
with the loaded model is components.llm.rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from components.errors import ModelError
from components.llm.model import RsllmModel
from components.llm.prompts import PromptBuilder
from components.llm.stage_folder import BASE_STAGE, StageFolder, load_stage_config


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
