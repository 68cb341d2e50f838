"""The BentoML service over real HTTP: a real `bentoml serve` on a free port of 127.0.0.1, serving a tiny
model promoted through the registry into the session's temp BENTOML_HOME (tests/conftest.py).

Every endpoint, the bad-request cases, cold start, the evaluation protocol over /score, one log line
per request, the limits (LLM admission: 503 + Retry-After while retrieval answers; a slow body: 408;
the rerank token bound: 422; hostile headers, ids and paths), Prometheus metrics, a schemathesis run
against the OpenAPI spec (no 5xx), the /ui page in headless Chromium (Debian's `chromium` +
`chromium-driver`: `make browser`), `bentoml build`, and a promotion that takes effect on restart only.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.e2e.serving_fixtures import COLD, UNTRAINED, build_promoted, free_port, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def promoted(tmp_path_factory) -> dict:
    return build_promoted(tmp_path_factory.mktemp("serving"))


def _env(promoted: dict) -> dict:
    # float32: the answers of /score must equal the evaluation's scores (the service picks bf16 on
    # CPUs with native bf16 by default; the load bench measures that). Small limits, so the tests reach
    # them: 2 LLM requests admitted, a body idle for 2 s, 250 tokens per rerank (10 history items and 20
    # candidates, the evaluation's prompt: 211 tokens; 40 items in all: ~270-330).
    return dict(
        os.environ,
        RSLLM_REPO=str(promoted["repo"]),
        RSLLM_LLM_DTYPE="float32",
        BENTOML_DO_NOT_TRACK="true",
        RSLLM_LLM_QUEUE="2",
        RSLLM_BODY_IDLE_S="2",
        RSLLM_MAX_RERANK_TOKENS="250",
    )


@pytest.fixture(scope="module")
def server(promoted, tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start_server(_env(promoted), free_port(), log)
    port = int(proc.args[proc.args.index("--port") + 1])
    try:
        yield {"url": f"http://127.0.0.1:{port}", "log": log, "proc": proc}
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], timeout=60) as c:
        yield c


def _post(client, path: str, body) -> httpx.Response:
    return (
        client.post(path, json=body)
        if not isinstance(body, str | bytes)
        else client.post(path, content=body, headers={"content-type": "application/json"})
    )


# ----------------------------------------------------------------------------------------- answers


def test_recommend_retrieval_over_the_whole_catalogue(client, promoted):
    r = _post(client, "/recommend", {"history": ["i5", "i6", "i7"], "k": 5, "rerank": False})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_version"] == promoted["model_tag"] and out["data_version"] == "data/v1"
    assert out["rerank"] is False and out["retrieval"] == "encoder" and out["cold_items"] == []
    ids = [it["item_id"] for it in out["items"]]
    assert len(ids) == 5 and not {"i5", "i6", "i7"} & set(ids)
    assert "i8" in ids[:3]  # the synthetic walk: the next item is the last + 1
    assert out["items"][ids.index("i8")]["title"] == "Movie 8"
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert out["timings"]["retrieval_ms"] > 0 and out["timings"]["rerank_ms"] == 0


def test_recommend_rerank_orders_the_encoders_candidates_by_the_llm(client):
    base = {"history": ["i20", "i21", "i22"], "k": 20, "rerank": False}
    encoder = [it["item_id"] for it in _post(client, "/recommend", base).json()["items"]]
    r = _post(client, "/recommend", {**base, "rerank": True, "k": 8, "candidates": 20})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = [it["item_id"] for it in out["items"]]
    assert out["rerank"] is True and len(ids) == 8 and set(ids) <= set(encoder)
    scores = [it["score"] for it in out["items"]]
    assert scores == sorted(scores, reverse=True)  # the score head's scores, best first
    assert out["timings"]["rerank_ms"] > 0


def test_rerank_follows_the_promoted_models_default(client):
    """The fixture's model was promoted with rerank off (its rerank lost to retrieval): a request that does
    not say answers from retrieval, exactly as rerank=false; /model says why."""
    meta = client.get("/model").json()
    assert meta["rerank_default"] is False and "vs retrieval" in meta["rerank_reason"]
    body = {"history": ["i20", "i21", "i22"], "k": 5}
    default, explicit = (
        _post(client, "/recommend", body).json(),
        _post(client, "/recommend", {**body, "rerank": False}).json(),
    )
    assert default["rerank"] is False and default["timings"]["rerank_ms"] == 0
    assert [it["item_id"] for it in default["items"]] == [it["item_id"] for it in explicit["items"]]
    # asking for the rerank still works
    assert _post(client, "/recommend", {**body, "rerank": True}).json()["rerank"] is True


def test_score_is_the_evaluation_protocol_over_http(client, promoted):
    """/score on a test user's 20 candidates gives the scores of components.llm.rank (the evaluation)."""
    from components import registry
    from components.llm.rank import evaluate_split

    test = pd.read_parquet(promoted["prepared"] / "test.parquet").sort_values("user_idx").head(2)
    model_dir = Path(registry.get_model(promoted["model_tag"]).path)
    base_dir = Path(registry.get_model(promoted["base_tag"]).path)
    # the server runs with RSLLM_LLM_DTYPE=float32; the evaluation with llm.dtype float32 (same rule)
    want = evaluate_split(
        base_dir, model_dir / "llm", promoted["prepared"], rows=test, device="cpu", dtype="float32"
    )
    for row, expected in zip(test.itertuples(), want.itertuples(), strict=True):
        body = {"history": [f"i{i}" for i in row.history], "candidates": [f"i{c}" for c in row.candidates]}
        r = _post(client, "/score", body)
        assert r.status_code == 200, r.text
        got = {it["item_id"]: it["score"] for it in r.json()["items"]}
        assert len(got) == 20
        np.testing.assert_allclose([got[f"i{c}"] for c in row.candidates], expected.scores, atol=1e-4)


def test_cold_start(client):
    cold_id, cold_title = next(iter(COLD.items()))
    # only cold items: the encoder has nothing to read, retrieval falls back to popularity
    r = _post(client, "/recommend", {"history": [int(cold_id), "902"], "k": 5, "rerank": False})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["retrieval"] == "popularity" and out["cold_items"] == [cold_id, "902"]
    assert len(out["items"]) == 5 and not {cold_id, "902"} & {it["item_id"] for it in out["items"]}
    # mixed: the encoder reads the known items, the LLM prompt has the cold one by title
    r = _post(client, "/recommend", {"history": ["i3", cold_id, "i4"], "k": 3})
    assert r.status_code == 200 and r.json()["retrieval"] == "encoder" and r.json()["cold_items"] == [cold_id]
    # a cold candidate can be scored (title only)
    r = _post(client, "/score", {"history": ["i3"], "candidates": [cold_id, "i4"]})
    assert r.status_code == 200 and {it["title"] for it in r.json()["items"]} == {cold_title, "Movie 4"}
    # an item of the index without training data is cold as well, and never retrieved
    r = _post(client, "/recommend", {"history": [UNTRAINED], "k": 5, "rerank": False})
    assert r.json()["retrieval"] == "popularity" and r.json()["cold_items"] == [UNTRAINED]
    r = _post(client, "/recommend", {"history": ["i40"], "k": 20, "rerank": False})
    assert r.status_code == 200 and UNTRAINED not in {it["item_id"] for it in r.json()["items"]}


def test_cold_items_are_rendered_by_title_alone(promoted):
    """In the unified prompt a known item is its title + [ITEM] (an injected ID embedding); a cold one is
    its title alone."""
    from components import registry
    from components.serving.engine import Engine

    model = registry.get_model(promoted["model_tag"])
    engine = Engine(
        Path(model.path), Path(registry.get_model(promoted["base_tag"]).path), {}, dtype="float32"
    )
    idx, cold = engine.parse_history(["i3", "901", "i4", UNTRAINED])
    assert cold == ["901", UNTRAINED]
    assert engine.reranker.cfg.stage.cold_items == [41]  # stage 2 wrote its untrained rows
    hist, cands, prefix = engine.reranker.job(
        idx, [engine.catalogue.index["902"], engine.catalogue.index["i9"]]
    )
    assert prefix == [3, 4]  # the [USER] encoder reads trained items only
    prompt = engine.reranker.builder.prompt(hist, cands)
    assert prompt.item_idx == [3, 4, 9]  # ID embeddings for known items only
    assert len(prompt.cand_pos) == 2  # ... and a marker the head reads for every candidate, cold ones too
    text = engine.reranker.builder.tok.decode(prompt.ids)
    assert "Cold Open;" in text.replace(" ;", ";") and "Frozen Planet" in text


def test_lookups_and_metadata(client, promoted):
    assert client.get("/items/i3").json() == {
        "item_id": "i3",
        "title": "Movie 3",
        "year": 1995,
        "genres": "Drama",
        "known_to_encoder": True,
    }
    assert client.get("/items/901").json()["known_to_encoder"] is False
    assert client.get(f"/items/{UNTRAINED}").json()["known_to_encoder"] is False
    r = client.get("/items/nope")
    assert r.status_code == 404 and "nope" in r.text
    hits = client.get("/items", params={"q": "movie 1", "limit": 3}).json()
    assert len(hits) == 3 and all("movie 1" in h["title"].lower() for h in hits)
    assert client.get("/items", params={"q": "HARBOUR"}).json()[0]["item_id"] == "903"
    meta = client.get("/model").json()
    assert meta["model_version"] == promoted["model_tag"] and meta["base_version"] == promoted["base_tag"]
    assert meta["data_version"] == "data/v1" and meta["metrics"] == {"hr@1": 0.5}
    assert (
        meta["items_known_to_encoder"] == 40
        and meta["catalogue_items"] == 44
        and meta["llm_mode"] == "unified"
    )
    users = client.get("/sample_users", params={"limit": 3}).json()
    assert len(users) == 3 and users[0]["history"] and users[0]["target"]["title"].startswith("Movie")


def test_health_metrics_openapi_and_pages(client):
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    assert {"/recommend", "/score", "/items", "/items/{item_id}", "/model", "/sample_users", "/ui"} <= set(
        spec["paths"]
    )
    assert client.get("/").status_code == 200  # BentoML's own page
    assert "RSLLM recommendations" in client.get("/ui").text
    metrics = client.get("/metrics").text
    assert 'bentoml_service_request_total{endpoint="/recommend",http_response_code="200"' in metrics


# ------------------------------------------------------------------------------------ bad requests

BAD = [
    ("empty history", "/recommend", {"history": []}, 400, "history"),
    ("no history", "/recommend", {"k": 3}, 400, "history"),
    ("unknown ids", "/recommend", {"history": ["i1", "zz9", 12345]}, 400, "zz9"),
    ("k zero", "/recommend", {"history": ["i1"], "k": 0}, 400, '"k"'),
    ("k too large", "/recommend", {"history": ["i1"], "k": 101, "rerank": False}, 400, '"k"'),
    ("k above candidates", "/recommend", {"history": ["i1"], "k": 30, "rerank": True}, 400, "candidates"),
    ("k as string", "/recommend", {"history": ["i1"], "k": "3"}, 400, '"k"'),
    ("k as float", "/recommend", {"history": ["i1"], "k": 2.5}, 400, '"k"'),
    ("rerank as string", "/recommend", {"history": ["i1"], "rerank": "yes"}, 400, "rerank"),
    ("history not a list", "/recommend", {"history": "i1"}, 400, "history"),
    ("id as bool", "/recommend", {"history": [True]}, 400, "history"),
    ("id null", "/recommend", {"history": [None]}, 400, "history"),
    ("id empty", "/recommend", {"history": [""]}, 400, "history"),
    ("id too long", "/recommend", {"history": ["x" * 200]}, 400, "history"),
    ("history too long", "/recommend", {"history": ["i1"] * 201}, 400, "history"),
    ("unknown field", "/recommend", {"history": ["i1"], "rerankk": True}, 400, "rerankk"),
    ("not json", "/recommend", "{history: [", 400, "json"),
    ("json array", "/recommend", "[1, 2]", 400, "object"),
    ("empty body", "/recommend", "", 400, "history"),
    ("no candidates", "/score", {"history": ["i1"]}, 400, "candidates"),
    ("duplicate candidates", "/score", {"history": ["i1"], "candidates": ["i2", "i2"]}, 400, "candidates"),
    ("unknown candidate", "/score", {"history": ["i1"], "candidates": ["i2", "nope"]}, 400, "nope"),
    (
        "too many candidates",
        "/score",
        {"history": ["i1"], "candidates": [f"i{i}" for i in range(1, 41)] * 2},
        400,
        "candidates",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_are_4xx_naming_the_field(client, case):
    _, path, body, status, named = case
    r = _post(client, path, body)
    assert r.status_code == status, r.text
    assert named.lower() in r.text.lower()


def test_oversized_wrong_type_and_method(client):
    big = json.dumps({"history": ["i1"] * 30000}).encode()
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"] and r.json()["field"] == "body"

    def chunks():  # no Content-Length: counted while reading
        for _ in range(40):
            yield b" " * 4096

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post(
        "/recommend", content=b"history=i1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"
    r = client.post("/score", content=b"x", headers={"content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415  # never unpickled
    assert client.get("/recommend").status_code == 405
    assert client.get("/items", params={"q": ""}).status_code == 422
    assert client.get("/items", params={"q": "a", "limit": 0}).status_code == 422
    assert client.get("/sample_users", params={"limit": "x"}).status_code == 422


def test_one_log_line_per_request(client, server, promoted):
    marker = ["i11", "i12", "i13", "i14"]
    _post(client, "/recommend", {"history": marker, "k": 2, "rerank": True})
    _post(client, "/recommend", {"history": marker, "k": 2, "rerank": False})
    _post(client, "/recommend", {"history": [], "k": 2})
    time.sleep(0.5)
    lines = [
        ln
        for ln in Path(server["log"]).read_text().splitlines()
        if "rsllm.serving" in ln and "history=4" in ln
    ]
    assert len(lines) == 2
    for line, rerank in zip(lines, ("true", "false"), strict=True):
        assert f"model={promoted['model_tag']}" in line and f"rerank={rerank}" in line
        assert "POST /recommend status=200" in line and "latency_ms=" in line
    assert any("POST /recommend status=400" in ln for ln in Path(server["log"]).read_text().splitlines())
    assert "Traceback" not in Path(server["log"]).read_text()  # bad requests are not errors


# ------------------------------------------------------------------------------------------ limits


def test_llm_admission_refuses_at_once_while_retrieval_and_lookups_answer(server):
    """30 concurrent LLM requests against a queue of 2: the excess gets 503 + Retry-After at once (no 504
    or 429); retrieval-only /recommend, /items and /model answer 200 meanwhile."""
    cands = [f"i{i}" for i in range(3, 23)]

    async def go():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server["url"], timeout=60, limits=limits) as c:

            async def llm(path: str, body: dict):
                t0 = time.perf_counter()
                r = await c.post(path, json=body)
                return r, time.perf_counter() - t0

            llm_calls = [llm("/score", {"history": ["i1", "i2"], "candidates": cands}) for _ in range(20)]
            llm_calls += [llm("/recommend", {"history": ["i4"], "rerank": True}) for _ in range(10)]
            others = [c.post("/recommend", json={"history": ["i5"], "rerank": False}) for _ in range(10)]
            others += [c.get("/items/i3"), c.get("/items", params={"q": "movie"}), c.get("/model")]
            return await asyncio.gather(asyncio.gather(*llm_calls), asyncio.gather(*others))

    llm, others = asyncio.run(go())
    codes = [r.status_code for r, _ in llm]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    for r, seconds in llm:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["field"] == "rerank"
            assert "queue is full" in r.json()["error"] and seconds < 15  # at once, never a 504
    assert [r.status_code for r in others] == [200] * len(others)
    log = Path(server["log"]).read_text()
    assert "llm=refused" in log and "Traceback" not in log


def test_a_body_that_trickles_in_gets_408(server):
    """Slow loris: headers promise 60 bytes, 10 come, then nothing: 408 after the idle deadline (2 s
    here), and the connection is closed, instead of holding a slot until BentoML's 120 s timeout."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 60\r\n\r\n{"history"'
        )
        t0 = time.monotonic()
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b'"field": "body"' in reply, reply[:300]
    assert time.monotonic() - t0 < 20


def test_the_rerank_token_bound_is_a_422_naming_candidates(client):
    """Prompts above this server's RSLLM_MAX_RERANK_TOKENS=250: 422 naming candidates, before the LLM."""
    history, cands = [f"i{i}" for i in range(1, 11)], [f"i{i}" for i in range(1, 41)]
    r = _post(client, "/score", {"history": history, "candidates": cands})  # ~330 tokens
    assert r.status_code == 422 and r.json()["field"] == "candidates", r.text
    assert "tokens, above the limit of 250" in r.json()["error"]
    body = {"history": ["i1", "i2", "i3"], "rerank": True, "candidates": 37, "k": 5}  # ~270 tokens
    r = _post(client, "/recommend", body)
    assert r.status_code == 422 and "RSLLM_MAX_RERANK_TOKENS" in r.text
    assert _post(client, "/score", {"history": history, "candidates": cands[10:30]}).status_code == 200


def test_two_content_type_headers_are_refused(client):
    """text/plain then application/json: whichever one a layer reads, the request is a 415."""
    r = client.post(
        "/recommend",
        content=b'{"history": ["i1"]}',
        headers=[("content-type", "text/plain"), ("content-type", "application/json")],
    )
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"


def test_long_ids_are_bounded_and_never_echoed_whole(client):
    # a 4,000-digit integer id: 400 naming history, the value never echoed
    r = client.post(
        "/recommend",
        content=b'{"history": [' + b"9" * 4000 + b"]}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "history" in r.text and "9" * 30 not in r.text and len(r.text) < 1500
    # an unknown id of the longest accepted length: named, shortened in the error and the values
    r = _post(client, "/recommend", {"history": ["q" * 128]})
    assert r.status_code == 400 and r.json()["field"] == "history" and "q" * 41 not in r.text


def test_a_newline_in_the_path_cannot_forge_a_log_line(client, server):
    client.get("/items/x%0A2026-01-01 00:00:00,000 INFO rsllm.serving: POST /forged status=200")
    time.sleep(0.5)
    lines = Path(server["log"]).read_text().splitlines()
    assert not any(ln.startswith("2026-01-01") for ln in lines)
    assert any("/items/x%0A2026-01-01" in ln for ln in lines)


def test_model_shows_no_server_path_and_states_the_limits(client, promoted):
    meta = client.get("/model")
    assert str(promoted["repo"]) not in meta.text and meta.json()["source"].startswith("pointer models/")
    assert meta.json()["limits"]["llm_queue"] == 2 and meta.json()["limits"]["max_rerank_tokens"] == 250


def test_retrieval_runs_off_the_event_loop(promoted):
    """While the ONNX encoder retrieves, the event loop keeps running other tasks (ticks)."""
    from components import registry
    from components.serving.engine import Engine

    model = registry.get_model(promoted["model_tag"])
    engine = Engine(
        Path(model.path), Path(registry.get_model(promoted["base_tag"]).path), {}, dtype="float32"
    )
    idx, _ = engine.parse_history(["i3", "i4", "i5"])

    async def go() -> tuple[int, list]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        out = [await engine.retrieve_async(idx, 10) for _ in range(20)]
        done = True
        await task
        return ticks - start, out

    ticks, out = asyncio.run(go())
    assert ticks >= 20  # a retrieval on the loop would let the ticker run 0 times during it
    assert out[0] == engine.retrieve(idx, 10)


# ---------------------------------------------------------------------------------- whole-API checks


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    """Property-based requests from the OpenAPI spec (bounded): no answer may be a 5xx."""
    cmd = [
        str(BIN / "st"),
        "run",
        f"{server['url']}/docs.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "30",
        "--report-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "Test cases:" in proc.stdout


def test_ui_page_in_headless_chromium(server):
    """The page lists sample users, shows recommendations with titles and scores, resolves typed titles."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "Chromium is not installed: run `make browser` (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(f"{server['url']}/ui")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        assert "model rsllm:" in driver.find_element(By.ID, "model").text
        # the checkbox starts at the promoted model's default
        box = driver.find_element(By.ID, "rerank")
        assert box.is_selected() == httpx.get(f"{server['url']}/model").json()["rerank_default"]
        if not box.is_selected():
            box.click()
        # a sample user, reranked by the LLM
        Select(driver.find_element(By.ID, "user")).select_by_index(1)
        user = httpx.get(f"{server['url']}/sample_users", params={"limit": 1}).json()[0]
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "results").is_displayed())
        rows = [
            r.find_elements(By.TAG_NAME, "td")
            for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        ]
        want = httpx.post(
            f"{server['url']}/recommend",
            json={
                "history": [h["item_id"] for h in user["history"]],
                "k": 10,
                "rerank": True,
                "candidates": 20,
            },
        ).json()
        assert [(r[1].text, r[2].text) for r in rows] == [
            (it["title"], it["item_id"]) for it in want["items"]
        ]
        assert "LLM rerank" in driver.find_element(By.ID, "status").text
        # typed titles (one cold), encoder order
        driver.find_element(By.ID, "titles").send_keys("Movie 5\nMovie 6\nfrozen planet")
        driver.find_element(By.ID, "rerank").click()
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "encoder order" in d.find_element(By.ID, "status").text)
        history = driver.find_element(By.ID, "history").text
        assert "Movie 5 (i5)" in history and "Frozen Planet (902) [cold]" in history
        titles = [
            r.find_elements(By.TAG_NAME, "td")[1].text
            for r in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        ]
        assert len(titles) == 10 and "Movie 7" in titles[:3]
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


def test_bentoml_build_packs_the_promoted_models(promoted, tmp_path):
    env = _env(promoted)
    proc = subprocess.run(
        [str(BIN / "bentoml"), "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = proc.stdout.strip().splitlines()[-1].replace("__tag__:", "")
    info = subprocess.run(
        [str(BIN / "bentoml"), "get", tag, "-o", "json"], env=env, capture_output=True, text=True, check=True
    )
    bento = json.loads(info.stdout)
    models = {m["tag"] for svc in bento["services"] for m in svc["models"]}
    assert models == {promoted["model_tag"], promoted["base_tag"]}
    assert bento["service"] == "components.serving.service:RsllmService"


def test_a_promotion_takes_effect_on_restart_only(client, promoted, tmp_path):
    """The running service keeps its model; a restarted one serves the newly promoted model."""
    from components import registry

    old = registry.get_model(promoted["model_tag"])
    parts = {p.name: p for p in Path(old.path).iterdir() if p.name not in ("model.yaml",)}
    new_tag = registry.save_candidate(parts, {**old.info.metadata, "data_version": "data/v2"})
    registry.promote(new_tag, promoted["repo"], reason="test")
    assert (
        _post(client, "/recommend", {"history": ["i1"], "k": 1, "rerank": False}).json()["model_version"]
        == promoted["model_tag"]
    )
    proc = start_server(_env(promoted), free_port(), tmp_path / "serve.log")
    try:
        port = int(proc.args[proc.args.index("--port") + 1])
        out = httpx.post(
            f"http://127.0.0.1:{port}/recommend", json={"history": ["i1"], "k": 1}, timeout=60
        ).json()
        assert out["model_version"] == new_tag and out["data_version"] == "data/v2"
    finally:
        stop_server(proc)
