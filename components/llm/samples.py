"""Training samples for the two LLM stages, and their collation into model inputs.

Every position t >= 1 of every training sequence (items[:-2]; the last two are valid and test) is a
sample: history = up to `history_len` previous items, target = items[t], candidates = the target +
seeded negatives the user never interacted with, drawn from the trained items (shuffled).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.errors import ModelError
from components.llm.prompts import PromptBuilder


@dataclass(frozen=True)
class Sample:
    user: int
    history: list[int]
    target: int
    candidates: list[int]
    prefix: tuple[int, ...] = ()  # every item before the target (SASRec's input for the user vector)


def read_titles(prepared: Path) -> list[str]:
    """titles[item_idx] for item_idx 0..N from data/prepared/items.parquet (index 0 = padding, "")."""
    path = Path(prepared) / "items.parquet"
    if not path.exists():
        raise ModelError(f"{path}: not found; run `rsllm prepare` first")
    items = pd.read_parquet(path, columns=["item_idx", "title"])
    titles = [""] * (int(items["item_idx"].max()) + 1)
    for idx, title in zip(items["item_idx"].tolist(), items["title"].tolist(), strict=True):
        titles[int(idx)] = "" if title is None else str(title)
    return titles


def trained_pool(prepared: Path) -> np.ndarray:
    """item_idx of the items with training data (data/prepared/items.parquet `trained`): the negatives'
    pool. A prepared folder from before the stable index lacks the column: every item was trained."""
    path = Path(prepared) / "items.parquet"
    if not path.exists():
        raise ModelError(f"{path}: not found; run `rsllm prepare` first")
    items = pd.read_parquet(path)
    from components.prepare import trained_flags

    return np.sort(items.loc[trained_flags(items), "item_idx"].to_numpy(np.int64))


def training_samples(
    sequences: pd.DataFrame,
    pool: np.ndarray,
    history_len: int,
    num_candidates: int,
    max_samples: int,
    seed: int,
    stream: int = 0,
) -> list[Sample]:
    """Draw `max_samples` (0 = all) training samples from every position of every train sequence.

    `stream` (the stage) gives each stage its own seeded draw of positions and negatives."""
    from components.prepare import sample_candidates

    trains = [
        (int(u), [int(i) for i in seq][:-2])
        for u, seq in zip(sequences["user_idx"].tolist(), sequences["items"].tolist(), strict=True)
    ]
    pairs = [(k, t) for k, (_, train) in enumerate(trains) for t in range(1, len(train))]
    if not pairs:
        raise ModelError("sequences.parquet: no training positions (every sequence is shorter than 4)")
    order = np.random.default_rng([seed, stream]).permutation(len(pairs))
    if max_samples:
        order = order[:max_samples]
    samples = []
    for j in order.tolist():
        k, t = pairs[j]
        user, train = trains[k]
        rng = np.random.default_rng([seed, stream, user, t])
        cands = sample_candidates(train[t], set(train), pool, num_candidates, rng)
        samples.append(
            Sample(
                user, train[max(0, t - history_len) : t], train[t], [int(c) for c in cands], tuple(train[:t])
            )
        )
    return samples


@torch.no_grad()
def user_vectors(sasrec_dir: Path, prefixes: list, batch: int = 512) -> torch.Tensor:
    """SASRec's user vector [N, D] after each prefix (the last max_len items), as the service's encoder."""
    from components.recommender import load_sasrec, pad_left

    model, cfg = load_sasrec(sasrec_dir)
    out = [
        model.user_vector(torch.from_numpy(pad_left(list(prefixes[i : i + batch]), cfg.max_len))).float()
        for i in range(0, len(prefixes), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, cfg.hidden)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(
    samples: list[Sample], builder: PromptBuilder, user_vec: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch of format-2 prompts + answers (components.llm.prompts, marked=True).

    user_vec [B, D]: SASRec's user vectors of these samples (for `[USER]` and distillation), or None.
    """
    ids, labels, item_at, prompt_end, cand_pos, user_pos = [], [], [], [], [], []
    for s in samples:
        p = builder.prompt(s.history, s.candidates)
        answer = builder.answer_ids(s.target)
        ids.append(p.ids + answer)
        labels.append([-100] * len(p.ids) + answer)
        at = [0] * len(ids[-1])
        for pos, item in zip(p.item_pos, p.item_idx, strict=True):
            at[pos] = item
        item_at.append(at)
        prompt_end.append(len(p.ids) - 1)
        cand_pos.append(p.cand_pos)
        user_pos.append(-1 if p.user_pos is None else p.user_pos)
    pad = builder.tok.pad_token_id
    batch = {
        "input_ids": _pad(ids, pad),  # [B, T]
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),  # [B, T]
        "labels": _pad(labels, -100),  # [B, T]
        "item_at": _pad(item_at, 0),  # [B, T]
        "prompt_end": torch.tensor(prompt_end),  # [B]
        "cand_pos": torch.tensor(cand_pos),  # [B, C]: each candidate's marker
        "cand_items": torch.tensor([s.candidates for s in samples]),  # [B, C]
        "target_col": torch.tensor([s.candidates.index(s.target) for s in samples]),  # [B]
        "user_pos": torch.tensor(user_pos),  # [B], -1 = no [USER]
    }
    if user_vec is not None:
        batch["user_vec"] = user_vec.float()  # [B, D]
    return batch
