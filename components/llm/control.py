"""The no-LLM control of the ablation: the same score head, L_user_item and training samples as the LLM
stages, over projected SASRec vectors with no LLM in between.

    score(user, c) = ScoreHead(P_u(SASRec user vector), P_i(SASRec item embedding of c))

If stage 2 does not beat this, the LLM adds nothing that SASRec's vectors alone do not already carry.
With `llm.head_init: recommender` the control's head starts at SASRec's geometry as stage 2's does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from components.llm.model import Projector, ScoreHead
from components.llm.samples import trained_pool, training_samples, user_vectors


class Control(nn.Module):
    """Projectors from the SASRec dimension D to `hidden` for users and items, then the score head."""

    def __init__(self, d: int, hidden: int, projector_hidden: int, head_dim: int):
        super().__init__()
        self.user = Projector(d, hidden, projector_hidden)
        self.item = Projector(d, hidden, projector_hidden)
        self.head = ScoreHead(hidden, head_dim)

    def forward(self, user_vec: torch.Tensor, cand_emb: torch.Tensor) -> torch.Tensor:
        """user_vec [B, D], cand_emb [B, C, D] -> scores [B, C]."""
        return self.head(self.user(user_vec), self.item(cand_emb))


def train_control(settings, prepared: Path, sasrec_dir: Path, hidden: int = 576) -> tuple[Control, dict]:
    """Train on stage 1's + stage 2's samples (the LLM's own draws), stage 2's batch size, lr and schedule."""
    from components.llm.optim import lr_at, param_groups
    from components.recommender import load_item_embeddings

    llm_s, seed = settings.llm, settings.seed
    sequences = pd.read_parquet(Path(prepared) / "sequences.parquet")
    table = load_item_embeddings(sasrec_dir).float()  # [N + 1, D]
    samples, pool = [], trained_pool(prepared)
    for stage, st in ((1, llm_s.stage1), (2, llm_s.stage2)):
        samples += training_samples(
            sequences,
            pool,
            llm_s.history_len,
            llm_s.train_candidates,
            st.samples,
            seed,
            stage,
        )
    vecs = user_vectors(sasrec_dir, [list(s.prefix) for s in samples])  # [S, D]
    cands = torch.tensor([s.candidates for s in samples])  # [S, C]
    target = torch.tensor([s.candidates.index(s.target) for s in samples])  # [S]
    torch.manual_seed(seed)
    model = Control(table.shape[1], hidden, llm_s.projector_hidden, llm_s.head_dim)
    head_fit = None
    if llm_s.head_init == "recommender":  # as stage 2: the head starts at SASRec's geometry
        from components.llm.head_init import calibrate_head

        n = min(llm_s.head_init_samples, len(samples))
        with torch.no_grad():
            h_user, h_item = model.user(vecs[:n]), model.item(table[cands[:n]]).reshape(-1, hidden)
        # stage 2's ridge (0.01 x n) is 0.04-0.08 of its hidden states' variance per dimension (measured on
        # SmolLM2: 0.23 at the user, 0.12 at the markers): the same relative ridge for these features
        ridge = 0.06 * float(torch.cat([h_user, h_item]).var(0).mean())
        emb = table[cands[:n]].reshape(-1, table.shape[1])
        head_fit = calibrate_head(model.head, h_user, vecs[:n], h_item, emb, ridge=ridge, seed=seed)
    st = llm_s.stage2
    opt = torch.optim.AdamW(param_groups(model, st.new_lr_scale), lr=st.lr, weight_decay=st.weight_decay)
    order = np.random.default_rng([seed, 3]).permutation(len(samples))
    batches = [order[i : i + st.batch_size] for i in range(0, len(order), st.batch_size)]
    losses = []
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, st.lr, st.warmup_steps, len(batches)) * g["scale"]
        idx = torch.from_numpy(idx)
        loss = F.cross_entropy(model(vecs[idx], table[cands[idx]]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    tenth = max(1, len(losses) // 10)
    info = {
        "samples": len(samples),
        "steps": len(batches),
        "loss_first_tenth": round(float(np.mean(losses[:tenth])), 4),
        "loss_last_tenth": round(float(np.mean(losses[-tenth:])), 4),
        "head_init_fit": head_fit,
    }
    return model.eval(), info


@torch.no_grad()
def control_ranks(model: Control, sasrec_dir: Path, prepared: Path, rows: pd.DataFrame) -> np.ndarray:
    """0-based rank of each row's target among its candidates (test rows: the prefix is items[:-1])."""
    from components.metrics import target_ranks
    from components.recommender import load_item_embeddings

    seqs = pd.read_parquet(Path(prepared) / "sequences.parquet")
    by_user = {int(u): list(s) for u, s in zip(seqs["user_idx"], seqs["items"], strict=True)}
    vecs = user_vectors(sasrec_dir, [by_user[int(u)][:-1] for u in rows["user_idx"]])
    table = load_item_embeddings(sasrec_dir).float()
    cands = torch.from_numpy(np.stack(rows["candidates"].to_numpy()).astype(np.int64))  # [U, C]
    scores = model(vecs, table[cands]).numpy()
    cols = np.argmax(cands.numpy() == rows["target"].to_numpy()[:, None], axis=1)
    return target_ranks(scores, cols)
