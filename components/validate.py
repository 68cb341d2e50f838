"""Great Expectations 1.x suites for interactions and items, run through checkpoints with data docs.

Two suites, built in code from params.yaml's `validate` section:
  interactions: columns, types, non-null ids, ratings in range, timestamps in [min_timestamp, now],
                unique (user, item, timestamp), every item in the catalogue, row count in bounds.
  items:        columns, unique non-null ids, non-empty titles of sane length, plausible years.

A failure raises DataValidationError naming the file, the column, the expectation and bad examples.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from components.columns import as_year, short
from components.config import Settings, ValidateSettings
from components.drops import check_limits, open_drop, refuse_non_drops
from components.errors import DataValidationError
from components.io import write_json_atomic
from components.sources import canonical_interactions, canonical_items, read_table

log = logging.getLogger(__name__)
SITE = "rsllm"
DROP_DOCS = Path("reports/validation/drops")  # data docs of single drops (ingest, `rsllm validate PATH`)


@dataclass
class TableCheck:
    """One table to validate: its name in reports, the file it came from, the frame and its suite."""

    name: str
    file: str
    frame: pd.DataFrame
    expectations: list = field(default_factory=list)


def interaction_expectations(cfg: ValidateSettings, catalogue_ids: set[str] | None, *, drop: bool) -> list:
    """The interactions suite. A drop has its own row-count bounds."""
    lo, hi = (cfg.drop_min_rows, cfg.drop_max_rows) if drop else (cfg.min_rows, cfg.max_rows)
    min_ts = int(dt.datetime.combine(cfg.min_timestamp, dt.time(), tzinfo=dt.UTC).timestamp())
    now = int(time.time()) + 3600  # an hour of clock skew is tolerated
    exps = [gxe.ExpectColumnToExist(column=c) for c in ("user_id", "item_id", "rating", "timestamp")]
    exps += [
        gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "item_id", "rating", "timestamp")
    ]
    exps += [
        gxe.ExpectColumnValueLengthsToBeBetween(column="user_id", min_value=1, max_value=128),
        gxe.ExpectColumnValueLengthsToBeBetween(column="item_id", min_value=1, max_value=128),
        gxe.ExpectColumnValuesToBeInTypeList(column="rating", type_list=["float64", "Float64"]),
        gxe.ExpectColumnValuesToBeInTypeList(column="timestamp", type_list=["int64", "Int64"]),
        gxe.ExpectColumnValuesToBeBetween(
            column="rating", min_value=cfg.rating_min, max_value=cfg.rating_max
        ),
        gxe.ExpectColumnValuesToBeBetween(column="timestamp", min_value=min_ts, max_value=now),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp"]),
        gxe.ExpectTableRowCountToBeBetween(min_value=lo, max_value=hi),
    ]
    if catalogue_ids is not None:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=sorted(catalogue_ids)))
    return exps


def item_expectations(cfg: ValidateSettings) -> list:
    """The items suite."""
    exps = [gxe.ExpectColumnToExist(column=c) for c in ("item_id", "title", "year", "genres")]
    exps += [
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="title"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1, max_value=cfg.max_title_length),
        gxe.ExpectColumnValuesToNotMatchRegex(column="title", regex=r"^\s*$"),
        gxe.ExpectColumnValuesToBeBetween(column="year", min_value=1870, max_value=dt.date.today().year + 5),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=None),
    ]
    return exps


def run_checks(checks: list[TableCheck], docs_dir: Path | None) -> list[dict]:
    """Run each table's suite through a GE checkpoint (data docs under docs_dir); return summaries."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # our CLI reports progress itself
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name=SITE,
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
    source = context.data_sources.add_pandas("rsllm")
    summaries = []
    for check in checks:
        batch = source.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=check.name, expectations=check.expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=check.name, data=batch, suite=suite)
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[SITE])] if docs_dir else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{check.name}-checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": check.frame})
        for run in result.run_results.values():
            summaries.append(_summarise(check, run))
    return summaries


def _summarise(check: TableCheck, run) -> dict:
    failures = []
    for r in run.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "value_set")}
        res = r.result or {}
        failures.append(
            {
                "expectation": cfg.type,
                "column": kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or "(table)",
                "kwargs": kwargs,
                "unexpected_count": res.get("unexpected_count"),
                "observed_value": res.get("observed_value"),
                "examples": [short(v) for v in (res.get("partial_unexpected_list") or [])[:5]],
                "exception": (r.exception_info or {}).get("exception_message") if r.exception_info else None,
            }
        )
    return {
        "table": check.name,
        "file": check.file,
        "rows": len(check.frame),
        "success": not failures,
        "expectations": len(run.results),
        "failures": failures,
    }


def raise_on_failure(summaries: list[dict]) -> None:
    """DataValidationError for the first failing table, naming file, column, expectation and examples."""
    for s in summaries:
        if s["success"]:
            continue
        first = s["failures"][0]
        detail = "; ".join(_describe(f) for f in s["failures"])
        raise DataValidationError(
            f"{s['file']}: {detail}",
            file=s["file"],
            column=first["column"],
            expectation=first["expectation"],
            examples=first["examples"],
        )


def _describe(f: dict) -> str:
    bounds = {k: v for k, v in f["kwargs"].items() if k not in ("column", "column_list")}
    what = f"column '{f['column']}'" if f["column"] != "(table)" else "table"
    text = f"{what} failed {f['expectation']}"
    if bounds:
        text += f" {bounds}"
    if f["unexpected_count"]:
        text += f": {f['unexpected_count']} bad rows, e.g. {f['examples']}"
    elif f["observed_value"] is not None:
        text += f": observed {f['observed_value']}"
    if f.get("exception"):
        text += f" ({f['exception'][:200]})"
    return text


# ---------------------------------------------------------------- entry points


def validate_snapshot(settings: Settings, raw: Path, docs_dir: Path | None) -> list[dict]:
    """Validate data/raw (interactions against its own catalogue)."""
    items_path, inter_path = raw / "items.parquet", raw / "interactions.parquet"
    items = read_table(items_path)
    inter = read_table(inter_path)
    cfg = settings.validate_
    checks = [
        TableCheck("items", str(items_path), items, item_expectations(cfg)),
        TableCheck(
            "interactions",
            str(inter_path),
            inter,
            interaction_expectations(cfg, set(items["item_id"].dropna()), drop=False),
        ),
    ]
    return run_checks(checks, docs_dir)


def drop_items_path(path: Path) -> Path | None:
    """The optional items file of a drop: <stem>.items.csv|parquet beside it (a link too: it is judged,
    and refused, rather than ignored)."""
    for suffix in (".parquet", ".csv"):
        candidate = path.with_name(f"{path.stem}.items{suffix}")
        if os.path.lexists(candidate):
            return candidate
    return None


def read_drop_file(path: Path, cfg: ValidateSettings) -> pd.DataFrame:
    """One drop file, opened without following links, its size and rows checked before it is read."""
    with open_drop(path) as fh:
        check_limits(fh, path, cfg)
        return read_table(path, fh)


def load_drop(settings: Settings, path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a drop (and its items file) into canonical tables; unreadable input raises with the file."""
    files, cfg = settings.data.files, settings.validate_
    inter = canonical_interactions(read_drop_file(path, cfg), path, files.columns, files.timestamp_unit)
    items_path = drop_items_path(path)
    items = None
    if items_path is not None:
        items = canonical_items(
            read_drop_file(items_path, cfg), items_path, files.columns, files.genre_separator
        )
        items["year"] = as_year(items["year"], "year", items_path)
    return inter, items


def validate_drop(
    settings: Settings, path: Path, catalogue: pd.DataFrame, docs_dir: Path | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, list[dict]]:
    """Validate one drop against the current catalogue (plus the drop's own items file)."""
    inter, items = load_drop(settings, path)
    known = set(catalogue["item_id"].dropna())
    checks = []
    if items is not None:
        checks.append(
            TableCheck(
                f"{path.stem}-items", str(drop_items_path(path)), items, item_expectations(settings.validate_)
            )
        )
        known |= set(items["item_id"].dropna())
    checks.append(
        TableCheck(
            path.stem, str(path), inter, interaction_expectations(settings.validate_, known, drop=True)
        )
    )
    summaries = run_checks(checks, docs_dir)
    raise_on_failure(summaries)
    return inter, items, summaries


def validate_path(settings: Settings, path: Path | None, raw: Path, reports: Path) -> dict:
    """`rsllm validate`: data/raw by default (data docs in `reports`/docs, the validate stage's
    output), or one drop file (docs in `reports`/drops, beside those ingest writes)."""
    docs = reports / ("docs" if path is None else "drops")
    if path is None:
        summaries = validate_snapshot(settings, raw, docs)
        summary = {"target": str(raw), "success": all(s["success"] for s in summaries), "tables": summaries}
        write_json_atomic(reports / "summary.json", summary)
        raise_on_failure(summaries)
    else:
        refuse_non_drops([Path(path)])
        catalogue = read_table(raw / "items.parquet")
        _, _, summaries = validate_drop(settings, Path(path), catalogue, docs)
        summary = {"target": str(path), "success": True, "tables": summaries}
    summary["data_docs"] = str(docs / "index.html")
    return summary
