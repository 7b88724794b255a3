"""The Renderer protocol over gRPC beside the same calls in-process, measured in one run.

    .venv/bin/python -m bench --only protocol

For each call a trainer or rollout worker makes (build_training_sample three
ways, render, parse_response, bridge_to_next_turn) on the qwen3 corpus: the
in-process rate on one core (the anchor, measured just before), the rate through
a remote renderer at concurrency 8 against a one-worker server (and render
streamed through render_many_tokens at concurrency 64), their ratio, and
the trainer-side cost: this process's CPU per remote call over the in-process
CPU per call (the server runs in processes of its own, so this process's CPU
is the client's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import renderers

import render_client
from bench.work import assistant_only
from render_client import RenderClient
from tests.reference import reference_renderer
from tests.support import corpus, running_server

MODEL = "qwen3"
CONCURRENCY = 8
STREAMED_CONCURRENCY = 64

Call = Callable[[Any, dict[str, Any]], Any]  # (renderer, case) -> result


def cases(local: Any) -> list[dict[str, Any]]:
    """Per conversation the corpus renders: its messages, tools, and a last assistant turn split
    into prompt and completion tokens, with the turn after it for bridging."""
    kept = []
    for conversation in corpus():
        messages, tools = conversation["messages"], conversation.get("tools")
        turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        if not turns:
            continue
        last = turns[-1]
        try:
            renderers.build_training_sample(local, messages, tools=tools, role_to_mask=assistant_only)
            prompt = local.render_ids(messages[:last], tools=tools, add_generation_prompt=True)
            full = local.render_ids(messages[: last + 1], tools=tools)
        except Exception:
            continue
        if full[: len(prompt)] != prompt:
            continue
        follow_up = [{"role": "user", "content": "Thanks. One more question, please."}]
        kept.append(
            {
                "messages": messages,
                "tools": tools,
                "prompt": prompt,
                "completion": full[len(prompt) :],
                "follow_up": follow_up,
            }
        )
    return kept


CALLS: dict[str, Call] = {
    "build_training_sample": lambda r, c: renderers.build_training_sample(
        r, c["messages"], tools=c["tools"], role_to_mask=assistant_only
    ),
    "render": lambda r, c: r.render(c["messages"], tools=c["tools"], add_generation_prompt=True),
    "parse_response": lambda r, c: r.parse_response(c["completion"], tools=c["tools"], prompt_ids=c["prompt"]),
    "bridge_to_next_turn": lambda r, c: r.bridge_to_next_turn(
        c["prompt"], c["completion"], c["follow_up"], tools=c["tools"]
    ),
}


def in_process(call: Call, renderer: Any, work: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """Calls per second and CPU per call on one thread of this process."""
    calls, cpu, started = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        call(renderer, work[calls % len(work)])
        calls += 1
    elapsed = time.perf_counter() - started
    return {"calls_per_s": calls / elapsed, "cpu_ms_per_call": (time.process_time() - cpu) * 1e3 / calls}


def remote(call: Call, renderer: Any, work: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """Calls per second at CONCURRENCY threads, and this process's CPU per call."""
    counts = [0] * CONCURRENCY
    stop = threading.Event()

    def loop(thread: int) -> None:
        index = thread
        while not stop.is_set():
            call(renderer, work[index % len(work)])
            counts[thread] += 1
            index += CONCURRENCY

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(CONCURRENCY)]
    cpu, started = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed, calls = time.perf_counter() - started, sum(counts)
    return {"calls_per_s": calls / elapsed, "cpu_ms_per_call": (time.process_time() - cpu) * 1e3 / calls}


def streamed(client: RenderClient, renderer: Any, work: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """render_many_tokens (Renders streams) over the work, for `seconds`: calls per second and CPU per call."""

    def requests() -> Any:
        index = 0
        while time.perf_counter() < deadline:
            case = work[index % len(work)]
            yield renderer.render_request(case["messages"], tools=case["tools"], add_generation_prompt=True)
            index += 1

    cpu, started = time.process_time(), time.perf_counter()
    deadline = started + seconds
    calls = sum(1 for _ in client.render_many_tokens(requests(), concurrency=STREAMED_CONCURRENCY))
    elapsed = time.perf_counter() - started
    return {"calls_per_s": calls / elapsed, "cpu_ms_per_call": (time.process_time() - cpu) * 1e3 / calls}


def protocol(quick: bool) -> list[dict[str, Any]]:
    seconds = 4.0 if quick else 15.0
    local = reference_renderer(MODEL)
    work = cases(local)
    rows = []
    with (
        running_server("--workers", "1") as server,
        RenderClient(server.target, timeout=120, connections=4) as client,
    ):
        remote_renderer = client.renderer(MODEL)
        server_side = lambda r, c: render_client.build_training_sample(  # noqa: E731
            r, c["messages"], tools=c["tools"], role_to_mask=assistant_only
        )
        plan: list[tuple[str, Call, Call | None]] = [
            ("build_training_sample (RenderTrainingSample)", CALLS["build_training_sample"], server_side),
            ("renderers.build_training_sample(remote)", CALLS["build_training_sample"], CALLS["build_training_sample"]),
            *((name, call, call) for name, call in CALLS.items() if name != "build_training_sample"),
        ]
        plan.append(("render (render_many_tokens, streamed)", CALLS["render"], None))
        for name, local_call, remote_call in plan:
            for case in work[:4]:  # warm both sides
                local_call(local, case)
                if remote_call is not None:
                    remote_call(remote_renderer, case)
            anchor = in_process(local_call, local, work, seconds)
            if remote_call is None:
                service = streamed(client, remote_renderer, work, seconds)
            else:
                service = remote(remote_call, remote_renderer, work, seconds)
            row = {
                "call": name,
                "concurrency": STREAMED_CONCURRENCY if remote_call is None else CONCURRENCY,
                "in_process_per_s": anchor["calls_per_s"],
                "remote_per_s": service["calls_per_s"],
                "ratio": service["calls_per_s"] / anchor["calls_per_s"],
                "in_process_cpu_ms": anchor["cpu_ms_per_call"],
                "client_cpu_ms": service["cpu_ms_per_call"],
                "client_cpu_share": service["cpu_ms_per_call"] / anchor["cpu_ms_per_call"],
            }
            rows.append(row)
            print(
                f"{name:46} in-process {row['in_process_per_s']:7.1f}/s  remote c={row['concurrency']} "
                f"{row['remote_per_s']:7.1f}/s  x{row['ratio']:.2f}  client CPU "
                f"{row['client_cpu_ms']:.2f} ms = {row['client_cpu_share']:.0%} of in-process {row['in_process_cpu_ms']:.2f} ms",
                flush=True,
            )
    return rows
