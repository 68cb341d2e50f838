"""Registry: BentoML store + atomic production pointer; promote, rollback, list, gc, kill midway."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bentoml
import numpy as np
import pytest

from components import registry
from components.errors import ModelError, RegistryError
from components.registry import BundleConfig
from components.serving import production


def candidate_parts(folder: Path, seed: int, size: int = 1000) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "onnx").mkdir(exist_ok=True)
    np.random.default_rng(seed).random(size).astype("float32").tofile(folder / "onnx/encoder.onnx")
    (folder / "items.json").write_text(json.dumps({"1": "Toy Story"}))
    return {"onnx": folder / "onnx", "items.json": folder / "items.json"}


def test_promote_rollback_and_list(tmp_path):
    repo = tmp_path / "repo"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    base_tag = registry.save_base(base)
    assert registry.save_base(base) == base_tag  # saved once per distinct content

    t1 = registry.save_candidate(
        candidate_parts(tmp_path / "c1", 1),
        {"metrics": {"hr@1": 0.2}, "data_version": "data/v1", "base_tag": base_tag},
    )
    t2 = registry.save_candidate(
        candidate_parts(tmp_path / "c2", 2),
        {"metrics": {"hr@1": 0.3}, "data_version": "data/v2", "base_tag": base_tag},
    )
    assert registry.read_production(repo) is None
    registry.promote(t1, repo)
    p = registry.promote(t2, repo)
    assert p["model_tag"] == t2 and p["previous"] == t1 and p["data_version"] == "data/v2"
    stored = Path(bentoml.models.get(t2).path)
    assert (stored / "onnx/encoder.onnx").read_bytes() == (tmp_path / "c2/onnx/encoder.onnx").read_bytes()

    rows = {r["tag"]: r for r in registry.list_models(repo)}
    assert rows[t2]["production"] and not rows[t1]["production"]
    assert rows[t1]["metrics"] == {"hr@1": 0.2}

    back = registry.rollback(repo)
    assert back["model_tag"] == t1 and registry.read_production(repo)["model_tag"] == t1
    history = (repo / registry.HISTORY).read_text().splitlines()
    assert len(history) == 3


def test_missing_parts_and_unknown_tags_are_clear_errors(tmp_path):
    with pytest.raises(RegistryError, match="missing: onnx"):
        registry.save_candidate({"onnx": tmp_path / "nope"}, {})
    with pytest.raises(RegistryError, match="not in the BentoML store"):
        registry.promote("rsllm:doesnotexist", tmp_path)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(tmp_path / "empty")


def test_gc_keeps_newest_and_production(tmp_path):
    repo = tmp_path / "repo"
    tags = [
        registry.save_candidate(candidate_parts(tmp_path / f"g{i}", i), {"metrics": {}}) for i in range(4)
    ]
    registry.promote(tags[0], repo)  # the oldest is production: protected
    deleted = registry.gc(repo, keep=1)
    remaining = {str(m.tag) for m in bentoml.models.list(registry.MODEL_NAME)}
    assert tags[0] in remaining and tags[-1] in remaining
    assert set(deleted) >= set(tags[1:3]) and not (set(tags[1:3]) & remaining)


def test_rollback_walks_back_through_the_history_skipping_deleted_models(tmp_path):
    repo = tmp_path / "repo"
    a, b, c, d = (registry.save_candidate(candidate_parts(tmp_path / f"r{i}", 10 + i), {}) for i in range(4))
    for tag in (a, b, c, d):
        registry.promote(tag, repo)
    assert registry.rollback(repo)["model_tag"] == c
    bentoml.models.delete(b)  # as `rsllm gc` would
    back = registry.rollback(repo)
    assert back["model_tag"] == a and back["previous"] is None  # B skipped; not back to D
    with pytest.raises(RegistryError, match=f"history.jsonl has no model before {a}"):
        registry.rollback(repo)
    registry.promote(d, repo)  # a promotion after rollbacks: rollback returns to A, where it came from
    assert registry.rollback(repo)["model_tag"] == a


def test_rollback_twice_after_one_promotion_does_not_return_to_the_newer_model(tmp_path):
    repo = tmp_path / "repo"
    a, b = (registry.save_candidate(candidate_parts(tmp_path / f"t{i}", 20 + i), {}) for i in range(2))
    registry.promote(a, repo)
    registry.promote(b, repo)
    assert registry.rollback(repo)["model_tag"] == a
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback(repo)
    assert registry.read_production(repo)["model_tag"] == a


def test_gc_keeps_the_model_a_rollback_returns_to(tmp_path):
    repo = tmp_path / "repo"
    tags = [registry.save_candidate(candidate_parts(tmp_path / f"k{i}", 30 + i), {}) for i in range(3)]
    for tag in tags:
        registry.promote(tag, repo)
    assert registry.rollback(repo)["previous"] == tags[0]  # production tags[1], a rollback goes to tags[0]
    registry.gc(repo, keep=1)
    assert registry.rollback(repo)["model_tag"] == tags[0]


@pytest.mark.parametrize("content", ['{"x": 1}', "[]", '{"model_tag": 3}', "not json"])
def test_a_broken_pointer_is_a_registry_error_and_promote_repairs_it(tmp_path, content):
    repo = tmp_path / "repo"
    tag = registry.save_candidate(candidate_parts(tmp_path / "p", 40), {})
    pointer = repo / registry.POINTER
    pointer.parent.mkdir(parents=True)
    pointer.write_text(content)
    for call in (registry.read_production, registry.rollback, registry.production_model, registry.gc):
        with pytest.raises(RegistryError, match="production.json") as info:
            call(repo)
        assert "rsllm promote" in str(info.value)
    assert registry.promote(tag, repo)["model_tag"] == tag  # the way out
    assert registry.production_model(repo).tag == bentoml.models.get(tag).tag


def test_a_pointer_to_a_deleted_model_is_a_registry_error(tmp_path):
    repo = tmp_path / "repo"
    tag = registry.save_candidate(candidate_parts(tmp_path / "g", 50), {})
    registry.promote(tag, repo)
    bentoml.models.delete(tag)
    with pytest.raises(RegistryError, match=f"production.json points at a missing model.*{tag}"):
        registry.production_model(repo)


def test_stored_files_are_checksummed_and_verified(tmp_path):
    parts = candidate_parts(tmp_path / "v", 60)
    model = bentoml.models.get(registry.save_candidate(parts, {"metrics": {"hr@1": 0.1}}))
    sums = model.info.metadata["checksums"]
    assert set(sums) == {"onnx/encoder.onnx", "items.json"}
    assert sums["items.json"] == hashlib.sha256((tmp_path / "v/items.json").read_bytes()).hexdigest()
    assert registry.verify_model(model) is True

    stored = Path(model.path)
    (stored / "items.json").write_text(json.dumps({"1": "Jumanji"}))
    with pytest.raises(RegistryError, match="items.json has sha256"):
        registry.verify_model(model)
    (stored / "items.json").write_text(json.dumps({"1": "Toy Story"}))
    (stored / "onnx/extra.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match="extra.bin was added"):
        registry.verify_model(model)
    (stored / "onnx/extra.bin").unlink()
    (stored / "onnx/encoder.onnx").unlink()
    with pytest.raises(RegistryError, match="encoder.onnx is missing"):
        registry.verify_model(model)


def test_a_legacy_bundle_without_checksums_loads_unverified(tmp_path):
    with bentoml.models.create(registry.MODEL_NAME, metadata={"metrics": {}}) as model:
        (Path(model.path) / "items.json").write_text("{}")
    assert registry.verify_model(bentoml.models.get(model.tag)) is False


@pytest.fixture
def stored():
    """Store a bundle with raw metadata, as an older or a newer rsllm wrote it; deleted afterwards
    (the store is shared by the session, and an unreadable bundle there would stop `gc`)."""
    tags = []

    def store(metadata: dict):
        with bentoml.models.create(registry.MODEL_NAME, metadata=metadata) as model:
            (Path(model.path) / "items.json").write_text("{}")
        tags.append(model.tag)
        return bentoml.models.get(model.tag)

    yield store
    for tag in tags:
        bentoml.models.delete(tag)


def test_the_bundle_config_round_trips_typed(tmp_path):
    repo = tmp_path / "repo"
    metadata = {
        "metrics": {"hr@1": 1, "ndcg@10": 0.25},  # an int metric comes back a float
        "data_version": None,  # dropped from model.yaml (BentoML takes no None), read back as None
        "git_commit": "abc123",
        "base_tag": "rsllm-base:b1",
        "rerank_default": True,
        "rerank_reason": "rerank 0.30 vs retrieval 0.25",
        "profile": "test",
        "params": {"seed": 7, "llm": {"lora": {"r": 8}}},
    }
    tag = registry.save_candidate(candidate_parts(tmp_path / "rt", 70), metadata)
    model = bentoml.models.get(tag)  # read back from the store's model.yaml
    config = registry.bundle_config(model)
    sums = model.info.metadata["checksums"]
    assert set(sums) == {"onnx/encoder.onnx", "items.json"}
    assert config == BundleConfig(
        format_version=1, checksums=sums, **{**metadata, "metrics": {"hr@1": 1.0, "ndcg@10": 0.25}}
    )
    assert model.info.metadata["format_version"] == 1 and "data_version" not in model.info.metadata
    assert isinstance(config.metrics["hr@1"], float) and config.data_version is None
    assert registry.verify_model(model) is True
    pointer = registry.promote(tag, repo)
    assert pointer["base_tag"] == "rsllm-base:b1" and pointer["data_version"] is None
    row = next(r for r in registry.list_models(repo) if r["tag"] == tag)
    assert row["metrics"] == {"hr@1": 1.0, "ndcg@10": 0.25} and row["git_commit"] == "abc123"


def test_save_candidate_replaces_stale_checksums_and_version(tmp_path):
    """Metadata copied from a stored bundle (checksums, format_version) is re-checksummed."""
    tag = registry.save_candidate(
        candidate_parts(tmp_path / "s", 71), {"format_version": 1, "checksums": {"gone.bin": "0" * 64}}
    )
    model = bentoml.models.get(tag)
    assert set(registry.bundle_config(model).checksums) == {"onnx/encoder.onnx", "items.json"}
    assert registry.verify_model(model) is True


def test_a_v0_bundle_loads_with_the_legacy_defaults(stored):
    old = {  # the untyped dict of bundles stored before typed folders: no format_version, no rerank rule
        "metrics": {"hr@1": 0.2},
        "data_version": "data/v1",
        "git_commit": "abc",
        "base_tag": "rsllm-base:old",
        "profile": "test",
        "params": {"seed": 1},
    }
    config = registry.bundle_config(stored(old))
    assert config == BundleConfig(
        format_version=1,
        checksums={},
        rerank_default=False,
        rerank_reason="stored before the rerank rule: rerank off",
        **old,
    )
    assert registry.verify_model(stored(old)) is False  # no checksums: loads unverified
    later = registry.bundle_config(stored({"rerank_default": True, "rerank_reason": "better", "extra": 1}))
    assert later.rerank_default is True and later.rerank_reason == "better"  # kept; unknown v0 keys dropped
    assert later.base_tag == "" and later.metrics == {} and later.git_commit is None


def test_a_bundle_from_a_newer_rsllm_is_refused(stored, tmp_path, monkeypatch):
    model = stored({"format_version": 99, "kind": "bundle", "something_new": {"x": 1}})
    for read in (registry.bundle_config, registry.verify_model):
        with pytest.raises(
            ModelError, match=f"model {model.tag}: format_version 99 was written by a newer rsllm"
        ):
            read(model)
    with pytest.raises(ModelError, match="newer"):
        registry.promote(str(model.tag), tmp_path / "repo")
    assert registry.read_production(tmp_path / "repo") is None  # the pointer never moved
    row = next(r for r in registry.list_models(tmp_path / "repo") if r["tag"] == str(model.tag))
    assert "newer rsllm" in row["unreadable"]  # `rsllm models` still lists it (and the others)
    # the service resolves its model at import: it refuses to start, even with the base tag given
    monkeypatch.setenv("RSLLM_MODEL_TAG", str(model.tag))
    monkeypatch.setenv("RSLLM_BASE_TAG", "rsllm-base:any")
    with pytest.raises(ModelError, match="newer"):
        production.resolve()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rerank_default": "yes please"}, "rerank_default"),
        ({"metrics": {"hr@1": "x"}}, r"metrics\.hr@1"),
        ({"surprise": 1}, "surprise: unknown field"),
    ],
)
def test_a_wrong_field_is_a_model_error_naming_it(stored, tmp_path, fields, field):
    model = stored({"format_version": 1, **fields})
    with pytest.raises(ModelError, match=f"model {model.tag}: .*{field}"):
        registry.bundle_config(model)
    before = {str(m.tag) for m in bentoml.models.list(registry.MODEL_NAME)}
    with pytest.raises(ModelError, match=f"candidate metadata: .*{field}"):  # refused before any copy
        registry.save_candidate(candidate_parts(tmp_path / "w", 72), fields)
    assert {str(m.tag) for m in bentoml.models.list(registry.MODEL_NAME)} == before


PROMOTE_LOOP = """
import sys, json
from pathlib import Path
import numpy as np
from components import registry
repo, work = Path(sys.argv[1]), Path(sys.argv[2])
for i in range(1000):
    d = work / f"c{i}"; (d / "onnx").mkdir(parents=True)
    np.random.default_rng(i).random(2_000_000).astype("float32").tofile(d / "onnx/encoder.onnx")
    tag = registry.save_candidate({"onnx": d / "onnx"}, {"metrics": {"i": i}})
    registry.promote(tag, repo)
    print(tag, flush=True)
"""


@pytest.mark.slow
def test_killing_a_promotion_midway_leaves_old_or_new_never_a_mix(tmp_path):
    repo, work = tmp_path / "repo", tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    for round_ in range(4):
        before = registry.read_production(repo)
        proc = subprocess.Popen(
            [sys.executable, "-c", PROMOTE_LOOP, str(repo), str(work / str(round_))],
            stdout=subprocess.PIPE,
            env=dict(os.environ),
            text=True,
        )
        time.sleep(2.0 + float(rng.uniform(0, 2.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pointer = registry.read_production(repo)  # valid JSON, never half-written
        if pointer is None:
            assert before is None
            continue
        model = bentoml.models.get(pointer["model_tag"])  # names a complete model in the store
        encoder = Path(model.path) / "onnx/encoder.onnx"
        assert encoder.stat().st_size == 8_000_000
    # a kill can leave a temp file behind (nothing survives SIGKILL); the next promotion clears it
    last = work / "last" / "onnx"
    last.mkdir(parents=True)
    np.zeros(10, dtype="float32").tofile(last / "encoder.onnx")
    tag = registry.save_candidate({"onnx": last}, {"metrics": {"i": -1}})
    registry.promote(tag, repo)
    leftovers = [p for p in (repo / "models/registry").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and registry.read_production(repo)["model_tag"] == tag
