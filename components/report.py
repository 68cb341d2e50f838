"""The weekly retrain's report: the run's markdown artifact and the terminal summary (make demo)."""

from __future__ import annotations

import json
from pathlib import Path

from components import registry
from components.paths import outputs
from components.versioning import current_data_version


def report_markdown(repo: Path, timings: list[dict], intake: dict) -> str:
    """The run's artifact: new metrics vs production, the gate's decision and reasons, reports, data."""
    o = outputs(repo)
    metrics = json.loads(o["eval"].read_text()) if o["eval"].exists() else {}
    prod_path = o["production_eval"]
    prod = json.loads(prod_path.read_text()).get("production") if prod_path.exists() else None
    gate = json.loads(o["gate"].read_text()) if o["gate"].exists() else {}
    rows = ["| model | HR@1 | HR@5 | NDCG@5 | ValidRatio | users |", "|---|---|---|---|---|---|"]
    label = f"production (re-scored, {prod.get('item_index', 'remap')} load)" if prod else ""
    for name, m in [*metrics.items(), *([(label, prod)] if prod else [])]:
        if isinstance(m, dict) and "hr@1" in m:
            rows.append(
                f"| {name} | {m['hr@1']:.4f} | {m['hr@5']:.4f} | {m['ndcg@5']:.4f} | "
                f"{m.get('valid_ratio', float('nan')):.3f} | {m.get('users')} |"
            )
    decision = "PASSED" if gate.get("passed") else "REJECTED"
    stages = "\n".join(
        f"| {t['stage']} | {', '.join(t['ran']) or 'up to date'} | {t['seconds']} |" for t in timings
    )
    version = (intake.get("version") or {}).get("version") or current_data_version(repo)
    return (
        "\n".join(
            [
                "# Weekly retrain",
                "",
                f"**Data version:** {version}  ",
                f"**Drops accepted:** {len(intake.get('accepted', []))}, "
                f"rejected: {len(intake.get('rejected', []))}",
                "",
                "## Metrics on the same 20-candidate test sets",
                "",
                *rows,
                "",
                f"## Gate: {decision}",
                "",
                *[f"- {r}" for r in gate.get("reasons", [])],
                "",
                "## Stages",
                "",
                "| stage | ran | seconds |",
                "|---|---|---|",
                stages,
                "",
                "## Reports",
                "",
                f"- validation: {o['validation'] / 'docs/index.html'}",
                f"- evaluation: {o['eval_reports'] / 'comparison.md'}",
                f"- gate: {o['gate']}",
            ]
        )
        + "\n"
    )


def summary_text(repo: Path) -> str:
    """The comparison table and the gate's decision, for a terminal (make demo)."""
    parts = []
    table = outputs(repo)["eval_reports"] / "comparison.md"
    if table.exists():
        parts += ["Comparison on the same 20-candidate test sets:", table.read_text()]
    gate_path = outputs(repo)["gate"]
    if gate_path.exists():
        gate = json.loads(gate_path.read_text())
        parts.append(f"Gate: {'PASSED' if gate['passed'] else 'REJECTED'}")
        parts += [f"  {r}" for r in gate["reasons"]]
    pointer = registry.read_production(repo)
    if pointer:
        parts.append(f"Production: {pointer['model_tag']} (data {pointer.get('data_version')})")
    return "\n".join(parts)
