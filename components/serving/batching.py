"""Adaptive batching of LLM work inside one service process.

BentoML's own adaptive batching (`@bentoml.api(batchable=True)`) batches requests whose bodies are
already batches (a list per request); our requests are one user each, with a JSON object body. So the
reranks are batched here the same way: requests that arrive while the LLM is busy wait in a queue, and
the next forward takes up to `max_batch` of them at once (the batch size follows the load; an idle
service runs each request alone, with no added wait). The LLM runs in one dedicated thread, so the event
loop (and retrieval-only requests) never waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class BatchQueue:
    """`await queue.submit(job)` -> fn([job, ...])[i], with jobs grouped by arrival while fn is busy."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 1):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        self.fn = fn
        self.max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._running = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsllm-llm")
        self.batches: list[int] = []  # sizes of the last batches run (for tests and metrics)

    async def submit(self, job: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((job, fut))
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await fut

    def run_now(self, jobs: list[Any]) -> list[Any]:
        """Synchronous call on the same thread as queued work (startup warm-up)."""
        return self._executor.submit(self.fn, jobs).result()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                batch = [(job, fut) for job, fut in batch if not fut.done()]  # cancelled while waiting
                if not batch:
                    continue
                self.batches = [*self.batches[-99:], len(batch)]
                try:
                    results = await loop.run_in_executor(self._executor, self.fn, [job for job, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to every waiting request
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
