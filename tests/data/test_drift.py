"""Drift: figures, relative thresholds, reference selection, verdicts on replayed ml-100k weeks and on
constructed shifted weeks, `rsllm drift` (exit code, last JSON line, reports)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import data, drift, drift_figures, registry
from components.config import load_settings
from components.errors import DriftError, SourceError
from tests.helpers import make_project, rsllm

WEEK = 7 * 86400


# ---------------------------------------------------------------- fast units (synthetic tables)


def _tables(rows: list[tuple], source: str = "t") -> drift.Tables:
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "genres": ["Drama", "Comedy|Drama", "Horror"]})
    return drift.Tables(drift._interactions(inter, source), items, source)


def test_genre_weights_split_an_item_over_its_genres_and_count_unknown_items():
    t = _tables([("u", "a", 4.0, 0), ("u", "b", 3.0, 1), ("v", "zz", 5.0, 2)])
    weights = drift_figures.genre_weights(t.interactions, drift_figures.genre_table(t.items))
    assert weights.to_dict() == {"Comedy": 0.5, "Drama": 1.5, drift_figures.UNKNOWN_GENRE: 1.0}


def test_cold_start_shares_and_identical_windows():
    history = _tables([("u", "a", 4.0, 0), ("v", "b", 3.0, 10)]).interactions
    window = _tables([("u", "a", 4.0, 100), ("w", "c", 3.0, 110)]).interactions
    figures = drift_figures.window_figures(window, history, drift_figures.genre_table(None), 100, WEEK)
    assert figures["new_items"] == 0.5 and figures["new_users"] == 0.5
    same = drift_figures.window_figures(history, history, drift_figures.genre_table(None), 0, WEEK)
    assert same["rating"] == pytest.approx(0.0) and same["item_popularity"] == pytest.approx(0.0)


def test_thresholds_are_relative_to_the_preceding_weeks_else_absolute():
    cfg = load_settings().drift
    weeks = [dict.fromkeys(drift_figures.FIGURES, v) for v in (0.1, 0.2, 0.3)]
    limits = drift_figures.thresholds(weeks, cfg)
    g = cfg.figures.genre_mix
    assert limits["genre_mix"]["threshold"] == pytest.approx(max(g.factor * 0.2, 0.2 + g.margin))
    assert limits["genre_mix"]["baseline_median"] == pytest.approx(0.2)
    few = drift_figures.thresholds(weeks[:1], cfg)
    assert few["genre_mix"]["threshold"] == g.absolute and "absolute" in few["genre_mix"]["basis"]


def test_reference_is_production_data_version_when_a_pointer_exists(tmp_path):
    assert drift.reference_for_production(tmp_path) is None
    pointer = tmp_path / registry.POINTER
    pointer.parent.mkdir(parents=True)
    pointer.write_text(json.dumps({"data_version": "data/v3", "model_tag": "rsllm:abc"}))
    assert drift.reference_for_production(tmp_path) == "data/v3"
    pointer.write_text("{not json")
    with pytest.raises(DriftError, match="production.json"):
        drift.reference_for_production(tmp_path)


def test_reference_defaults_to_data_raw_and_names_a_missing_file(tmp_path):
    with pytest.raises(DriftError, match="data/raw/interactions.parquet"):
        drift.load_reference(tmp_path)
    with pytest.raises(DriftError, match="nope.parquet"):
        drift.load_reference(tmp_path, "nope.parquet")


# ---------------------------------------------------------------- ml-100k (the embedded wheel)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory) -> Path:
    """A project on ml-100k in weekly mode: fetched and merged (the snapshot before 1998-01-01)."""
    project = make_project(tmp_path_factory.mktemp("drift") / "project", {"data": {"mode": "weekly"}})
    rsllm(["fetch"], project)
    rsllm(["merge"], project)
    return project


def _replay_all_weeks(project: Path, incoming: Path) -> list[Path]:
    """Every held-back week as a drop in `incoming` (replay_week goes on after the last drop there)."""
    settings = load_settings(project / "params.yaml")
    drops = []
    while True:
        try:
            drop = data.replay_week(settings, project / "data/fetched", project / "data/raw", incoming)
        except SourceError:  # no held-back interactions left
            break
        drops.append(Path(drop["drop"]))
    return drops


def shifted_week(
    week: pd.DataFrame, items: pd.DataFrame, reference: pd.DataFrame, seed: int = 0
) -> pd.DataFrame:
    """The same users and times, but every interaction on a rare Horror film (one genre, rare items)."""
    popularity = reference["item_id"].value_counts()
    horror = items.loc[items["genres"].str.contains("Horror"), "item_id"].astype(str)
    rare = [i for i in horror if popularity.get(i, 0) <= popularity.median()]
    rng = np.random.default_rng(seed)
    out = week.copy()
    out["item_id"] = rng.choice(np.array(rare, dtype=object), len(out))
    return out.drop_duplicates(["user_id", "item_id", "timestamp"]).reset_index(drop=True)


@pytest.mark.slow
def test_at_least_80_percent_of_replayed_weeks_pass_and_shifted_weeks_are_flagged(ml100k, tmp_path):
    """Replay every week in order; each is checked against everything accepted before it (data/raw grows),
    as `rsllm ingest` would. A shifted copy of a week must be flagged, naming the figures."""
    settings = load_settings(ml100k / "params.yaml")
    raw = drift.load_reference(ml100k)
    items = pd.read_parquet(ml100k / "data/raw/items.parquet")
    reference = raw.interactions
    verdicts, shifted_trips = [], []
    for k, path in enumerate(_replay_all_weeks(ml100k, tmp_path / "incoming")):
        current = drift.load_current(settings, path)
        result = drift.measure(drift.Tables(reference, items, "raw"), current, settings.drift, 7)
        verdicts.append((path.name, result["drift"], result["tripped"]))
        if k % 3 == 0:  # a shifted copy of every third week
            shifted = shifted_week(current.interactions, items, reference)
            flagged = drift.measure(
                drift.Tables(reference, items, "raw"),
                drift.Tables(shifted, None, "shifted"),
                settings.drift,
                7,
            )
            shifted_trips.append(flagged["tripped"])
        reference = pd.concat([reference, current.interactions], ignore_index=True)
    assert len(verdicts) >= 15
    passed = sum(not flagged for _, flagged, _ in verdicts)
    assert passed / len(verdicts) >= 0.8, verdicts
    assert all({"genre_mix", "item_popularity"} <= set(trips) for trips in shifted_trips), shifted_trips


@pytest.mark.slow
def test_a_week_mostly_on_new_items_is_flagged_as_cold_start(ml100k, tmp_path):
    settings = load_settings(ml100k / "params.yaml")
    reference = drift.load_reference(ml100k)
    week = pd.read_parquet(ml100k / "data/fetched/interactions.parquet")
    week = week[(week["timestamp"] >= 883612800) & (week["timestamp"] < 883612800 + WEEK)].copy()
    rng = np.random.default_rng(1)
    new = rng.random(len(week)) < 0.7
    week.loc[new, "item_id"] = [f"new-{i}" for i in rng.integers(0, 40, int(new.sum()))]
    week = week.drop_duplicates(["user_id", "item_id", "timestamp"])
    week.to_parquet(tmp_path / "cold.parquet", index=False)
    pd.DataFrame(
        {"item_id": [f"new-{i}" for i in range(40)], "title": "New film", "year": 1998, "genres": "Drama"}
    ).to_parquet(tmp_path / "cold.items.parquet", index=False)
    result = drift.measure(
        reference, drift.load_current(settings, tmp_path / "cold.parquet"), settings.drift, 7
    )
    assert result["drift"] and "new_items" in result["tripped"]
    assert result["figures"]["new_items"]["value"] > 0.6


@pytest.mark.slow
def test_cli_normal_week_then_shifted_week_with_evidently_reports(ml100k):
    """`rsllm drift`: exit 0 either way, a readable verdict, one JSON line last, <date>.json + .html written;
    Evidently's column tests agree with the figures."""
    rsllm(["replay-week"], ml100k)
    normal = rsllm(["drift"], ml100k)
    verdict = json.loads(normal.stdout.strip().splitlines()[-1])
    assert verdict["drift"] is False and verdict["tripped"] == []
    assert "no drift" in normal.stderr
    report = json.loads((ml100k / verdict["report"]).read_text())
    assert (ml100k / verdict["html"]).stat().st_size > 10_000
    assert set(report["figures"]) == set(drift_figures.FIGURES)
    for name, figure in report["figures"].items():
        assert {"value", "threshold", "drift", "basis"} <= set(figure), name
    for name in drift.EVIDENTLY_COLUMNS:
        assert report["figures"][name]["evidently"]["value"] == pytest.approx(
            report["figures"][name]["value"]
        )
        assert report["figures"][name]["evidently"]["drift"] == report["figures"][name]["drift"]

    week = Path(verdict["current"])
    week = week if week.is_absolute() else ml100k / week
    items = pd.read_parquet(ml100k / "data/raw/items.parquet")
    raw = pd.read_parquet(ml100k / "data/raw/interactions.parquet")
    shifted_path = ml100k / "shifted.parquet"
    shifted_week(pd.read_parquet(week), items, raw).to_parquet(shifted_path, index=False)
    shifted = rsllm(["drift", str(shifted_path), "--out", "reports/drift-shifted"], ml100k)
    flagged = json.loads(shifted.stdout.strip().splitlines()[-1])
    assert flagged["drift"] is True
    assert {"genre_mix", "item_popularity"} <= set(flagged["tripped"])
    assert "DRIFT" in shifted.stderr and "genre_mix" in shifted.stderr
    report = json.loads((ml100k / flagged["report"]).read_text())
    assert (
        report["figures"]["genre_mix"]["drift"] and report["figures"]["item_popularity"]["evidently"]["drift"]
    )


def test_cli_unreadable_input_is_an_error_naming_the_file(tmp_path):
    project = make_project(tmp_path / "project")
    bad = project / "drop.csv"
    bad.write_bytes(b"\xff\xfe not utf-8")
    proc = rsllm(["drift", str(bad), "--no-html"], project, check=False)
    assert proc.returncode == 1
    assert "drop.csv" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_reference_is_the_data_version_production_was_trained_on(project):
    """After a version data/v1 is recorded and production points at it, a later drop is compared with
    data/raw as of data/v1 (read through dvc.api), not with today's data/raw."""
    rsllm(["replay-week"], project)
    first = json.loads(rsllm(["ingest"], project).stdout.splitlines()[-1])
    assert first["version"]["version"] == "data/v1"
    pointer = project / registry.POINTER
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(json.dumps({"data_version": "data/v1", "model_tag": "rsllm:test"}))
    rsllm(["replay-week"], project)
    raw = project / "data/raw/interactions.parquet"  # today's data/raw differs from data/v1's
    pd.read_parquet(raw).head(500).to_parquet(raw, index=False)
    verdict = json.loads(rsllm(["drift", "--no-html"], project).stdout.splitlines()[-1])
    assert verdict["reference"] == "data/v1"
    report = json.loads((project / verdict["report"]).read_text())
    assert report["reference"]["rows"] == first["version"]["rows"]
    assert report["reference"]["production_data_version"] == "data/v1"
