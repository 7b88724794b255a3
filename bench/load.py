"""A load generator process: drives a server through render_client on command.

    python -m bench.load --target HOST:PORT --model qwen3 --connections 2 \
        --requests requests.json --server-pid PID

It reads one JSON command per line on stdin, {"mode": "unary"|"stream",
"concurrency": N, "seconds": S}, runs that load and answers one JSON line:
samples, tokens, seconds, latencies (ms), errors, and the CPU seconds the
server (the supervisor and its workers) and this process used in that window.
Living on between commands keeps start-up cost out of the figures, and a
process of its own keeps its CPU apart from the in-process anchor's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from render_client import RenderClient, SampleRequest


def assistant_only(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant"


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_total(metrics_url: str, name: str) -> float:
    """The sum of a metric over its labels and the server's processes (from /metrics)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    return sum(float(value) for value in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def renderer_cpu(metrics_url: str) -> float:
    """CPU seconds the server's processes spent inside build_training_sample."""
    return metric_total(metrics_url, "render_renderer_cpu_seconds_total")


def server_cpu(supervisor: int) -> float:
    """CPU seconds of the supervisor and every live process under it (workers' render processes too)."""
    return sum(process_cpu(pid) for pid in process_tree(supervisor))


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (each process forks from its main thread, whose children these are)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(descendant for child in children for descendant in process_tree(int(child)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--requests", required=True, help="JSON list of {messages, tools}")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--metrics-url", required=True)
    args = parser.parse_args()
    conversations = json.loads(Path(args.requests).read_text(encoding="utf-8"))
    with RenderClient(args.target, timeout=600, connections=args.connections) as client:
        renderer = client.renderer(args.model)
        # Assistant-only masking, as the in-process anchor renders (qwen3-template needs a role_to_mask).
        requests = [
            renderer.request(c["messages"], tools=c.get("tools"), role_to_mask=assistant_only) for c in conversations
        ]
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            run = unary if command["mode"] == "unary" else stream
            server_before, client_before = server_cpu(args.server_pid), time.process_time()
            renderer_before = renderer_cpu(args.metrics_url)
            result = run(client, requests, command["concurrency"], command["seconds"])
            result["server_cpu_seconds"] = server_cpu(args.server_pid) - server_before
            result["renderer_cpu_seconds"] = renderer_cpu(args.metrics_url) - renderer_before
            result["client_cpu_seconds"] = time.process_time() - client_before
            print(json.dumps(result), flush=True)


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
    return _result(latencies, tokens, errors, started)


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
    return _result(latencies, tokens, errors, started)


def _result(latencies: list[float], tokens: int, errors: int, started: float) -> dict[str, Any]:
    return {
        "samples": len(latencies),
        "tokens": tokens,
        "errors": errors,
        "seconds": time.perf_counter() - started,
        "latencies_ms": latencies,
    }


if __name__ == "__main__":
    main()
