"""Intake of weekly drops: validate, accept (merge + version) or quarantine with a reason.

A drop is data/incoming/<name>.csv|parquet (interactions), optionally with <name>.items.csv|parquet.
  pass -> data/accepted/<name>.parquet (+ .items.parquet), original moved to data/archive/,
          `dvc add data/accepted`, `dvc repro validate` rebuilds data/raw, a data version is recorded.
  fail -> moved to data/quarantine/ beside <name>.reason.json; data/raw, data/prepared and models
          are not touched and nothing downstream runs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from components import versioning
from components.config import Settings
from components.errors import DataValidationError, RsllmError, SourceError
from components.io import atomic_file, write_json_atomic
from components.sources import DROP_SUFFIXES, read_table
from components.validate import drop_items_path, validate_drop

log = logging.getLogger(__name__)


def waiting_drops(incoming: Path) -> list[Path]:
    """Interaction files waiting in data/incoming, oldest name first (items files ride along)."""
    if not incoming.is_dir():
        return []
    return sorted(
        p
        for p in incoming.iterdir()
        if p.is_file() and p.suffix.lower() in DROP_SUFFIXES and not p.stem.endswith(".items")
    )


def quarantine(drop: Path, error: Exception, quarantine_dir: Path) -> dict:
    """Move a rejected drop (and its items file) to quarantine beside a JSON reason."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    reason = {
        "drop": drop.name,
        "rejected_at": stamp,
        "error": type(error).__name__,
        "message": str(error),
        "file": getattr(error, "file", str(drop)),
        "column": getattr(error, "column", ""),
        "expectation": getattr(error, "expectation", ""),
        "examples": getattr(error, "examples", []),
    }
    moved = []
    for path in (drop, drop_items_path(drop)):
        if path is not None and path.exists():
            target = quarantine_dir / f"{stamp}-{path.name}"
            shutil.move(str(path), target)
            moved.append(str(target))
    reason["moved_to"] = moved
    write_json_atomic(quarantine_dir / f"{stamp}-{drop.stem}.reason.json", reason)
    return reason


def accept(
    drop: Path, inter: pd.DataFrame, items: pd.DataFrame | None, accepted: Path, archive: Path
) -> list[Path]:
    """Write the canonical drop into data/accepted (atomically) and archive the original files."""
    written = []
    with atomic_file(accepted / f"{drop.stem}.parquet") as fh:
        inter.to_parquet(fh, index=False)
    written.append(accepted / f"{drop.stem}.parquet")
    if items is not None:
        with atomic_file(accepted / f"{drop.stem}.items.parquet") as fh:
            items.to_parquet(fh, index=False)
        written.append(accepted / f"{drop.stem}.items.parquet")
    archive.mkdir(parents=True, exist_ok=True)
    for path in (drop, drop_items_path(drop)):
        if path is not None and path.exists():
            shutil.move(str(path), archive / path.name)
    return written


def ingest(settings: Settings, paths: list[Path] | None, repo: Path, *, record_version: bool = True) -> dict:
    """Validate each waiting drop; merge those that pass into data/raw and record a data version."""
    repo = Path(repo)
    data = repo / "data"
    drops = [Path(p) for p in paths] if paths else waiting_drops(data / "incoming")
    result: dict = {"accepted": [], "rejected": [], "version": None}
    if not drops:
        result["message"] = f"no drops waiting in {data / 'incoming'}"
        return result
    if record_version:
        versioning.check_committable(repo)  # refuse before anything moves
    catalogue = read_table(data / "raw" / "items.parquet")
    written: list[Path] = []
    for drop in drops:
        try:
            if (data / "accepted" / f"{drop.stem}.parquet").exists():
                raise DataValidationError(
                    f"{drop}: a drop named {drop.stem!r} was already accepted",
                    file=str(drop),
                    expectation="drop name is new",
                )
            inter, items, summaries = validate_drop(
                settings, drop, catalogue, repo / "reports/validation/docs"
            )
        except (DataValidationError, SourceError) as e:
            reason = quarantine(drop, e, data / "quarantine")
            log.error("rejected %s: %s", drop.name, e)
            result["rejected"].append(reason)
            continue
        written += accept(drop, inter, items, data / "accepted", data / "archive")
        if items is not None:
            catalogue = pd.concat([catalogue, items[~items["item_id"].isin(set(catalogue["item_id"]))]])
        result["accepted"].append(
            {"drop": drop.name, "rows": len(inter), "users": int(inter["user_id"].nunique())}
        )
    if not written:
        return result
    try:
        versioning.run(["dvc", "add", "-q", "data/accepted"], repo)
        versioning.run(["dvc", "repro", "-q", "validate"], repo)  # fetch? -> merge -> validate
    except RsllmError:
        _undo_accept(repo, written)
        raise
    if record_version:
        names = ", ".join(a["drop"] for a in result["accepted"])
        result["version"] = versioning.record_version(repo, note=f"ingest {names}", check=False)
    return result


def _undo_accept(repo: Path, written: list[Path]) -> None:
    """A merge that fails after acceptance: take the new files out again and restore data/raw."""
    for path in written:
        path.unlink(missing_ok=True)
    try:
        versioning.run(["dvc", "add", "-q", "data/accepted"], repo)
        versioning.run(["dvc", "checkout", "-q", "merge"], repo)
    except RsllmError as e:  # pragma: no cover - best effort; the original error is what matters
        log.error("could not restore data/raw after a failed merge: %s", e)
    log.error("undid acceptance of %s", json.dumps([p.name for p in written]))
