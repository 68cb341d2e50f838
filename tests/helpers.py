"""Test helpers: synthetic sources and throwaway project checkouts (git + DVC) in temp folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
# What a project checkout needs to run the data stages (code comes from the installed package).
PROJECT_FILES = [
    "dvc.yaml",
    "data/dvc.yaml",
    "data/manifest.jsonl",
    "params.yaml",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "data/accepted.dvc",
    "data/.gitignore",
    ".gitignore",
]
DAY = 86400
START = 883612800  # 1998-01-01 UTC


def synthetic_source(folder: Path, users: int = 80, items: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """A small interactions.csv + items.csv in the canonical column names: 20 days before and
    28 days after 1998-01-01, every user with at least 12 interactions."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        n = int(rng.integers(12, 30))
        chosen = rng.choice(np.arange(1, items + 1), size=n, replace=False)
        t0 = START - 20 * DAY + int(rng.integers(0, 40 * DAY))
        for k, i in enumerate(chosen):
            rows.append((str(u), str(i), float(rng.integers(1, 6)), t0 + k * 3600 * int(rng.integers(1, 20))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    cat = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, items + 1)],
            "title": [f"Movie number {i}" for i in range(1, items + 1)],
            "year": [str(1980 + i % 20) for i in range(1, items + 1)],
            "genres": ["Drama|Comedy" if i % 2 else "Action" for i in range(1, items + 1)],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    inter.to_csv(folder / "interactions.csv", index=False)
    cat.to_csv(folder / "items.csv", index=False)
    return folder / "interactions.csv", folder / "items.csv"


def tool_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k in ("GIT_DIR", "GIT_WORK_TREE"):
        env.pop(k, None)
    return env


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=tool_env())
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def make_project(dest: Path, params: dict | None = None) -> Path:
    """A fresh git checkout of the project's pipeline files with params.yaml overridden, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    # stages depend on their code: the checkout carries it (it runs from the installed package)
    shutil.copytree(ROOT / "components", dest / "components", ignore=shutil.ignore_patterns("__pycache__"))
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = deep_merge(base, params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    (dest / "data/accepted").mkdir(parents=True, exist_ok=True)
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"], dest)
    return dest


def synthetic_params(source_dir: Path) -> dict:
    inter, items = synthetic_source(source_dir)
    return {
        "data": {
            "source": "files",
            "files": {"interactions": str(inter), "items": str(items)},
            "mode": "weekly",
            "cutoff": "1998-01-01",
        },
        "validate": {"min_rows": 100},
    }


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def rsllm(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "components.cli", *args], cwd, check=check)


def tree_digest(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (to prove nothing changed)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def save_tiny_base(dest: Path, texts: list[str]) -> Path:
    """A tiny random Llama + in-memory tokenizer saved as a Hugging Face folder (llm.base.local_dir)."""
    from components.llm.base import tiny_llama

    model, tok = tiny_llama(texts)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


TINY_STAGE = {
    "samples": 8,
    "epochs": 1,
    "batch_size": 4,
    "lr": 0.001,
    "warmup_steps": 0,
    "max_prompt_tokens": 512,
    "checkpoint_every": 1,
    "log_every": 1,
}


def tiny_params(root: Path) -> dict:
    """Params for a whole-graph run in seconds: synthetic data, a tiny SASRec, a tiny random Llama,
    and a gate that a working pipeline passes (ValidRatio 1.0 in ranking mode)."""
    params = synthetic_params(root / "source")
    titles = pd.read_csv(params["data"]["files"]["items"])["title"].tolist()
    base = save_tiny_base(
        root / "tiny-base", [f"This user has watched {t}. Candidates: {t}. Answer: {t}" for t in titles]
    )
    return deep_merge(
        params,
        {
            "profile": None,  # the sections below as they are (no profile merged over them)
            "sasrec": {
                "hidden": 16,
                "layers": 1,
                "heads": 1,
                "inner": 32,
                "max_len": 20,
                "batch_size": 32,
                "max_epochs": 3,
                "patience": 2,
                "train_stride": 10,
            },
            "export": {"parity_users": 16},
            "llm": {
                "base": {"source": "local", "local_dir": str(base)},
                "lora": {"r": 4, "alpha": 8},
                "projector_hidden": 16,
                "stage1": TINY_STAGE,
                "stage2": TINY_STAGE,
                "eval_users": 6,
                "generation_users": 2,
                "max_new_tokens": 6,
            },
            "gate": {"min": {"valid_ratio": 1.0}, "tolerance": {"hr@1": 1.0}},
        },
    )
