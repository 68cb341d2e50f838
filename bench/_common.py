"""What the LLM benches share: the pipeline's paths as options, and params.yaml with its profile resolved."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from components.config import deep_merge, parse_settings


def add_pipeline_paths(parser: argparse.ArgumentParser) -> None:
    """--params and the pipeline's outputs a bench reads (after `dvc repro evaluate`)."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--base", type=Path, default=Path("models/base"))
    parser.add_argument("--stage1", type=Path, default=Path("models/llm/stage1"))
    parser.add_argument("--stage2", type=Path, default=Path("models/llm/stage2"))
    parser.add_argument("--sasrec", type=Path, default=Path("models/sasrec"))


def resolved_params(raw: dict) -> dict:
    """params with the active profile merged in and `profile` removed, so that a bench's overrides merged
    on top are not overridden again by the profile."""
    profile = parse_settings(raw).profile or ""
    raw = deep_merge(raw, {"profile": None, **(raw.get("profiles") or {}).get(profile, {})})
    raw.pop("profile")
    return raw


def read_params(path: Path) -> dict:
    """params.yaml as a dict (YAML)."""
    return yaml.safe_load(Path(path).read_text())
