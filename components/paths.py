"""Where the stages put their outputs, relative to the repository (the same paths dvc.yaml declares).

Written here once for Python; dvc.yaml holds the other copy (issue 13: one `paths:` block in params.yaml).
"""

from __future__ import annotations

from pathlib import Path

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
