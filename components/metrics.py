"""Ranking metrics: one implementation, used by every model's evaluation (SASRec, the LLM stages, serving).

Everything starts from the 0-based rank of the target among the scored items:
rank = number of other items scored at least as high as the target: ties count against the target,
so a degenerate model (constant scores, or NaN everywhere) ranks every target last instead of first
and can never pass a gate; with float scores exact ties are rare in practice. A NaN target score is
ranked last. A target with rank r (0 = top) is a hit at K when r < K,
and its NDCG@K is 1 / log2(r + 2) (a single relevant item: IDCG = 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def target_ranks(scores: np.ndarray, target_cols: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target: the number of other scores >= the target's (ties count against).

    scores: [n, m] float (use -inf for items that must never be recommended);
    target_cols: [n] int, the column of the target in each row. Returns [n] int64.
    """
    scores = np.asarray(scores)
    target_cols = np.asarray(target_cols, dtype=np.int64)
    if scores.ndim != 2 or target_cols.shape != (scores.shape[0],):
        raise ValueError(
            f"scores must be [n, m] and target_cols [n]; got {scores.shape} and {target_cols.shape}"
        )
    rows = np.arange(scores.shape[0])
    target = scores[rows, target_cols][:, None]  # [n, 1]
    at_least = (scores >= target).sum(axis=1) - 1  # others scoring >= the target (it equals itself)
    worst = scores.shape[1] - 1
    return np.where(np.isnan(target[:, 0]), worst, at_least).astype(np.int64)


def hit_rate_at_k(ranks: np.ndarray, k: int) -> float:
    """HR@K: share of targets ranked in the top K (rank < K). Empty input -> 0.0."""
    ranks = np.asarray(ranks)
    return float((ranks < k).mean()) if ranks.size else 0.0


def ndcg_at_k(ranks: np.ndarray, k: int) -> float:
    """NDCG@K with one relevant item per row: mean of 1/log2(rank+2) over rows with rank < K, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def mrr_at_k(ranks: np.ndarray, k: int) -> float:
    """MRR@K: mean of 1/(rank+1) over rows with rank < K, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if not ranks.size:
        return 0.0
    return float(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0).mean())


def ranking_metrics(
    ranks: np.ndarray, hr_ks: Sequence[int] = (), ndcg_ks: Sequence[int] = ()
) -> dict[str, float]:
    """A dict like {"hr@1": ..., "hr@5": ..., "ndcg@5": ...} from target ranks."""
    out = {f"hr@{k}": hit_rate_at_k(ranks, k) for k in hr_ks}
    out.update({f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ndcg_ks})
    return out


def valid_ratio(answers: Sequence[object | None], candidates: Sequence[Sequence[object]]) -> float:
    """ValidRatio (LLaRA): share of generated answers that are one of that row's candidates.

    answers[i] is the parsed answer of row i (None when nothing could be parsed); candidates[i] is
    that row's candidate list. Empty input -> 0.0.
    """
    if len(answers) != len(candidates):
        raise ValueError(f"answers ({len(answers)}) and candidates ({len(candidates)}) differ in length")
    if not answers:
        return 0.0
    valid = sum(1 for a, c in zip(answers, candidates, strict=True) if a is not None and a in set(c))
    return valid / len(answers)
