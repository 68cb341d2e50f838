"""What the LLM benches share: the pipeline's paths as options, and params.yaml with its profile resolved."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from components.config import deep_merge, load_settings, parse_settings


def add_pipeline_paths(parser: argparse.ArgumentParser) -> None:
    """--params and the pipeline's outputs a bench reads (after `dvc repro evaluate`); each defaults to
    params.yaml's `paths:` (see pipeline_paths)."""
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("prepared", "base", "stage1", "stage2", "sasrec"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"default: params paths.{name}")


def pipeline_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the path options not given on the command line from params.yaml's `paths:`."""
    paths = load_settings(args.params).paths
    for name in ("prepared", "base", "stage1", "stage2", "sasrec"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(paths, name))
    return args


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
