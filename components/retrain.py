"""The weekly retrain's own steps after the DVC stages: re-score production, gate, promote, report.

Paths of the stage outputs live in OUTPUTS (the same paths dvc.yaml declares).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from components import gate as gate_lib
from components import registry
from components.config import load_settings
from components.errors import RsllmError

log = logging.getLogger(__name__)

OUTPUTS = {
    "prepared": Path("data/prepared"),
    "catalogue": Path("data/raw/items.parquet"),
    "sasrec": Path("models/sasrec"),
    "onnx": Path("models/onnx"),
    "base": Path("models/base"),
    "stage1": Path("models/llm/stage1"),
    "stage2": Path("models/llm/stage2"),
    "projected": Path("models/projected"),
    "eval": Path("metrics/eval.json"),
    "production_eval": Path("metrics/production.json"),
    "gate": Path("reports/gate.json"),
}


def current_data_version(repo: Path) -> str | None:
    """The newest data/vN tag that points at HEAD or an ancestor of it (None before the first)."""
    from components.versioning import existing_tags

    for tag in reversed(existing_tags(repo)):
        proc = subprocess.run(["git", "merge-base", "--is-ancestor", tag, "HEAD"], cwd=repo)
        if proc.returncode == 0:
            return tag
    return None


def ensure_data_version(repo: Path) -> str | None:
    """The current data version; when there is none yet (first run), record the snapshot as one.

    Refused (logged, None returned) when the checkout has uncommitted pipeline edits.
    """
    from components.versioning import record_version

    version = current_data_version(repo)
    if version is None:
        try:
            version = record_version(repo, note="initial snapshot")["version"]
        except RsllmError as e:
            log.warning("the snapshot was not recorded as a data version: %s", e)
    return version


def git_commit(repo: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    return proc.stdout.strip() or None


def remap_stage(stage_dir: Path, model_items: pd.DataFrame, prepared_items: pd.DataFrame, out: Path) -> Path:
    """A copy of a stored stage whose ID-embedding table follows the current item_idx space.

    Items the stored model never saw get a zero row and are listed as cold (title only).
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(stage_dir, out)
    table = load_file(str(stage_dir / "item_embeddings.safetensors"))["item_embeddings"]
    old_idx = dict(zip(model_items["item_id"].astype(str), model_items["item_idx"], strict=True))
    new = table.new_zeros((len(prepared_items) + 1, table.shape[1]))
    cold = []
    for idx, item_id in zip(prepared_items["item_idx"], prepared_items["item_id"].astype(str), strict=True):
        j = old_idx.get(item_id)
        if j is None or j >= table.shape[0]:
            cold.append(int(idx))
        else:
            new[int(idx)] = table[int(j)]
    save_file({"item_embeddings": new.contiguous()}, str(out / "item_embeddings.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_id_items"] = len(prepared_items)
    cfg["cold_items"] = cold
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def score_production(repo: Path) -> str | None:
    """Re-score the production model on the current candidate sets -> metrics/production.json."""
    from components.evaluate import score_model_dirs

    pointer = registry.read_production(repo)
    out = repo / OUTPUTS["production_eval"]
    if pointer is None:
        out.unlink(missing_ok=True)
        return None
    settings = load_settings(repo / "params.yaml")
    model = registry.get_model(pointer["model_tag"])
    base = registry.get_model(pointer["base_tag"])
    stored = Path(model.path)
    prepared = repo / OUTPUTS["prepared"]
    with tempfile.TemporaryDirectory() as tmp:
        stage = remap_stage(
            stored / "llm",
            pd.read_parquet(stored / "items.parquet"),
            pd.read_parquet(prepared / "items.parquet"),
            Path(tmp) / "stage",
        )
        score_model_dirs(settings, prepared, Path(base.path), stage, "production", out)
    return str(out)


def run_gate(repo: Path) -> dict:
    """Apply the thresholds to metrics/eval.json (+ production's re-scored block) -> reports/gate.json."""
    settings = load_settings(repo / "params.yaml")
    metrics = json.loads((repo / OUTPUTS["eval"]).read_text())
    prod_path = repo / OUTPUTS["production_eval"]
    if prod_path.exists() and registry.read_production(repo) is not None:
        metrics |= json.loads(prod_path.read_text())
    decision = gate_lib.decide(metrics, settings.gate)
    return gate_lib.write_decision(decision, repo / OUTPUTS["gate"])


def candidate_parts(repo: Path) -> dict[str, Path]:
    """Everything the service needs, by its name inside the stored model."""
    o = {k: repo / v for k, v in OUTPUTS.items()}
    return {
        "onnx": o["onnx"],
        "llm": o["stage2"],
        "projected": o["projected"],
        "items.parquet": o["prepared"] / "items.parquet",  # item_idx <-> item_id of this model
        "catalogue.parquet": o["catalogue"],  # every titled item, cold ones included
        "sample_users.parquet": o["prepared"] / "test.parquet",
        "sasrec.json": o["sasrec"] / "config.json",
    }


def promote_candidate(repo: Path) -> dict:
    """Save base (once) + candidate into the BentoML store, then move the production pointer."""
    settings = load_settings(repo / "params.yaml")
    gate = json.loads((repo / OUTPUTS["gate"]).read_text())
    if not gate["passed"]:
        raise RsllmError(f"{repo / OUTPUTS['gate']}: the gate did not pass; refusing to promote")
    base_tag = registry.save_base(repo / OUTPUTS["base"])
    metadata = {
        "metrics": {k: v for k, v in gate["metrics"].items() if isinstance(v, int | float)},
        "data_version": current_data_version(repo),
        "git_commit": git_commit(repo),
        "base_tag": base_tag,
        "rerank_default": bool(gate.get("rerank", False)),
        "rerank_reason": gate.get("rerank_reason", ""),
        "profile": settings.profile,
        "params": settings.model_dump(mode="json", by_alias=True),
    }
    tag = registry.save_candidate(candidate_parts(repo), metadata)
    return registry.promote(tag, repo, reason="gate passed")


def report_markdown(repo: Path, timings: list[dict], intake: dict) -> str:
    """The run's artifact: new metrics vs production, the gate's decision and reasons, reports, data."""
    metrics = json.loads((repo / OUTPUTS["eval"]).read_text()) if (repo / OUTPUTS["eval"]).exists() else {}
    prod_path = repo / OUTPUTS["production_eval"]
    prod = json.loads(prod_path.read_text()).get("production") if prod_path.exists() else None
    gate = json.loads((repo / OUTPUTS["gate"]).read_text()) if (repo / OUTPUTS["gate"]).exists() else {}
    rows = ["| model | HR@1 | HR@5 | NDCG@5 | ValidRatio | users |", "|---|---|---|---|---|---|"]
    for name, m in [*metrics.items(), *([("production (re-scored)", prod)] if prod else [])]:
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
                f"- validation: {repo / 'reports/validation/docs/index.html'}",
                f"- evaluation: {repo / 'reports/eval/comparison.md'}",
                f"- gate: {repo / OUTPUTS['gate']}",
            ]
        )
        + "\n"
    )


def summary_text(repo: Path) -> str:
    """The comparison table and the gate's decision, for a terminal (make demo)."""
    parts = []
    table = repo / "reports/eval/comparison.md"
    if table.exists():
        parts += ["Comparison on the same 20-candidate test sets:", table.read_text()]
    gate_path = repo / OUTPUTS["gate"]
    if gate_path.exists():
        gate = json.loads(gate_path.read_text())
        parts.append(f"Gate: {'PASSED' if gate['passed'] else 'REJECTED'}")
        parts += [f"  {r}" for r in gate["reasons"]]
    pointer = registry.read_production(repo)
    if pointer:
        parts.append(f"Production: {pointer['model_tag']} (data {pointer.get('data_version')})")
    return "\n".join(parts)
