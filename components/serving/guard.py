"""ASGI middleware in front of every route: request size and content-type limits, one log line per request.

- A body over `max_bytes` (by Content-Length, or counted while reading a chunked body) is a 413 naming the
  limit, before any handler runs; a POST whose Content-Type is not JSON is a 415 naming the header.
- After each request one line goes to the `rsllm.serving` logger: method, path, status, latency, the
  model version, and whatever the handler added to `request_log()` (rerank on/off, k, retrieval, ...).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

logger = logging.getLogger("rsllm.serving")
_LOG: contextvars.ContextVar[dict | None] = contextvars.ContextVar("rsllm_request_log", default=None)
QUIET_PATHS = {"/livez", "/readyz", "/healthz", "/metrics"}


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
    return str(v)


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """See the module docstring. `json_paths`: POST routes that take a JSON body."""

    def __init__(self, app, max_bytes: int = 65536, model_version: str = "", json_paths: tuple = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.model_version = model_version
        self.json_paths = set(json_paths)

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
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(receive)
                if refusal is None:
                    receive = _replay(body, receive)
            if refusal is not None:
                fields.update(error=refusal[1]["field"])
                await _reply(send_status, *refusal)
            else:
                await self.app(scope, receive, send_status)
        finally:
            _LOG.reset(token)
            path = scope.get("path", "")
            ms = (time.perf_counter() - t0) * 1000
            line = " ".join(
                [
                    f"{scope.get('method')} {path} status={status['code']} latency_ms={ms:.1f}",
                    f"model={self.model_version}",
                    *(f"{k}={_value(v)}" for k, v in fields.items()),
                ]
            )
            logger.log(logging.DEBUG if path in QUIET_PATHS else logging.INFO, line)

    def _check_headers(self, scope) -> tuple[int, dict] | None:
        headers = dict(scope.get("headers") or [])
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
        chunks, size = [], 0
        while True:
            message = await receive()
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


def _replay(body: bytes, original):
    """The body read above as one message; later calls wait on the client (e.g. for its disconnect)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
