"""Judging a drop's files before their rows are read, and a validated drop against the accepted data.

Before reading:
  - a path given as a drop (`rsllm ingest PATH`, `rsllm validate PATH`) must be a regular .csv or
    .parquet file that is not an items file: anything else (missing, a folder, a link, dvc.yaml) is
    refused with DropPathError and never read or moved;
  - a drop or items file is opened without following links and must be a regular file (a link's
    target is never read) within validate.drop_max_bytes and validate.drop_max_rows, taken from its
    size and its Parquet metadata or CSV line count, never by loading it.
After validation, accepted data is never changed by a later drop: an item keeps the title it was
accepted with and an interaction (user, item, timestamp) its rating. A drop that would change either
is rejected, whatever the file names (merge keeps the first of equal rows by name, so it must never
see two different ones).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import pyarrow.parquet as pq

from components.columns import short
from components.config import ValidateSettings
from components.errors import DataValidationError, DropPathError, SourceError
from components.sources import DROP_SUFFIXES, unreadable

KEYS = ["user_id", "item_id", "timestamp"]
CHUNK = 1 << 20


def is_drop_name(path: Path) -> bool:
    """A drop's name: .csv or .parquet, not an items file (<name>.items.csv|parquet rides along)."""
    return path.suffix.lower() in DROP_SUFFIXES and not path.stem.lower().endswith(".items")


def path_problem(path: Path) -> str | None:
    """Why `path` is not a drop file, or None when it is one (inspected with lstat: nothing is read)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(mode):
        return "is a symbolic link; a drop must be a regular file (the link is not followed)"
    if stat.S_ISDIR(mode):
        return "is a folder, not a drop; pass the drop files (or put them in data/incoming)"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if path.suffix.lower() not in DROP_SUFFIXES:
        return f"is not a drop: a drop is a {' or '.join(DROP_SUFFIXES)} file"
    if not is_drop_name(path):
        return "is the items file of a drop; pass the drop itself (its items file rides along)"
    return None


def refuse_non_drops(paths: list[Path]) -> None:
    """DropPathError naming every given path that is not a drop file; nothing is read or moved."""
    problems = [f"{p}: {why}" for p in paths if (why := path_problem(Path(p))) is not None]
    if problems:
        raise DropPathError("refused, nothing was read or moved: " + "; ".join(problems))


@contextmanager
def open_drop(path: Path) -> Iterator[BinaryIO]:
    """Open a drop file for reading without following a link; only a regular file is opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_regular(path, "is a symbolic link (not followed: its target was not read)") from None
        raise SourceError(f"{path}: cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_regular(path, "is not a regular file (a folder, pipe or device); not read")
        yield fh


def _not_regular(path: Path, why: str) -> DataValidationError:
    return DataValidationError(
        f"{path}: {why}; drops must be regular files", file=str(path), expectation="drop is a regular file"
    )


def check_limits(fh: BinaryIO, path: Path, cfg: ValidateSettings) -> None:
    """Bytes and rows within validate.drop_max_bytes / drop_max_rows, from size and metadata only."""
    size = os.fstat(fh.fileno()).st_size
    if size > cfg.drop_max_bytes:
        raise _too_big(path, f"{size} bytes", "validate.drop_max_bytes", cfg.drop_max_bytes)
    if path.suffix.lower() == ".parquet":
        rows, declared = parquet_size(fh, path)
        if declared > cfg.drop_max_bytes:
            raise _too_big(
                path,
                f"{declared} bytes uncompressed (Parquet metadata)",
                "validate.drop_max_bytes",
                cfg.drop_max_bytes,
            )
    else:
        rows = csv_rows(fh)
    if rows > cfg.drop_max_rows:
        raise _too_big(path, f"{rows} rows", "validate.drop_max_rows", cfg.drop_max_rows)


def _too_big(path: Path, observed: str, key: str, limit: int) -> DataValidationError:
    return DataValidationError(
        f"{path}: {observed}, over {key}={limit} (checked before reading the rows)",
        file=str(path),
        column="(table)",
        expectation=f"{key.split('.')[-1]} within {limit}",
    )


def parquet_size(fh: BinaryIO, path: Path) -> tuple[int, int]:
    """Rows and uncompressed bytes a Parquet file's footer declares (the footer only is read)."""
    try:
        meta = pq.ParquetFile(fh).metadata
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return meta.num_rows, declared
    except Exception as e:  # not Parquet: the same one-line error the reader gives
        raise unreadable(path, e) from None
    finally:
        fh.seek(0)


def csv_rows(fh: BinaryIO) -> int:
    """Data lines of a CSV (lines after the header), counted in chunks; quoted line breaks count too,
    so this bounds the rows from above."""
    lines, last = 0, b"\n"
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    fh.seek(0)
    lines += last != b"\n"
    return max(lines - 1, 0)


def check_item_titles(items: pd.DataFrame | None, catalogue: pd.DataFrame, path: Path) -> None:
    """Reject an items file that changes the title of an item already in the accepted data."""
    if items is None or items.empty:
        return
    accepted = catalogue[["item_id", "title"]].astype("string").drop_duplicates("item_id")
    both = (
        items[["item_id", "title"]].astype("string").merge(accepted, on="item_id", suffixes=("", "_accepted"))
    )
    changed = both[both["title"].fillna("").str.strip() != both["title_accepted"].fillna("").str.strip()]
    if changed.empty:
        return
    shown = [
        f"{short(r.item_id)}: {short(r.title_accepted)!r} -> {short(r.title)!r}"
        for r in changed.head(3).itertuples()
    ]
    raise DataValidationError(
        f"{path}: {len(changed)} item(s) already accepted would be retitled, e.g. {shown}; an accepted "
        "item keeps its title (give a changed item a new item_id)",
        file=str(path),
        column="title",
        expectation="accepted items keep their title",
        examples=[short(v) for v in changed["item_id"].head(3)],
    )


def check_ratings(inter: pd.DataFrame, accepted: pd.DataFrame, path: Path) -> None:
    """Reject a drop holding an accepted interaction (user, item, timestamp) with a different rating."""
    if inter.empty or accepted.empty:
        return
    both = _keyed(inter).merge(_keyed(accepted), on=KEYS, suffixes=("", "_accepted"))
    changed = both[both["rating"] != both["rating_accepted"]]
    if changed.empty:
        return
    shown = [
        f"({short(r.user_id)}, {short(r.item_id)}, {r.timestamp}): {r.rating_accepted} -> {r.rating}"
        for r in changed.head(3).itertuples()
    ]
    raise DataValidationError(
        f"{path}: {len(changed)} interaction(s) already accepted with another rating, e.g. {shown} "
        "((user, item, timestamp): accepted -> new); an accepted interaction keeps its rating",
        file=str(path),
        column="rating",
        expectation="accepted interactions keep their rating",
        examples=shown,
    )


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """The key columns in one dtype per column (so frames from different readers merge), plus rating."""
    return frame[[*KEYS, "rating"]].astype(
        {"user_id": "string", "item_id": "string", "timestamp": "int64", "rating": "float64"}
    )
