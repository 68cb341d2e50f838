"""Data drift between the data the production model was trained on (reference) and a new drop (current).

Figures that matter for a sequential recommender, each one number per window of interactions, measured
against everything before that window:

  item_popularity  normed Wasserstein distance of log(1 + reference popularity) of the items interacted with
  genre_mix        Jensen-Shannon distance of the genre shares (an item's genres split its interaction)
  rating           Jensen-Shannon distance of the rating values
  user_activity    normed Wasserstein distance of log(1 + interactions per user per window)
  time_of_day      Jensen-Shannon distance of the hour (UTC) of the interactions
  new_items        share of interactions on items the reference never saw (cold-start items)
  new_users        share of interactions by users the reference never saw (cold-start users)

Thresholds are relative: the same figures are measured for the `drift.baseline_weeks` windows just before
the current one (each against the data before it), and a figure drifts when it exceeds
max(factor * median, median + margin) of those weeks (params.yaml `drift.figures.<name>`). With fewer
than `drift.min_baseline_weeks` usable weeks the figure's `absolute` threshold applies.

Evidently (its Report + DataDriftPreset) runs the column-level tests of item_popularity, rating and
time_of_day with the same methods and thresholds, and writes the HTML report.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd

from components.config import Settings
from components.drift_figures import Tables, evidently_frame, exclude, measure
from components.errors import DriftError, RsllmError
from components.io import atomic_file, sha256_of, write_json_atomic
from components.sources import DROP_SUFFIXES, canonical_interactions, canonical_items, read_table

RAW = Path("data/raw")
INCOMING = Path("data/incoming")
ACCEPTED = Path("data/accepted")
# figure -> (column in the Evidently datasets, Evidently stat test, column type)
EVIDENTLY_COLUMNS: dict[str, tuple[str, str, str]] = {
    "item_popularity": ("item_popularity", "wasserstein", "numerical"),
    "rating": ("rating", "jensenshannon", "categorical"),
    "time_of_day": ("hour", "jensenshannon", "categorical"),
}


# ---------------------------------------------------------------- reference and current


def reference_for_production(repo: Path) -> str | None:
    """The data version the production model was trained on (`data_version` of the registry's
    production pointer), or None when nothing is in production yet."""
    from components import registry

    try:
        pointer = registry.read_production(Path(repo))
    except RsllmError as e:
        raise DriftError(str(e)) from None
    version = pointer.get("data_version") if isinstance(pointer, dict) else None
    return str(version) if version else None


def load_reference(repo: Path, reference: str | Path | None = None) -> Tables:
    """The reference data: `reference` (a data version `data/vN`, a folder with interactions.parquet and
    items.parquet, or an interactions file); by default production's data version, else data/raw."""
    repo = Path(repo)
    if reference is None:
        reference = reference_for_production(repo) or RAW
    ref = str(reference)
    if re.fullmatch(r"data/v\d+", ref):
        from components import versioning

        try:
            inter = pd.read_parquet(
                io.BytesIO(versioning.read_version_file(repo, ref, "data/raw/interactions.parquet"))
            )
            items = pd.read_parquet(
                io.BytesIO(versioning.read_version_file(repo, ref, "data/raw/items.parquet"))
            )
        except RsllmError:
            raise
        except Exception as e:  # dvc: missing cache / remote
            raise DriftError(
                f"data/raw of data version {ref}: cannot be read ({type(e).__name__}: {e})"
            ) from None
        return Tables(_interactions(inter, ref), items, ref)
    path = Path(reference) if Path(reference).is_absolute() else repo / reference
    if path.is_dir() or not path.suffix:  # a folder like data/raw
        inter_path = path / "interactions.parquet"
        if not inter_path.exists():
            raise DriftError(f"{inter_path}: reference interactions not found (run `rsllm merge` first)")
        items_path = path / "items.parquet"
        items = read_table(items_path) if items_path.exists() else None
        return Tables(_interactions(read_table(inter_path), inter_path), items, str(reference))
    if not path.exists():
        raise DriftError(f"{path}: reference not found")
    catalogue = repo / RAW / "items.parquet"
    items = read_table(catalogue) if catalogue.exists() else None
    return Tables(_interactions(read_table(path), path), items, str(reference))


def latest_drop(repo: Path) -> Path | None:
    """The newest drop waiting in data/incoming, else the newest accepted one (by name), else None."""
    for folder in (INCOMING, ACCEPTED):
        drops = sorted(
            p
            for p in (Path(repo) / folder).glob("*")
            if p.is_file() and p.suffix.lower() in DROP_SUFFIXES and not p.stem.endswith(".items")
        )
        if drops:
            return drops[-1]
    return None


def load_current(settings: Settings, path: Path) -> Tables:
    """A drop (CSV or Parquet interactions) and its optional items file `<stem>.items.csv|parquet`."""
    files = settings.data.files
    inter = canonical_interactions(read_table(path), path, files.columns, files.timestamp_unit)
    items = None
    for suffix in (".parquet", ".csv"):
        items_path = path.with_name(f"{path.stem}.items{suffix}")
        if items_path.exists():
            items = canonical_items(read_table(items_path), items_path, files.columns, files.genre_separator)
            break
    return Tables(_interactions(inter, path), items, str(path))


def _interactions(df: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """The four canonical columns with usable values; anything else is a DriftError naming the source."""
    missing = [c for c in ("user_id", "item_id", "rating", "timestamp") if c not in df.columns]
    if missing:
        raise DriftError(f"{source}: missing column(s) {missing}")
    out = df[["user_id", "item_id", "rating", "timestamp"]].copy()
    for column in out.columns:
        if out[column].isna().any():
            raise DriftError(f"{source}: column {column!r} has missing values")
    if out.empty:
        raise DriftError(f"{source}: no interactions")
    # plain Python strings (object): hashing them is much faster than Arrow-backed strings in isin/map
    out["user_id"] = out["user_id"].astype(str).astype(object)
    out["item_id"] = out["item_id"].astype(str).astype(object)
    out["rating"] = out["rating"].astype("float64")
    out["timestamp"] = out["timestamp"].astype("int64")
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- Evidently


def import_evidently():
    """Import evidently 0.7, first restoring the one pandas helper its legacy test module still imports
    (`infer_dtype_from_object`, gone in pandas 3; only its column-type test calls it, never this module)."""
    import pandas.core.dtypes.common as common

    if not hasattr(common, "infer_dtype_from_object"):
        common.infer_dtype_from_object = lambda dtype: pd.api.types.pandas_dtype(dtype).type
    import evidently

    return evidently


def evidently_tests(
    reference: pd.DataFrame, current: pd.DataFrame, limits: dict[str, float]
) -> tuple[str, dict]:
    """Run Evidently's DataDriftPreset on the per-interaction columns with our methods and thresholds.

    Returns the HTML report and, per figure, Evidently's drift score and test verdict.
    """
    import_evidently()
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = {figure: spec[0] for figure, spec in EVIDENTLY_COLUMNS.items()}
    definition = DataDefinition(
        numerical_columns=[c for c, _, kind in EVIDENTLY_COLUMNS.values() if kind == "numerical"],
        categorical_columns=[c for c, _, kind in EVIDENTLY_COLUMNS.values() if kind == "categorical"],
    )
    preset = DataDriftPreset(
        columns=list(columns.values()),
        per_column_method={column: method for column, method, _ in EVIDENTLY_COLUMNS.values()},
        per_column_threshold={columns[figure]: limits[figure] for figure in columns},
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    result = snapshot.dict()
    scores = {
        m["config"]["column"]: float(m["value"])
        for m in result["metrics"]
        if m["config"].get("type", "").endswith("ValueDrift")
    }
    failed = {
        t["metric_config"]["params"].get("column"): t["status"] != "SUCCESS"
        for t in result["tests"]
        if t["metric_config"]["params"].get("type", "").endswith("ValueDrift")
    }
    per_figure = {
        figure: {"value": scores.get(column), "drift": failed.get(column)}
        for figure, column in columns.items()
    }
    return snapshot.get_html_str(as_iframe=False), per_figure


# ---------------------------------------------------------------- the check


def check_drift(
    settings: Settings,
    repo: Path = Path("."),
    current: Path | None = None,
    reference: str | None = None,
    out_dir: Path = Path("reports/drift"),
    html: bool = True,
) -> dict:
    """Compare `current` (default: the newest drop) with `reference` (default: drift.reference, else the
    production model's data version, else data/raw); write reports/drift/<date>.json (+ .html)."""
    repo = Path(repo)
    cfg = settings.drift
    path = current if current is not None else latest_drop(repo)
    if path is None:
        raise DriftError(f"no drop in {repo / INCOMING} or {repo / ACCEPTED}: pass the file to check")
    path = path if path.is_absolute() or current is not None else repo / path
    cur = load_current(settings, path)
    production = reference_for_production(repo)
    ref = load_reference(repo, reference or cfg.reference or production)
    result = measure(ref, cur, cfg, settings.data.replay_days)
    result["current"]["sha256"] = sha256_of(path)
    result["reference"]["production_data_version"] = production
    out_dir = out_dir if out_dir.is_absolute() else repo / out_dir
    stem = out_dir / result["date"]
    if html:
        ref_frame = exclude(ref.interactions, cur.interactions)
        limits = {name: f["threshold"] for name, f in result["figures"].items()}
        page, per_figure = evidently_tests(
            evidently_frame(ref_frame, ref_frame), evidently_frame(cur.interactions, ref_frame), limits
        )
        for figure, ev in per_figure.items():
            result["figures"][figure]["evidently"] = ev
        with atomic_file(stem.with_suffix(".html"), "w") as fh:
            fh.write(page)
        result["html"] = str(stem.with_suffix(".html"))
    result["json"] = str(stem.with_suffix(".json"))
    write_json_atomic(stem.with_suffix(".json"), result)
    return result


def summary(result: dict) -> dict:
    """The short machine-readable verdict: drift, the figures (value, threshold) and where the report is."""
    return {
        "drift": result["drift"],
        "tripped": result["tripped"],
        "date": result["date"],
        "current": result["current"]["source"],
        "reference": result["reference"]["source"],
        "figures": {
            name: {"value": round(f["value"], 4), "threshold": round(f["threshold"], 4), "drift": f["drift"]}
            for name, f in result["figures"].items()
        },
        "report": result["json"],
        "html": result.get("html"),
    }


def print_verdict(result: dict, console=None) -> None:
    """A readable verdict: one line, then a table of every figure against its threshold."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    cur, ref = result["current"], result["reference"]
    if result["drift"]:
        console.print(f"[bold red]DRIFT[/] in {', '.join(result['tripped'])}", highlight=False)
    else:
        console.print("[bold green]no drift[/]", highlight=False)
    console.print(
        f"current {cur['source']} ({cur['rows']} interactions, {cur['users']} users) vs reference "
        f"{ref['source']} ({ref['rows']} interactions)",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(show_edge=False)
    for column in ("figure", "value", "threshold", "verdict", "basis"):
        table.add_column(column)
    for name, f in result["figures"].items():
        verdict = "[red]drift[/]" if f["drift"] else "[green]ok[/]"
        table.add_row(name, f"{f['value']:.3f}", f"{f['threshold']:.3f}", verdict, f["basis"])
    console.print(table)


def alert_text(result: dict) -> str:
    """Plain-text verdict for a notification: what tripped, on what data, every figure vs its threshold."""
    cur, ref = result["current"], result["reference"]
    head = (
        f"Data drift in {', '.join(result['tripped'])}" if result["drift"] else "No data drift"
    ) + f" (week of {result['date']})"
    lines = [
        head,
        f"current: {cur['source']} ({cur['rows']} interactions, {cur['users']} users)",
        f"reference: {ref['source']} ({ref['rows']} interactions)",
    ]
    for name, f in result["figures"].items():
        mark = "DRIFT" if f["drift"] else "ok"
        lines.append(f"  {name}: {f['value']:.3f} (threshold {f['threshold']:.3f}) {mark}")
    lines.append(f"report: {result.get('html') or result['json']}")
    return "\n".join(lines)


def verdict_markdown(result: dict) -> str:
    """Markdown verdict (a Prefect artifact): one line, then a table of every figure against its threshold."""
    cur, ref = result["current"], result["reference"]
    verdict = f"**DRIFT** in {', '.join(result['tripped'])}" if result["drift"] else "**No drift**"
    rows = [
        f"| {name} | {f['value']:.3f} | {f['threshold']:.3f} | {'drift' if f['drift'] else 'ok'} "
        f"| {f['basis']} |"
        for name, f in result["figures"].items()
    ]
    return "\n".join(
        [
            f"# Data drift check, week of {result['date']}",
            "",
            verdict,
            "",
            f"Current `{cur['source']}` ({cur['rows']} interactions, {cur['users']} users) against reference "
            f"`{ref['source']}` ({ref['rows']} interactions).",
            "",
            "| figure | value | threshold | verdict | threshold basis |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Report: `{result['json']}`" + (f", `{result['html']}`" if result.get("html") else ""),
        ]
    )
