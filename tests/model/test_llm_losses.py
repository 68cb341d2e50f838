"""Each loss on constructed inputs with known values; weights switch losses off."""

from __future__ import annotations

import math

import pytest
import torch

from components.llm.losses import batch_losses, combine, info_nce, lm_loss
from components.llm.model import Projector, RsllmModel
from components.llm.prompts import PromptBuilder
from components.llm.samples import Sample, collate
from tests.model.llm_fixtures import tiny_model, tiny_titles


def test_lm_loss_known_value():
    # uniform logits over 4 tokens: CE = log 4, whatever the target
    assert lm_loss(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item() == pytest.approx(math.log(4))
    # a confident correct prediction and a confident wrong one
    logits = torch.tensor([[10.0, 0.0], [10.0, 0.0]])
    expected = (math.log(1 + math.exp(-10)) + math.log(1 + math.exp(10))) / 2
    assert lm_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_known_values():
    q = torch.eye(2)
    # perfectly aligned, orthogonal negatives: -log(e^(1/t) / (e^(1/t) + e^0))
    t = 0.5
    assert info_nce(q, q, t).item() == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-6)
    # swapped keys: the positive is orthogonal, the negative aligned
    assert info_nce(q, q.flip(0), t).item() == pytest.approx(math.log(1 + math.exp(1 / t)), rel=1e-6)
    # cosine: scale does not matter
    assert info_nce(3 * q, 0.5 * q, t).item() == pytest.approx(info_nce(q, q, t).item())


def test_info_nce_does_not_use_the_same_item_as_a_negative():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.tensor([7, 8, 7])  # rows 0 and 2 are the same item
    plain = info_nce(q, k, 1.0)
    masked = info_nce(q, k, 1.0, ids)
    # masked: row 0 sees {itself: cos 1, row 1: cos 0}; likewise row 2; row 1 sees {1, 0, 0}
    expected = (2 * math.log(1 + math.exp(-1)) + math.log(1 + 2 * math.exp(-1))) / 3
    assert masked.item() == pytest.approx(expected, rel=1e-6)
    assert plain.item() > masked.item()


def test_combine():
    one, two, three = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)
    assert combine(one, two, three, 0.5, 0.1).item() == pytest.approx(1 + 1.0 + 0.3)
    assert combine(one, two, three, 0.0, 0.0).item() == 1.0


@pytest.fixture(scope="module")
def setup():
    titles = tiny_titles(12)
    llm, tok = tiny_model(titles)
    torch.manual_seed(0)
    model = RsllmModel(llm, Projector(8, llm.config.hidden_size, 16), torch.randn(13, 8)).eval()
    b = PromptBuilder(tok, titles, unified=True, n_id_items=12)
    batch = collate([Sample(0, [1, 2], 3, [3, 4]), Sample(1, [5], 6, [6, 7]), Sample(2, [8], 9, [9, 1])], b)
    return model, b, batch


def test_batch_lm_loss_is_answer_tokens_only(setup):
    model, b, batch = setup
    out = batch_losses(model, batch)  # a = b = 0
    assert out["user_item"] == 0 and out["id_text"] == 0 and out["loss"] == out["lm"]
    assert out["answer_tokens"] == sum(len(b.answer_ids(t)) for t in (3, 9, 6))
    # brute force: CE over each sample's answer tokens given its prompt, pooled over tokens
    total, n = 0.0, 0
    with torch.no_grad():
        for s in (Sample(0, [1, 2], 3, [3, 4]), Sample(1, [5], 6, [6, 7]), Sample(2, [8], 9, [9, 1])):
            p, ans = b.prompt(s.history, s.candidates), b.answer_ids(s.target)
            at = torch.zeros(1, len(p.ids) + len(ans), dtype=torch.long)
            at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
            h = model.hidden(torch.tensor([p.ids + ans]), at)[0]
            logits = model.logits(h[len(p.ids) - 1 : -1])
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(ans), reduction="sum").item()
            n += len(ans)
    assert out["lm"].item() == pytest.approx(total / n, rel=1e-5)


def test_weights_switch_losses_on_and_off(setup):
    model, _, batch = setup
    with torch.no_grad():
        a_only = batch_losses(model, batch, a=0.5, b=0.0, temperature=0.1)
        both = batch_losses(model, batch, a=0.5, b=2.0, temperature=0.1)
        inp = batch_losses(model, batch, a=0.0, b=1.0, temperature=0.1, id_text_space="input")
    assert a_only["user_item"] > 0 and a_only["id_text"] == 0
    assert a_only["loss"].item() == pytest.approx((a_only["lm"] + 0.5 * a_only["user_item"]).item())
    assert both["id_text"] > 0
    expected = both["lm"] + 0.5 * both["user_item"] + 2.0 * both["id_text"]
    assert both["loss"].item() == pytest.approx(expected.item())
    assert inp["id_text"] > 0 and inp["id_text"] != both["id_text"]
    # a text-only model has no ID embeddings: L_id_text stays off whatever b is
    text = RsllmModel(model.llm)
    with torch.no_grad():
        assert batch_losses(text, batch, a=0.0, b=5.0)["id_text"] == 0
