"""Typed model folders: one pydantic config per kind of model folder, saved and read by one function
each (like peft's `save_pretrained` / `from_pretrained`).

Every config carries `format_version`. Reading:
- a config without `format_version` is **v0** (written before typed folders): the caller's `legacy`
  function turns the old dict into today's config (the legacy path);
- a version above the kind's `FORMAT_VERSION` was written by a newer rsllm: a clear ModelError;
- a field that is missing, unknown or of the wrong type: a ModelError naming the file and the field.

The kinds live beside the code that writes them: `SASRecFolder` (components/recommender.py),
`StageFolder` (components/llm/stage_folder.py), `OnnxFolder` (components/export.py), `BundleConfig`
(components/registry.py). `record` makes a free-form record (a training summary) JSON-safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from components.errors import ModelError
from components.io import write_json_atomic

CONFIG = "config.json"


class FolderConfig(BaseModel):
    """Base of every model folder's config: frozen, unknown keys refused, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    FORMAT_VERSION: ClassVar[int] = 1  # the newest version this code writes and reads
    format_version: int


F = TypeVar("F", bound=FolderConfig)


def save_config(folder: Path, config: FolderConfig, name: str = CONFIG) -> None:
    """Write `folder/name` (atomically) from a typed config."""
    write_json_atomic(Path(folder) / name, config.model_dump(mode="json"))


def record(obj: dict | None) -> dict:
    """A JSON-safe copy of a free-form record kept in a config (numpy numbers, paths -> JSON / str)."""
    return json.loads(json.dumps(obj or {}, default=str))


def parse_config(raw: object, cls: type[F], source: str, legacy: Callable[[dict], F] | None = None) -> F:
    """A typed config from a parsed mapping (see the module docstring for v0 and newer versions).
    `source` names where the mapping came from in every error."""
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: not a {cls.__name__} (a JSON object expected, got {type(raw).__name__})")
    version = raw.get("format_version")
    if version is None:
        if legacy is None:
            raise ModelError(f"{source}: format_version missing")
        try:
            return legacy(raw)
        except (KeyError, TypeError, ValueError) as e:  # ValidationError is a ValueError
            raise ModelError(f"{source}: not a v0 {cls.__name__} either ({_reason(e)})") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelError(f"{source}: format_version: expected a positive integer, got {version!r}")
    if version > cls.FORMAT_VERSION:
        raise ModelError(
            f"{source}: format_version {version} was written by a newer rsllm; this one reads "
            f"{cls.__name__} up to version {cls.FORMAT_VERSION} (upgrade rsllm to load it)"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ModelError(f"{source}: {_reason(e)}") from None


def load_config(
    folder: Path, cls: type[F], legacy: Callable[[dict], F] | None = None, name: str = CONFIG
) -> F:
    """Read `folder/name` as `cls`; ModelError naming the file when it is missing or invalid."""
    path = Path(folder) / name
    if not path.is_file():
        raise ModelError(f"{path}: not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not JSON ({e})") from None
    return parse_config(raw, cls, str(path), legacy)


def _reason(e: Exception) -> str:
    if not isinstance(e, ValidationError):
        return f"{type(e).__name__}: {e}"
    problems = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{key}: {kind}")
    return "; ".join(problems)
