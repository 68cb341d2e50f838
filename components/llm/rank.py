"""Candidate ranking and generation mode.

Head ranking (`rank: head`, models trained since prompt format 2): ONE causal forward of the prompt alone;
score(c) = ScoreHead(h at the prompt's end, h at candidate c's `[ITEM]` marker). The prompt lists the
candidates in a canonical order (components.llm.prompts), so a candidate's score does not depend on the
order it was passed in, and a cold candidate (no ID embedding) is read at its marker too: one scale.

Likelihood ranking (`rank: likelihood`, and every older bundle): each candidate's score is the mean
log-probability of its answer tokens (" <title>" + eos) after the prompt (length-normalised
log-likelihood).  All candidates of a user are scored in ONE forward: the prompt followed by every
candidate's answer tokens, with a block attention mask (a candidate's tokens see the prompt and
themselves only) and position ids that restart at the end of the prompt for each candidate.  The LM
head runs only on the positions that predict an answer token.  Every answer is a candidate, so
ValidRatio is 1 in both modes.

Generation: greedy decoding after the prompt; the text is mapped back to a candidate by exact title
(ValidRatio = share of users whose text is a candidate's title), as LLaRA reports it.

Loading a ranker (base or trained stage, in a dtype) is components.llm.loading.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.errors import ModelError
from components.llm.loading import PLAIN, RankerConfig, load_ranker, make_builder
from components.llm.model import RsllmModel
from components.llm.prompts import Prompt, PromptBuilder


def _item_at(prompt: Prompt, length: int) -> list[int]:
    at = [0] * length
    for pos, item in zip(prompt.item_pos, prompt.item_idx, strict=True):
        at[pos] = item
    return at


def block_inputs(prompt: Prompt, answers: Sequence[list[int]]) -> dict:
    """One user's packed sequence: prompt (P tokens) + every candidate's answer tokens (S tokens in all).

    Returns ids [S], item_at [S], position ids [S], allowed [S, S] bool (query row sees key column),
    and for scoring: `src` [N] positions whose logits predict `tgt` [N] tokens of candidate `cand` [N].
    """
    p = len(prompt.ids)
    ids, pos = list(prompt.ids), list(range(p))
    src, tgt, cand, blocks = [], [], [], []
    for c, ans in enumerate(answers):
        start = len(ids)
        blocks.append((start, start + len(ans)))
        ids += ans
        pos += range(p, p + len(ans))
        # token j of the answer is predicted at the prompt's last position (j = 0) or at answer token j-1
        src += [p - 1] + list(range(start, start + len(ans) - 1))
        tgt += ans
        cand += [c] * len(ans)
    s = len(ids)
    allowed = torch.zeros(s, s, dtype=torch.bool)
    allowed[:p, :p] = torch.tril(torch.ones(p, p, dtype=torch.bool))
    for start, end in blocks:
        allowed[start:end, :p] = True
        allowed[start:end, start:end] = torch.tril(torch.ones(end - start, end - start, dtype=torch.bool))
    return {
        "ids": ids,
        "item_at": _item_at(prompt, s),
        "pos": pos,
        "allowed": allowed,
        "src": src,
        "tgt": tgt,
        "cand": cand,
    }


def _user_inputs(prompts: Sequence[Prompt], user_vecs: torch.Tensor | None, device) -> dict:
    if user_vecs is None or all(p.user_pos is None for p in prompts):
        return {}
    pos = torch.tensor([-1 if p.user_pos is None else p.user_pos for p in prompts], device=device)
    return {"user_pos": pos, "user_vec": user_vecs.to(device)}


@torch.inference_mode()
def score_head(
    model: RsllmModel, prompts: Sequence[Prompt], user_vecs: torch.Tensor | None = None
) -> torch.Tensor:
    """Head scores of every candidate, one prompt-only forward for a batch of users.

    prompts: B format-2 prompts (cand_pos set); user_vecs [B, D] for `[USER]`. Returns [B, C] float32
    (-inf beyond a prompt's candidates), columns in each prompt's given candidate order."""
    if model.head is None:
        raise ModelError("this model has no score head (trained before prompt format 2): rank by likelihood")
    device = model.item_table.device
    n_b, width = len(prompts), max(len(p.ids) for p in prompts)
    n_c = max(len(p.cand_pos) for p in prompts)
    ids = torch.zeros(n_b, width, dtype=torch.long)
    item_at = torch.zeros(n_b, width, dtype=torch.long)
    attn = torch.zeros(n_b, width, dtype=torch.long)
    cand_pos = torch.zeros(n_b, n_c, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p.ids)] = torch.tensor(p.ids)
        item_at[b, : len(p.ids)] = torch.tensor(_item_at(p, len(p.ids)))
        attn[b, : len(p.ids)] = 1
        cand_pos[b, : len(p.cand_pos)] = torch.tensor(p.cand_pos)
    end = torch.tensor([len(p.ids) - 1 for p in prompts])
    _, h = model.head_states(
        ids.to(device), item_at.to(device), attn.to(device), **_user_inputs(prompts, user_vecs, device)
    )  # [B, T, H]: the score head's input layer
    scores = model.head_scores(h, end.to(device), cand_pos.to(device), item_at.to(device)).float().cpu()
    for b, p in enumerate(prompts):
        scores[b, len(p.cand_pos) :] = float("-inf")
    return scores


@torch.inference_mode()
def score_block(
    model: RsllmModel,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[list[int]]],
    user_vecs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Length-normalised log-likelihood of every candidate answer, one forward for a batch of users.

    prompts: B prompts; answers[b]: C answer token lists for user b. Returns scores [B, C] (float32).
    """
    packs = [block_inputs(p, a) for p, a in zip(prompts, answers, strict=True)]
    n_b, width = len(packs), max(len(k["ids"]) for k in packs)
    device = model.item_table.device
    ids = torch.full((n_b, width), 0, dtype=torch.long)
    item_at = torch.zeros(n_b, width, dtype=torch.long)
    pos = torch.zeros(n_b, width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(n_b, 1, 1)  # padding rows see themselves only
    for b, k in enumerate(packs):
        s = len(k["ids"])
        ids[b, :s], item_at[b, :s], pos[b, :s] = (
            torch.tensor(k["ids"]),
            torch.tensor(k["item_at"]),
            torch.tensor(k["pos"]),
        )
        allowed[b, :s, :s] = k["allowed"]
    dtype = model.causal_lm.get_input_embeddings().weight.dtype
    mask = torch.zeros(n_b, 1, width, width, dtype=dtype)  # additive: 0 = attend, min = masked (eager + sdpa)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    user = _user_inputs(prompts, user_vecs, device)
    h = model.hidden(ids.to(device), item_at.to(device), mask.to(device), pos.to(device), **user)  # [B, S, H]
    n_c = max(len(a) for a in answers)
    scores = torch.full((n_b, n_c), float("-inf"))
    for b, k in enumerate(packs):
        logp = torch.log_softmax(model.logits(h[b, k["src"]]).float(), dim=-1)  # [N, V]: needed rows only
        tok_lp = logp[torch.arange(len(k["tgt"])), torch.tensor(k["tgt"], device=logp.device)].cpu()  # [N]
        cand = torch.tensor(k["cand"])
        total = torch.zeros(n_c).index_add_(0, cand, tok_lp)
        count = torch.zeros(n_c).index_add_(0, cand, torch.ones_like(tok_lp))
        c = len(answers[b])
        scores[b, :c] = total[:c] / count[:c]
    return scores


@torch.inference_mode()
def score_brute_force(model: RsllmModel, prompt: Prompt, answers: Sequence[list[int]]) -> torch.Tensor:
    """Reference: one ordinary causal forward of prompt + answer per candidate. Returns [C]."""
    device = model.item_table.device
    out = []
    p = len(prompt.ids)
    for ans in answers:
        ids = torch.tensor([prompt.ids + ans], device=device)
        item_at = torch.tensor([_item_at(prompt, len(prompt.ids) + len(ans))], device=device)
        h = model.hidden(ids, item_at)[0]  # [P + L, H]
        logp = torch.log_softmax(model.logits(h[p - 1 : p + len(ans) - 1]).float(), dim=-1)  # [L, V]
        out.append(logp[torch.arange(len(ans)), torch.tensor(ans, device=device)].mean().item())
    return torch.tensor(out)


@torch.inference_mode()
def generate(
    model: RsllmModel,
    prompt: Prompt,
    max_new_tokens: int,
    eos_id: int,
    banned: Sequence[int] = (),
    user_vec: torch.Tensor | None = None,
) -> list[int]:
    """Greedy decoding after the prompt (KV cache); `banned` tokens (e.g. `[ITEM]`) are never produced."""
    lm = model.causal_lm
    device = model.item_table.device
    ids = torch.tensor([prompt.ids], device=device)
    user = _user_inputs([prompt], None if user_vec is None else user_vec[None], device)
    embeds = model.embed(ids, torch.tensor([_item_at(prompt, len(prompt.ids))], device=device), **user)
    out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    cache, new = out.cache, []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        if banned:
            logits[list(banned)] = float("-inf")
        tok = int(logits.argmax())
        if tok == eos_id:
            break
        new.append(tok)
        out = lm(
            input_ids=torch.tensor([[tok]], device=device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = out.cache
    return new


def map_to_candidate(text: str, candidates: Sequence[int], titles: Sequence[str]) -> int:
    """The candidate whose title equals the generated text (first line, stripped); 0 when none does."""
    line = text.strip().split("\n")[0].strip()
    for c in candidates:
        if str(titles[c]).strip() == line:
            return int(c)
    return 0


# ------------------------------------------------------------------------------------------- loading


def score_users(
    model: RsllmModel,
    builder: PromptBuilder,
    cfg: RankerConfig,
    histories: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[int]],
    prefixes: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, list[Prompt], list]:
    """Scores [B, C] of a batch of users' candidates, in the model's ranking mode (cfg.rank).

    histories: the prompt's history (already cut to history_len); prefixes: what SASRec's user vector
    reads for `[USER]` (default: the history). Returns (scores, prompts, answers or None)."""
    prompts = [builder.prompt(h, c) for h, c in zip(histories, candidates, strict=True)]
    enc = cfg.user_encoder
    vecs = enc(prefixes if prefixes is not None else histories) if enc is not None else None
    if cfg.rank == "head":
        return score_head(model, prompts, vecs), prompts, None
    answers = [[builder.answer_ids(int(c)) for c in cands] for cands in candidates]
    return score_block(model, prompts, answers, vecs), prompts, answers


def rank_users(
    model: RsllmModel,
    builder: PromptBuilder,
    rows: pd.DataFrame,
    *,
    history_len: int,
    cfg: RankerConfig | None = None,
    batch_users: int = 1,
    generation: bool = False,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Score (and optionally decode) every row of valid/test.parquet (user_idx, history, target, candidates;
    `prefix` when the model has a `[USER]` token). A target outside its candidates gets target_col -1.

    cfg: load_ranker's config (ranking mode, user encoder); None = likelihood ranking, no `[USER]`.
    Returns one row per user: user_idx, target, candidates (list), scores (list, same order), target_col,
    seconds; with generation also: generated (text), predicted (item_idx or 0), valid (bool).
    """
    from rich.progress import Progress

    cfg = cfg or PLAIN
    titles = builder.titles
    records = []
    todo = rows.reset_index(drop=True)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("ranking", total=len(todo))
        for start in range(0, len(todo), batch_users):
            chunk = todo.iloc[start : start + batch_users]
            t0 = time.perf_counter()
            hists = [[int(i) for i in r.history if int(i) > 0][-history_len:] for r in chunk.itertuples()]
            cands_all = [[int(c) for c in r.candidates] for r in chunk.itertuples()]
            prefixes = [list(r) for r in chunk["prefix"]] if "prefix" in chunk else None
            scores, prompts, _ = score_users(model, builder, cfg, hists, cands_all, prefixes)
            scores = scores.numpy()
            per_user = (time.perf_counter() - t0) / len(chunk)
            for b, r in enumerate(chunk.itertuples()):
                cands = cands_all[b]
                rec = {
                    "user_idx": int(r.user_idx),
                    "target": int(r.target),
                    "candidates": cands,
                    "scores": scores[b, : len(cands)].tolist(),
                    "target_col": cands.index(int(r.target)) if int(r.target) in cands else -1,
                    "seconds": per_user,
                }
                if generation:
                    t1 = time.perf_counter()
                    # a text longer than every candidate title cannot be one: stop there
                    longest = max(len(builder.answer_ids(c)) for c in cands) + 1
                    limit = min(max_new_tokens, longest)
                    enc = cfg.user_encoder
                    vec = enc([prefixes[b] if prefixes else hists[b]])[0] if enc is not None else None
                    gen = generate(model, prompts[b], limit, builder.eos_id, [builder.item_token_id], vec)
                    text = builder.tok.decode(gen, skip_special_tokens=True)
                    pred = map_to_candidate(text, cands, titles)
                    rec.update(
                        {
                            "generated": text,
                            "predicted": pred,
                            "valid": pred > 0,
                            "generation_seconds": time.perf_counter() - t1,
                        }
                    )
                records.append(rec)
            bar.advance(task, len(chunk))
    return pd.DataFrame.from_records(records)


def with_prefixes(rows: pd.DataFrame, prepared: Path, split: str) -> pd.DataFrame:
    """rows + `prefix`: every item of the user's sequence before the split's target (SASRec's input)."""
    seqs = pd.read_parquet(Path(prepared) / "sequences.parquet")
    by_user = {int(u): list(s) for u, s in zip(seqs["user_idx"], seqs["items"], strict=True)}
    cut = 1 if split == "test" else 2
    rows = rows.copy()
    rows["prefix"] = [by_user[int(u)][:-cut] for u in rows["user_idx"]]
    return rows


def evaluate_split(
    base_dir: Path,
    stage_dir: Path | None,
    prepared: Path,
    *,
    split: str = "test",
    users: int | None = None,
    generation_users: int = 0,
    batch_users: int = 1,
    max_new_tokens: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    rows: pd.DataFrame | None = None,
    rank: str | None = None,
) -> pd.DataFrame:
    """Per-user ranking (and generation for the first `generation_users`) of one LLM on valid/test.

    Users: the first `users` rows of the split ordered by user_idx (the same users for every model), or
    `rows` (same columns) when given. Columns as rank_users; generation columns are NaN for users not
    decoded.
    """
    from components.llm.samples import read_titles

    path = Path(prepared) / f"{split}.parquet"
    if rows is None:
        if not path.exists():
            raise ModelError(f"{path}: not found; run `rsllm prepare` first")
        rows = pd.read_parquet(path).sort_values("user_idx", kind="stable")
        if users:
            rows = rows.head(users)
    model, tok, cfg = load_ranker(base_dir, stage_dir, device, dtype, rank)
    if cfg.stage.user_token and "prefix" not in rows:
        rows = with_prefixes(rows, prepared, split)
    hist_len = cfg.stage.history_len or int(max(len(h) for h in rows["history"]))
    builder = make_builder(tok, read_titles(prepared), cfg)
    kw = {"cfg": cfg, "history_len": hist_len, "batch_users": batch_users, "progress": progress}
    parts = [
        rank_users(
            model, builder, rows.head(generation_users), generation=True, max_new_tokens=max_new_tokens, **kw
        ),
        rank_users(model, builder, rows.iloc[generation_users:], **kw),
    ]
    ranked = pd.concat([p for p in parts if len(p)], ignore_index=True)
    return ranked


def ranks_from(df: pd.DataFrame) -> np.ndarray:
    """0-based rank of each user's target among its candidates (components.metrics.target_ranks)."""
    from components.metrics import target_ranks

    return target_ranks(np.array(df["scores"].tolist()), df["target_col"].to_numpy())
