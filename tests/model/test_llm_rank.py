"""Ranking with the block attention mask equals brute-force per-candidate scoring; generation mode."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from components.llm.model import Projector, RsllmModel
from components.llm.prompts import PromptBuilder
from components.llm.rank import (
    block_inputs,
    generate,
    map_to_candidate,
    rank_users,
    score_block,
    score_brute_force,
)
from tests.model.llm_fixtures import tiny_model, tiny_titles

TITLES = tiny_titles(30)


@pytest.fixture(scope="module")
def unified():
    llm, tok = tiny_model(TITLES)
    torch.manual_seed(0)
    model = RsllmModel(llm, Projector(8, llm.config.hidden_size, 16), torch.randn(31, 8)).eval()
    return model, PromptBuilder(tok, TITLES, unified=True, n_id_items=25)  # 26..30 are cold


def test_block_mask_layout():
    from components.llm.prompts import Prompt

    pack = block_inputs(Prompt(ids=[10, 11, 12]), [[20, 21], [30]])
    assert pack["ids"] == [10, 11, 12, 20, 21, 30]
    assert pack["pos"] == [0, 1, 2, 3, 4, 3]  # each candidate continues from the prompt's end
    a = pack["allowed"]
    assert a[4].tolist() == [True, True, True, True, True, False]  # 2nd token of cand 0: prompt + itself
    assert a[5].tolist() == [True, True, True, False, False, True]  # cand 1 never sees cand 0
    assert a[1].tolist() == [True, True, False, False, False, False]  # prompt stays causal
    assert pack["src"] == [2, 3, 2] and pack["tgt"] == [20, 21, 30] and pack["cand"] == [0, 0, 1]


@pytest.mark.parametrize("mode", ["unified", "text"])
def test_block_scores_equal_brute_force(unified, mode):
    model, b = unified
    if mode == "text":
        model, b = RsllmModel(model.llm).eval(), PromptBuilder(b.tok, TITLES, unified=False)
    users = [([1, 2, 3, 26], list(range(4, 24))), ([5], [27, 6, 7, 28, 9]), ([8, 9], [10, 11, 12])]
    prompts = [b.prompt(h, c) for h, c in users]
    answers = [[b.answer_ids(i) for i in c] for _, c in users]
    batched = score_block(model, prompts, answers)  # 3 users of different lengths, padded
    assert batched.shape == (3, 20)
    for k, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        brute = score_brute_force(model, p, a)
        one = score_block(model, [p], [a])[0]
        assert (one - brute).abs().max().item() < 1e-5
        assert (batched[k, : len(a)] - brute).abs().max().item() < 1e-5
        assert torch.isinf(batched[k, len(a) :]).all()
    # the scores differ between candidates (so equality above is not trivial)
    assert batched[0].std() > 0


def test_scores_depend_on_the_id_embeddings(unified):
    model, b = unified
    p, a = b.prompt([1, 2], [3, 4, 5]), [b.answer_ids(i) for i in (3, 4, 5)]
    before = score_block(model, [p], [a])
    saved = model.item_table[4].clone()
    model.item_table[4] += 2.0
    try:
        assert not torch.allclose(before, score_block(model, [p], [a]))
    finally:
        model.item_table[4] = saved


@pytest.fixture(scope="module")
def headed(unified):
    from components.llm.model import ScoreHead

    model, b = unified
    torch.manual_seed(1)
    hidden = model.causal_lm.config.hidden_size
    head_model = RsllmModel(model.llm, model.projector, model.item_table, ScoreHead(hidden, 16)).eval()
    return head_model, PromptBuilder(b.tok, TITLES, unified=True, n_id_items=25, marked=True)


def test_head_scores_are_order_invariant(headed):
    """Permuting the candidates permutes the head's scores (the service passes retrieval order)."""
    from components.llm.rank import score_head

    model, b = headed
    cands = [4, 27, 9, 3, 12, 28, 20]  # 27 and 28 are cold
    perm = [5, 2, 0, 6, 1, 4, 3]
    one = score_head(model, [b.prompt([1, 2, 26], cands)])[0]
    two = score_head(model, [b.prompt([1, 2, 26], [cands[j] for j in perm])])[0]
    torch.testing.assert_close(two, one[perm], atol=1e-5, rtol=0)
    assert one.std() > 0 and torch.isfinite(one).all()  # cold candidates get a real score too
    # batched with a longer prompt (padding) gives the same scores
    both = score_head(model, [b.prompt([1, 2, 26], cands), b.prompt(list(range(1, 11)), [3, 4])])
    torch.testing.assert_close(both[0], one, atol=1e-5, rtol=0)
    assert torch.isinf(both[1, 2:]).all()


def test_head_scores_depend_on_the_candidates_id_embedding(headed):
    from components.llm.rank import score_head

    model, b = headed
    p = b.prompt([1, 2], [3, 4, 5])
    before = score_head(model, [p])[0]
    saved = model.item_table[4].clone()
    model.item_table[4] += 2.0
    try:
        assert not torch.allclose(before, score_head(model, [p])[0])
    finally:
        model.item_table[4] = saved


def test_head_id_skip_reads_the_candidates_sasrec_embedding(headed, tmp_path):
    """llm.head_id_skip: at zero the head scores as without it; trained, a candidate's score moves with
    its own SASRec row and no other's, a cold candidate keeps its title-only score, order invariance
    holds, and the skip survives save/load."""
    from components.errors import ModelError
    from components.llm.model import ScoreHead, load_head, save_head
    from components.llm.rank import score_head

    model, b = headed
    hidden = model.causal_lm.config.hidden_size
    head = ScoreHead(hidden, 16)
    head.load_state_dict(model.head.state_dict())
    head.add_id_skip(8)
    skip_model = RsllmModel(model.llm, model.projector, model.item_table, head).eval()
    cands = [4, 27, 9, 3, 12]  # 27 is cold
    p = b.prompt([1, 2, 26], cands)
    torch.testing.assert_close(score_head(skip_model, [p])[0], score_head(model, [p])[0], atol=1e-6, rtol=0)
    torch.manual_seed(2)
    with torch.no_grad():
        head.skip.weight.normal_()
    plain, with_skip = score_head(model, [p])[0], score_head(skip_model, [p])[0]
    moved = (with_skip - plain).abs() > 1e-4
    assert moved.tolist() == [True, False, True, True, True]  # the cold candidate reads no ID
    # the skip's share is <W_u h_user, W_s e_c> / sqrt(dim), e_c = the candidate's own SASRec row
    ids = torch.tensor([p.ids])
    at = torch.zeros_like(ids)
    at[0, p.item_pos] = torch.tensor(p.item_idx)
    with torch.no_grad():
        u = head.user(skip_model.hidden(ids, at)[0, -1])  # [16]
        e = model.item_table[cands] * torch.tensor([c != 27 for c in cands]).unsqueeze(-1)  # [5, 8]
        share = head.skip(e) @ u / 16**0.5
    torch.testing.assert_close(with_skip - plain, share, atol=1e-5, rtol=0)
    perm = [3, 0, 4, 1, 2]
    again = score_head(skip_model, [b.prompt([1, 2, 26], [cands[j] for j in perm])])[0]
    torch.testing.assert_close(again, with_skip[perm], atol=1e-5, rtol=0)
    save_head(head, tmp_path / "head.safetensors")
    loaded = load_head(tmp_path / "head.safetensors")
    assert loaded.id_skip == 8
    torch.testing.assert_close(loaded.skip.weight, head.skip.weight)
    with pytest.raises(ModelError, match="ID skip"):
        RsllmModel(model.llm, head=head).head_scores(
            torch.zeros(1, 3, hidden), torch.tensor([2]), torch.tensor([[0]])
        )


def test_map_to_candidate_by_exact_title():
    cands = [3, 7, 9]
    assert map_to_candidate(f" {TITLES[7]}", cands, TITLES) == 7
    assert map_to_candidate(f"{TITLES[9]}\nsomething else", cands, TITLES) == 9
    assert map_to_candidate(TITLES[5], cands, TITLES) == 0  # a title, but not a candidate
    assert map_to_candidate(TITLES[7][:-1], cands, TITLES) == 0  # not exact


def test_generation_mode_maps_the_decoded_title_back():
    llm, tok = tiny_model(TITLES)
    torch.manual_seed(0)
    model = RsllmModel(llm, Projector(8, llm.config.hidden_size, 16), torch.randn(31, 8))
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=25)
    # teach the tiny model one answer for one prompt, then decode it greedily
    history, cands, target = [1, 2], [4, 12, 17], 12
    p, ans = b.prompt(history, cands), b.answer_ids(target)
    at = torch.zeros(1, len(p.ids) + len(ans), dtype=torch.long)
    at[0, p.item_pos] = torch.tensor(p.item_idx, dtype=torch.long)
    ids, labels = torch.tensor([p.ids + ans]), torch.tensor(ans)
    opt = torch.optim.Adam(llm.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(80):
        h = model.hidden(ids, at)[0, len(p.ids) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(model.logits(h), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert generate(model, p, 20, b.eos_id, [b.item_token_id]) == b.title_ids(target)
    rows = pd.DataFrame([{"user_idx": 0, "history": history, "target": target, "candidates": cands}])
    out = rank_users(model, b, rows, history_len=10, generation=True).iloc[0]  # likelihood mode
    assert out["generated"].strip() == TITLES[target]
    assert out["predicted"] == target and out["valid"]
    assert out["target_col"] == 1 and out["scores"][1] == max(out["scores"])
