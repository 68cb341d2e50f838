"""Adaptive batching and admission control of LLM work inside one service process.

BentoML's own adaptive batching (`@bentoml.api(batchable=True)`) batches requests whose bodies are
already batches (a list per request); our requests are one user each, with a JSON object body. So the
reranks are batched here the same way: requests that arrive while the LLM is busy wait in a queue, and
the next forward takes up to `max_batch` of them at once (the batch size follows the load; an idle
service runs each request alone, with no added wait). The LLM runs in one dedicated thread, so the event
loop (and retrieval-only requests) never waits for it.

- Admission: at most `max_queue` jobs are admitted (waiting or running); beyond it `submit` raises
  `QueueFull` at once, with a Retry-After estimate (the service answers 503).
- Cancellation: a request cancelled while waiting (its client hung up) leaves the queue before it is
  scored; a forward already running finishes and its result is dropped.
- Errors are per request: when a batch of several fails, each job is run again alone, so only the
  failing request gets the error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """The LLM queue holds `max_queue` requests already; retry after `retry_after` seconds."""

    def __init__(self, max_queue: int, retry_after: int):
        super().__init__(f"the LLM queue is full ({max_queue} requests waiting or running)")
        self.max_queue = max_queue
        self.retry_after = retry_after


class BatchQueue:
    """`await queue.submit(job)` -> fn([job, ...])[i], with jobs grouped by arrival while fn is busy."""

    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 1, max_queue: int = 1 << 30):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 (got {max_batch}, {max_queue})")
        self.fn = fn
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_forward = 0
        self._running = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsllm-llm")
        self._seconds = 0.5  # moving average of one forward (for Retry-After)
        self.batches: list[int] = []  # sizes of the last batches run (for tests and metrics)
        self.counts = {"scored": 0, "cancelled": 0, "refused": 0, "failed": 0}

    @property
    def admitted(self) -> int:
        """Jobs waiting or in the running forward."""
        return len(self._pending) + self._in_forward

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch's worth (at least 1)."""
        batches = math.ceil(self.admitted / self.max_batch)
        return max(1, math.ceil(batches * self._seconds))

    def admit(self) -> None:
        """QueueFull when no more jobs can be admitted (callers check before costly preparation)."""
        if self.admitted >= self.max_queue:
            self.counts["refused"] += 1
            raise QueueFull(self.max_queue, self.retry_after())

    async def submit(self, job: Any) -> Any:
        self.admit()
        loop = asyncio.get_running_loop()
        entry = (job, loop.create_future())
        self._pending.append(entry)
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        try:
            return await entry[1]
        except asyncio.CancelledError:  # the request was cancelled (client gone): never scored
            if entry in self._pending:
                self._pending.remove(entry)
            self.counts["cancelled"] += 1
            raise

    def run_now(self, jobs: list[Any]) -> list[Any]:
        """Synchronous call on the same thread as queued work (startup warm-up)."""
        return self._executor.submit(self.fn, jobs).result()

    def _run(self, jobs: list[Any]) -> list[Any]:
        """fn over the batch; if it fails, each job alone (an Exception in place of a failed result)."""
        t0 = time.perf_counter()
        try:
            results = self.fn(jobs)
        except Exception as e:  # noqa: BLE001 - isolated below, handed to the failing request only
            if len(jobs) == 1:
                return [e]
            return [self._run([job])[0] for job in jobs]
        self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - t0)
        return results

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
                self._in_forward = len(batch)
                try:
                    results = await loop.run_in_executor(self._executor, self._run, [j for j, _ in batch])
                finally:
                    self._in_forward = 0
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Exception):
                        self.counts["failed"] += 1
                        fut.set_exception(result)
                    else:
                        self.counts["scored"] += 1
                        fut.set_result(result)
        finally:
            self._running = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
