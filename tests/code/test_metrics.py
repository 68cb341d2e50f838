"""HR@K, NDCG@K, MRR@K and ValidRatio on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.metrics import (
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    ranking_metrics,
    target_ranks,
    valid_ratio,
)


def test_target_ranks_count_higher_scores_and_ties_against_the_target():
    scores = np.array(
        [[0.1, 0.5, 0.3, 0.2], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, -np.inf, 9.0, 1.0]]
    )
    ranks = target_ranks(scores, np.array([2, 0, 3, 3]))
    # row 0: only 0.5 beats 0.3; row 1: the top; row 2: ties count against the target; row 3: 9.0 beats 1.0
    assert ranks.tolist() == [1, 0, 3, 1]


def test_degenerate_scores_never_look_good():
    constant = np.zeros((5, 20))
    nan = np.full((5, 20), np.nan)
    for scores in (constant, nan):
        ranks = target_ranks(scores, np.arange(5))
        assert hit_rate_at_k(ranks, 1) == 0.0 and (ranks == 19).all()


def test_target_ranks_rejects_bad_shapes():
    with pytest.raises(ValueError, match="scores must be"):
        target_ranks(np.zeros((3, 4)), np.zeros(2, dtype=int))


def test_hit_rate_and_ndcg_known_values():
    ranks = np.array([0, 1, 5, 20])
    assert hit_rate_at_k(ranks, 1) == 0.25
    assert hit_rate_at_k(ranks, 5) == 0.5
    assert hit_rate_at_k(ranks, 6) == 0.75
    assert ndcg_at_k(ranks, 1) == pytest.approx(0.25)
    assert ndcg_at_k(ranks, 5) == pytest.approx((1.0 + 1.0 / math.log2(3)) / 4)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(7)) / 4)
    assert mrr_at_k(ranks, 10) == pytest.approx((1.0 + 0.5 + 1.0 / 6) / 4)


def test_perfect_and_hopeless_rankings():
    assert hit_rate_at_k(np.zeros(7, dtype=int), 1) == 1.0
    assert ndcg_at_k(np.zeros(7, dtype=int), 10) == 1.0
    assert hit_rate_at_k(np.full(7, 50), 10) == 0.0
    assert ndcg_at_k(np.full(7, 50), 10) == 0.0


def test_empty_input_is_zero():
    assert hit_rate_at_k(np.array([], dtype=int), 10) == 0.0
    assert ndcg_at_k(np.array([], dtype=int), 10) == 0.0
    assert valid_ratio([], []) == 0.0


def test_ranking_metrics_keys():
    out = ranking_metrics(np.array([0, 3]), hr_ks=(1, 5), ndcg_ks=(5,))
    assert set(out) == {"hr@1", "hr@5", "ndcg@5"}
    assert out["hr@1"] == 0.5 and out["hr@5"] == 1.0
    assert out["ndcg@5"] == pytest.approx((1.0 + 1.0 / math.log2(5)) / 2)


def test_ranks_to_metrics_end_to_end():
    # 20 candidates, target in column 7, scored 3rd best -> rank 2: HR@1 0, HR@5 1, NDCG@5 = 1/log2(4) = 0.5
    scores = np.linspace(0, 1, 20)[None, :]
    scores[0, 7] = 0.93  # only 18/19 and 19/19 are higher
    ranks = target_ranks(scores, np.array([7]))
    assert ranks.tolist() == [2]
    assert ranking_metrics(ranks, (1, 5), (5,)) == {"hr@1": 0.0, "hr@5": 1.0, "ndcg@5": 0.5}


def test_valid_ratio():
    answers = ["Heat", None, "Alien", "Toy Story"]
    candidates = [["Heat", "Fargo"], ["Heat"], ["Fargo"], ["Toy Story"]]
    assert valid_ratio(answers, candidates) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        valid_ratio(["a"], [])
