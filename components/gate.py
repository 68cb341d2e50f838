"""The promotion gate: thresholds on the candidate's metrics, and no regression against production.

Inputs are the evaluation metrics (metrics/eval.json: one block per model, e.g. "stage2", and a
"production" block when the production model was re-scored on the same candidate sets).
  - absolute minimums: every `gate.min.<metric>` must hold for the candidate (always);
  - no regression: candidate >= production - `gate.tolerance.<metric>` (only when production exists).
  - rerank by default: only when the LLM's rerank of retrieval's top 20 gains at least
    `gate.rerank_min_gain` full-catalogue NDCG@10 over retrieval alone (metrics["rerank_on_retrieval"];
    the lower bound of its paired 95% interval when the evaluation reports one);
    otherwise the model is still promotable, with rerank off by default. This never fails the gate.
The decision and every reason go to reports/gate.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.config import GateSettings
from components.io import write_json_atomic
from components.paths import outputs


@dataclass
class Decision:
    passed: bool
    candidate: str
    reasons: list[str] = field(default_factory=list)  # one line per check, failed or passed
    failed: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    production: dict | None = None
    rerank: bool = False  # the promoted model's default for requests that do not say
    rerank_reason: str = ""


def decide(metrics: dict, cfg: GateSettings) -> Decision:
    """Pure function: apply the thresholds to the candidate block of `metrics`."""
    cand = metrics.get(cfg.candidate)
    if cand is None:
        return Decision(
            False,
            cfg.candidate,
            failed=[f"no '{cfg.candidate}' block in the evaluation metrics"],
            reasons=[f"no '{cfg.candidate}' block in the evaluation metrics"],
        )
    prod = metrics.get("production")
    d = Decision(True, cfg.candidate, metrics=cand, production=prod)
    for name, minimum in sorted(cfg.min.items()):
        value = cand.get(name)
        ok = value is not None and value >= minimum
        _record(d, ok, f"{cfg.candidate} {name} = {_fmt(value)} {'>=' if ok else '<'} minimum {minimum}")
    if prod is None:
        d.reasons.append("no production model: only the minimums apply")
    else:
        for name, tol in sorted(cfg.tolerance.items()):
            value, ref = cand.get(name), prod.get(name)
            if ref is None:
                continue
            ok = value is not None and value >= ref - tol
            _record(
                d,
                ok,
                f"{cfg.candidate} {name} = {_fmt(value)} vs production {_fmt(ref)} "
                f"(tolerance {tol}): {'no worse' if ok else 'worse'}",
            )
    d.passed = not d.failed
    d.rerank, d.rerank_reason = rerank_default(metrics.get("rerank_on_retrieval"), cfg.rerank_min_gain)
    d.reasons.append(f"rerank {'on' if d.rerank else 'off'} by default: {d.rerank_reason}")
    return d


def rerank_default(rr: dict | None, min_gain: float) -> tuple[bool, str]:
    """(rerank on by default?, why) from the rerank-on-retrieval figures of the evaluation."""
    if not rr:
        return False, "no rerank-on-retrieval figures in the evaluation metrics"
    k = rr.get("k", 10)
    gain = rr.get(f"gain_ndcg@{k}")
    if gain is None:
        return False, f"the rerank-on-retrieval figures lack gain_ndcg@{k}"
    ret, rer = rr["retrieval"][f"ndcg@{k}"], rr["rerank"][f"ndcg@{k}"]
    ci = rr.get(f"gain_ndcg@{k}_ci95")
    shown = f", 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""
    # with a paired interval, its lower bound must reach the minimum: a gain inside the noise does not
    # make an LLM call per request the default (the point estimate flips with the users drawn)
    judged = ci[0] if ci else gain
    line = (
        f"LLM rerank NDCG@{k} {rer:.4f} vs retrieval {ret:.4f} on {rr.get('users')} users "
        f"(gain {gain:+.4f}{shown}, minimum {min_gain}{' for the lower bound' if ci else ''})"
    )
    return judged >= min_gain, line


def _record(d: Decision, ok: bool, line: str) -> None:
    d.reasons.append(("PASS " if ok else "FAIL ") + line)
    if not ok:
        d.failed.append(line)


def _fmt(v) -> str:
    return "missing" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_decision(d: Decision, path: Path) -> dict:
    out = asdict(d)
    write_json_atomic(path, out)
    return out


def run_gate(repo: Path) -> dict:
    """Apply the thresholds to metrics/eval.json (+ production's re-scored block) -> reports/gate.json."""
    from components import registry
    from components.config import load_settings

    settings = load_settings(repo / "params.yaml")
    o = outputs(repo)
    metrics = json.loads(o["eval"].read_text())
    prod_path = o["production_eval"]
    if prod_path.exists() and registry.read_production(repo) is not None:
        metrics |= json.loads(prod_path.read_text())
    decision = decide(metrics, settings.gate)
    return write_decision(decision, o["gate"])
