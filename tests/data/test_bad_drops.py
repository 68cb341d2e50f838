"""Corrupted weekly drops are rejected with a clear message, quarantined, and nothing else changes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from components.config import load_settings
from components.data import replay_week
from components.ingest import ingest
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
    "notes.json": (b'{"user_id": 1}', "unsupported file type"),
}


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
