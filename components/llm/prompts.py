"""Prompt templates (LLaRA-style), rendered straight to token ids with the placeholder positions.

Text-only prompt (stage 1, the base model zero-shot):

    This user has watched: Toy Story; Heat; Casino.
    Candidates: GoldenEye; Heat; ... (20 titles).
    Which candidate will the user watch next? Answer:

Unified prompt (stage 2): every history item AND every candidate is its title followed by one
placeholder token `[ITEM]` whose input embedding is replaced by projector(SASRec item embedding):

    This user has watched: Toy Story[ITEM]; Heat[ITEM]; Casino[ITEM].
    Candidates: GoldenEye[ITEM]; Heat[ITEM]; ...
    Which candidate will the user watch next? Answer:

An item without an ID embedding (cold start: item_idx 0 or above the SASRec table) is its title alone.
The answer (training target, and what ranking scores) is " <title>" followed by the tokenizer's eos.

Format 2 (every model trained since the head ranker, `marked=True`): every candidate is followed by an
`[ITEM]` marker whatever its mode (text-only, cold: the marker's own token embedding; unified with an ID:
the projected ID embedding), the head reads each candidate at its marker, and the candidates are listed
in a canonical order (title, then item_idx), so the prompt depends on the candidate *set*, never on the
order a caller passes (retrieval order must not leak SASRec's rank). With `user_token`, one `[USER]`
placeholder carries user_projector(SASRec user vector): after "This user" in format 2; in format 3 it is
the prompt's last token, so the head's user state (the prompt's last hidden state) is read at it and
carries the user vector in its own residual stream. `titles=False` renders items
as their `[ITEM]` alone (the IDs-only ablation). Format 1 (older bundles) is rendered exactly as before.

Prompts are built piecewise from cached per-title token ids (each title is tokenised once), so the ids
of a title are the same in the history, in the candidates, in the target and in ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from components.llm.base import ITEM_TOKEN

HISTORY_HEAD = "This user has watched:"
CANDIDATES_HEAD = "\nCandidates:"
QUESTION = "\nWhich candidate will the user watch next? Answer:"
SEPARATOR = ";"
END = "."


@dataclass
class Prompt:
    """One rendered prompt: token ids and where the item placeholders are."""

    ids: list[int]
    item_pos: list[int] = field(default_factory=list)  # positions of `[ITEM]` tokens in ids
    item_idx: list[int] = field(default_factory=list)  # the item each placeholder stands for (same order)
    history: list[int] = field(default_factory=list)  # the history items actually rendered (after trimming)
    cand_pos: list[int] = field(default_factory=list)  # format 2: each candidate's marker, in the GIVEN order
    user_pos: int | None = None  # format 2 with user_token: the `[USER]` placeholder


class PromptBuilder:
    """Renders prompts for one tokenizer and item catalogue.

    titles: titles[item_idx] for item_idx 0..N (index 0 = padding, unused).
    n_id_items: items 1..n_id_items have an ID embedding (rows of the SASRec table); others are cold.
    cold_items: items within 1..n_id_items that are cold all the same (a stored model re-scored on a
        newer snapshot: items it never saw).
    unified: True renders `[ITEM]` placeholders (stage 2); False renders titles alone (text-only).
    """

    def __init__(
        self,
        tokenizer,
        titles: Sequence[str],
        *,
        unified: bool,
        n_id_items: int = 0,
        max_prompt_tokens: int | None = None,
        cold_items: Sequence[int] = (),
        marked: bool = False,
        user_token: bool = False,
        titles_in_prompt: bool = True,
        user_at_end: bool = False,
    ):
        self.tok = tokenizer
        self.titles = list(titles)
        self.unified = unified
        self.n_id_items = n_id_items
        self.cold_items = frozenset(int(i) for i in cold_items)  # within 1..n_id_items but without an ID
        self.max_prompt_tokens = max_prompt_tokens
        self.marked = marked  # format 2: a marker after every candidate, canonical candidate order
        self.user_token = user_token and marked
        self.user_at_end = user_at_end  # format 3: `[USER]` is the prompt's last token (the head reads it)
        self.titles_in_prompt = titles_in_prompt
        self.item_token_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
        self.eos_id = tokenizer.eos_token_id
        self._cache: dict[int, list[int]] = {}
        self._head = self._encode(HISTORY_HEAD)
        self._cands_head = self._encode(CANDIDATES_HEAD)
        self._question = self._encode(QUESTION)
        self._sep = self._encode(SEPARATOR)
        self._end = self._encode(END)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def title_ids(self, item: int) -> list[int]:
        """Token ids of " <title>" (cached), without eos."""
        if item not in self._cache:
            if not 0 < item < len(self.titles):
                raise KeyError(f"item_idx {item} is not in the item catalogue (1..{len(self.titles) - 1})")
            self._cache[item] = self._encode(" " + str(self.titles[item]).strip())
        return self._cache[item]

    def answer_ids(self, item: int) -> list[int]:
        """The answer the model is trained to produce and ranking scores: " <title>" + eos."""
        return self.title_ids(item) + [self.eos_id]

    def has_id(self, item: int) -> bool:
        """True when the item has an ID embedding (and the prompt is unified): it gets a placeholder."""
        return self.unified and 0 < item <= self.n_id_items and item not in self.cold_items

    def item_ids(self, item: int) -> tuple[list[int], int, int | None]:
        """The item on its own, for its LLM representation: " <title>" (+ `[ITEM]` when it has an ID).

        Returns (ids, text_pos = last title token, id_pos = the placeholder's position or None).
        """
        ids = list(self.title_ids(item))
        text_pos = len(ids) - 1
        if self.has_id(item):
            ids.append(self.item_token_id)
            return ids, text_pos, len(ids) - 1
        return ids, text_pos, None

    def canonical(self, candidates: Sequence[int]) -> list[int]:
        """The order candidates are listed in a format-2 prompt: by title (case-folded), then item_idx."""
        return sorted(candidates, key=lambda i: (str(self.titles[i]).strip().casefold(), i))

    def _render(self, history: Sequence[int], candidates: Sequence[int]) -> Prompt:
        p = Prompt(ids=list(self._head), history=list(history))
        if self.user_token and not self.user_at_end:  # format 2: "This user[USER] has watched:"
            p.ids = self._encode("This user") + [self.item_token_id] + self._encode(" has watched:")
            p.user_pos = len(self._encode("This user"))
        marker_at: dict[int, int] = {}

        def add_items(items: Sequence[int], mark: bool) -> None:
            for k, item in enumerate(items):
                if self.titles_in_prompt or not self.has_id(item):
                    p.ids += self.title_ids(item)
                if self.has_id(item):
                    p.item_pos.append(len(p.ids))
                    p.item_idx.append(int(item))
                if self.has_id(item) or mark:
                    marker_at[int(item)] = len(p.ids)
                    p.ids.append(self.item_token_id)
                p.ids += self._sep if k < len(items) - 1 else self._end

        add_items(history, mark=False)
        p.ids += self._cands_head
        add_items(self.canonical(candidates) if self.marked else candidates, mark=self.marked)
        p.ids += self._question
        if self.user_token and self.user_at_end:  # format 3: "... Answer:[USER]"
            p.user_pos = len(p.ids)
            p.ids.append(self.item_token_id)
        if self.marked:
            p.cand_pos = [marker_at[int(c)] for c in candidates]
        return p

    def prompt(self, history: Sequence[int], candidates: Sequence[int]) -> Prompt:
        """Render a prompt; drops the oldest history items while it exceeds max_prompt_tokens."""
        history = [int(i) for i in history if int(i) > 0]  # 0 = padding
        candidates = [int(i) for i in candidates]
        p = self._render(history, candidates)
        while self.max_prompt_tokens and len(p.ids) > self.max_prompt_tokens and len(history) > 1:
            history = history[1:]
            p = self._render(history, candidates)
        return p

    def text(self, history: Sequence[int], candidates: Sequence[int]) -> str:
        """The prompt as text (placeholders shown as `[ITEM]`), for logs and the README."""
        return self.tok.decode(self.prompt(history, candidates).ids)
