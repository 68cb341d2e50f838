"""Embedding injection, cold start, projector round trip, and where gradients go."""

from __future__ import annotations

import pytest
import torch

from components.llm.losses import batch_losses
from components.llm.model import (
    Projector,
    RsllmModel,
    ScoreHead,
    add_lora,
    calibrate_projector,
    load_projector,
    save_projector,
)
from components.llm.prompts import PromptBuilder
from components.llm.samples import Sample, collate
from tests.model.llm_fixtures import tiny_model, tiny_titles

TITLES = tiny_titles(12)


@pytest.fixture
def parts():
    model, tok = tiny_model(TITLES)
    table = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))  # items 1..10 have IDs
    torch.manual_seed(0)
    return model, tok, table, Projector(8, model.config.hidden_size, 16)


def _last_hidden(model: RsllmModel, builder: PromptBuilder, history, cands) -> torch.Tensor:
    p = builder.prompt(history, cands)
    at = torch.zeros(1, len(p.ids), dtype=torch.long)
    at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
    with torch.no_grad():
        return model.hidden(torch.tensor([p.ids]), at)[0, -1]


def test_changing_an_items_id_embedding_changes_the_unified_output(parts):
    llm, tok, table, proj = parts
    model = RsllmModel(llm, proj, table.clone()).eval()
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=10)
    before = _last_hidden(model, b, [1, 2], [3, 4])
    model.item_table[2] += 1.0  # an item in the prompt
    assert not torch.allclose(before, _last_hidden(model, b, [1, 2], [3, 4]), atol=1e-5)
    changed = _last_hidden(model, b, [1, 2], [3, 4])
    model.item_table[7] += 1.0  # an item not in the prompt
    torch.testing.assert_close(changed, _last_hidden(model, b, [1, 2], [3, 4]))


def test_text_only_prompts_ignore_id_embeddings(parts):
    llm, tok, table, proj = parts
    model = RsllmModel(llm, proj, table.clone()).eval()
    b = PromptBuilder(tok, TITLES, unified=False, n_id_items=10)
    before = _last_hidden(model, b, [1, 2], [3, 4])
    model.item_table[1:5] += 3.0
    torch.testing.assert_close(before, _last_hidden(model, b, [1, 2], [3, 4]))
    # and a text-only model (no projector) never injects, even given item positions
    text_model = RsllmModel(llm).eval()
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(
        text_model.embed(ids, torch.tensor([[0, 3, 0]])), llm.get_input_embeddings()(ids)
    )


def test_placeholder_embedding_is_the_projected_id_embedding(parts):
    llm, tok, table, proj = parts
    model = RsllmModel(llm, proj, table).eval()
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=10)
    p = b.prompt([4, 11], [2])  # 11 is cold: title only
    assert p.item_idx == [4, 2]
    at = torch.zeros(1, len(p.ids), dtype=torch.long)
    at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
    with torch.no_grad():
        emb = model.embed(torch.tensor([p.ids]), at)[0]
        plain = llm.get_input_embeddings()(torch.tensor(p.ids))
        torch.testing.assert_close(emb[p.item_pos], proj(table[[4, 2]]))
        others = [i for i in range(len(p.ids)) if i not in p.item_pos]
        torch.testing.assert_close(emb[others], plain[others])


def test_projector_round_trip(tmp_path, parts):
    *_, proj = parts
    save_projector(proj, tmp_path / "p.safetensors")
    again = load_projector(tmp_path / "p.safetensors")
    x = torch.randn(3, 8)
    assert again.config() == proj.config()
    torch.testing.assert_close(again(x), proj(x))


def test_gradients_reach_projector_head_and_lora_only(parts):
    llm, tok, table, proj = parts
    head = ScoreHead(llm.config.hidden_size, 8)
    model = RsllmModel(add_lora(llm, 4, 8, 0.0, ["q_proj", "v_proj"]), proj, table, head)
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=10, marked=True)
    batch = collate(
        [Sample(0, [1, 2], 3, [3, 4, 5]), Sample(1, [4], 6, [7, 6, 8]), Sample(2, [9, 10], 11, [11, 1, 2])], b
    )
    out = batch_losses(model, batch, a=1.0, b=1.0, temperature=0.1)
    assert out["user_item"] > 0 and out["id_text"] > 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith(("projector.", "head.")):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # LoRA B starts at zero, so it (not A) gets a non-zero gradient on the first step
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_calibrated_projector_starts_at_the_mean_token_embedding(parts):
    llm, _, table, proj = parts
    tokens = llm.get_input_embeddings().weight.detach()
    rows = table[1:] * 50.0  # SASRec rows far larger than token embeddings
    calibrate_projector(proj, table * 50.0, tokens, spread=0.1)
    with torch.no_grad():
        out = proj(rows)
    torch.testing.assert_close(out.mean(0), tokens.mean(0), atol=1e-5, rtol=1e-4)
    dev, tok_dev = out - out.mean(0), tokens - tokens.mean(0)
    assert dev.pow(2).mean().sqrt().item() == pytest.approx(
        0.1 * tok_dev.pow(2).mean().sqrt().item(), rel=1e-3
    )
    assert dev.abs().sum() > 0  # items still differ


def test_head_reads_the_configured_layer(parts, tmp_path):
    """llm.head_layer: the score head reads decoder layer k's output, in training (L_user_item) and when
    saved and loaded; layer 0 and layers past the LLM's depth are refused."""
    import torch.nn.functional as F

    from components.errors import ModelError
    from components.llm.model import load_head, save_head

    llm, tok, table, proj = parts
    head = ScoreHead(llm.config.hidden_size, 8, layer=1)
    save_head(head, tmp_path / "head.safetensors")
    assert load_head(tmp_path / "head.safetensors").layer == 1
    with pytest.raises(ModelError, match="layer 0"):
        ScoreHead(llm.config.hidden_size, 8, layer=0)
    model = RsllmModel(llm, proj, table, head)
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=10, marked=True)
    batch = collate([Sample(0, [1, 2], 3, [3, 4, 5]), Sample(1, [4], 6, [7, 6, 8])], b)
    args = (batch["input_ids"], batch["item_at"], batch["attention_mask"])
    with torch.no_grad():
        last, first = model.head_states(*args)
        out = batch_losses(model, batch, a=1.0)
        want = F.cross_entropy(
            model.head_scores(first, batch["prompt_end"], batch["cand_pos"]), batch["target_col"]
        )
        other = F.cross_entropy(
            model.head_scores(last, batch["prompt_end"], batch["cand_pos"]), batch["target_col"]
        )
    torch.testing.assert_close(last, model.hidden(*args))
    assert not torch.allclose(first, last)
    torch.testing.assert_close(out["user_item"], want)
    assert not torch.isclose(out["user_item"], other)
    head.layer = llm.config.num_hidden_layers  # the last layer's output is `-1` (after the final norm)
    with pytest.raises(ModelError, match="decoder layers"):
        model.head_states(*args)
