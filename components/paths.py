"""Where the stages put their outputs, relative to a repository: params.yaml's `paths:` block, the same
block dvc.yaml reads as `${paths.<key>}`. Written once."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator


class PathsSettings(BaseModel):
    """Where the model stages read and write, relative to the repository, written once: dvc.yaml uses
    them as `${paths.<key>}`, the CLI as its defaults, the library through components.paths.outputs.
    The data layout (data/fetched, data/raw, data/accepted, reports/validation) is fixed: intake,
    versioning and drift work on it (data/dvc.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: Path = Path("settings")
    prepared: Path = Path("data/prepared")
    data_metrics: Path = Path("metrics/data.json")
    sasrec: Path = Path("models/sasrec")
    sasrec_metrics: Path = Path("metrics/sasrec.json")
    sasrec_curve: Path = Path("metrics/sasrec_curve.json")
    onnx: Path = Path("models/onnx")
    base: Path = Path("models/base")
    stage1: Path = Path("models/llm/stage1")
    stage2: Path = Path("models/llm/stage2")
    projected: Path = Path("models/projected")
    eval_metrics: Path = Path("metrics/eval.json")
    eval_reports: Path = Path("reports/eval")
    production_eval: Path = Path("metrics/production.json")
    gate: Path = Path("reports/gate.json")

    @model_validator(mode="after")
    def _inside_repo(self) -> PathsSettings:
        for key, path in self:
            if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
                raise ValueError(f"paths.{key}: {str(path)!r} must be a path inside the repository")
        return self


def outputs(repo: Path) -> dict[str, Path]:
    """The outputs the library reads, by name, under `repo` (as its params.yaml's `paths:` places them)."""
    from components.config import load_settings

    repo = Path(repo)
    p = load_settings(repo / "params.yaml").paths if (repo / "params.yaml").exists() else PathsSettings()
    return {
        k: repo / v
        for k, v in {
            "prepared": p.prepared,
            "catalogue": Path("data/raw/items.parquet"),  # the fixed data layout (PathsSettings)
            "sasrec": p.sasrec,
            "onnx": p.onnx,
            "base": p.base,
            "stage1": p.stage1,
            "stage2": p.stage2,
            "projected": p.projected,
            "eval": p.eval_metrics,
            "production_eval": p.production_eval,
            "gate": p.gate,
            "validation": Path("reports/validation"),
            "eval_reports": p.eval_reports,
        }.items()
    }
