"""Sources: the embedded ml-100k wheel (checksum, quirks), user files with mapped columns, replay."""

import pandas as pd
import pytest

from components.config import load_settings, parse_settings
from components.data import clean_catalogue, merge, replay_week
from components.errors import DataValidationError, SourceError
from components.sources import fetch, read_table
from tests.helpers import ROOT, deep_merge, synthetic_source


def settings_with(**sections):
    import yaml

    return parse_settings(deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), sections))


@pytest.mark.slow
def test_ml100k_fetch_and_merge_handle_the_known_quirks(tmp_path):
    s = load_settings(ROOT / "params.yaml")
    meta = fetch(s, tmp_path / "fetched")
    assert meta["interactions"] == 100_000 and meta["items"] == 1682
    inter = pd.read_parquet(tmp_path / "fetched/interactions.parquet")
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert inter["timestamp"].dtype == "int64" and inter["rating"].between(1, 5).all()
    out = merge(s, tmp_path / "fetched", tmp_path / "accepted", tmp_path / "raw", tmp_path / "merge.json")
    items = pd.read_parquet(tmp_path / "raw/items.parquet").set_index("item_id")
    assert "267" not in items.index  # title 'unkonwn', year 'unkonwn': excluded with its interactions
    assert items.loc["1412", "year"] == 1995  # year 'V', '(1995)' inside the title: repaired
    assert items.loc["1412", "title"] == "Land Before Time III: The Time of the Great Giving"
    assert out["catalogue_fixes"] == {"excluded": 1, "repaired": 1, "warned": 0}
    raw = pd.read_parquet(tmp_path / "raw/interactions.parquet")
    assert raw["timestamp"].max() < 883612800  # weekly mode: only before the 1998-01-01 cutoff


def test_wrong_checksum_is_an_error_not_a_warning(tmp_path):
    s = settings_with(data={"ml100k": {"sha256": "0" * 64}, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(SourceError, match=r"does not match data\.ml100k\.sha256 0{64} \(params\.yaml\)"):
        fetch(s, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_own_files_with_mapped_columns(tmp_path):
    inter_path, items_path = synthetic_source(tmp_path / "src")
    inter = pd.read_csv(inter_path).rename(columns={"user_id": "uid", "item_id": "movie", "timestamp": "ts"})
    inter["ts"] = pd.to_datetime(inter["ts"], unit="s", utc=True).map(lambda t: t.isoformat())
    inter.to_parquet(tmp_path / "mine.parquet", index=False)
    pd.read_csv(items_path).rename(columns={"item_id": "movie"}).to_csv(tmp_path / "movies.csv", index=False)
    s = settings_with(
        data={
            "source": "files",
            "files": {
                "interactions": str(tmp_path / "mine.parquet"),
                "items": str(tmp_path / "movies.csv"),
                "timestamp_unit": "iso",
                "columns": {"user_id": "uid", "item_id": "movie", "timestamp": "ts"},
            },
        }
    )
    meta = fetch(s, tmp_path / "fetched")
    got = pd.read_parquet(tmp_path / "fetched/interactions.parquet")
    want = pd.read_csv(inter_path)
    assert meta["source"] == "files" and len(got) == len(want)
    assert got["timestamp"].tolist() == want["timestamp"].tolist()
    assert got["user_id"].tolist() == want["user_id"].astype(str).tolist()


def test_missing_mapped_column_names_file_and_column(tmp_path):
    inter_path, _ = synthetic_source(tmp_path / "src")
    s = settings_with(
        data={"source": "files", "files": {"interactions": str(inter_path), "columns": {"rating": "stars"}}}
    )
    with pytest.raises(DataValidationError, match=r"interactions.csv: missing column\(s\) \['stars'\]"):
        fetch(s, tmp_path / "fetched")


def test_catalogue_policy_repair_exclude_or_reject():
    items = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, 201)],
            "title": [f"T{i}" for i in range(1, 201)],
            "year": ["1990"] * 200,
            "genres": [""] * 200,
        }
    ).astype("string")
    items.loc[0, ["title", "year"]] = ["unkonwn", "unkonwn"]
    items.loc[1, ["title", "year"]] = ["Heat (1995)", "V"]
    cleaned, report = clean_catalogue(items, 0.02, "items.parquet")
    assert len(cleaned) == 199 and report["counts"] == {"excluded": 1, "repaired": 1, "warned": 0}
    assert cleaned.loc[cleaned["item_id"] == "2", "title"].item() == "Heat"
    items.loc[2:20, "title"] = ""  # bad rows are the norm now
    with pytest.raises(DataValidationError, match="catalogue rows are bad"):
        clean_catalogue(items, 0.02, "items.parquet")


def test_replay_weeks_follow_each_other_and_never_overlap(project):
    s = load_settings(project / "params.yaml")
    first = replay_week(s, project / "data/fetched", project / "data/raw", project / "data/incoming")
    second = replay_week(s, project / "data/fetched", project / "data/raw", project / "data/incoming")
    a, b = (read_table(project / d["drop"]) for d in (first, second))
    assert first["week_start"] == "1998-01-01" and second["week_start"] == "1998-01-08"
    assert a["timestamp"].max() < b["timestamp"].min()
    raw = pd.read_parquet(project / "data/raw/interactions.parquet")
    assert raw["timestamp"].max() < a["timestamp"].min()


def test_full_mode_has_nothing_to_replay(project):
    s = settings_with(data={"mode": "full"})
    with pytest.raises(SourceError, match="no held-back weeks"):
        replay_week(s, project / "data/fetched", project / "data/raw", project / "data/incoming")
