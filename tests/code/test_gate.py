"""The promotion gate: minimums always, no-regression only against an existing production."""

from components.config import GateSettings
from components.gate import decide, write_decision

CFG = GateSettings(min={"hr@1": 0.1, "valid_ratio": 1.0}, tolerance={"hr@1": 0.02})


def test_minimums_only_without_production():
    d = decide({"stage2": {"hr@1": 0.15, "valid_ratio": 1.0}}, CFG)
    assert d.passed and d.failed == []
    assert any("no production model" in r for r in d.reasons)


def test_each_failed_minimum_is_a_reason():
    d = decide({"stage2": {"hr@1": 0.05, "valid_ratio": 0.9}}, CFG)
    assert not d.passed and len(d.failed) == 2
    assert any("hr@1 = 0.0500 < minimum 0.1" in f for f in d.failed)
    assert any("valid_ratio" in f for f in d.failed)


def test_regression_beyond_tolerance_fails_within_passes():
    worse = decide({"stage2": {"hr@1": 0.20, "valid_ratio": 1.0}, "production": {"hr@1": 0.25}}, CFG)
    assert not worse.passed and "vs production 0.2500" in worse.failed[0]
    close = decide({"stage2": {"hr@1": 0.24, "valid_ratio": 1.0}, "production": {"hr@1": 0.25}}, CFG)
    assert close.passed


def test_missing_candidate_or_metric_fails(tmp_path):
    assert not decide({"stage1": {"hr@1": 0.9}}, CFG).passed
    d = decide({"stage2": {"valid_ratio": 1.0}}, CFG)
    assert not d.passed and "hr@1 = missing" in d.failed[0]
    out = write_decision(d, tmp_path / "gate.json")
    assert (tmp_path / "gate.json").exists() and out["passed"] is False


def _rr(retrieval: float, rerank: float) -> dict:
    return {
        "users": 400,
        "k": 10,
        "retrieval": {"ndcg@10": retrieval},
        "rerank": {"ndcg@10": rerank},
        "gain_ndcg@10": rerank - retrieval,
    }


def test_a_rerank_that_loses_to_retrieval_is_promoted_with_rerank_off():
    ok = {"hr@1": 0.15, "valid_ratio": 1.0}
    lose = decide({"stage2": ok, "rerank_on_retrieval": _rr(0.12, 0.10)}, CFG)
    assert lose.passed and lose.rerank is False  # still promotable
    assert "0.1000 vs retrieval 0.1200" in lose.rerank_reason
    assert any(r.startswith("rerank off by default") for r in lose.reasons)
    win = decide({"stage2": ok, "rerank_on_retrieval": _rr(0.12, 0.13)}, CFG)
    assert win.passed and win.rerank is True
    # the minimum gain is a setting; no figures at all: rerank off
    strict = GateSettings(min=CFG.min, tolerance=CFG.tolerance, rerank_min_gain=0.05)
    assert decide({"stage2": ok, "rerank_on_retrieval": _rr(0.12, 0.13)}, strict).rerank is False
    with_ci = _rr(0.12, 0.13) | {"gain_ndcg@10_ci95": [-0.004, 0.024]}  # the paired interval is reported
    noisy = decide({"stage2": ok, "rerank_on_retrieval": with_ci}, CFG)
    assert "95% CI [-0.0040, +0.0240]" in noisy.rerank_reason and "lower bound" in noisy.rerank_reason
    assert noisy.rerank is False  # a gain inside the noise: its lower bound is below the minimum
    clear = _rr(0.12, 0.13) | {"gain_ndcg@10_ci95": [0.002, 0.018]}
    assert decide({"stage2": ok, "rerank_on_retrieval": clear}, CFG).rerank is True
    none = decide({"stage2": ok}, CFG)
    assert none.passed and none.rerank is False and "no rerank-on-retrieval" in none.rerank_reason
