"""Prompt rendering: templates, placeholder positions, cold start, trimming, answer tokens."""

from __future__ import annotations

import pytest

from components.llm.base import ITEM_TOKEN, tiny_tokenizer
from components.llm.prompts import CANDIDATES_HEAD, HISTORY_HEAD, QUESTION, PromptBuilder

TITLES = ["", "Toy Story", "Heat", "Casino", "GoldenEye", "Four Rooms", "Get Shorty"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer([*TITLES[1:], HISTORY_HEAD + CANDIDATES_HEAD + QUESTION])


def test_text_only_prompt_has_titles_and_no_placeholders(tok):
    b = PromptBuilder(tok, TITLES, unified=False, n_id_items=6)
    p = b.prompt([1, 2], [3, 4, 2])
    assert p.item_pos == [] and p.item_idx == []
    assert b.item_token_id not in p.ids
    assert tok.decode(p.ids) == (
        "This user has watched: Toy Story; Heat.\nCandidates: Casino; GoldenEye; Heat."
        "\nWhich candidate will the user watch next? Answer:"
    )


def test_unified_prompt_places_one_placeholder_after_each_title(tok):
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=6)
    p = b.prompt([1, 2], [3, 4, 2])
    assert tok.decode(p.ids).startswith(f"This user has watched: Toy Story{ITEM_TOKEN}; Heat{ITEM_TOKEN}.")
    # history items, then candidates, in order; each position holds the placeholder token
    assert p.item_idx == [1, 2, 3, 4, 2]
    assert all(p.ids[i] == b.item_token_id for i in p.item_pos)
    assert p.ids.count(b.item_token_id) == 5
    # the placeholder comes right after the item's own title tokens
    for pos, item in zip(p.item_pos, p.item_idx, strict=True):
        title = b.title_ids(item)
        assert p.ids[pos - len(title) : pos] == title


def test_cold_start_item_is_rendered_by_title_alone(tok):
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=4)  # items 5, 6 have no ID embedding
    p = b.prompt([5, 1], [6, 2])
    assert p.item_idx == [1, 2]
    text = tok.decode(p.ids)
    assert f"Four Rooms; Toy Story{ITEM_TOKEN}." in text
    assert f"Get Shorty; Heat{ITEM_TOKEN}." in text


def test_listed_cold_items_inside_the_table_are_title_only(tok):
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=6, cold_items=[2])  # 2: unknown to the model
    p = b.prompt([1, 2], [3, 2])
    assert p.item_idx == [1, 3]
    assert f"Toy Story{ITEM_TOKEN}; Heat." in tok.decode(p.ids)


def test_padding_dropped_and_history_trimmed_oldest_first(tok):
    full = PromptBuilder(tok, TITLES, unified=False)
    n_full = len(full.prompt([0, 1, 2, 3], [4, 5]).ids)
    assert full.prompt([0, 1, 2, 3], [4, 5]).history == [1, 2, 3]
    short = PromptBuilder(tok, TITLES, unified=False, max_prompt_tokens=n_full - 1)
    p = short.prompt([1, 2, 3], [4, 5])
    assert p.history == [2, 3] and len(p.ids) <= n_full - 1


def test_answer_is_title_plus_eos_and_item_alone(tok):
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=4)
    assert b.answer_ids(3) == b.title_ids(3) + [tok.eos_token_id]
    assert tok.decode(b.title_ids(3)) == " Casino"
    ids, text_pos, id_pos = b.item_ids(3)
    assert ids[id_pos] == b.item_token_id and text_pos == id_pos - 1
    ids, text_pos, id_pos = b.item_ids(6)  # cold: no placeholder
    assert id_pos is None and text_pos == len(ids) - 1
    with pytest.raises(KeyError, match="item_idx 99"):
        b.title_ids(99)


def test_format2_marks_every_candidate_in_a_canonical_order(tok):
    """Format 2: the candidates are listed by title whatever order they come in, each followed by a marker
    (cold ones too); cand_pos follows the order given."""
    b = PromptBuilder(tok, TITLES, unified=True, n_id_items=4, marked=True)  # 5, 6 are cold
    p = b.prompt([1], [6, 3, 2])
    q = b.prompt([1], [2, 6, 3])
    assert p.ids == q.ids  # the prompt depends on the set of candidates only
    text = tok.decode(p.ids)
    assert f"Candidates: Casino{ITEM_TOKEN}; Get Shorty{ITEM_TOKEN}; Heat{ITEM_TOKEN}." in text
    assert all(p.ids[i] == b.item_token_id for i in p.cand_pos)
    # the marker of each given candidate follows its own title
    for pos, item in zip(p.cand_pos, [6, 3, 2], strict=True):
        assert p.ids[pos - len(b.title_ids(item)) : pos] == b.title_ids(item)
    assert [q.cand_pos[[2, 6, 3].index(c)] for c in [6, 3, 2]] == p.cand_pos
    # only items with an ID get an injected embedding; the cold candidate's marker keeps its token
    assert sorted(p.item_idx) == [1, 2, 3]


def test_format2_text_only_user_token_and_ids_only(tok):
    text = PromptBuilder(tok, TITLES, unified=False, marked=True)
    p = text.prompt([1, 2], [3, 4])
    assert p.item_pos == [] and len(p.cand_pos) == 2 and p.user_pos is None
    user = PromptBuilder(tok, TITLES, unified=True, n_id_items=6, marked=True, user_token=True)
    p = user.prompt([1], [3, 4])
    assert p.user_pos is not None and p.ids[p.user_pos] == user.item_token_id
    assert p.user_pos not in p.item_pos  # the user placeholder is injected separately
    assert p.user_pos < len(user.prompt([1], []).ids) - 10  # format 2: "This user[USER] has watched:"
    end = PromptBuilder(
        tok, TITLES, unified=True, n_id_items=6, marked=True, user_token=True, user_at_end=True
    )
    q = end.prompt([1], [3, 4])
    assert q.user_pos == len(q.ids) - 1 and q.ids[-1] == end.item_token_id  # format 3: the last token
    assert (
        q.ids[:-1]
        == PromptBuilder(tok, TITLES, unified=True, n_id_items=6, marked=True).prompt([1], [3, 4]).ids
    )
    ids_only = PromptBuilder(tok, TITLES, unified=True, n_id_items=4, marked=True, titles_in_prompt=False)
    decoded = tok.decode(ids_only.prompt([1, 5], [3, 6]).ids)
    assert "Toy Story" not in decoded and "Casino" not in decoded  # items with an ID: marker alone
    assert "Four Rooms" in decoded and "Get Shorty" in decoded  # cold items keep their title
