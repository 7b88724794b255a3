"""A load generator process: drives a server through render_client, reports JSON.

    python -m bench.load --target HOST:PORT --model qwen3 --mode unary|stream \
        --concurrency 8 --connections 2 --seconds 5 --requests requests.json

Runs in a process of its own so that its CPU is not the orchestrator's, and
prints one JSON object: samples, tokens, seconds, latencies (ms), errors, cpu.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from render_client import RenderClient, SampleRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=["unary", "stream"], required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--requests", required=True, help="JSON list of {messages, tools}")
    args = parser.parse_args()
    with open(args.requests, encoding="utf-8") as file:
        conversations = json.load(file)
    with RenderClient(args.target, timeout=600, connections=args.connections) as client:
        renderer = client.renderer(args.model)
        # Assistant-only masking, as the in-process anchor renders (qwen3-template needs a role_to_mask).
        requests = [
            renderer.request(c["messages"], tools=c.get("tools"), role_to_mask=assistant_only) for c in conversations
        ]
        run = unary if args.mode == "unary" else stream
        run(client, requests, args.concurrency, args.warmup)  # warm up connections and caches
        cpu = time.process_time()
        result = run(client, requests, args.concurrency, args.seconds)
        result["client_cpu_seconds"] = time.process_time() - cpu
    print(json.dumps(result))


def assistant_only(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant"


def unary(client: RenderClient, requests: list[SampleRequest], concurrency: int, seconds: float) -> dict[str, Any]:
    cycle = itertools.cycle(requests)
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = errors = 0
    started = time.perf_counter()
    deadline = started + seconds

    def work() -> None:
        nonlocal tokens, errors
        while time.perf_counter() < deadline:
            with lock:
                request = next(cycle)
            begun = time.perf_counter()
            try:
                sample = client.render(request)
            except Exception:
                with lock:
                    errors += 1
                continue
            elapsed = time.perf_counter() - begun
            with lock:
                latencies.append(elapsed * 1e3)
                tokens += len(sample.token_ids)

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "samples": len(latencies),
        "tokens": tokens,
        "errors": errors,
        "seconds": time.perf_counter() - started,
        "latencies_ms": latencies,
    }


def stream(client: RenderClient, requests: list[SampleRequest], concurrency: int, seconds: float) -> dict[str, Any]:
    sent: list[float] = []

    def timed() -> Iterator[SampleRequest]:
        for request in itertools.cycle(requests):
            sent.append(time.perf_counter())
            yield request

    latencies: list[float] = []
    tokens = errors = 0
    started = time.perf_counter()
    deadline = started + seconds
    for index, result in enumerate(client.render_many(timed(), concurrency=concurrency, return_exceptions=True)):
        now = time.perf_counter()
        if isinstance(result, Exception):
            errors += 1
        else:
            latencies.append((now - sent[index]) * 1e3)
            tokens += len(result.token_ids)
        if now >= deadline:
            break
    return {
        "samples": len(latencies),
        "tokens": tokens,
        "errors": errors,
        "seconds": time.perf_counter() - started,
        "latencies_ms": latencies,
    }


if __name__ == "__main__":
    main()
