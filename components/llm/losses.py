"""L = L_lm + a * L_user_item + b * L_id_text (weights and temperature in params.yaml, llm.loss).

L_lm        cross-entropy on the answer (target title + eos) tokens only; the prompt is masked.
L_user_item InfoNCE: user = last hidden state at the end of the prompt ("Answer:"); positive = the
            target item's LLM representation (hidden state at the end of " <title>[ITEM]" in stage 2,
            " <title>" in stage 1); negatives = the other targets of the batch.
L_id_text   InfoNCE (stage 2): projector(ID embedding of an item) vs the LLM's representation of its title
            (last hidden state of " <title>", or the mean input embedding of its tokens); in-batch negatives.
A weight of 0 switches a loss off (it is then not computed at all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy. logits [N, V] (at positions that predict an answer token), targets [N]."""
    return F.cross_entropy(logits.float(), targets)


def info_nce(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of queries [B, H] should match row i of keys [B, H].

    Cosine similarity / temperature. When `ids` [B] is given, other rows with the same id (the same
    item twice in a batch) are not used as negatives.
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    sim = q @ k.T / temperature  # [B, B]
    if ids is not None:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        sim = sim.masked_fill(same, float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(q), device=q.device))


def combine(
    l_lm: torch.Tensor, l_user_item: torch.Tensor, l_id_text: torch.Tensor, a: float, b: float
) -> torch.Tensor:
    """L = L_lm + a * L_user_item + b * L_id_text."""
    return l_lm + a * l_user_item + b * l_id_text


def batch_losses(
    model,
    batch: dict[str, torch.Tensor],
    a: float = 0.0,
    b: float = 0.0,
    temperature: float = 0.07,
    id_text_space: str = "hidden",
) -> dict[str, torch.Tensor]:
    """All losses of one training batch (see components.llm.train.collate for the batch layout)."""
    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    h = model.hidden(ids, batch["item_at"], batch["attention_mask"])  # [B, T, H]
    # position t predicts token t+1: keep only positions whose next token is part of the answer
    sel = labels[:, 1:] != -100  # [B, T-1]
    l_lm = lm_loss(model.logits(h[:, :-1][sel]), labels[:, 1:][sel])  # logits [n_answer_tokens, V]
    zero = l_lm.new_zeros(())
    l_ui, l_it = zero, zero
    rows = torch.arange(len(ids), device=ids.device)
    if a > 0 or (b > 0 and model.unified):
        hi = model.hidden(batch["item_input_ids"], batch["item_item_at"], batch["item_attention_mask"])
        if a > 0:
            user = h[rows, batch["prompt_end"]]  # [B, H]
            item = hi[rows, batch["item_rep_pos"]]  # [B, H]
            l_ui = info_nce(user, item, temperature, batch["target"])
        has_id = batch["item_has_id"]  # [B] bool
        if b > 0 and model.unified and bool(has_id.any()):
            if id_text_space == "input":
                tok = model.causal_lm.get_input_embeddings()(batch["item_input_ids"])  # [B, Ti, H]
                title_mask = batch["item_title_mask"].unsqueeze(-1).to(tok.dtype)  # [B, Ti, 1]
                text = (tok * title_mask).sum(1) / title_mask.sum(1)  # [B, H]
            else:
                text = hi[rows, batch["item_text_pos"]]  # [B, H]: before [ITEM], so text only
            proj = model.project(batch["target"][has_id])  # [B', H]
            l_it = info_nce(proj, text[has_id], temperature, batch["target"][has_id])
    loss = combine(l_lm, l_ui, l_it, a, b)
    return {
        "loss": loss,
        "lm": l_lm.detach(),
        "user_item": l_ui.detach(),
        "id_text": l_it.detach(),
        "answer_tokens": sel.sum().detach(),
    }
