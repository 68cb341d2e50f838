"""The merged current snapshot and weekly drops.

  merge        data/fetched (up to the cutoff in weekly mode) + the drops of data/manifest.jsonl, in
               acceptance order -> data/raw/ (cleaned) and data/raw/item_index.parquet
  item_index   item_id -> item_idx, never renumbered: the source catalogue's ids in file order, then
               each accepted drop's new ids in acceptance order (its items file, then its interactions)
  replay_week  the next held-back week of the source -> data/incoming/week-YYYY-MM-DD.parquet

Sources and the canonical tables are in components/sources.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Settings
from components.errors import DataValidationError, SourceError
from components.io import atomic_dir, atomic_file, write_json_atomic
from components.manifest import MANIFEST, accepted_files

log = logging.getLogger(__name__)
INDEX_FILE = "item_index.parquet"  # in data/raw: the stable item index (item_index)

_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_PLACEHOLDER_TITLES = {"unknown", "unkonwn", "n/a", "na", "none", "null", "?"}


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


def cutoff_seconds(settings: Settings) -> int:
    return int(dt.datetime.combine(settings.data.cutoff, dt.time(), tzinfo=dt.UTC).timestamp())


def item_index(id_lists: list) -> pd.DataFrame:
    """item_id (str) -> item_idx (int32, 1..N; 0 is padding) in order of first appearance over `id_lists`.

    merge passes the source catalogue's ids, then each accepted drop's ids in acceptance order. Those
    inputs only grow (the source is pinned, accepted drops are immutable and checked by sha256), so an
    item keeps its index for ever and new items are appended: a stored model scores a newer snapshot by
    a plain load, and an item it has no row for is cold by index. Ids excluded later (a bad catalogue
    row) keep their index unused, so cleaning rules never renumber anything."""
    order: dict[str, None] = {}
    for ids in id_lists:
        for item_id in ids:
            if item_id is not None and not pd.isna(item_id):
                order.setdefault(str(item_id), None)
    return pd.DataFrame(
        {"item_id": list(order), "item_idx": np.arange(1, len(order) + 1, dtype=np.int32)}
    ).astype({"item_id": "string"})


def merge_tables(
    settings: Settings, fetched: Path, accepted: Path, manifest: Path = MANIFEST
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Pure part of merge: snapshot (cut) + drops in acceptance order (the manifest), deduped on
    (user, item, timestamp) keeping the first, catalogue cleaned -> (interactions, items, the stable
    item index over the source catalogue and every drop, report)."""
    inter = pd.read_parquet(fetched / "interactions.parquet")
    items = pd.read_parquet(fetched / "items.parquet")
    report: dict = {"source_rows": len(inter)}
    if settings.data.mode == "weekly":
        inter = inter[inter["timestamp"] < cutoff_seconds(settings)]
        report["cutoff"] = str(settings.data.cutoff)
    report["snapshot_rows"] = len(inter)
    index_ids = [items["item_id"].tolist()]  # the whole source catalogue, cut or not
    frames, drop_items, drops = [inter], [], []
    for inter_path, items_path in accepted_files(manifest, accepted):
        drop = pd.read_parquet(inter_path)
        frames.append(drop)
        drops.append({"drop": inter_path.name, "rows": len(drop)})
        if items_path is not None:
            drop_items.append(pd.read_parquet(items_path))
            index_ids.append(drop_items[-1]["item_id"].tolist())
        index_ids.append(drop["item_id"].tolist())
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
    index = item_index(index_ids)
    report["index_items"] = len(index)
    return merged, items, index, report


def merge(
    settings: Settings, fetched: Path, accepted: Path, out: Path, report_path: Path, manifest: Path = MANIFEST
) -> dict:
    """dvc stage `merge`: write data/raw/ and the merge report atomically."""
    if not (fetched / "interactions.parquet").exists():
        raise SourceError(f"{fetched}/interactions.parquet: not found; run `rsllm fetch` first")
    merged, items, index, report = merge_tables(settings, fetched, accepted, manifest)
    with atomic_dir(out) as tmp:
        merged.to_parquet(tmp / "interactions.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        index.to_parquet(tmp / INDEX_FILE, index=False)
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
