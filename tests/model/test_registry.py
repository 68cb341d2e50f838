"""Registry: BentoML store + atomic production pointer; promote, rollback, list, gc, kill midway."""

from __future__ import annotations

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
from components.errors import RegistryError


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
