"""ASGI middleware in front of every route: request size and content-type limits, one log line per request.

- A body over `max_bytes` (by Content-Length, or counted while reading a chunked body) is a 413 naming the
  limit, before any handler runs; a POST whose Content-Type is not JSON (or that has two Content-Type
  or Content-Length headers) is a 415 (400) naming the header.
- A body that trickles in (slow loris) is a 408: no bytes for `idle_s`, or not complete after `body_s`.
- Once the body is read, the guard watches the connection: a client that hangs up before its answer
  has started cancels the handler (a queued LLM job leaves the queue unscored); logged as status=499.
- After each request one line goes to the `rsllm.serving` logger: method, path (control characters
  percent-escaped, so a `%0A` cannot forge a line), status, latency, the model version, and whatever the
  handler added to `request_log()` (rerank on/off, k, retrieval, ...).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from urllib.parse import quote

import anyio

logger = logging.getLogger("rsllm.serving")
_LOG: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rsllm_request_log", default=None)
QUIET_PATHS = {"/livez", "/readyz", "/healthz", "/metrics"}
CLIENT_GONE = 499  # logged (and counted in /metrics) for a request whose client hung up; never sent
MAX_LOGGED_PATH = 200


class _NoValidationTracebacks(logging.Filter):
    """BentoML logs a traceback for every request body that fails validation; our line says it already."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ValidationError)


def setup_logging() -> None:
    """Our own handler (BentoML configures only its loggers): one plain line per request to stderr."""
    bentoml_http = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _NoValidationTracebacks) for f in bentoml_http.filters):
        bentoml_http.addFilter(_NoValidationTracebacks())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def request_log() -> dict:
    """The current request's log fields (a throwaway dict outside a request)."""
    fields = _LOG.get()
    return fields if fields is not None else {}


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.1f}"
    return safe_text(str(v))


def safe_text(text: str, limit: int = MAX_LOGGED_PATH) -> str:
    """`text` for one log line: control characters, spaces and non-ASCII percent-escaped, cut to limit."""
    out = quote(text, safe="/:@!$&'()*+,;=-._~[]{}\"<>|^`#?%")
    return out if len(out) <= limit else out[:limit] + "..."


async def _reply(send, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:  # the rest of the body is never read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """See the module docstring. `json_paths`: POST routes that take a JSON body."""

    def __init__(
        self,
        app,
        max_bytes: int = 65536,
        model_version: str = "",
        json_paths: tuple = (),
        idle_s: float = 10.0,
        body_s: float = 30.0,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.model_version = model_version
        self.json_paths = set(json_paths)
        self.idle_s = idle_s
        self.body_s = body_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        fields: dict = {}
        token = _LOG.set(fields)
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._check_headers(scope)
            body = None
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(receive)
            if refusal is not None:
                fields.update(error=refusal[1]["field"])
                await _reply(send_status, *refusal, close=refusal[0] in (408, 413))
            elif body is not None:
                await self._run_watched(scope, body, receive, send_status, status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            _LOG.reset(token)
            method, path = safe_text(str(scope.get("method"))), safe_text(scope.get("path", ""))
            ms = (time.perf_counter() - t0) * 1000
            line = " ".join(
                [
                    f"{method} {path} status={status['code']} latency_ms={ms:.1f}",
                    f"model={self.model_version}",
                    *(f"{k}={_value(v)}" for k, v in fields.items()),
                ]
            )
            logger.log(logging.DEBUG if path in QUIET_PATHS else logging.INFO, line)

    async def _run_watched(self, scope, body: bytes, receive, send, status: dict) -> None:
        """The app with `body` replayed, cancelled if the client disconnects before the answer starts."""
        gone = anyio.Event()
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # later calls (e.g. a disconnect listener) hear what the watcher heard
            return {"type": "http.disconnect"}

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()
                if not status.get("started"):
                    tg.cancel_scope.cancel()

            async def started_send(message) -> None:
                if message["type"] == "http.response.start":
                    status["started"] = True
                await send(message)

            tg.start_soon(watch)
            await self.app(scope, replay, started_send)
            tg.cancel_scope.cancel()
        if gone.is_set() and not status.get("started"):  # cancelled: nothing reaches the client
            request_log().update(cancelled="client_gone")
            await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    def _check_headers(self, scope) -> tuple[int, dict] | None:
        raw = scope.get("headers") or []
        for name in (b"content-type", b"content-length"):
            if sum(1 for k, _ in raw if k.lower() == name) > 1:
                return (415 if name == b"content-type" else 400), {
                    "error": f"{name.decode().title()}: more than one header; send exactly one",
                    "field": name.decode().title(),
                }
        headers = {k.lower(): v for k, v in raw}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return 400, {"error": "Content-Length: not an integer", "field": "Content-Length"}
            if n > self.max_bytes:
                return 413, {
                    "error": f"request body: {n} bytes > the limit of {self.max_bytes} bytes",
                    "field": "body",
                }
        if scope["method"] == "POST" and scope.get("path") in self.json_paths:
            ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
            if ctype and not (ctype == b"application/json" or ctype.endswith(b"+json")):
                return 415, {
                    "error": f"Content-Type: {ctype.decode(errors='replace')!r} is not supported; "
                    "send application/json",
                    "field": "Content-Type",
                }
        return None

    async def _read_body(self, receive) -> tuple[bytes, tuple[int, dict] | None]:
        """The whole body, or a refusal: 413 over the limit, 408 idle or too slow, 400 client gone."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_s
        while True:
            wait = min(self.idle_s, deadline - time.monotonic())
            message = None
            with anyio.move_on_after(max(wait, 0)):
                message = await receive()
            if message is None:
                return b"", (
                    408,
                    {
                        "error": f"request body: no bytes for {self.idle_s:g} s, or not complete "
                        f"after {self.body_s:g} s",
                        "field": "body",
                    },
                )
            if message["type"] == "http.disconnect":
                return b"", (400, {"error": "client disconnected", "field": "body"})
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", (
                    413,
                    {
                        "error": f"request body: more than the limit of {self.max_bytes} bytes",
                        "field": "body",
                    },
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None
