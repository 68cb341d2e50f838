"""The BentoML service: ONNX retrieval over the whole catalogue, LLM rerank, lookups and a small UI.

    bentoml serve components.serving.service:RsllmService --port 3000

Loads the production model (components.serving.production) once at startup; nothing is loaded or
reloaded during a request, and every answer names the model version that produced it. Limits
(components.serving.settings): LLM requests beyond the LLM queue get 503 + Retry-After at once, so
retrieval and lookups keep their share of BentoML's max_concurrency; retrieval runs off the event loop.

POST /recommend, /score      BentoML APIs (pydantic bodies: a bad request is a 4xx naming the field)
GET  /model, /items/{id}, /items?q=, /sample_users, /ui      a FastAPI app mounted on the service
GET  /livez, /readyz, /metrics, /docs.json, /     BentoML's health, Prometheus metrics, OpenAPI, Swagger UI
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import bentoml
from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from starlette.responses import HTMLResponse, JSONResponse

from components import registry
from components.errors import RequestError
from components.serving import production
from components.serving.batching import BatchQueue, QueueFull
from components.serving.engine import Engine, shorten
from components.serving.guard import RequestGuard, logger, request_log, setup_logging
from components.serving.schemas import (
    MAX_ID_CHARS,
    Item,
    RecommendRequest,
    RecommendResponse,
    SampleUser,
    ScoreRequest,
    ScoreResponse,
    Timings,
)
from components.serving.settings import MAX_CONCURRENCY, ServingSettings

PRODUCTION = production.resolve()
SETTINGS = ServingSettings.from_env()
UI_PAGE = (Path(__file__).parent / "ui.html").read_text()

extras = FastAPI(title="rsllm", docs_url=None, redoc_url=None, openapi_url=None)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _error(e: RequestError) -> JSONResponse:
    request_log().update(status_reason=e.field)
    return JSONResponse(
        {"error": str(e), "field": e.field, "values": [shorten(v) for v in e.values[:20]]},
        status_code=e.status,
    )


def _busy(e: QueueFull) -> JSONResponse:
    """503 at once, with Retry-After: the LLM queue is full (retrieval-only requests still answer)."""
    request_log().update(llm="refused")
    return JSONResponse(
        {
            "error": f"{e}; retry after {e.retry_after} s, or ask for rerank: false (retrieval only)",
            "field": "rerank",
            "values": [],
        },
        status_code=503,
        headers={"Retry-After": str(e.retry_after)},
    )


@bentoml.asgi_app(extras, path="/")
@bentoml.service(
    name="rsllm",
    workers=1,
    traffic={"timeout": 120, "max_concurrency": MAX_CONCURRENCY},
    logging={"access": {"enabled": False}},  # our RequestGuard writes one line per request instead
)
class RsllmService:
    """RSLLM recommendations: the ID encoder retrieves from the whole catalogue, the LLM reranks."""

    model_ref = bentoml.models.BentoModel(PRODUCTION.model_tag)
    base_ref = bentoml.models.BentoModel(PRODUCTION.base_tag)

    def __init__(self) -> None:
        import torch

        setup_logging()
        # one core stays free for the event loop and retrieval while the LLM runs
        threads = SETTINGS.torch_threads or max(1, len(os.sched_getaffinity(0)) - 1)
        torch.set_num_threads(threads)
        model, base = self.model_ref, self.base_ref
        # ModelError (the service does not start) when the bundle is from a newer rsllm or invalid
        config = registry.bundle_config(model)
        verified = registry.verify_model(model)  # RegistryError naming a changed file; False: no checksums
        info = {
            "model_version": str(model.tag),
            "base_version": str(base.tag),
            "data_version": config.data_version,
            "created": model.info.creation_time.isoformat(timespec="seconds"),
            "git_commit": config.git_commit,
            "profile": config.profile,
            "metrics": config.metrics,
            # bundles from before the rerank rule carry no default: retrieval only (bundle_config's v0)
            "rerank_default": config.rerank_default,
            "rerank_reason": config.rerank_reason,
            "source": PRODUCTION.source,
            "verified": verified,
        }
        self.engine = Engine(
            Path(model.path),
            Path(base.path),
            info,
            device=SETTINGS.device,
            dtype=SETTINGS.dtype,
        )
        cuda = self.engine.reranker.device.startswith("cuda")
        max_batch = SETTINGS.rerank_batch or (8 if cuda else 1)
        self.queue = BatchQueue(self.engine.reranker.score_jobs, max_batch, SETTINGS.llm_queue)
        self.version = str(model.tag)
        self.data_version = config.data_version
        self._warm_up()
        logger.info(
            "serving %s (base %s, data %s) from %s: %d encoder items, %d catalogue items, LLM on %s "
            "(%s, %s, %d threads), ONNX %s, rerank batch <= %d, LLM queue <= %d, rerank <= %d tokens, "
            "loaded in %.1f s",
            self.version,
            base.tag,
            self.data_version,
            PRODUCTION.source,
            self.engine.catalogue.n_known,
            len(self.engine.catalogue),
            self.engine.reranker.device,
            self.engine.reranker.mode,
            self.engine.reranker.dtype,
            threads,
            self.engine.encoder.providers,
            max_batch,
            SETTINGS.llm_queue,
            SETTINGS.max_rerank_tokens,
            self.engine.load_seconds,
        )

    def _warm_up(self) -> None:
        """One retrieval and one rerank before the service reports ready (first calls are slow)."""
        c = self.engine.catalogue
        first = c.ids[next(i for i in range(1, len(c.ids)) if c.is_known(i))]
        idx, _ = self.engine.parse_history([first])
        top, _, _ = self.engine.retrieve(idx, 20)
        self.queue.run_now([self.engine.reranker.job(idx, top or idx)])

    def __is_ready__(self) -> bool:
        return self.engine is not None

    async def _llm_scores(self, idx: list[int], cands: list[int]) -> list[float]:
        """The LLM's scores of `cands` after the history: RequestError (422) over the token bound,
        QueueFull (503) when the LLM queue is full; cancelled with the request (client gone)."""
        job = self.engine.reranker.job(idx, cands)
        tokens = self.engine.reranker.tokens(job)
        if tokens > SETTINGS.max_rerank_tokens:
            raise RequestError(
                "candidates",
                f"the rerank prompt is {tokens} tokens, above the limit of {SETTINGS.max_rerank_tokens} "
                "(RSLLM_MAX_RERANK_TOKENS); ask for fewer candidates",
                status=422,
            )
        scores = await self.queue.submit(job)
        request_log().update(llm="scored")
        return scores

    # ----------------------------------------------------------------------------- BentoML APIs

    @bentoml.api(route="/recommend")
    async def recommend(self, request: RecommendRequest, /) -> RecommendResponse:
        """Top k items of the whole catalogue for a history (newest last); the LLM reranks the encoder's
        top `candidates` unless rerank is false."""
        t0 = time.perf_counter()
        log = request_log()
        rerank = self.engine.info["rerank_default"] if request.rerank is None else request.rerank
        log.update(api="recommend", rerank=rerank, k=request.k, history=len(request.history))
        try:
            idx, cold = self.engine.parse_history(request.history)
        except RequestError as e:
            return _error(e)
        n = max(request.candidates, request.k) if rerank else request.k
        if rerank:
            try:
                self.queue.admit()  # a full LLM queue refuses before any retrieval work
            except QueueFull as e:
                return _busy(e)
        top, scores, how = await self.engine.retrieve_async(idx, n)
        retrieval_ms = _ms(t0)
        t1 = time.perf_counter()
        if rerank and top:
            try:
                llm_scores = await self._llm_scores(idx, top)
            except RequestError as e:
                return _error(e)
            except QueueFull as e:
                return _busy(e)
            ranked = self.engine.rank(top, llm_scores)[: request.k]
        else:
            ranked = list(zip(top, scores, strict=True))[: request.k]
        rerank_ms = _ms(t1) if rerank else 0.0
        log.update(retrieval=how, cold=len(cold))
        return RecommendResponse(
            items=self.engine.items(ranked),
            model_version=self.version,
            data_version=self.data_version,
            rerank=rerank,
            retrieval=how,
            cold_items=cold,
            timings=Timings(retrieval_ms=retrieval_ms, rerank_ms=rerank_ms, total_ms=_ms(t0)),
        )

    @bentoml.api(route="/score")
    async def score(self, request: ScoreRequest, /) -> ScoreResponse:
        """Explicit candidates (catalogue ids) ranked by the LLM after the history, best first."""
        t0 = time.perf_counter()
        request_log().update(
            api="score", rerank=True, candidates=len(request.candidates), history=len(request.history)
        )
        try:
            idx, cold = self.engine.parse_history(request.history)
            cands = self.engine.parse_candidates(request.candidates)
            llm_scores = await self._llm_scores(idx, cands)
        except RequestError as e:
            return _error(e)
        except QueueFull as e:
            return _busy(e)
        return ScoreResponse(
            items=self.engine.items(self.engine.rank(cands, llm_scores)),
            model_version=self.version,
            data_version=self.data_version,
            cold_items=cold,
            timings=Timings(rerank_ms=_ms(t0), total_ms=_ms(t0)),
        )

    # ------------------------------------------------------------------- lookups and the UI page

    @extras.get("/model", tags=["rsllm"], summary="The served model's metadata")
    def model_info(self) -> dict:
        limits = {
            "max_concurrency": MAX_CONCURRENCY,
            "llm_queue": SETTINGS.llm_queue,
            "rerank_batch": self.queue.max_batch,
            "max_rerank_tokens": SETTINGS.max_rerank_tokens,
            "max_body_bytes": SETTINGS.max_body_bytes,
            "body_idle_s": SETTINGS.body_idle_s,
            "body_timeout_s": SETTINGS.body_timeout_s,
        }
        return {**self.engine.metadata(), "limits": limits}

    @extras.get("/items/{item_id}", tags=["rsllm"], summary="One catalogue item by id")
    def item(self, item_id: str = PathParam(min_length=1, max_length=MAX_ID_CHARS)) -> Item:
        i = self.engine.catalogue.index.get(item_id)
        if i is None:
            raise HTTPException(404, detail=f"item_id {shorten(item_id)!r}: not in the catalogue")
        return Item(**self.engine.catalogue.item(i))

    @extras.get("/items", tags=["rsllm"], summary="Catalogue items whose title contains q")
    def search(
        self,
        q: str = Query(min_length=1, max_length=200, description="title substring, case-insensitive"),
        limit: int = Query(20, ge=1, le=100),
    ) -> list[Item]:
        hits = self.engine.catalogue.search(q, limit, self.engine.popularity)
        return [Item(**self.engine.catalogue.item(i)) for i in hits]

    @extras.get("/sample_users", tags=["rsllm"], summary="Users of the test split, for trying the service")
    def sample_users(
        self, limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)
    ) -> list[SampleUser]:
        c, rows = self.engine.catalogue, self.engine.sample_users.iloc[offset : offset + limit]
        return [
            SampleUser(
                user_idx=int(r.user_idx),
                history=[Item(**c.item(int(i))) for i in r.history if c.is_known(int(i))],
                target=Item(**c.item(int(r.target))) if c.is_known(int(r.target)) else None,
            )
            for r in rows.itertuples()
        ]

    @extras.get("/ui", response_class=HTMLResponse, tags=["rsllm"], summary="A page to try recommendations")
    def ui(self) -> HTMLResponse:
        return HTMLResponse(UI_PAGE)


RsllmService.add_asgi_middleware(
    RequestGuard,
    max_bytes=SETTINGS.max_body_bytes,
    model_version=PRODUCTION.model_tag,
    json_paths=("/recommend", "/score"),
    idle_s=SETTINGS.body_idle_s,
    body_s=SETTINGS.body_timeout_s,
)
