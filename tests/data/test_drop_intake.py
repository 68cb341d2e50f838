"""Judging a drop before and after its rows are read: paths that are not drops, links, limits, errors
nobody foresaw, and drops that would change accepted data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import ingest as ingest_module
from components import validate
from components.config import load_settings
from components.errors import DropPathError
from components.ingest import ingest
from tests.data.test_bad_drops import good_drop, write_csv
from tests.helpers import rsllm, tree_digest

SECRET = "aws_secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def data_digest(project: Path) -> dict:
    return tree_digest(project / "data/raw", project / "data/prepared", project / "data/accepted")


def only_reason(project: Path, result: dict) -> dict:
    """The one rejection, checked against its reason file; the secret appears nowhere."""
    assert result["accepted"] == [] and len(result["rejected"]) == 1, result
    reason = result["rejected"][0]
    files = list((project / "data/quarantine").glob("*.reason.json"))
    assert len(files) == 1
    text = files[0].read_text()
    assert json.loads(text)["message"] == reason["message"]
    assert "wJalrXUtnFEMI" not in text and "aws_secret" not in text
    return reason


def test_paths_that_are_not_drops_are_refused_with_exit_2_and_never_moved(project):
    (project / "data/incoming").mkdir(exist_ok=True)
    items_file = project / "data/incoming/week.items.csv"
    items_file.write_text("item_id,title\n1,A\n")
    (project / "notes.json").write_text('{"user_id": 1}')
    before = tree_digest(project / "components") | tree_digest(project / "data/incoming")
    dvc_yaml = (project / "dvc.yaml").read_bytes()
    args = ["dvc.yaml", "components", "notes.json", "missing.csv", "data/incoming/week.items.csv"]
    proc = rsllm(["ingest", *args], project, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "DropPathError" in proc.stderr
    why = ["is not a drop", "is a folder", "is not a drop", "no such file", "is the items file"]
    for arg, words in zip(args, why, strict=True):
        assert f"{arg}: {words}" in proc.stderr, (arg, proc.stderr)
    assert (project / "dvc.yaml").read_bytes() == dvc_yaml
    assert tree_digest(project / "components") | tree_digest(project / "data/incoming") == before
    assert not (project / "data/quarantine").exists() and not (project / "data/archive").exists()
    proc = rsllm(["validate", "dvc.yaml"], project, check=False)
    assert proc.returncode == 2 and "not a drop" in proc.stderr


def test_a_link_given_as_a_drop_is_refused_unread(project, tmp_path):
    secret = tmp_path / "credentials"
    secret.write_text(SECRET + "\n")
    link = project / "data/incoming/week.csv"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(secret)
    with pytest.raises(DropPathError, match="symbolic link") as info:
        ingest(load_settings(project / "params.yaml"), [link], project)
    assert "aws_secret" not in str(info.value)
    assert link.is_symlink() and secret.read_text() == SECRET + "\n"


@pytest.mark.parametrize("which", ["drop", "items file"])
def test_a_link_in_incoming_is_quarantined_without_reading_its_target(project, tmp_path, which):
    secret = tmp_path / "credentials"
    secret.write_text(SECRET + "\nline two\n")
    incoming = project / "data/incoming"
    incoming.mkdir(exist_ok=True)
    if which == "drop":
        (incoming / "week.csv").symlink_to(secret)
    else:
        write_csv(project, "week.csv", good_drop(project))
        (incoming / "week.items.csv").symlink_to(secret)
    before = data_digest(project)
    secret_stat = secret.stat()
    reason = only_reason(project, ingest(load_settings(project / "params.yaml"), None, project))
    assert "symbolic link" in reason["message"] and "not followed" in reason["message"]
    assert secret.read_text() == SECRET + "\nline two\n" and secret.stat().st_mtime == secret_stat.st_mtime
    moved = [p for p in (project / "data/quarantine").iterdir() if not p.name.endswith(".json")]
    assert any(p.is_symlink() for p in moved)  # the link itself moved, its target untouched
    assert not list(incoming.iterdir()) and data_digest(project) == before


def test_a_pipe_in_incoming_is_quarantined_without_blocking(project):
    (project / "data/incoming").mkdir(exist_ok=True)
    os.mkfifo(project / "data/incoming/week.parquet")
    reason = only_reason(project, ingest(load_settings(project / "params.yaml"), None, project))
    assert "not a regular file" in reason["message"]


def test_a_headerless_file_is_not_echoed(project):
    (project / "data/incoming").mkdir(exist_ok=True)
    (project / "data/incoming/creds.csv").write_text(SECRET + "\nsecond,line\n")
    reason = only_reason(project, ingest(load_settings(project / "params.yaml"), None, project))
    assert "missing column" in reason["message"] and "none expected" in reason["message"]


@pytest.fixture
def no_drop_reads(monkeypatch):
    """Fails the test if a drop's rows are read (the size checks must come first)."""

    def refuse(path, fh=None):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(validate, "read_table", refuse)


def test_a_parquet_of_ten_million_rows_is_rejected_from_its_metadata(project, no_drop_reads):
    n = 1_000_000
    table = pa.table(
        {
            "user_id": pa.array(["1"] * n),
            "item_id": pa.array(["1"] * n),
            "rating": pa.array([4.0] * n),
            "timestamp": pa.array([883700000] * n),
        }
    )
    path = project / "data/incoming/huge.parquet"
    path.parent.mkdir(exist_ok=True)
    with pq.ParquetWriter(path, table.schema) as writer:
        for _ in range(10):
            writer.write_table(table)
    assert path.stat().st_size < 1_000_000  # a few hundred kB on disk
    reason = only_reason(project, ingest(load_settings(project / "params.yaml"), None, project))
    assert "10000000 rows" in reason["message"] and "validate.drop_max_rows=5000000" in reason["message"]


@pytest.mark.parametrize("limit", ["drop_max_rows", "drop_max_bytes"])
def test_a_csv_over_a_limit_is_rejected_before_reading(project, no_drop_reads, limit):
    settings = load_settings(project / "params.yaml")
    small = {"drop_max_rows": 10} if limit == "drop_max_rows" else {"drop_max_bytes": 1000}
    settings = settings.model_copy(update={"validate_": settings.validate_.model_copy(update=small)})
    write_csv(project, "week.csv", good_drop(project))
    reason = only_reason(project, ingest(settings, None, project))
    assert f"validate.{limit}=" in reason["message"] and "week.csv" in reason["message"]


def test_an_unexpected_error_while_judging_quarantines_the_drop(project, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nobody foresaw this")

    monkeypatch.setattr(ingest_module, "validate_drop", broken)
    write_csv(project, "week.csv", good_drop(project))
    reason = only_reason(project, ingest(load_settings(project / "params.yaml"), None, project))
    assert reason["error"] == "RuntimeError" and "nobody foresaw this" in reason["message"]
    assert "week.csv" in reason["message"] and not list((project / "data/incoming").iterdir())


def test_a_later_drop_cannot_change_accepted_items_or_ratings(project):
    settings = load_settings(project / "params.yaml")
    drop = good_drop(project).reset_index(drop=True)
    raw = pd.read_parquet(project / "data/raw/interactions.parquet")
    first, later = drop.iloc[: len(drop) // 2].copy(), drop.iloc[len(drop) // 2 :].copy()
    first.loc[first.index[0], "item_id"] = "new-1"
    same = raw.iloc[[0]]  # an accepted interaction sent again with the same rating: harmless
    write_csv(project, "week-1.csv", pd.concat([first, same]))
    items = {"item_id": ["new-1"], "title": ["A new film"], "year": [2020], "genres": ["Drama"]}
    pd.DataFrame(items).to_csv(project / "data/incoming/week-1.items.csv", index=False)
    result = ingest(settings, None, project, record_version=False)
    assert [a["drop"] for a in result["accepted"]] == ["week-1.csv"], result["rejected"]
    catalogue = pd.read_parquet(project / "data/raw/items.parquet").set_index("item_id")
    assert catalogue.loc["new-1", "title"] == "A new film"
    before = data_digest(project)

    # "a-early" sorts before "week-1": by file name it would win the merge and retitle new-1
    write_csv(project, "a-early.csv", later)
    retitle = {"item_id": ["new-1", "1"], "title": ["Retitled", catalogue.loc["1", "title"]]}
    pd.DataFrame(retitle).to_csv(project / "data/incoming/a-early.items.csv", index=False)
    conflict = raw.iloc[[1]].copy()
    conflict["rating"] = conflict["rating"] % 5 + 1
    write_csv(project, "b-conflict.csv", conflict)
    result = ingest(settings, None, project, record_version=False)
    assert result["accepted"] == []
    by_drop = {r["drop"]: r for r in result["rejected"]}
    retitled = by_drop["a-early.csv"]
    assert "a-early.items.csv" in retitled["message"] and retitled["column"] == "title"
    assert "new-1" in retitled["message"] and "'A new film' -> 'Retitled'" in retitled["message"]
    assert retitled["examples"] == ["new-1"]  # item "1" is sent with its own title: not a change
    changed = by_drop["b-conflict.csv"]
    key = f"({raw.iloc[1]['user_id']}, {raw.iloc[1]['item_id']}, {raw.iloc[1]['timestamp']})"
    assert changed["column"] == "rating" and key in changed["message"]
    assert data_digest(project) == before


def test_accepted_drops_append_to_the_item_index_and_never_renumber(project):
    """The stable item index (data/raw/item_index.parquet, written by merge from the source catalogue and
    the acceptance manifest): every accepted drop's new items are appended, nothing moves."""
    settings = load_settings(project / "params.yaml")
    index = lambda: pd.read_parquet(project / "data/raw/item_index.parquet")  # noqa: E731
    start = index()
    assert list(start["item_idx"]) == list(range(1, len(start) + 1))
    drop = good_drop(project).reset_index(drop=True)
    half = len(drop) // 2
    for name, rows, new in (
        ("week-1", drop.iloc[:half].copy(), "new-1"),
        ("week-2", drop.iloc[half:].copy(), "new-2"),
    ):
        rows.loc[rows.index[0], "item_id"] = new
        write_csv(project, f"{name}.csv", rows)
        items = {"item_id": [new], "title": [f"Film {new}"], "year": [2020], "genres": ["Drama"]}
        pd.DataFrame(items).to_csv(project / f"data/incoming/{name}.items.csv", index=False)
        before = index()
        result = ingest(settings, None, project, record_version=False)
        assert [a["drop"] for a in result["accepted"]] == [f"{name}.csv"], result["rejected"]
        after = index()
        pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
        assert after.iloc[len(before) :].to_dict("records") == [{"item_id": new, "item_idx": len(before) + 1}]
    rsllm(["prepare"], project)
    prepared = pd.read_parquet(project / "data/prepared/items.parquet").set_index("item_id")
    assert prepared.loc["new-1", "item_idx"] == len(start) + 1
    assert prepared.loc["new-2", "item_idx"] == len(start) + 2  # one interaction: below the k-core
    assert not prepared.loc["new-2", "trained"] and prepared["trained"].sum() > 0
