"""Typed model folders (components/folders.py): every model folder's config is versioned; a folder
without a version (v0) is read through its legacy reader; a newer version or a bad field is a clear
ModelError naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from components.errors import ModelError
from components.export import load_onnx_config
from components.folders import save_config
from components.llm.stage_folder import load_stage_config
from components.recommender import load_sasrec, load_sasrec_config, save_model
from components.sasrec import SASRec, SASRecConfig

V0 = Path(__file__).parents[1] / "fixtures" / "bundle_v0"  # made by main at 00c60f4, before typed folders


def _edit(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, **changes}))


def test_a_sasrec_folder_round_trips_typed(tmp_path):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=7, max_len=5, hidden=8, heads=2, inner=16))
    save_model(model, {1: "a", 3: "c"}, tmp_path / "m", {"seed": 3, "epochs_run": 2})
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["format_version"] == 1 and raw["kind"] == "sasrec"
    cfg = load_sasrec_config(tmp_path / "m")
    assert cfg.model == model.cfg and cfg.training == {"seed": 3, "epochs_run": 2}
    loaded, _ = load_sasrec(tmp_path / "m")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_v0_folders_load_through_their_legacy_readers():
    sasrec = load_sasrec_config(V0 / "llm" / "sasrec")  # {"format": "rsllm-sasrec/1", "model": ...}
    raw = json.loads((V0 / "llm" / "sasrec" / "config.json").read_text())
    assert "format_version" not in raw and sasrec.model == SASRecConfig(**raw["model"])
    onnx = load_onnx_config(V0 / "onnx")  # {"format": "rsllm-onnx-encoder/1", "input": {...}, ...}
    raw = json.loads((V0 / "onnx" / "meta.json").read_text())
    assert "format_version" not in raw and onnx.max_length == raw["input"]["max_length"]
    assert (onnx.n_items + 1, onnx.hidden) == tuple(raw["outputs"]["item_embeddings"])
    assert onnx.input == raw["input"]["name"]
    stage = load_stage_config(V0 / "llm")
    raw = json.loads((V0 / "llm" / "config.json").read_text())
    assert "format_version" not in raw
    assert (stage.stage, stage.mode, stage.rank, stage.prompt_format) == (2, "unified", "head", 3)
    assert stage.user_token is True and stage.n_id_items == raw["n_id_items"] and stage.history_len == 10


def test_a_v0_stage_from_before_the_head_ranker_ranks_by_likelihood(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(json.dumps({"mode": "unified", "n_id_items": 3}))
    stage = load_stage_config(tmp_path / "s")
    assert (stage.prompt_format, stage.rank, stage.user_token, stage.prompt_titles) == (
        1,
        "likelihood",
        False,
        True,
    )


@pytest.mark.parametrize("folder", ["llm", "llm/sasrec"])
def test_a_newer_format_version_is_refused_by_name(tmp_path, folder):
    shutil.copytree(V0 / "llm", tmp_path / "llm")
    load = load_stage_config if folder == "llm" else load_sasrec_config
    path = tmp_path / folder / "config.json"
    first = load(path.parent)  # a v0 folder loads ...
    save_config(path.parent, first)  # ... saves as version 1 ...
    assert json.loads(path.read_text())["format_version"] == 1 and load(path.parent) == first  # ... the same
    _edit(path, format_version=99)
    with pytest.raises(ModelError, match=r"config\.json: format_version 99 was written by a newer rsllm"):
        load(path.parent)


def test_bad_fields_are_named(tmp_path):
    model = SASRec(SASRecConfig(n_items=4, max_len=5, hidden=8, heads=2, inner=16))
    save_model(model, {1: "a"}, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "model": {**raw["model"], "n_items": "many"}}))
    with pytest.raises(ModelError, match=r"m/config\.json: model\.n_items: .*integer"):
        load_sasrec(tmp_path / "m")
    path.write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(ModelError, match=r"colour: unknown field"):
        load_sasrec(tmp_path / "m")
    path.write_text(json.dumps({**raw, "format_version": "1"}))
    with pytest.raises(ModelError, match=r"format_version: expected a positive integer"):
        load_sasrec(tmp_path / "m")
    path.write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"not a SASRecFolder"):
        load_sasrec(tmp_path / "m")
    shutil.copytree(V0 / "llm", tmp_path / "llm")
    _edit(tmp_path / "llm" / "config.json", format_version=1, kind="llm_stage", rank="telepathy")
    with pytest.raises(ModelError, match=r"llm/config\.json: rank: "):
        load_stage_config(tmp_path / "llm")
