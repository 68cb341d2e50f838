"""Intake of weekly drops: judge each one, then accept (merge + version) or quarantine it with a reason.

A drop is data/incoming/<name>.csv|parquet (interactions), optionally with <name>.items.csv|parquet.
  judge  -> the file checks of components/drops.py (a regular file, never a link; size and rows from
            metadata), the expectations of components/validate.py, then no change to accepted data
            (components/drops.py). Any error while judging, expected or not, rejects the drop.
  pass   -> data/accepted/<name>.parquet (+ .items.parquet), original moved to data/archive/,
            `dvc add data/accepted`, `dvc repro validate` rebuilds data/raw, a data version is recorded.
  fail   -> moved to data/quarantine/ beside <name>.reason.json; data/raw, data/prepared and models
            are not touched and nothing downstream runs.
A path given explicitly that is not a drop file (dvc.yaml, a folder, a link) is refused before
anything is read or moved (DropPathError; the CLI exits 2).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from components import versioning
from components.columns import short
from components.config import Settings
from components.drops import KEYS, check_item_titles, check_ratings, is_drop_name, refuse_non_drops
from components.errors import DataValidationError, RsllmError, SourceError
from components.io import atomic_file, write_json_atomic
from components.sources import read_table
from components.validate import drop_items_path, validate_drop

log = logging.getLogger(__name__)


def waiting_drops(incoming: Path) -> list[Path]:
    """Entries with a drop's name waiting in data/incoming, oldest name first (items files ride along).

    Links, folders and other non-regular entries with such a name are listed too: judging rejects
    them unread, so that they are quarantined instead of failing every later run.
    """
    if not incoming.is_dir():
        return []
    return sorted(p for p in incoming.iterdir() if is_drop_name(p))


def quarantine(drop: Path, error: Exception, quarantine_dir: Path, *, kind: str | None = None) -> dict:
    """Move a rejected drop (and its items file) to quarantine beside a JSON reason; a link is moved
    as a link (its target is not touched)."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    reason = {
        "drop": drop.name,
        "rejected_at": stamp,
        "error": kind or type(error).__name__,
        "message": str(error),
        "file": getattr(error, "file", str(drop)),
        "column": getattr(error, "column", ""),
        "expectation": getattr(error, "expectation", ""),
        "examples": getattr(error, "examples", []),
    }
    moved = []
    for path in (drop, drop_items_path(drop)):
        if path is not None and os.path.lexists(path):
            target = quarantine_dir / f"{stamp}-{path.name}"
            shutil.move(str(path), target)  # a rename where it can: a link moves as a link
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
    """Judge each waiting drop (or each of `paths`); merge those that pass into data/raw and record a
    data version. A path that is not a drop file is refused (DropPathError) before anything moves."""
    repo = Path(repo)
    data = repo / "data"
    if paths:
        refuse_non_drops([Path(p) for p in paths])
    drops = [Path(p) for p in paths] if paths else waiting_drops(data / "incoming")
    result: dict = {"accepted": [], "rejected": [], "version": None}
    if not drops:
        result["message"] = f"no drops waiting in {data / 'incoming'}"
        return result
    if record_version:
        versioning.check_committable(repo)  # refuse before anything moves
    catalogue = read_table(data / "raw" / "items.parquet")
    accepted = accepted_interactions(data / "raw" / "interactions.parquet")
    written: list[Path] = []
    for drop in drops:
        try:
            inter, items = judge(settings, drop, catalogue, accepted, repo)
        except (DataValidationError, SourceError) as e:
            result["rejected"].append(_reject(drop, e, data / "quarantine"))
            continue
        except (
            Exception
        ) as e:  # a bug or an input nobody foresaw: the drop is quarantined, never left waiting
            error = DataValidationError(
                f"{drop}: unexpected error while judging the drop: {type(e).__name__}: {short(str(e), 200)}",
                file=str(drop),
                expectation="drop can be judged",
            )
            log.debug("unexpected error judging %s", drop, exc_info=True)
            result["rejected"].append(_reject(drop, error, data / "quarantine", kind=type(e).__name__))
            continue
        written += accept(drop, inter, items, data / "accepted", data / "archive")
        if items is not None:
            catalogue = pd.concat([catalogue, items[~items["item_id"].isin(set(catalogue["item_id"]))]])
        accepted = pd.concat([accepted, inter[[*KEYS, "rating"]]], ignore_index=True)
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


def judge(
    settings: Settings, drop: Path, catalogue: pd.DataFrame, accepted: pd.DataFrame, repo: Path
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A drop's canonical tables if it may be accepted; DataValidationError / SourceError otherwise."""
    if (repo / "data" / "accepted" / f"{drop.stem}.parquet").exists():
        raise DataValidationError(
            f"{drop}: a drop named {drop.stem!r} was already accepted",
            file=str(drop),
            expectation="drop name is new",
        )
    inter, items, _ = validate_drop(settings, drop, catalogue, repo / "reports/validation/docs")
    items_path = drop_items_path(drop)
    check_item_titles(items, catalogue, items_path or drop)
    check_ratings(inter, accepted, drop)
    return inter, items


def accepted_interactions(path: Path) -> pd.DataFrame:
    """The keys and ratings of the accepted interactions (data/raw), empty before the first merge."""
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype="string") for c in ("user_id", "item_id")}).assign(
            timestamp=pd.Series(dtype="int64"), rating=pd.Series(dtype="float64")
        )
    return pd.read_parquet(path, columns=[*KEYS, "rating"])


def _reject(drop: Path, error: Exception, quarantine_dir: Path, kind: str | None = None) -> dict:
    """Quarantine a rejected drop and log it; the reason as recorded."""
    reason = quarantine(drop, error, quarantine_dir, kind=kind)
    log.error("rejected %s: %s", drop.name, error)
    return reason


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
