"""Loading a ranker: the base LLM (zero-shot, text-only) or a trained stage folder, LoRA merged, in a dtype.

`load_ranker` returns (model, tokenizer, config); `make_builder` the prompt builder the model was trained
with. A folder without `prompt_format` is a bundle from before the head ranker (LEGACY: format 1,
likelihood ranking). Scoring with the loaded model is components.llm.rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from components.errors import ModelError
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


LEGACY = {"prompt_format": 1, "rank": "likelihood", "user_token": False, "prompt_titles": True}


def load_ranker(
    base_dir: Path,
    stage_dir: Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    rank: str | None = None,
):
    """The base LLM (zero-shot, text-only) or a trained stage, LoRA merged for inference, in `dtype`
    (auto: components.llm.base.llm_dtype, as the service).

    Returns (model, tokenizer, config): config has mode ("text" | "unified"), rank ("head" |
    "likelihood"), prompt_format, user_token, prompt_titles, history_len, max_prompt_tokens, n_id_items,
    cold_items, and `user_encoder` (UserEncoder or None). A folder without prompt_format is a bundle from
    before the head ranker: format 1, likelihood ranking. `rank` overrides the stored ranking mode (the
    ablation scores one format-2 model both ways).
    """
    from safetensors.torch import load_file

    from components.llm.base import llm_dtype, load_base
    from components.llm.model import load_head, load_lora, load_projector

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = llm_dtype(dtype, device)
    base, tok = load_base(base_dir, dtype=torch.float32)
    cfg = {
        "mode": "text",
        "history_len": None,
        "max_prompt_tokens": None,
        "n_id_items": 0,
        "stage": 0,
        "cold_items": [],
        **LEGACY,
    }
    projector, table, head, user_projector = None, None, None, None
    if stage_dir is not None:
        stage_dir = Path(stage_dir)
        if not (stage_dir / "config.json").exists():
            raise ModelError(f"{stage_dir}: no trained stage (config.json missing)")
        stored = json.loads((stage_dir / "config.json").read_text())
        cfg.update({k: v for k, v in stored.items() if k in cfg})
        base = load_lora(base, stage_dir / "adapter", trainable=False).merge_and_unload()
        if cfg["mode"] == "unified":
            projector = load_projector(stage_dir / "projector.safetensors")
            table = load_file(str(stage_dir / "item_embeddings.safetensors"))["item_embeddings"]
        if cfg["prompt_format"] >= 2:
            head = load_head(stage_dir / "head.safetensors")
        if cfg["user_token"]:
            user_projector = load_projector(stage_dir / "user_projector.safetensors")
    model = RsllmModel(base, projector, table, head, user_projector).to(device)
    model.to(getattr(torch, dtype))
    model.eval()
    if rank is not None:
        if rank == "head" and head is None:
            raise ModelError(f"{stage_dir}: no score head (prompt format 1): it ranks by likelihood only")
        cfg["rank"] = rank
    cfg["dtype"] = dtype
    cfg["user_encoder"] = UserEncoder(stage_dir / "sasrec") if cfg["user_token"] else None
    return model, tok, cfg


def make_builder(tok, titles: Sequence[str], cfg: dict, cold_items: Sequence[int] = ()) -> PromptBuilder:
    """The prompt builder a loaded ranker was trained with (load_ranker's config)."""
    return PromptBuilder(
        tok,
        titles,
        unified=cfg["mode"] == "unified",
        n_id_items=cfg["n_id_items"],
        cold_items=[*cfg["cold_items"], *cold_items],
        max_prompt_tokens=cfg["max_prompt_tokens"],
        marked=cfg["prompt_format"] >= 2,
        user_token=cfg["user_token"],
        titles_in_prompt=cfg["prompt_titles"],
        user_at_end=cfg["prompt_format"] >= 3,
    )
