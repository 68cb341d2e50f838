"""Where the stages put their outputs, relative to a repository: params.yaml's `paths:` block
(components.config.PathsSettings), the same block dvc.yaml reads as `${paths.<key>}`. Written once."""

from __future__ import annotations

from pathlib import Path

from components.config import PathsSettings, load_settings


def outputs(repo: Path) -> dict[str, Path]:
    """The outputs the library reads, by name, under `repo` (as its params.yaml's `paths:` places them)."""
    repo = Path(repo)
    p = load_settings(repo / "params.yaml").paths if (repo / "params.yaml").exists() else PathsSettings()
    return {
        k: repo / v
        for k, v in {
            "prepared": p.prepared,
            "catalogue": Path("data/raw/items.parquet"),  # the fixed data layout (config.PathsSettings)
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
