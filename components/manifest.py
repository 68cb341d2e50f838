"""The acceptance manifest: data/manifest.jsonl, one JSON line per accepted drop in acceptance order.

Each line: `drop` (name), `file` and `sha256` (data/accepted/<name>.parquet), `items_file` and
`items_sha256` (or null), `rows`, `accepted_at` (UTC). It is git-tracked and committed with every
data version, only ever appended to (a failed intake restores the committed file), and it is what
`merge` reads: drops are merged in this order, each file checked against its sha256.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from components.errors import DataValidationError, SourceError
from components.io import sha256_of

MANIFEST = Path("data/manifest.jsonl")


def read(path: Path) -> list[dict]:
    """The manifest's entries in acceptance order ([] when the file does not exist yet)."""
    if not Path(path).exists():
        return []
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataValidationError(f"{path}:{n}: not a JSON line ({e.msg})", file=str(path)) from None
    return entries


def entry(name: str, accepted: Path, files: list[Path], rows: int) -> dict:
    """The manifest line of a drop whose canonical files (interactions, then items) are in `accepted`."""
    inter, items = files[0], (files[1] if len(files) > 1 else None)
    return {
        "drop": name,
        "file": inter.name,
        "sha256": sha256_of(inter),
        "items_file": items.name if items else None,
        "items_sha256": sha256_of(items) if items else None,
        "rows": rows,
        "accepted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def append(path: Path, entries: list[dict]) -> None:
    """Append entries (one line each) and fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for e in entries:
            fh.write(json.dumps(e, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def accepted_files(manifest: Path, accepted: Path) -> list[tuple[Path, Path | None]]:
    """(interactions, items or None) of every accepted drop in acceptance order, each file checked
    against its sha256; a file in data/accepted the manifest does not list is an error."""
    entries = read(manifest)
    out, listed = [], set()
    for e in entries:
        files = [(e["file"], e["sha256"])] + (
            [(e["items_file"], e["items_sha256"])] if e["items_file"] else []
        )
        for name, sha in files:
            path = Path(accepted) / name
            listed.add(name)
            if not path.exists():
                raise SourceError(
                    f"{path}: listed in {manifest} but missing; run `dvc pull data/accepted.dvc` first"
                )
            if sha256_of(path) != sha:
                raise DataValidationError(
                    f"{path}: sha256 differs from {manifest} (accepted data must not change)",
                    file=str(path),
                    expectation="accepted file matches the manifest",
                )
        out.append(
            (Path(accepted) / e["file"], Path(accepted) / e["items_file"] if e["items_file"] else None)
        )
    extra = sorted(p.name for p in Path(accepted).glob("*.parquet")) if Path(accepted).is_dir() else []
    extra = [n for n in extra if n not in listed]
    if extra:
        raise DataValidationError(
            f"{accepted}: {extra} not in {manifest}; only `rsllm ingest` adds accepted drops",
            file=str(accepted),
            expectation="every accepted file is in the manifest",
        )
    return out
