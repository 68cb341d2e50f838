"""L = L_lm + a * L_user_item + b * L_id_text + c * L_distill (weights and temperatures in llm.loss).

L_lm        cross-entropy on the answer (target title + eos) tokens only; the prompt is masked.
L_user_item InfoNCE between the user (last hidden state of the prompt) and each of the sample's
            candidates (hidden state at its `[ITEM]` marker), through the score head: a softmax over the
            prompt's candidates, whose 19 negatives are the hard ones the ranker must separate. Ranking
            (`llm.rank: head`) reads the same scores.
L_id_text   InfoNCE (stage 2) between an item's projected ID embedding and the LLM's text representation
            of its title, both through small projection heads (ScoreHead.id / .text):
              hidden: the title's last hidden state in the prompt (just before its `[ITEM]`); negatives =
                      every other item among the batch's candidates (B x 20, not B);
              input:  the mean input embedding of the title's tokens; negatives = the whole catalogue.
L_distill   KL(SASRec's softmax over the candidates || the head's), stage 2, training only (SASRec's
            scores are never used at inference).
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
    """InfoNCE: row i of queries [B, H] should match row i of keys [M >= B, H] (rows B.. are negatives only).

    Cosine similarity / temperature. When `ids` [M] is given, other rows with the same id (the same
    item twice) are not used as negatives.
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    sim = q @ k.T / temperature  # [B, M]
    if ids is not None:
        same = ids[: len(q), None] == ids[None, :]
        same[torch.arange(len(q)), torch.arange(len(q))] = False
        sim = sim.masked_fill(same, float("-inf"))
    return F.cross_entropy(sim, torch.arange(len(q), device=q.device))


@torch.no_grad()
def mean_offdiag_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity between different rows of x [N, d] (1.0 = all parallel)."""
    if len(x) < 2:
        return float("nan")
    z = F.normalize(x.float(), dim=-1)
    sim = z @ z.T
    n = len(z)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student)), mean over the batch. Both [B, C]."""
    target = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student.float(), dim=-1), target, reduction="batchmean")


def _centred(x: torch.Tensor) -> torch.Tensor:
    """x minus its mean row: the calibrated projector puts every ID near the mean token embedding, so the
    raw reps are nearly parallel (mean cosine 0.99 measured) and cosine InfoNCE sees no difference."""
    return x - x.mean(0, keepdim=True)


def id_text_pairs(model, batch: dict, h: torch.Tensor, space: str) -> tuple[torch.Tensor, ...]:
    """(ID reps [n, d], text reps [m, d], item ids [m]) for L_id_text; rows :n of the text reps pair up
    with the ID reps, the rest are extra negatives (the catalogue in `input` space)."""
    rows = torch.arange(len(h), device=h.device)[:, None]
    at = batch["item_at"][rows, batch["cand_pos"]]  # [B, C]: the item injected at each marker, 0 = cold
    items = torch.unique(at[at > 0])  # [n] distinct items with an ID
    if space == "input":  # every titled catalogue item: text = mean title input embedding
        titled = model.title_table[1:].abs().sum(1) > 0  # [N]: a gap in the item index has no title
        all_items = torch.arange(1, model.title_table.shape[0], device=h.device)[titled]
        rest = all_items[~torch.isin(all_items, items)]
        keys = torch.cat([items, rest])
        text = model.head.text(model.title_table[keys].to(model.head.text.weight.dtype))
        ids_rep = model.head.id(model.project(items).to(model.head.id.weight.dtype))
        return ids_rep, text, keys
    mask = at > 0
    flat_items = at[mask]  # [n]: may repeat (one item in two prompts)
    text_h = h[rows, (batch["cand_pos"] - 1).clamp_min(0)][mask]  # [n, H]: the title's last token
    ids_rep = model.head.id(model.project(flat_items).to(model.head.id.weight.dtype))
    text = model.head.text(text_h.to(model.head.text.weight.dtype))
    return ids_rep, text, flat_items


def batch_losses(
    model,
    batch: dict[str, torch.Tensor],
    a: float = 1.0,
    b: float = 0.0,
    c: float = 0.0,
    temperature: float = 0.07,
    distill_temperature: float = 1.0,
    id_text_space: str = "hidden",
) -> dict[str, torch.Tensor]:
    """All losses of one training batch (see components.llm.samples.collate for the batch layout)."""
    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    h, h_head = model.head_states(
        ids,
        batch["item_at"],
        batch["attention_mask"],
        user_pos=batch["user_pos"],
        user_vec=batch.get("user_vec"),
    )  # [B, T, H] each: the last layer's (L_lm, L_id_text) and the score head's input (llm.head_layer)
    # position t predicts token t+1: keep only positions whose next token is part of the answer
    sel = labels[:, 1:] != -100  # [B, T-1]
    l_lm = lm_loss(model.logits(h[:, :-1][sel]), labels[:, 1:][sel])  # logits [n_answer_tokens, V]
    zero = l_lm.new_zeros(())
    l_ui, l_it, l_kd = zero, zero, zero
    diag = {"id_text_negatives": zero, "cos_id": zero, "cos_text": zero}
    scores = None
    if a > 0 or c > 0:
        scores = model.head_scores(h_head, batch["prompt_end"], batch["cand_pos"], batch["item_at"])  # [B, C]
    if a > 0:
        l_ui = F.cross_entropy(scores, batch["target_col"])
    if c > 0 and model.unified and "user_vec" in batch:
        teacher = torch.einsum("bd,bcd->bc", batch["user_vec"], model.item_table[batch["cand_items"]])
        l_kd = distill_loss(scores, teacher, distill_temperature)
    if b > 0 and model.unified and bool((batch["item_at"] > 0).any()):
        id_rep, text_rep, keys = id_text_pairs(model, batch, h, id_text_space)
        if len(id_rep) > 1:
            l_it = info_nce(_centred(id_rep), _centred(text_rep), temperature, keys)
            n_neg = float((keys[: len(id_rep), None] != keys[None, :]).sum(1).float().mean())
            diag = {
                "id_text_negatives": l_lm.new_tensor(n_neg),
                "cos_id": l_lm.new_tensor(mean_offdiag_cosine(id_rep)),
                "cos_text": l_lm.new_tensor(mean_offdiag_cosine(text_rep[: len(id_rep)])),
            }
    loss = l_lm + a * l_ui + b * l_it + c * l_kd
    return {
        "loss": loss,
        "lm": l_lm.detach(),
        "user_item": l_ui.detach(),
        "id_text": l_it.detach(),
        "distill": l_kd.detach(),
        "answer_tokens": sel.sum().detach(),
        **diag,
    }
