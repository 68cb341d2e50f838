"""What every `rsllm` command shares: the error printer, the options, reading the settings, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from components.config import Settings, load_settings
from components.errors import RsllmError

console = Console(stderr=True)
ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read", envvar="RSLLM_PARAMS")]
SettingsOpt = Annotated[
    Path | None,
    typer.Option("--settings", help="this stage's settings file (dvc.yaml): refuse to run if it is stale"),
]


def cli_errors(fn):
    """Project errors as one red line + exit 1 (or the error's exit_code: 2 for a non-drop path)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RsllmError as e:
            console.print(f"[bold red]{type(e).__name__}:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 1)) from None

    return wrapper


def settings_for(params: Path, consumer: str | None = None, settings_file: Path | None = None) -> Settings:
    """params.yaml's settings; with a settings file, first check that it holds `consumer`'s exactly."""
    s = load_settings(params)
    if settings_file is not None:
        from components.stage_settings import check_settings

        check_settings(s, consumer, settings_file)
    return s


def print_json(obj: object) -> None:
    """Machine-readable result on stdout (the last line)."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
