"""Each loss on constructed inputs with known values; weights switch losses off."""

from __future__ import annotations

import math

import pytest
import torch

from components.llm.losses import batch_losses, distill_loss, info_nce, lm_loss, mean_offdiag_cosine
from components.llm.model import Projector, RsllmModel, ScoreHead
from components.llm.prompts import PromptBuilder
from components.llm.samples import Sample, collate
from components.llm.train import title_table
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


def test_info_nce_extra_keys_are_negatives_only():
    q = torch.eye(2)
    keys = torch.cat([torch.eye(2), torch.tensor([[1.0, 0.0]])])  # a third key aligned with query 0
    t = 1.0
    # row 0: positive cos 1, negatives cos 0 and cos 1; row 1: positive 1, negatives 0, 0
    expected = (math.log(1 + math.exp(-1) + 1) + math.log(1 + 2 * math.exp(-1))) / 2
    assert info_nce(q, keys, t).item() == pytest.approx(expected, rel=1e-6)


def test_distill_is_zero_when_the_student_matches_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    assert distill_loss(teacher, teacher, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.zeros(1, 3), teacher, 1.0).item() > 0.1


def test_mean_offdiag_cosine():
    assert mean_offdiag_cosine(torch.eye(3)) == pytest.approx(0.0)
    assert mean_offdiag_cosine(torch.ones(4, 2)) == pytest.approx(1.0)


SAMPLES = [
    Sample(0, [1, 2], 3, [3, 4, 10], (1, 2)),
    Sample(1, [5], 6, [7, 6, 11], (5,)),
    Sample(2, [8], 9, [1, 12, 9], (8,)),
]


@pytest.fixture(scope="module")
def setup():
    titles = tiny_titles(12)
    llm, tok = tiny_model(titles)
    torch.manual_seed(0)
    hidden = llm.config.hidden_size
    model = RsllmModel(
        llm, Projector(8, hidden, 16), torch.randn(13, 8), ScoreHead(hidden, 16), Projector(8, hidden, 16)
    ).eval()
    b = PromptBuilder(tok, titles, unified=True, n_id_items=11, marked=True, user_token=True)  # 12 is cold
    batch = collate(SAMPLES, b, torch.randn(3, 8))
    model.register_buffer("title_table", title_table(model, b), persistent=False)  # id_text_space input
    return model, b, batch


def test_batch_lm_loss_is_answer_tokens_only(setup):
    model, b, batch = setup
    out = batch_losses(model, batch, a=0.0)  # every other loss off
    assert out["user_item"] == 0 and out["id_text"] == 0 and out["loss"] == out["lm"]
    assert out["answer_tokens"] == sum(len(b.answer_ids(t)) for t in (3, 9, 6))
    # brute force: CE over each sample's answer tokens given its prompt, pooled over tokens
    total, n = 0.0, 0
    with torch.no_grad():
        for k, s in enumerate(SAMPLES):
            p, ans = b.prompt(s.history, s.candidates), b.answer_ids(s.target)
            at = torch.zeros(1, len(p.ids) + len(ans), dtype=torch.long)
            at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
            user = {"user_pos": torch.tensor([p.user_pos]), "user_vec": batch["user_vec"][k : k + 1]}
            h = model.hidden(torch.tensor([p.ids + ans]), at, **user)[0]
            logits = model.logits(h[len(p.ids) - 1 : -1])
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(ans), reduction="sum").item()
            n += len(ans)
    assert out["lm"].item() == pytest.approx(total / n, rel=1e-5)


def test_user_item_is_a_softmax_over_each_prompts_candidates(setup):
    """L_user_item = CE of the head's scores (prompt end vs each candidate's marker) at the target."""
    model, b, batch = setup
    with torch.no_grad():
        out = batch_losses(model, batch, a=1.0)
        scores = []
        for k, s in enumerate(SAMPLES):
            p = b.prompt(s.history, s.candidates)
            at = torch.zeros(1, len(p.ids), dtype=torch.long)
            at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
            user = {"user_pos": torch.tensor([p.user_pos]), "user_vec": batch["user_vec"][k : k + 1]}
            h = model.hidden(torch.tensor([p.ids]), at, **user)[0]  # the prompt alone: answers come after
            scores.append(model.head(h[-1][None], h[p.cand_pos][None])[0])
    targets = torch.tensor([s.candidates.index(s.target) for s in SAMPLES])
    expected = torch.nn.functional.cross_entropy(torch.stack(scores), targets)
    assert out["user_item"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert batch["target_col"].tolist() == targets.tolist()


def test_weights_switch_losses_on_and_off(setup):
    model, _, batch = setup
    with torch.no_grad():
        a_only = batch_losses(model, batch, a=0.5, b=0.0, temperature=0.1)
        both = batch_losses(model, batch, a=0.5, b=2.0, c=0.3, temperature=0.1)
        inp = batch_losses(model, batch, a=0.0, b=1.0, temperature=0.1, id_text_space="input")
    assert a_only["user_item"] > 0 and a_only["id_text"] == 0 and a_only["distill"] == 0
    assert a_only["loss"].item() == pytest.approx((a_only["lm"] + 0.5 * a_only["user_item"]).item())
    assert both["id_text"] > 0 and both["distill"] > 0
    expected = both["lm"] + 0.5 * both["user_item"] + 2.0 * both["id_text"] + 0.3 * both["distill"]
    assert both["loss"].item() == pytest.approx(expected.item())
    # hidden space: the batch's candidates with an ID (8 of 9; item 12 is cold) are each other's negatives
    assert both["id_text_negatives"].item() == pytest.approx(7.0)
    # input space: every other title of the catalogue (12 titles, the cold one too) is a negative
    assert inp["id_text"] > 0 and inp["id_text_negatives"].item() == pytest.approx(11.0)
    # ... but a gap in the item index (no title: a zero row) is none
    saved = model.title_table[12].clone()
    model.title_table[12] = 0
    with torch.no_grad():
        gap = batch_losses(model, batch, a=0.0, b=1.0, temperature=0.1, id_text_space="input")
    model.title_table[12] = saved
    assert gap["id_text_negatives"].item() == pytest.approx(10.0)
    # a text-only model has no ID embeddings: L_id_text and L_distill stay off whatever b and c are
    text = RsllmModel(model.llm, head=model.head)
    with torch.no_grad():
        off = batch_losses(text, batch, a=0.0, b=5.0, c=5.0)
    assert off["id_text"] == 0 and off["distill"] == 0
