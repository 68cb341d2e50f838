"""Stage 2's score head started at the recommender's geometry (`llm.head_init: recommender`).

A bilinear head <W_u h_user, W_i h_c> started at random has to rediscover from a few thousand samples
what SASRec already knows; measured, it did not (the same head over SASRec's own vectors, the no-LLM
control, reached 0.79x SASRec). Here the head starts as ridge maps from the LLM's hidden states onto
SASRec's user vector and item embeddings, so at step 0 it scores ~ <u, e_c> *as read from the LLM*, and
training moves the head and the LLM from there. The LLM carries both vectors: each candidate's `[ITEM]`
input is its projected ID embedding, and with `llm.user_token` the prompt's last token `[USER]` is the
projected user vector. No SASRec score is used at inference: only the LLM's hidden states are read.

Measured on the medium profile (README): it puts the no-LLM control exactly at SASRec's HR@1, but
through SmolLM2-135M the readouts recover only part of the vectors (stage 2 0.81x SASRec), so it is a
switch, not the default.
"""

from __future__ import annotations

import torch

from components.errors import ModelError
from components.llm.model import ScoreHead


def ridge_map(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Least squares with an L2 penalty: y ~ x @ w + b. x [n, H], y [n, D] -> (w [H, D], b [D], R^2)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    w = torch.linalg.solve(gram + ridge * len(x) * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc)
    b = my - mx @ w
    r2 = 1.0 - float(((xc @ w - yc) ** 2).sum() / (yc**2).sum().clamp_min(1e-12))
    return w.float(), b.float(), r2


@torch.no_grad()
def calibrate_head(
    head: ScoreHead,
    h_user: torch.Tensor,
    user_vec: torch.Tensor,
    h_item: torch.Tensor,
    item_emb: torch.Tensor,
    ridge: float = 1e-2,
    seed: int = 0,
) -> dict:
    """Start the score head at the recommender's geometry, read from the LLM's own hidden states.

    Ridge maps A: h_user [n, H] -> SASRec user vector [n, D] and B: h_c [m, H] -> SASRec item embedding
    [m, D] become the first D rows of W_u and W_i (scaled by dim**0.25 against the head's 1/sqrt(dim)),
    so that at step 0 score(u, c) ~ <A h_user, B h_c>: SASRec's dot product as far as the LLM's hidden
    states carry the user and the candidate. The other dim - D rows start small and random. Training then
    moves the head and the LLM from there instead of from a random bilinear form (which lost SASRec's
    geometry: the no-LLM control sat at 0.79x SASRec). Returns the two fits' R^2 on the given rows.
    """
    d = user_vec.shape[1]
    if d > head.dim:
        raise ModelError(f"llm.head_dim ({head.dim}) must be >= the recommender's dimension ({d})")
    w_u, b_u, r2_u = ridge_map(h_user, user_vec, ridge)
    w_i, b_i, r2_i = ridge_map(h_item, item_emb, ridge)
    scale = head.dim**0.25
    gen = torch.Generator().manual_seed(seed)
    for layer, w, b in ((head.user, w_u, b_u), (head.item, w_i, b_i)):
        fresh = torch.randn(layer.weight.shape, generator=gen) * 1e-3
        fresh[:d] = w.T * scale  # [D, H]
        layer.weight.copy_(fresh.to(layer.weight.dtype))
        layer.bias.zero_()
        layer.bias[:d] = (b * scale).to(layer.bias.dtype)
    return {"r2_user": round(r2_u, 4), "r2_item": round(r2_i, 4), "rows": len(h_user)}


@torch.no_grad()
def read_states(model, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's inputs over some collated training batches (components.llm.samples.collate), LoRA
    dropout off: (h_user [n, H] at each prompt's end, h_c [n * C, H] at the candidates' markers,
    the candidates' item_idx [n * C])."""
    was_training = model.training
    model.eval()
    users, items, idx = [], [], []
    for batch in batches:
        _, h = model.head_states(
            batch["input_ids"],
            batch["item_at"],
            batch["attention_mask"],
            user_pos=batch["user_pos"],
            user_vec=batch.get("user_vec"),
        )
        h = h.float()  # [B, T, H]: the score head's input layer
        rows = torch.arange(len(h))
        users.append(h[rows, batch["prompt_end"]])
        items.append(h[rows[:, None], batch["cand_pos"]].reshape(-1, h.shape[-1]))
        idx.append(batch["cand_items"].reshape(-1))
    model.train(was_training)
    return torch.cat(users), torch.cat(items), torch.cat(idx)


def init_from_recommender(
    model, samples, builder, user_vecs: torch.Tensor, n: int, batch: int, seed: int
) -> dict:
    """calibrate_head on the first n training samples: their prompts' states against SASRec's user
    vectors (user_vecs [S, D], one per sample) and the candidates' item embeddings (model.item_table)."""
    from components.llm.samples import collate

    n = min(n, len(samples))
    batches = (collate(samples[i : i + batch], builder, user_vecs[i : i + batch]) for i in range(0, n, batch))
    h_user, h_item, items = read_states(model, batches)
    return calibrate_head(model.head, h_user, user_vecs[:n], h_item, model.item_table[items], seed=seed)
