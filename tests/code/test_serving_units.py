"""The service's pure parts: request models, the request guard (limits, deadlines, disconnects, log
line), the batch queue (admission, cancellation, per-request errors), settings, top-k, the catalogue,
dtype choice, and bentofile.yaml's packages against pyproject.toml."""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from components.errors import ConfigError, ModelError, RequestError
from components.llm.base import llm_dtype
from components.serving.batching import BatchQueue, QueueFull
from components.serving.engine import Catalogue, popularity, top_k
from components.serving.guard import RequestGuard, request_log
from components.serving.schemas import RecommendRequest, ScoreRequest
from components.serving.settings import ServingSettings

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- schemas


def test_ids_are_strings_and_integers_are_accepted():
    r = RecommendRequest.model_validate_json('{"history": ["50", 181, 0]}')
    assert r.history == ["50", "181", "0"] and r.k == 10 and r.rerank is None and r.candidates == 20


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"history": []}', "history"),
        ('{"history": [true]}', "history"),
        ('{"history": [1.5]}', "history"),
        ('{"history": [-1]}', "history"),
        ('{"history": ["1"], "k": "2"}', "k"),
        ('{"history": ["1"], "k": 0}', "k"),
        ('{"history": ["1"], "rerank": 1}', "rerank"),
        ('{"history": ["1"], "extra": 1}', "extra"),
    ],
)
def test_bad_bodies_name_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        RecommendRequest.model_validate_json(body)
    assert field in {str(loc) for err in e.value.errors() for loc in err["loc"]}


def test_integer_ids_are_bounded():
    with pytest.raises(ValidationError) as e:
        RecommendRequest.model_validate_json('{"history": [' + "9" * 4000 + "]}")
    assert "9" * 50 not in str(e.value.errors(include_input=False))
    assert RecommendRequest.model_validate_json('{"history": [9223372036854775807]}').history == [
        "9223372036854775807"
    ]


def test_k_must_fit_the_reranked_candidates():
    with pytest.raises(ValidationError, match=r"k \(30\) must be <= candidates \(20\)"):
        RecommendRequest.model_validate_json('{"history": ["1"], "k": 30, "rerank": true}')
    # rerank absent: the promoted model's default decides (the service widens the candidates to k)
    assert RecommendRequest.model_validate_json('{"history": ["1"], "k": 30}').rerank is None
    assert RecommendRequest.model_validate_json('{"history": ["1"], "k": 30, "rerank": false}').k == 30
    with pytest.raises(ValidationError):
        ScoreRequest.model_validate_json('{"history": ["1"], "candidates": []}')


# --------------------------------------------------------------------------------------------- guard


async def _echo(scope, receive, send):
    """A tiny ASGI app: echoes the body length; adds a field to the request's log line."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    request_log().update(api="echo", rerank=True)
    data = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": data})


def _guarded(**kw) -> httpx.AsyncClient:
    app = RequestGuard(_echo, max_bytes=100, model_version="rsllm:test", json_paths=("/recommend",), **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_guard_limits_size_and_content_type_and_logs_one_line(caplog):
    async def go():
        async with _guarded() as c:
            ok = await c.post("/recommend", content=b"x" * 100, headers={"content-type": "application/json"})
            big = await c.post("/recommend", content=b"x" * 101)

            async def chunks():
                for _ in range(3):
                    yield b"x" * 60

            chunked = await c.post("/recommend", content=chunks())
            form = await c.post(
                "/recommend", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}
            )
            other = await c.post("/other", content=b"a=1", headers={"content-type": "text/plain"})
            return ok, big, chunked, form, other

    with caplog.at_level(logging.INFO, logger="rsllm.serving"):
        ok, big, chunked, form, other = asyncio.run(go())
    assert ok.status_code == 200 and ok.text == "100"
    assert big.status_code == 413 and big.json()["field"] == "body" and "100 bytes" in big.json()["error"]
    assert chunked.status_code == 413
    assert form.status_code == 415 and form.json()["field"] == "Content-Type"
    assert other.status_code == 200  # only the JSON APIs insist on JSON
    lines = [r.getMessage() for r in caplog.records if r.name == "rsllm.serving"]
    assert len(lines) == 5
    assert re.fullmatch(
        r"POST /recommend status=200 latency_ms=\d+\.\d model=rsllm:test api=echo rerank=true", lines[0]
    )
    assert "status=413" in lines[1] and "error=body" in lines[1]


def test_guard_refuses_two_content_types_and_escapes_the_logged_path(caplog):
    async def go():
        async with _guarded() as c:
            two = await c.post(
                "/recommend",
                content=b"{}",
                headers=[("content-type", "text/plain"), ("content-type", "application/json")],
            )
            forged = await c.get("/x%0A2026-01-01%2000:00:00,000%20INFO%20rsllm.serving:%20forged")
            return two, forged

    with caplog.at_level(logging.INFO, logger="rsllm.serving"):
        two, forged = asyncio.run(go())
    assert two.status_code == 415 and two.json()["field"] == "Content-Type"
    assert forged.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "rsllm.serving"]
    assert len(lines) == 2 and all("\n" not in ln for ln in lines)
    assert lines[1].startswith(
        "GET /x%0A2026-01-01%2000:00:00,000%20INFO%20rsllm.serving:%20forged status=200"
    )


async def _asgi(app, messages: asyncio.Queue, path: str = "/recommend") -> list[dict]:
    """Drive an ASGI app by hand: `messages` feeds receive(); returns what it sent."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-type", b"application/json")],
    }
    await app(scope, messages.get, send)
    return sent


def test_guard_gives_a_trickling_body_408():
    """A slow loris (a body whose bytes stop coming) is refused after the idle deadline, not held."""

    async def go():
        guard = RequestGuard(_echo, json_paths=("/recommend",), idle_s=0.2, body_s=5)
        messages: asyncio.Queue = asyncio.Queue()
        messages.put_nowait({"type": "http.request", "body": b'{"hist', "more_body": True})
        return await asyncio.wait_for(_asgi(guard, messages), timeout=5)

    sent = asyncio.run(go())
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b'"field": "body"' in sent[1]["body"]


def test_a_client_that_hangs_up_leaves_the_llm_queue_unscored(caplog):
    """A request waiting for the LLM whose client disconnects is cancelled and never scored; the
    forward already running finishes."""
    import threading

    release = threading.Event()
    scored: list[list[str]] = []

    def fn(jobs):
        release.wait(timeout=10)
        scored.append(list(jobs))
        return jobs

    async def go():
        queue = BatchQueue(fn, max_batch=1, max_queue=4)

        async def app(scope, receive, send):
            await receive()
            result = await queue.submit(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": result.encode()})

        guard = RequestGuard(app, json_paths=("/a", "/b"))
        first = asyncio.create_task(queue.submit("/warm"))  # occupies the LLM thread
        a_msgs, b_msgs = asyncio.Queue(), asyncio.Queue()
        for m in (a_msgs, b_msgs):
            m.put_nowait({"type": "http.request", "body": b"{}", "more_body": False})
        a = asyncio.create_task(_asgi(guard, a_msgs, "/a"))
        b = asyncio.create_task(_asgi(guard, b_msgs, "/b"))
        while queue.admitted < 3:
            await asyncio.sleep(0.01)
        b_msgs.put_nowait({"type": "http.disconnect"})  # b's client hangs up while b waits
        b_sent = await asyncio.wait_for(b, timeout=5)
        assert queue.admitted == 2  # b left the queue at once
        release.set()
        a_sent = await asyncio.wait_for(a, timeout=10)
        a_msgs.put_nowait({"type": "http.disconnect"})
        await first
        queue.close()
        return a_sent, b_sent, queue.counts

    with caplog.at_level(logging.INFO, logger="rsllm.serving"):
        a_sent, b_sent, counts = asyncio.run(go())
    assert scored == [["/warm"], ["/a"]]  # /b never reached the LLM
    assert a_sent[0]["status"] == 200 and b_sent[0]["status"] == 499  # 499: logged, never delivered
    assert counts["cancelled"] == 1 and counts["scored"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "rsllm.serving"]
    assert any(ln.startswith("POST /b status=499") and "cancelled=client" in ln for ln in lines)


def test_settings_come_from_rsllm_variables(monkeypatch):
    monkeypatch.setenv("RSLLM_LLM_QUEUE", "3")
    monkeypatch.setenv("RSLLM_MAX_RERANK_TOKENS", "500")
    s = ServingSettings.from_env()
    assert s.llm_queue == 3 and s.max_rerank_tokens == 500 and s.max_body_bytes == 65536
    monkeypatch.setenv("RSLLM_BODY_IDLE_S", "soon")
    with pytest.raises(ConfigError, match="RSLLM_BODY_IDLE_S"):
        ServingSettings.from_env()
    monkeypatch.setenv("RSLLM_BODY_IDLE_S", "1")
    monkeypatch.setenv("RSLLM_LLM_QUEUE", "100")
    with pytest.raises(ConfigError, match="RSLLM_LLM_QUEUE=100: must be below 64"):
        ServingSettings.from_env()


# --------------------------------------------------------------------------------------------- queue


def test_queue_batches_what_arrives_while_busy_and_keeps_order():
    calls: list[list[int]] = []

    def fn(jobs):
        import time

        time.sleep(0.05)
        calls.append(list(jobs))
        return [j * 10 for j in jobs]

    async def go():
        q = BatchQueue(fn, max_batch=3)
        out = await asyncio.gather(*(q.submit(i) for i in range(7)))
        q.close()
        return out

    assert asyncio.run(go()) == [i * 10 for i in range(7)]
    assert [len(c) for c in calls] == [3, 3, 1] and sum(calls, []) == list(range(7))


def test_queue_hands_an_error_to_each_request_of_the_batch():
    def fn(jobs):
        raise ValueError("boom")

    async def go():
        q = BatchQueue(fn, max_batch=2)
        out = await asyncio.gather(q.submit(1), q.submit(2), return_exceptions=True)
        q.close()
        return out

    assert [str(e) for e in asyncio.run(go())] == ["boom", "boom"]
    with pytest.raises(ValueError, match="max_batch"):
        BatchQueue(lambda j: j, max_batch=0)


def test_one_failing_request_does_not_fail_its_batch():
    def fn(jobs):
        import time

        time.sleep(0.05)
        if "bad" in jobs:
            raise ValueError("bad job")
        return [j.upper() for j in jobs]

    async def go():
        q = BatchQueue(fn, max_batch=4)
        out = await asyncio.gather(*(q.submit(j) for j in ("w", "a", "bad", "b")), return_exceptions=True)
        q.close()
        return out, q.batches, q.counts

    out, batches, counts = asyncio.run(go())
    assert out[0] == "W" and out[1] == "A" and out[3] == "B"
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad job"
    assert batches == [4] and counts["failed"] == 1 and counts["scored"] == 3


def test_queue_refuses_beyond_its_bound_at_once():
    import threading

    release = threading.Event()

    def fn(jobs):
        release.wait(timeout=10)
        return jobs

    async def go():
        q = BatchQueue(fn, max_batch=1, max_queue=2)
        held = [asyncio.create_task(q.submit(i)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as e:
            await q.submit(9)
        release.set()
        out = await asyncio.gather(*held)
        q.close()
        return e.value, out, q.counts

    full, out, counts = asyncio.run(go())
    assert full.retry_after >= 1 and "2 requests" in str(full)
    assert out == [0, 1] and counts["refused"] == 1


# ----------------------------------------------------------------------------- retrieval and catalogue


def test_top_k_masks_padding_and_history():
    scores = np.array([9.0, 1.0, 5.0, 5.0, 3.0, 7.0])
    assert top_k(scores, {5}, 3) == [2, 3, 4]  # padding (0) and history (5) never come back; ties by index
    assert top_k(scores, set(), 10) == [5, 2, 3, 4, 1]
    assert top_k(scores, {1, 2, 3, 4, 5}, 3) == []


def _catalogue(tmp_path: Path) -> Catalogue:
    pd.DataFrame(
        {
            "item_idx": [1, 2],
            "item_id": ["a", "b"],
            "title": ["Heat", "Toy Story"],
            "year": [1995, 1995],
            "genres": ["Action", "Animation"],
        }
    ).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame(
        {
            "item_id": ["a", "b", "z"],
            "title": ["Heat", "Toy Story", "Toy Soldiers"],
            "year": [1995, 1995, None],
            "genres": ["Action", "Animation", "Drama"],
        }
    ).to_parquet(tmp_path / "catalogue.parquet")
    pd.DataFrame({"user_idx": [0, 1], "history": [[1, 2], [2]], "target": [2, 2]}).to_parquet(
        tmp_path / "sample_users.parquet"
    )
    return Catalogue.load(tmp_path)


def test_catalogue_puts_cold_items_after_the_encoders(tmp_path):
    c = _catalogue(tmp_path)
    assert c.ids == ["", "a", "b", "z"] and c.n_known == 2 and len(c) == 3
    assert c.item(3) == {
        "item_id": "z",
        "title": "Toy Soldiers",
        "year": None,
        "genres": "Drama",
        "known_to_encoder": False,
    }
    with pytest.raises(RequestError) as e:
        c.lookup("history", ["a", "q", "r", "q"])
    assert e.value.field == "history" and e.value.values == ["q", "r"] and "'q', 'r'" in str(e.value)
    pop = popularity(tmp_path / "sample_users.parquet", 4)
    assert pop.tolist() == [0, 1, 4, 0]
    assert c.search("toy", 5, pop) == [2, 3]  # the popular one first
    assert c.search("TOY SOL", 5, pop) == [3]


def test_catalogue_on_the_stable_index_knows_only_trained_rows(tmp_path):
    """Index 2 is a gap (an excluded catalogue row), index 3 has no training data: both are no item the
    encoder knows, the gap is no item at all."""
    pd.DataFrame(
        {
            "item_idx": [1, 3, 4],
            "item_id": ["a", "c", "d"],
            "title": ["Heat", "Casino", "Fargo"],
            "year": [1995, 1995, 1996],
            "genres": ["Action", "Crime", "Crime"],
            "trained": [True, False, True],
        }
    ).to_parquet(tmp_path / "items.parquet")
    c = Catalogue.load(tmp_path)
    assert c.ids == ["", "a", "", "c", "d"] and c.rows == 5 and len(c) == 3 and c.n_known == 2
    assert [c.is_known(i) for i in range(6)] == [False, True, False, False, True, False]
    assert c.index == {"a": 1, "c": 3, "d": 4} and c.item(3)["known_to_encoder"] is False
    assert c.search("", 10, np.zeros(5)) == [3, 4, 1]  # every title matches ""; the gap is no item
    with pytest.raises(RequestError):
        c.lookup("history", [""])


def test_dtype_choice():
    assert llm_dtype("auto", "cuda:0") == "bfloat16"
    assert llm_dtype("float32", "cuda:0") == "float32"
    assert llm_dtype("auto", "cpu") in ("bfloat16", "float32")
    with pytest.raises(ModelError, match="dtype .fp8."):
        llm_dtype("fp8", "cpu")


# ---------------------------------------------------------------------------------------- bentofile


def test_bentofile_packages_agree_with_pyproject():
    from packaging.requirements import Requirement

    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bento["service"] == "components.serving.service:RsllmService"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for spec in project:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"sys_platform": "linux", "platform_machine": "x86_64"}):
            declared[req.name.lower()] = req
    for spec in bento["python"]["packages"]:
        req = Requirement(spec)
        pinned = [s for s in req.specifier if s.operator == "=="]
        assert pinned, f"bentofile.yaml: {spec} is not pinned"
        if req.name.lower() == "fastapi":  # imported by the service; pyproject gets it through prefect
            continue
        assert req.name.lower() in declared, (
            f"bentofile.yaml: {req.name} is not a dependency in pyproject.toml"
        )
        assert declared[req.name.lower()].specifier.contains(pinned[0].version), (
            f"bentofile.yaml: {spec} is outside pyproject.toml's {declared[req.name.lower()]}"
        )
