"""Drift figures: one number per window of interactions, each against everything before that window,
and thresholds relative to the preceding weeks. Pure functions on tables; components/drift.py loads the
data, runs Evidently and writes the reports (its docstring describes every figure).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import distance
from scipy.stats import wasserstein_distance

from components.config import DriftSettings
from components.errors import DriftError

DAY = 86400
UNKNOWN_GENRE = "(unknown)"
FIGURES: dict[str, str] = {
    "item_popularity": "normed Wasserstein distance of log(1 + reference popularity) of the items",
    "genre_mix": "Jensen-Shannon distance of the genre shares",
    "rating": "Jensen-Shannon distance of the rating values",
    "user_activity": "normed Wasserstein distance of log(1 + interactions per user per window)",
    "time_of_day": "Jensen-Shannon distance of the hour of day (UTC)",
    "new_items": "share of interactions on items the reference never saw",
    "new_users": "share of interactions by users the reference never saw",
}


@dataclass(frozen=True)
class Tables:
    """Interactions (canonical columns), the item catalogue that goes with them, and where they came from."""

    interactions: pd.DataFrame
    items: pd.DataFrame | None
    source: str


def js_distance(reference: pd.Series, current: pd.Series) -> float:
    """Jensen-Shannon distance (natural log) of two samples' value shares, as Evidently's categorical test."""
    ref, cur = reference.value_counts(normalize=True), current.value_counts(normalize=True)
    keys = ref.index.union(cur.index)
    return float(distance.jensenshannon(ref.reindex(keys, fill_value=0), cur.reindex(keys, fill_value=0)))


def js_weights(reference: pd.Series, current: pd.Series) -> float:
    """Jensen-Shannon distance of two weight vectors indexed by category."""
    keys = reference.index.union(current.index)
    return float(
        distance.jensenshannon(reference.reindex(keys, fill_value=0), current.reindex(keys, fill_value=0))
    )


def wasserstein_normed(reference: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein distance divided by the reference's standard deviation, as Evidently's numerical test."""
    return float(wasserstein_distance(reference, current) / max(float(np.std(reference)), 0.001))


def genre_table(items: pd.DataFrame | None) -> pd.DataFrame:
    """Long table item_id, genre, weight: an item with k genres gives each genre 1/k."""
    if items is None or not len(items):
        return pd.DataFrame(
            {
                "item_id": pd.Series(dtype=object),
                "genre": pd.Series(dtype=object),
                "weight": pd.Series(dtype=float),
            }
        )
    cat = items.drop_duplicates("item_id")
    genres = cat["genres"].astype(str).fillna("").replace("", UNKNOWN_GENRE).str.split("|")
    long = pd.DataFrame(
        {"item_id": cat["item_id"].astype(str).to_numpy(dtype=object), "genre": genres.to_numpy(dtype=object)}
    )
    long["weight"] = 1.0 / long["genre"].map(len)
    return long.explode("genre").reset_index(drop=True)


def genre_weights(interactions: pd.DataFrame, genres: pd.DataFrame) -> pd.Series:
    """Interactions per genre (fractional for items with several genres); items without a catalogue row
    count under '(unknown)'."""
    counts = interactions["item_id"].value_counts()
    table = genres.assign(n=genres["item_id"].map(counts).fillna(0.0))
    weights = (table["weight"] * table["n"]).groupby(table["genre"]).sum()
    unknown = float(counts[~counts.index.isin(genres["item_id"].to_numpy())].sum())
    if unknown:
        weights.loc[UNKNOWN_GENRE] = weights.get(UNKNOWN_GENRE, 0.0) + unknown
    return weights[weights > 0]


def popularity(window: pd.DataFrame, history: pd.DataFrame) -> np.ndarray:
    """log(1 + the item's interactions in `history`) for every interaction of `window`."""
    counts = history["item_id"].value_counts()
    return np.log1p(window["item_id"].map(counts).fillna(0).to_numpy(dtype=float))


def hours(interactions: pd.DataFrame) -> pd.Series:
    """Hour of day (UTC) of every interaction."""
    return (interactions["timestamp"] % DAY) // 3600


def evidently_frame(window: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """The per-interaction columns Evidently tests: item_popularity (numerical), rating and hour
    (categorical, as text)."""
    return pd.DataFrame(
        {
            "item_popularity": popularity(window, history),
            "rating": window["rating"].map("{:g}".format).to_numpy(),
            "hour": hours(window).map("{:02d}".format).to_numpy(),
        }
    )


def activity(history: pd.DataFrame, start: int, window_s: int) -> np.ndarray:
    """log(1 + interactions per user per window) of `history`, windows aligned to end at `start`."""
    bucket = (start - 1 - history["timestamp"]) // window_s
    counts = history.groupby([history["user_id"], bucket]).size()
    return np.log1p(counts.to_numpy(dtype=float))


def window_figures(
    window: pd.DataFrame, history: pd.DataFrame, genres: pd.DataFrame, start: int, window_s: int
) -> dict[str, float]:
    """Every figure of one window of interactions (starting at `start`) against the interactions before it."""
    per_user = np.log1p(window.groupby("user_id").size().to_numpy(dtype=float))
    return {
        "item_popularity": wasserstein_normed(popularity(history, history), popularity(window, history)),
        "genre_mix": js_weights(genre_weights(history, genres), genre_weights(window, genres)),
        "rating": js_distance(history["rating"], window["rating"]),
        "user_activity": wasserstein_normed(activity(history, start, window_s), per_user),
        "time_of_day": js_distance(hours(history), hours(window)),
        "new_items": float((~window["item_id"].isin(history["item_id"].unique())).mean()),
        "new_users": float((~window["user_id"].isin(history["user_id"].unique())).mean()),
    }


def baseline_figures(
    reference: pd.DataFrame, genres: pd.DataFrame, anchor: int, cfg: DriftSettings, window_s: int
) -> list[dict]:
    """The figures of the windows just before `anchor`, each against the reference data before it."""
    weeks = []
    for k in range(1, cfg.baseline_weeks + 1):
        lo, hi = anchor - k * window_s, anchor - (k - 1) * window_s
        window = reference[(reference["timestamp"] >= lo) & (reference["timestamp"] < hi)]
        history = reference[reference["timestamp"] < lo]
        if len(window) < cfg.baseline_min_rows or len(history) < cfg.baseline_min_rows:
            continue
        start = dt.datetime.fromtimestamp(lo, tz=dt.UTC).date().isoformat()
        weeks.append(
            {"start": start, "rows": len(window)} | window_figures(window, history, genres, lo, window_s)
        )
    return weeks


def thresholds(baseline: list[dict], cfg: DriftSettings) -> dict[str, dict]:
    """Each figure's threshold: max(factor * median, median + margin) of the preceding weeks' values, or
    the absolute one when fewer than `min_baseline_weeks` weeks are usable."""
    out = {}
    for name in FIGURES:
        t = getattr(cfg.figures, name)
        if len(baseline) >= cfg.min_baseline_weeks:
            median = float(np.median([week[name] for week in baseline]))
            out[name] = {
                "threshold": max(t.factor * median, median + t.margin),
                "basis": f"max({t.factor:g} x median, median + {t.margin:g}) of {len(baseline)} weeks before",
                "baseline_median": median,
            }
        else:
            out[name] = {
                "threshold": t.absolute,
                "basis": f"absolute (only {len(baseline)} preceding weeks usable, "
                f"drift.min_baseline_weeks={cfg.min_baseline_weeks})",
                "baseline_median": None,
            }
    return out


def exclude(reference: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The reference without the current rows (a drop merged into data/raw is not its own reference)."""
    keys = ["user_id", "item_id", "timestamp"]
    seen = pd.MultiIndex.from_frame(reference[keys]).isin(pd.MultiIndex.from_frame(current[keys]))
    return reference[~seen].reset_index(drop=True)


def measure(reference: Tables, current: Tables, cfg: DriftSettings, window_days: int) -> dict:
    """Every figure of `current` against `reference`, its threshold from the preceding weeks, the verdict."""
    ref = exclude(reference.interactions, current.interactions)
    if ref.empty:
        raise DriftError(f"{reference.source}: no reference interactions left besides the current ones")
    cur = current.interactions
    genres = genre_table(_catalogue(reference.items, current.items))
    ref_codes, cur_codes, genres = _encode(ref, cur, genres)
    window_s = window_days * DAY
    start = int(cur["timestamp"].min()) // DAY * DAY
    anchor = min(start, int(ref["timestamp"].max()) // DAY * DAY + DAY)
    baseline = baseline_figures(ref_codes, genres, anchor, cfg, window_s)
    values = window_figures(cur_codes, ref_codes, genres, start, window_s)
    limits = thresholds(baseline, cfg)
    figures = {
        name: {
            "value": values[name],
            "drift": bool(values[name] > limits[name]["threshold"]),
            "description": FIGURES[name],
        }
        | limits[name]
        for name in FIGURES
    }
    tripped = [name for name, f in figures.items() if f["drift"]]
    return {
        "drift": bool(tripped),
        "tripped": tripped,
        "date": dt.datetime.fromtimestamp(start, tz=dt.UTC).date().isoformat(),
        "reference": _describe(reference.source, ref),
        "current": _describe(current.source, current.interactions),
        "figures": figures,
        "baseline_weeks": baseline,
    }


def _encode(
    reference: pd.DataFrame, current: pd.DataFrame, genres: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The same tables with user and item ids replaced by shared integer codes (counting integers is
    several times faster than counting strings; the figures only compare ids)."""
    n_ref, n_cur = len(reference), len(current)
    users, _ = pd.factorize(np.concatenate([reference["user_id"].to_numpy(), current["user_id"].to_numpy()]))
    items, _ = pd.factorize(
        np.concatenate(
            [reference["item_id"].to_numpy(), current["item_id"].to_numpy(), genres["item_id"].to_numpy()]
        )
    )
    ref = reference.assign(user_id=users[:n_ref], item_id=items[:n_ref])
    cur = current.assign(user_id=users[n_ref:], item_id=items[n_ref : n_ref + n_cur])
    return ref, cur, genres.assign(item_id=items[n_ref + n_cur :])


def _catalogue(reference: pd.DataFrame | None, current: pd.DataFrame | None) -> pd.DataFrame | None:
    """The reference catalogue plus the drop's new items."""
    frames = [
        f[["item_id", "genres"]].astype({"item_id": str}) for f in (reference, current) if f is not None
    ]
    return pd.concat(frames, ignore_index=True).drop_duplicates("item_id") if frames else None


def _describe(source: str, interactions: pd.DataFrame) -> dict:
    first, last = interactions["timestamp"].min(), interactions["timestamp"].max()
    return {
        "source": source,
        "rows": len(interactions),
        "users": int(interactions["user_id"].nunique()),
        "items": int(interactions["item_id"].nunique()),
        "first": dt.datetime.fromtimestamp(int(first), tz=dt.UTC).isoformat(timespec="seconds"),
        "last": dt.datetime.fromtimestamp(int(last), tz=dt.UTC).isoformat(timespec="seconds"),
    }
