"""Intake of weekly drops: judge each one, then accept (merge + version) or quarantine it with a reason.

A drop is data/incoming/<name>.csv|parquet (interactions), optionally with <name>.items.csv|parquet.
  judge  -> the file checks of components/drops.py (a regular file, never a link; size and rows from
            metadata), the expectations of components/validate.py, then no change to accepted data
            (components/drops.py). Any error while judging, expected or not, rejects the drop.
  pass   -> the drops that pass are committed together as one transaction (components/transaction.py):
            data/accepted/<name>.parquet (+ .items.parquet) and a manifest line, merged into data/raw,
            pushed, committed and tagged data/vN; only then are the originals moved to data/archive/.
            A failure while committing (a lock, the disk, the remote, a kill) rolls it all back and
            the drops wait in data/incoming/ for the next run; a content fault first seen at merge
            time quarantines the drop it names.
  fail   -> moved to data/quarantine/ beside <name>.reason.json; data/raw, data/prepared and models
            are not touched and nothing downstream runs.
All of it runs under the repository lock (components/lock.py); a run first completes or rolls back
a transaction a killed run left half-done.
A path given explicitly that is not a drop file (dvc.yaml, a folder, a link) is refused before
anything is read or moved (DropPathError; the CLI exits 2).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from components import transaction, versioning
from components.columns import short
from components.config import Settings
from components.drops import KEYS, check_item_titles, check_ratings, is_drop_name, refuse_non_drops
from components.errors import DataValidationError, RsllmError, SourceError
from components.io import write_json_atomic
from components.lock import repo_lock
from components.sources import read_table
from components.transaction import Judged
from components.validate import DROP_DOCS, drop_items_path, validate_drop

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


def ingest(settings: Settings, paths: list[Path] | None, repo: Path, *, record_version: bool = True) -> dict:
    """Judge each waiting drop (or each of `paths`); commit those that pass as one transaction
    (merged into data/raw and versioned), quarantine the rest. A path that is not a drop file is
    refused (DropPathError) before anything moves. Held under the repository lock."""
    repo = Path(repo)
    if paths:
        refuse_non_drops([Path(p) for p in paths])
    with repo_lock(repo, "ingest"):
        return _ingest(settings, [Path(p) for p in paths or []], repo, record_version)


def _ingest(settings: Settings, paths: list[Path], repo: Path, record_version: bool) -> dict:
    data = repo / "data"
    result: dict = {"accepted": [], "rejected": [], "waiting": [], "version": None}
    result["recovered"] = transaction.recover(repo)
    drops = paths or waiting_drops(data / "incoming")
    if not drops:
        result["message"] = f"no drops waiting in {data / 'incoming'}"
        return result
    if record_version:
        versioning.check_committable(repo)  # refuse before anything moves
    catalogue = read_table(data / "raw" / "items.parquet")
    accepted = accepted_interactions(data / "raw" / "interactions.parquet")
    batch: list[Judged] = []
    for drop in drops:
        try:
            inter, items = judge(settings, drop, catalogue, accepted, repo)
        except (DataValidationError, SourceError) as e:
            result["rejected"].append(_reject(drop, e, data / "quarantine"))
            continue
        except Exception as e:  # a bug or an input nobody foresaw: quarantined, never left waiting
            error = DataValidationError(
                f"{drop}: unexpected error while judging the drop: {type(e).__name__}: {short(str(e), 200)}",
                file=str(drop),
                expectation="drop can be judged",
            )
            log.debug("unexpected error judging %s", drop, exc_info=True)
            result["rejected"].append(_reject(drop, error, data / "quarantine", kind=type(e).__name__))
            continue
        batch.append(Judged(drop, inter, items))
        if items is not None:
            catalogue = pd.concat([catalogue, items[~items["item_id"].isin(set(catalogue["item_id"]))]])
        accepted = pd.concat([accepted, inter[[*KEYS, "rating"]]], ignore_index=True)
    if batch:
        _commit(repo, batch, result, record_version)
    return result


def _commit(repo: Path, batch: list[Judged], result: dict, record_version: bool) -> None:
    """Commit the batch; on failure it was rolled back and its drops wait, except for a content fault
    first seen at merge time (the merge or validate stage refused the merged data): the drops the error
    names are quarantined and the rest committed again; when it names none, a lone drop is the one at
    fault, and a batch is committed one drop at a time to find it."""
    names = [j.drop.name for j in batch]
    try:
        result["version"] = transaction.commit(
            repo, batch, version=record_version, note=f"ingest {', '.join(names)}"
        )
    except RsllmError as e:
        content = "DataValidationError" in str(e)
        faulty = [j for j in batch if content and f"accepted/{j.drop.stem}." in str(e)]
        if content and not faulty and len(batch) > 1:
            for j in batch:
                _commit(repo, [j], result, record_version)
            return
        if content and not faulty:
            faulty = batch
        for j in faulty:
            error = DataValidationError(
                f"{j.drop}: rejected when merged: {short(str(e), 400)}",
                file=str(j.drop),
                expectation="drop merges",
            )
            result["rejected"].append(_reject(j.drop, error, repo / "data/quarantine"))
        rest = [j for j in batch if j not in faulty]
        if faulty and rest:
            _commit(repo, rest, result, record_version)
        elif not faulty:
            result["waiting"] += names
            result["error"] = f"{type(e).__name__}: {e}"
            log.error("intake of %s rolled back, the drops wait in data/incoming: %s", names, e)
        return
    result["accepted"] += [
        {"drop": j.drop.name, "rows": len(j.inter), "users": int(j.inter["user_id"].nunique())} for j in batch
    ]


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
    inter, items, _ = validate_drop(settings, drop, catalogue, repo / DROP_DOCS)
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
