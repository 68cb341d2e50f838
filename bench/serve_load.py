"""Load test of the running service: single-request latency, then a concurrent mix.

    python bench/serve_load.py --url http://127.0.0.1:3000   # a server already running
    python bench/serve_load.py --start                         # serves the production model itself
    python bench/serve_load.py --tiny                          # builds and serves the tests' tiny model

1. One request at a time: p50/p95/p99 latency of retrieval-only requests (`rerank: false`, k 10) and of
   rerank-of-20 requests (`candidates: 20`, k 10), histories of the model's sample users.
2. Concurrency 16: 1,000 retrieval + 50 rerank requests, shuffled (seeded): requests/s and errors
   (anything but a 200, or no answer; must be 0), with each kind's latency under load.
3. Saturation: rerank requests from 4x the LLM queue bound (GET /model: limits.llm_queue) of clients,
   non-stop, while 500 retrieval-only requests (concurrency 8) are measured: retrieval p50/p99, and the
   count of each status (LLM: 200 and 503 + Retry-After; any 429; 5xx must be 0).
Prints a table, then as its LAST line a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = {"retrieval_p50_ms": 20.0, "rerank20_p50_ms": 1500.0}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "p50_ms": round(pct(xs, 50), 2),
        "p95_ms": round(pct(xs, 95), 2),
        "p99_ms": round(pct(xs, 99), 2),
        "mean_ms": round(statistics.fmean(xs), 2) if xs else None,
    }


def body(history: list[str], rerank: bool) -> dict:
    return {"history": history, "k": 10, "rerank": rerank, "candidates": 20}


def single(url: str, histories: list[list[str]], n: int, rerank: bool) -> tuple[list[float], int]:
    """n requests one at a time (after 2 warm-up requests) -> latencies in ms, errors."""
    lat, errors = [], 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n + 2):
            t0 = time.perf_counter()
            r = client.post("/recommend", json=body(histories[i % len(histories)], rerank))
            ms = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                errors += 1
            elif i >= 2:
                lat.append(ms)
    return lat, errors


async def mixed(
    url: str, histories: list[list[str]], n_retrieval: int, n_rerank: int, concurrency: int, seed: int = 0
) -> dict:
    jobs = [False] * n_retrieval + [True] * n_rerank
    random.Random(seed).shuffle(jobs)
    lat: dict[bool, list[float]] = {False: [], True: []}
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(i: int, rerank: bool) -> None:
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recommend", json=body(histories[i % len(histories)], rerank))
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    lat[rerank].append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, rr) for i, rr in enumerate(jobs)))
        wall = time.perf_counter() - t0
    return {
        "requests": len(jobs),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(jobs) / wall, 1),
        "errors": len(errors),
        "error_examples": errors[:5],
        "retrieval": summary(lat[False]),
        "rerank20": summary(lat[True]),
    }


async def saturation(
    url: str,
    histories: list[list[str]],
    llm_clients: int,
    n_retrieval: int,
    concurrency: int = 8,
    honour_retry_after: bool = False,
) -> dict:
    """LLM requests beyond the queue bound, non-stop, while retrieval latency is measured. A refused
    LLM client retries after 50 ms (or after Retry-After with `honour_retry_after`)."""
    lat: list[float] = []
    codes: dict[str, dict[str, int]] = {"llm": {}, "retrieval": {}}
    retry_after: set[str] = set()
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=llm_clients + concurrency + 4)

    def count(kind: str, code: str) -> None:
        codes[kind][code] = codes[kind].get(code, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def llm_client(c: int) -> None:
            i = c
            while not done.is_set():
                try:
                    r = await client.post("/recommend", json=body(histories[i % len(histories)], True))
                except httpx.HTTPError as e:
                    count("llm", type(e).__name__)
                    continue
                count("llm", str(r.status_code))
                if r.status_code == 503:
                    after = r.headers.get("retry-after", "missing")
                    retry_after.add(after)
                    await asyncio.sleep(float(after) if honour_retry_after and after.isdigit() else 0.05)
                i += llm_clients

        async def retrieval(lane: int) -> None:
            for i in range(lane, n_retrieval, concurrency):
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recommend", json=body(histories[i % len(histories)], False))
                except httpx.HTTPError as e:
                    count("retrieval", type(e).__name__)
                    continue
                count("retrieval", str(r.status_code))
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t0) * 1000)

        hogs = [asyncio.create_task(llm_client(c)) for c in range(llm_clients)]
        await asyncio.sleep(1.0)  # the LLM queue fills first
        t0 = time.perf_counter()
        await asyncio.gather(*(retrieval(lane) for lane in range(concurrency)))
        wall = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*hogs)
    both = [(k, v) for kind in codes.values() for k, v in kind.items()]
    return {
        "llm_clients": llm_clients,
        "honour_retry_after": honour_retry_after,
        "seconds": round(wall, 2),
        "retrieval": summary(lat),
        "codes": codes,
        "llm_503": codes["llm"].get("503", 0),
        "llm_200": codes["llm"].get("200", 0),
        "status_429": sum(v for k, v in both if k == "429"),
        "status_5xx": sum(v for k, v in both if k.isdigit() and k.startswith("5") and k != "503"),
        "retrieval_not_200": sum(v for k, v in codes["retrieval"].items() if k != "200"),
        "retry_after_values": sorted(retry_after),
    }


def run(
    url: str,
    n_single: int,
    n_single_rerank: int,
    n_retrieval: int,
    n_rerank: int,
    concurrency: int,
    n_saturation: int = 500,
    honour_retry_after: bool = False,
) -> dict:
    info = httpx.get(f"{url}/model", timeout=30).json()
    users = httpx.get(f"{url}/sample_users", params={"limit": 200}, timeout=30).json()
    histories = [[it["item_id"] for it in u["history"]] for u in users if u["history"]]
    if not histories:
        raise SystemExit(f"{url}/sample_users: no sample users with a history")
    ret, ret_err = single(url, histories, n_single, rerank=False)
    rr, rr_err = single(url, histories, n_single_rerank, rerank=True)
    load = asyncio.run(mixed(url, histories, n_retrieval, n_rerank, concurrency))
    queue = int(info.get("limits", {}).get("llm_queue", 16))
    sat = None
    if n_saturation:
        sat = asyncio.run(
            saturation(url, histories, 4 * queue, n_saturation, honour_retry_after=honour_retry_after)
        )
    result = {
        "model_version": info.get("model_version"),
        "base_version": info.get("base_version"),
        "llm": f"{info.get('llm_mode')} on {info.get('llm_device')} ({info.get('llm_dtype')})",
        "onnx_providers": info.get("onnx_providers"),
        "cpus": len(os.sched_getaffinity(0)),
        "single_retrieval": summary(ret),
        "single_rerank20": summary(rr),
        "single_errors": ret_err + rr_err,
        "concurrency": concurrency,
        "mixed": load,
        "llm_queue": queue,
        "saturation": sat,
    }
    result["targets"] = {
        "retrieval_p50_ms<=20": result["single_retrieval"]["p50_ms"] <= TARGETS["retrieval_p50_ms"],
        "rerank20_p50_ms<=1500": result["single_rerank20"]["p50_ms"] <= TARGETS["rerank20_p50_ms"],
        "no_errors": load["errors"] == 0 and result["single_errors"] == 0,
    }
    if sat is not None:
        result["targets"]["saturation_no_5xx"] = sat["status_5xx"] == 0
        result["targets"]["saturation_retrieval_all_200"] = sat["retrieval_not_200"] == 0
    return result


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"serve_load: {r['model_version']} · LLM {r['llm']} · {r['cpus']} CPUs")
    for col in ("phase", "kind", "n", "p50 ms", "p95 ms", "p99 ms"):
        t.add_column(col, justify="left" if col in ("phase", "kind") else "right")
    for phase, kind, s in (
        ("one at a time", "retrieval", r["single_retrieval"]),
        ("one at a time", "rerank of 20", r["single_rerank20"]),
        (f"concurrency {r['concurrency']}", "retrieval", r["mixed"]["retrieval"]),
        (f"concurrency {r['concurrency']}", "rerank of 20", r["mixed"]["rerank20"]),
        *(
            [(f"saturation ({sat['llm_clients']} LLM clients)", "retrieval", sat["retrieval"])]
            if (sat := r["saturation"])
            else []
        ),
    ):
        t.add_row(phase, kind, str(s["n"]), f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}")
    console = Console()
    console.print(t)
    m = r["mixed"]
    console.print(
        f"mixed load: {m['requests']} requests in {m['seconds']} s = {m['requests_per_s']} requests/s, "
        f"errors {m['errors']}",
        highlight=False,
    )
    if sat:
        console.print(
            f"saturation (LLM queue {r['llm_queue']}, {sat['llm_clients']} LLM clients"
            f"{' honouring Retry-After' if sat['honour_retry_after'] else ''}, {sat['seconds']} s): "
            f"LLM 200 {sat['llm_200']}, 503 {sat['llm_503']} (Retry-After {sat['retry_after_values']}); "
            f"429 {sat['status_429']}; 5xx {sat['status_5xx']}; retrieval not 200 {sat['retrieval_not_200']}",
            highlight=False,
        )
    console.print(f"targets: {r['targets']}", highlight=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one, see --start/--tiny)")
    ap.add_argument("--start", action="store_true", help="start `bentoml serve` on the production model")
    ap.add_argument("--tiny", action="store_true", help="serve the tests' tiny model (temp store)")
    ap.add_argument("--single", type=int, default=200, help="retrieval requests one at a time")
    ap.add_argument("--single-rerank", type=int, default=20, help="rerank requests one at a time")
    ap.add_argument("--retrieval", type=int, default=1000)
    ap.add_argument("--rerank", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--saturation",
        type=int,
        default=500,
        help="retrieval requests measured under LLM saturation (0: skip)",
    )
    ap.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="saturating LLM clients wait Retry-After after a 503 (default: retry after 50 ms)",
    )
    args = ap.parse_args()
    if not (args.url or args.start or args.tiny):
        ap.error("give --url of a running server, or --start, or --tiny")
    proc, tmp = None, None
    try:
        url = args.url
        if url is None:
            from tests.e2e.serving_fixtures import build_promoted, free_port, start_server

            env = dict(os.environ, BENTOML_DO_NOT_TRACK="true")
            tmp = tempfile.TemporaryDirectory(prefix="rsllm-serve-load-")
            if args.tiny:
                env["BENTOML_HOME"] = os.environ["BENTOML_HOME"] = str(Path(tmp.name) / "bentoml")
                built = build_promoted(Path(tmp.name) / "tiny")
                env["RSLLM_REPO"] = str(built["repo"])
            port = free_port()
            proc = start_server(env, port, Path(tmp.name) / "serve.log")
            url = f"http://127.0.0.1:{port}"
        result = run(
            url.rstrip("/"),
            args.single,
            args.single_rerank,
            args.retrieval,
            args.rerank,
            args.concurrency,
            args.saturation,
            args.honour_retry_after,
        )
        print_table(result)
        print(json.dumps(result, sort_keys=True))
    finally:
        if proc is not None:
            from tests.e2e.serving_fixtures import stop_server

            stop_server(proc)
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
