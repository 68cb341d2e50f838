"""Corrupted weekly drops are rejected with a clear message, quarantined, and nothing else changes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from components.columns import as_year
from components.config import load_settings
from components.data import replay_week
from components.errors import DataValidationError
from components.ingest import ingest
from components.sources import canonical_interactions
from tests.helpers import rsllm, tree_digest


def good_drop(project: Path) -> pd.DataFrame:
    s = load_settings(project / "params.yaml")
    out = replay_week(s, project / "data/fetched", project / "data/raw", project / "data/incoming")
    path = project / out["drop"]
    df = pd.read_parquet(path)
    path.unlink()
    return df


def write_csv(project: Path, name: str, df: pd.DataFrame) -> Path:
    path = project / "data/incoming" / name
    df.to_csv(path, index=False)
    return path


def future(df):
    df.loc[df.index[3], "timestamp"] = int(time.time()) + 30 * 86400
    return df


def set_value(column, value, row=2):
    def corrupt(df):
        df[column] = df[column].astype(object)
        df.loc[df.index[row], column] = value
        return df

    return corrupt


# name -> (corruption of a good drop, expected column, expected words in the message)
FRAME_CORRUPTIONS = {
    "rating_out_of_range": (set_value("rating", 7.0), "rating", "expect_column_values_to_be_between"),
    "rating_not_numeric": (set_value("rating", "five"), "rating", "non-numeric"),
    "null_user": (set_value("user_id", None), "user_id", "expect_column_values_to_not_be_null"),
    "timestamp_in_future": (future, "timestamp", "expect_column_values_to_be_between"),
    "timestamp_before_start": (
        set_value("timestamp", 86400),
        "timestamp",
        "expect_column_values_to_be_between",
    ),
    "timestamp_not_a_number": (set_value("timestamp", "yesterday"), "timestamp", "not s timestamps"),
    "duplicate_rows": (
        lambda df: pd.concat([df, df.head(3)]),
        "user_id,item_id,timestamp",
        "expect_compound_columns_to_be_unique",
    ),
    "unknown_item": (set_value("item_id", "no-such-item"), "item_id", "expect_column_values_to_be_in_set"),
    "missing_column": (lambda df: df.drop(columns="rating"), "rating", "missing column"),
    "empty_table": (lambda df: df.head(0), "(table)", "expect_table_row_count_to_be_between"),
}


def assert_rejected(project: Path, before: dict, result: dict, name: str, column: str, words: str) -> dict:
    assert result["accepted"] == [] and len(result["rejected"]) == 1
    reason = result["rejected"][0]
    assert name in reason["message"], reason["message"]  # names the file
    assert words in reason["message"], reason["message"]  # names the failed expectation / problem
    if column:
        assert column == reason["column"] or column in reason["message"]
    # quarantined beside a JSON reason; nothing else changed
    quarantined = list((project / "data/quarantine").glob(f"*{Path(name).stem}*"))
    reasons = [p for p in quarantined if p.name.endswith(".reason.json")]
    assert len(reasons) == 1 and len(quarantined) >= 2  # the drop itself + its reason
    assert json.loads(reasons[0].read_text())["message"] == reason["message"]
    assert not (project / "data/incoming" / name).exists()
    assert tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted") == before
    return reason


@pytest.mark.parametrize("kind", sorted(FRAME_CORRUPTIONS))
def test_corrupted_drop_is_rejected(project, kind):
    corrupt, column, words = FRAME_CORRUPTIONS[kind]
    drop = corrupt(good_drop(project).reset_index(drop=True))
    name = f"{kind}.csv"
    write_csv(project, name, drop)
    before = tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted")
    result = ingest(load_settings(project / "params.yaml"), None, project)
    reason = assert_rejected(project, before, result, name, column, words)
    if kind == "rating_out_of_range":
        assert reason["examples"] == [7.0]  # an example of the bad values


RAW_FILES = {
    "empty.csv": (b"", "file is empty"),
    "latin1.csv": ("user_id,item_id,rating,timestamp\nJosé,1,4,883700000\n".encode("latin-1"), "not UTF-8"),
    "noheader.csv": (b"1,2,4,883700000\n3,4,5,883700001\n", "missing column"),
    "garbage.parquet": (b"this is not a parquet file at all", "cannot be read as PARQUET"),
}


def whole_column(column, make):
    def corrupt(df):
        df[column] = [make(v) for v in df[column]]
        return df

    return corrupt


def float_timestamp(value, row=2):
    def corrupt(df):
        df["timestamp"] = df["timestamp"].astype("float64")
        df.loc[df.index[row], "timestamp"] = value
        return df

    return corrupt


# name -> (corruption, column, words in the message, an offending value the message shows)
TYPED_CORRUPTIONS = {
    "fractional_timestamp.parquet": (float_timestamp(889000000.5), "timestamp", "fractional", "889000000.5"),
    "overflowing_timestamp.parquet": (float_timestamp(1e30), "timestamp", "out of range", "1e+30"),
    "fractional_timestamp.csv": (
        set_value("timestamp", "889000000.5"),
        "timestamp",
        "fractional",
        "889000000.5",
    ),
    "overflowing_timestamp.csv": (set_value("timestamp", "1e30"), "timestamp", "out of range", "1e30"),
    "datetime_timestamp.parquet": (
        lambda df: df.assign(timestamp=pd.to_datetime(df["timestamp"], unit="s")),
        "timestamp",
        "holds datetimes",
        "Timestamp(",
    ),
    "list_user_ids.parquet": (whole_column("user_id", lambda v: [int(v)]), "user_id", "lists", "array(["),
    "dict_item_ids.parquet": (whole_column("item_id", lambda v: {"id": v}), "item_id", "mappings", "{'id':"),
}


@pytest.mark.parametrize("name", sorted(TYPED_CORRUPTIONS))
def test_values_of_the_wrong_type_are_rejected_naming_column_and_values(project, name):
    corrupt, column, words, shown = TYPED_CORRUPTIONS[name]
    drop = corrupt(good_drop(project).reset_index(drop=True))
    path = project / "data/incoming" / name
    drop.to_parquet(path, index=False) if name.endswith(".parquet") else drop.to_csv(path, index=False)
    before = tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted")
    result = ingest(load_settings(project / "params.yaml"), None, project)
    reason = assert_rejected(project, before, result, name, column, words)
    assert reason["error"] == "DataValidationError" and reason["column"] == column
    assert shown in reason["message"], reason["message"]


MIXED = {
    "user_id": ([1, "u2", 3], 'e.g. ["u2"]'),
    "item_id": ([[1], "2", "3"], "e.g. ['[1]']"),
    "rating": ([4.0, "x", 3.0], "e.g. ['x']"),
    "timestamp": ([889000000, "889000001", 889000002], "e.g. ['889000001']"),
}


@pytest.mark.parametrize("column", sorted(MIXED))
def test_a_column_mixing_kinds_of_values_is_rejected(column):
    values, shown = MIXED[column]
    frame = pd.DataFrame(
        {"user_id": ["1", "2", "3"], "item_id": ["1", "2", "3"], "rating": [4.0, 3.0, 5.0]}
        | {"timestamp": [889000000, 889000001, 889000002]}
    )
    frame[column] = pd.Series(values, dtype=object)
    with pytest.raises(DataValidationError) as info:
        canonical_interactions(frame, "drop.parquet")
    assert info.value.column == column and str(info.value).startswith("drop.parquet: column")
    assert shown.replace('"', "'") in str(info.value), str(info.value)


def test_a_fractional_year_in_an_items_file_is_rejected():
    with pytest.raises(DataValidationError, match="year.*not whole numbers.*1995.5"):
        as_year(pd.Series(["1995", "1995.5"], dtype="string"), "year", "drop.items.csv")


@pytest.mark.parametrize("name", sorted(RAW_FILES))
def test_unreadable_drop_is_rejected_without_traceback(project, name):
    content, words = RAW_FILES[name]
    (project / "data/incoming").mkdir(parents=True, exist_ok=True)
    (project / "data/incoming" / name).write_bytes(content)
    before = tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted")
    s = load_settings(project / "params.yaml")
    path = project / "data/incoming" / name
    result = ingest(s, [path], project)
    assert_rejected(project, before, result, name, "", words)


def test_items_file_with_bad_rows_rejects_the_drop(project):
    drop = good_drop(project)
    drop.loc[drop.index[0], "item_id"] = "new-1"
    write_csv(project, "with_items.csv", drop)
    items = pd.DataFrame(
        {
            "item_id": ["new-1", "new-1"],
            "title": ["A new film", ""],
            "year": [2020, 2021],
            "genres": ["Drama", "Drama"],
        }
    )
    items.to_csv(project / "data/incoming/with_items.items.csv", index=False)
    before = tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted")
    result = ingest(load_settings(project / "params.yaml"), None, project)
    reason = result["rejected"][0]
    assert "with_items.items.csv" in reason["message"]
    assert "expect_column_values_to_be_unique" in reason["message"]
    assert tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted") == before
    assert not list((project / "data/incoming").iterdir())  # both files went to quarantine


def test_cli_exit_code_and_message(project):
    drop = set_value("rating", 0.0)(good_drop(project))
    write_csv(project, "zero.csv", drop)
    before = tree_digest(project / "data/raw", project / "data/prepared")
    proc = rsllm(["ingest"], project, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "DataValidationError" in proc.stderr or "rejected" in proc.stderr
    assert (
        "zero.csv" in proc.stderr
        and "rating" in proc.stderr
        and "expect_column_values_to_be_between" in proc.stderr
    )
    assert tree_digest(project / "data/raw", project / "data/prepared") == before


def test_validate_command_on_a_bad_file(project):
    drop = set_value("rating", 9.0)(good_drop(project))
    path = write_csv(project, "check.csv", drop)
    proc = rsllm(["validate", str(path)], project, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "check.csv" in proc.stderr and "'rating'" in proc.stderr and "[9.0]" in proc.stderr
    assert path.exists()  # validate only reports; it moves nothing
