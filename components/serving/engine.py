"""What the service computes, without BentoML: load one stored model folder, retrieve, rerank.

Index space: 1..N is the stable item index of the model's items.parquet (rows of the ONNX item table and
of the LLM's ID-embedding table); rows without training data are cold, and so are catalogue items after
N the model has never seen (cold: title only, never retrieved).

- retrieval: ONNX encoder -> user vector; scores = user_vector @ item_table.T over items 1..N with the
  history masked out. A history with no item known to the encoder falls back to popularity (how often
  an item appears in the sample users' histories and targets, i.e. the prepared test split).
- rerank:    the LLM scores each candidate after the unified prompt (components.llm.rank.score_users:
  the score head at each candidate's marker, or the title log-likelihood for older bundles; cold items
  are rendered by title alone), highest score first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import numpy as np
import pandas as pd

from components.errors import ModelError, RequestError
from components.prepare import trained_flags

ONNX_DIR, LLM_DIR = "onnx", "llm"
ECHO_CHARS = 40  # an id echoed in an error is cut to this many characters


def shorten(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as text for an error message, cut to `limit` characters."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


@dataclass
class Catalogue:
    """Every servable item: ids[i], titles[i] for index i (0 = padding, "" = a gap in the index).

    Indexes 1..rows-1 are the stable item index of the model's items.parquet (rows of its ONNX and LLM
    tables); `known[i]`: the model has a trained row for item i. Catalogue items outside its index follow
    (cold: title only). A bundle from before the stable index (format v0) has items 1..N, all trained."""

    ids: list[str]
    titles: list[str]
    years: list[int | None]
    genres: list[str]
    known: np.ndarray  # bool [len(ids)]
    rows: int  # rows of the model's item tables (largest item_idx + 1)
    index: dict[str, int]

    @classmethod
    def load(cls, model_dir: Path) -> Catalogue:
        items_path = model_dir / "items.parquet"
        if not items_path.exists():
            raise ModelError(f"{items_path}: not found (the stored model lacks its item mapping)")
        items = pd.read_parquet(items_path).sort_values("item_idx").reset_index(drop=True)
        idx = items["item_idx"].to_numpy(np.int64)
        if len(idx) == 0 or idx[0] < 1 or (np.diff(idx) < 1).any():
            raise ModelError(f"{items_path}: item_idx must be distinct and >= 1")
        rows = int(idx[-1]) + 1
        trained = trained_flags(items)
        table = pd.DataFrame(index=range(rows), columns=["item_id", "title", "year", "genres"], dtype=object)
        table.loc[idx, ["item_id", "title", "year", "genres"]] = items.reindex(
            columns=["item_id", "title", "year", "genres"]
        ).to_numpy(object)
        frames = [table.iloc[1:]]
        cat_path = model_dir / "catalogue.parquet"
        if cat_path.exists():
            cat = pd.read_parquet(cat_path)
            cat = cat[~cat["item_id"].astype(str).isin(set(items["item_id"].astype(str)))]
            frames.append(cat.sort_values("item_id", key=lambda s: s.astype(str)))
        allrows = pd.concat(frames, ignore_index=True)
        text = lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v)) else str(v)  # noqa: E731
        ids = [""] + [text(v) for v in allrows["item_id"]]
        titles = [""] + [text(v).strip() for v in allrows["title"]]
        years = [None] + [
            None if y is None or pd.isna(y) else _int_or_none(y)
            for y in allrows.get("year", [None] * len(allrows))
        ]
        genres = [""] + [
            str(g) if isinstance(g, str) else "" for g in allrows.get("genres", [""] * len(allrows))
        ]
        known = np.zeros(len(ids), dtype=bool)
        known[idx[trained]] = True
        return cls(
            ids, titles, years, genres, known, rows, {item_id: i for i, item_id in enumerate(ids) if item_id}
        )

    @property
    def n_known(self) -> int:
        """Items the model has a trained row for."""
        return int(self.known.sum())

    def is_known(self, idx: int) -> bool:
        return 0 < idx < len(self.known) and bool(self.known[idx])

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, field: str, item_ids: list[str]) -> list[int]:
        """Indexes of `item_ids`; RequestError naming the field and every id not in the catalogue."""
        unknown = [i for i in dict.fromkeys(item_ids) if i not in self.index]
        if unknown:
            shown = ", ".join(repr(shorten(u)) for u in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise RequestError(field, f"{len(unknown)} item id(s) not in the catalogue: {shown}", unknown)
        return [self.index[i] for i in item_ids]

    def item(self, idx: int) -> dict:
        return {
            "item_id": self.ids[idx],
            "title": self.titles[idx],
            "year": self.years[idx],
            "genres": self.genres[idx],
            "known_to_encoder": self.is_known(idx),
        }

    def search(self, query: str, limit: int, popularity: np.ndarray) -> list[int]:
        """Items whose title contains `query` (case-insensitive), most popular first, then by title."""
        q = query.casefold().strip()
        hits = [i for i in range(1, len(self.ids)) if self.ids[i] and q in self.titles[i].casefold()]
        pop = lambda i: float(popularity[i]) if i < len(popularity) else 0.0  # noqa: E731
        hits.sort(key=lambda i: (-pop(i), self.titles[i].casefold(), i))
        return hits[:limit]


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Encoder:
    """The ONNX ID encoder and its item table, read once; top-k over the whole table in numpy."""

    def __init__(self, onnx_dir: Path, rows: int, threads: int = 1):
        from components.export import META, load_onnx_config, make_session, onnx_providers

        if not (onnx_dir / META).exists():
            raise ModelError(f"{onnx_dir / META}: not found (the stored model lacks its ONNX encoder)")
        meta = load_onnx_config(onnx_dir)
        self.max_len = meta.max_length
        self.input = meta.input
        self.session = make_session(onnx_dir / "encoder.onnx", threads, onnx_providers())
        self.providers = self.session.get_providers()
        probe = {self.input: np.ones((1, 1), np.int64)}
        _, table = self.session.run(["user_vector", "item_embeddings"], probe)
        if table.shape[0] != rows:
            raise ModelError(
                f"{onnx_dir}: item table has {table.shape[0] - 1} items, items.parquet's index {rows - 1}"
            )
        self.table_t = np.ascontiguousarray(table.T, dtype=np.float32)  # [D, N+1]

    def scores(self, history: list[int]) -> np.ndarray:
        """Scores [N+1] of every item for one history of known items (oldest first)."""
        tail = np.asarray(history[-self.max_len :], dtype=np.int64)[None, :]
        (user,) = self.session.run(["user_vector"], {self.input: tail})
        return user[0] @ self.table_t


def top_k(scores: np.ndarray, exclude: set[int], k: int) -> list[int]:
    """Indexes of the k best scores, skipping column 0 (padding) and `exclude`; ties by lower index."""
    s = scores.astype(np.float64, copy=True)
    s[0] = -np.inf
    for i in exclude:
        if i < len(s):
            s[i] = -np.inf
    k = min(k, int(np.isfinite(s).sum()))
    if k <= 0:
        return []
    part = np.argpartition(-s, k - 1)[:k]
    return sorted(part.tolist(), key=lambda i: (-s[i], i))


def popularity(sample_users: Path, size: int) -> np.ndarray:
    """How often each index 1..size-1 appears in the sample users' histories and targets."""
    counts = np.zeros(size, dtype=np.float64)
    if not sample_users.exists():
        return counts
    df = pd.read_parquet(sample_users, columns=["history", "target"])
    flat = np.concatenate(
        [
            np.concatenate([np.asarray(h, np.int64) for h in df["history"]] or [[]]),
            df["target"].to_numpy(np.int64),
        ]
    ).astype(np.int64)
    flat = flat[(flat > 0) & (flat < size)]
    np.add.at(counts, flat, 1.0)
    return counts


class Reranker:
    """The LLM (base + merged LoRA + projector + score head) and its prompt builder over the catalogue.

    Scores exactly as the evaluation does (components.llm.rank.score_users, the same dtype rule), in the
    model's ranking mode: `head` (format-2 models) or `likelihood` (older bundles)."""

    def __init__(
        self, base_dir: Path, stage_dir: Path, catalogue: Catalogue, device: str = "auto", dtype: str = "auto"
    ):
        from components.llm.loading import load_ranker, make_builder

        self.model, self.tok, self.cfg = load_ranker(base_dir, stage_dir, device, dtype)
        stage = self.cfg.stage
        self.dtype = self.cfg.dtype
        if stage.n_id_items > catalogue.rows - 1:
            raise ModelError(
                f"{stage_dir}: LLM has {stage.n_id_items} ID items, "
                f"items.parquet's index {catalogue.rows - 1}"
            )
        if stage.history_len is None:
            raise ModelError(f"{stage_dir}/config.json: history_len missing (a stage folder always has one)")
        self.history_len = stage.history_len
        self.mode = stage.mode
        self.rank_mode = self.cfg.rank
        self.catalogue = catalogue
        self.device = str(self.model.item_table.device)
        self.builder = make_builder(self.tok, catalogue.titles, self.cfg)

    def job(self, history: list[int], candidates: list[int]) -> tuple:
        """One request's inputs: (prompt history, candidates, SASRec prefix = the known history items)."""
        known = [i for i in history if self.catalogue.is_known(i)]
        return history[-self.history_len :], list(candidates), known

    def tokens(self, job: tuple) -> int:
        """Tokens one request puts through the LLM: its prompt (+ every answer when ranking by likelihood)."""
        hist, cands, _ = job
        n = len(self.builder.prompt(hist, cands).ids)
        if self.rank_mode != "head":
            n += sum(len(self.builder.answer_ids(int(c))) for c in cands)
        return n

    def score_jobs(self, jobs: list[tuple]) -> list[list[float]]:
        """One batched forward for several requests -> each request's candidate scores."""
        from components.llm.rank import score_users

        hists, cands, prefixes = (list(x) for x in zip(*jobs, strict=True))
        scores, _, _ = score_users(self.model, self.builder, self.cfg, hists, cands, prefixes)
        return [scores[b, : len(c)].tolist() for b, c in enumerate(cands)]


class Engine:
    """Everything one stored model serves; loaded once at startup, read-only afterwards."""

    def __init__(
        self,
        model_dir: Path,
        base_dir: Path,
        info: dict,
        *,
        device: str = "auto",
        dtype: str = "auto",
        onnx_threads: int = 1,
    ):
        model_dir, base_dir = Path(model_dir), Path(base_dir)
        t0 = time.perf_counter()
        self.info = info
        self.catalogue = Catalogue.load(model_dir)
        self.encoder = Encoder(model_dir / ONNX_DIR, self.catalogue.rows, onnx_threads)
        self.reranker = Reranker(base_dir, model_dir / LLM_DIR, self.catalogue, device, dtype)
        self.popularity = popularity(model_dir / "sample_users.parquet", len(self.catalogue.ids))
        self.sample_users = _read_sample_users(model_dir / "sample_users.parquet")
        self.load_seconds = round(time.perf_counter() - t0, 2)

    # -------------------------------------------------------------------------------- requests

    def parse_history(self, history: list[str]) -> tuple[list[int], list[str]]:
        """Indexes of the history (4xx naming unknown ids) and the ids the encoder does not know."""
        idx = self.catalogue.lookup("history", history)
        cold = [
            self.catalogue.ids[i] for i in dict.fromkeys(i for i in idx if not self.catalogue.is_known(i))
        ]
        return idx, cold

    def retrieve(self, idx: list[int], n: int) -> tuple[list[int], list[float], str]:
        """The top n items (indexes, scores) by the encoder, or by popularity for an all-cold history."""
        known = [i for i in idx if self.catalogue.is_known(i)]
        exclude = set(idx)
        if known:
            scores = self.encoder.scores(known)
            how = "encoder"
        else:
            scores = self.popularity[: self.catalogue.rows]
            how = "popularity"
        # only items with a trained row are retrieved (others are cold: a request may still name them)
        scores = np.where(self.catalogue.known[: self.catalogue.rows], scores, -np.inf)
        top = top_k(scores, exclude, n)
        return top, [float(scores[i]) for i in top], how

    async def retrieve_async(self, idx: list[int], n: int) -> tuple[list[int], list[float], str]:
        """`retrieve` in a worker thread: a slow ONNX run never stalls the event loop."""
        return await anyio.to_thread.run_sync(self.retrieve, idx, n)

    def parse_candidates(self, candidates: list[str]) -> list[int]:
        dupes = [c for c in dict.fromkeys(candidates) if candidates.count(c) > 1]
        if dupes:
            shown = ", ".join(repr(shorten(d)) for d in dupes[:20])
            raise RequestError("candidates", f"duplicate item id(s): {shown}", dupes)
        return self.catalogue.lookup("candidates", candidates)

    def rank(self, cands: list[int], scores: list[float]) -> list[tuple[int, float]]:
        """Candidates by score, best first (stable: ties keep the given order)."""
        order = sorted(range(len(cands)), key=lambda j: -scores[j])
        return [(cands[j], float(scores[j])) for j in order]

    def items(self, ranked: list[tuple[int, float]]) -> list[dict]:
        c = self.catalogue
        return [{"item_id": c.ids[i], "title": c.titles[i], "score": round(s, 6)} for i, s in ranked]

    def metadata(self) -> dict:
        return {
            **self.info,
            "items_known_to_encoder": self.catalogue.n_known,
            "catalogue_items": len(self.catalogue),
            "llm_mode": self.reranker.mode,
            "llm_device": self.reranker.device,
            "llm_dtype": self.reranker.dtype,
            "llm_rank": self.reranker.rank_mode,
            "history_len": self.reranker.history_len,
            "onnx_providers": self.encoder.providers,
            "load_seconds": self.load_seconds,
        }


def _read_sample_users(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame({"user_idx": [], "history": [], "target": []})
    return pd.read_parquet(path, columns=["user_idx", "history", "target"]).sort_values("user_idx")
