"""The service's limits and performance settings: `RSLLM_*` environment variables, read once at startup.

| variable | default | what a client gets beyond it |
|---|---|---|
| RSLLM_MAX_BODY_BYTES | 65536 | 413 (by Content-Length, or counted while reading a chunked body) |
| RSLLM_BODY_IDLE_S | 10 | 408 when no body bytes arrive for this long (slow loris) |
| RSLLM_BODY_TIMEOUT_S | 30 | 408 when the whole body has not arrived within this |
| RSLLM_LLM_QUEUE | 16 | 503 + Retry-After at once: LLM requests admitted (waiting or running) |
| RSLLM_MAX_RERANK_TOKENS | 2048 | 422 naming `candidates`: tokens of one rerank prompt (+ answers) |
| RSLLM_RERANK_BATCH | 8 on CUDA, 1 on CPU | reranks per forward (queued ones wait) |
| RSLLM_TORCH_THREADS | cores - 1 | |
| RSLLM_DEVICE, RSLLM_LLM_DTYPE | auto | |

A value that is not a number in range is a ConfigError naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from components.errors import ConfigError

MAX_CONCURRENCY = 128  # BentoML's traffic.max_concurrency (every route): 429 beyond it


def _number(name: str, default: float, kind: type = int, low: float = 0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: not a {kind.__name__}") from None
    if value < low:
        raise ConfigError(f"{name}={raw!r}: must be >= {low}")
    return value


@dataclass(frozen=True)
class ServingSettings:
    max_body_bytes: int = 65536
    body_idle_s: float = 10.0
    body_timeout_s: float = 30.0
    llm_queue: int = 16
    max_rerank_tokens: int = 2048
    rerank_batch: int = 0  # 0: 8 on CUDA, 1 on CPU
    torch_threads: int = 0  # 0: cores - 1
    device: str = "auto"
    dtype: str = "auto"

    @classmethod
    def from_env(cls) -> ServingSettings:
        """The settings from the environment; ConfigError naming a bad variable."""
        s = cls(
            max_body_bytes=int(_number("RSLLM_MAX_BODY_BYTES", cls.max_body_bytes, low=1)),
            body_idle_s=_number("RSLLM_BODY_IDLE_S", cls.body_idle_s, float, low=0.01),
            body_timeout_s=_number("RSLLM_BODY_TIMEOUT_S", cls.body_timeout_s, float, low=0.01),
            llm_queue=int(_number("RSLLM_LLM_QUEUE", cls.llm_queue, low=1)),
            max_rerank_tokens=int(_number("RSLLM_MAX_RERANK_TOKENS", cls.max_rerank_tokens, low=1)),
            rerank_batch=int(_number("RSLLM_RERANK_BATCH", cls.rerank_batch)),
            torch_threads=int(_number("RSLLM_TORCH_THREADS", cls.torch_threads)),
            device=os.environ.get("RSLLM_DEVICE", "auto"),
            dtype=os.environ.get("RSLLM_LLM_DTYPE", "auto"),
        )
        if s.llm_queue >= MAX_CONCURRENCY // 2:
            raise ConfigError(
                f"RSLLM_LLM_QUEUE={s.llm_queue}: must be below {MAX_CONCURRENCY // 2} (half of "
                f"max_concurrency {MAX_CONCURRENCY}), so retrieval and lookups always find a slot"
            )
        return s
