"""Builders for the LLM tests: a tiny prepared dataset, a tiny Llama saved as a base folder, settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from components.config import Settings, parse_settings
from components.llm.base import tiny_llama
from components.llm.prompts import CANDIDATES_HEAD, HISTORY_HEAD, QUESTION

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["red", "blue", "night", "day", "story", "heat", "toy", "river", "king", "city", "dog", "moon"]


def tiny_titles(n_items: int) -> list[str]:
    """titles[0] = "" (padding), then distinct two- or three-word titles."""
    titles = [""]
    for i in range(n_items):
        words = [WORDS[i % len(WORDS)].title(), WORDS[(i // len(WORDS) + 3 * i) % len(WORDS)]]
        if i % 3 == 0:
            words.append(str(1990 + i % 9))
        titles.append(" ".join(words) + f" {i}")
    return titles


def write_prepared(folder: Path, n_users: int = 12, n_items: int = 40, seed: int = 0) -> list[str]:
    """items/sequences/valid/test parquet in the prepare.py layout; returns titles."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    titles = tiny_titles(n_items)
    pd.DataFrame(
        {
            "item_idx": np.arange(1, n_items + 1, dtype=np.int32),
            "item_id": [str(i) for i in range(1, n_items + 1)],
            "title": titles[1:],
            "year": [1990] * n_items,
            "genres": ["Drama"] * n_items,
        }
    ).to_parquet(folder / "items.parquet")
    seqs, valid, test = [], [], []
    for u in range(n_users):
        seq = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(6, 12)), replace=False).tolist()
        seqs.append({"user_idx": u, "items": seq})
        for rows, cut in ((valid, -2), (test, -1)):
            target = seq[cut]
            negs = [i for i in rng.permutation(np.arange(1, n_items + 1)).tolist() if i not in seq][:19]
            cands = rng.permutation([target, *negs]).tolist()
            rows.append({"user_idx": u, "history": seq[:cut][-10:], "target": target, "candidates": cands})
    pd.DataFrame(seqs).to_parquet(folder / "sequences.parquet")
    pd.DataFrame(valid).to_parquet(folder / "valid.parquet")
    pd.DataFrame(test).to_parquet(folder / "test.parquet")
    return titles


def tiny_model(titles: list[str], seed: int = 0):
    """Tiny Llama + tokenizer trained on the titles and the prompt template."""
    return tiny_llama([*titles[1:], HISTORY_HEAD + CANDIDATES_HEAD + QUESTION], seed=seed)


def write_base(folder: Path, titles: list[str]) -> Path:
    """The tiny model saved like models/base (safetensors + tokenizer)."""
    model, tok = tiny_model(titles)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def write_item_table(path: Path, n_items: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    from safetensors.torch import save_file

    table = torch.randn(n_items + 1, dim, generator=torch.Generator().manual_seed(seed))
    table[0] = 0
    save_file({"item_embeddings": table}, str(path))
    return table


def llm_params(tmp: Path, **stage) -> dict:
    """The repo's params.yaml with a small llm section (both stages use `stage` overrides)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    st = {
        "samples": 8,
        "epochs": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 0,
        "max_prompt_tokens": 400,
        "checkpoint_every": 1,
        "log_every": 1,
        **stage,
    }
    raw["llm"] = {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "projector_hidden": 16,
        "loss": {"user_item": 0.5, "id_text": 0.5, "temperature": 0.1},
        "stage1": st,
        "stage2": st,
        "checkpoint_dir": str(tmp / "ckpt"),
        "threads": 1,
    }
    return raw


def llm_settings(tmp: Path, **stage) -> Settings:
    return parse_settings(llm_params(tmp, **stage))


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
