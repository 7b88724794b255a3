"""RL rollouts (issue 21): an env server's turns in-process beside a remote renderer, and VLM images.

    .venv/bin/python -m bench --only rl [--quick]

Four parts, in-process and remote side by side in one run, against one
2-worker render-server on this machine (client and server share its cores):

1. env: the env server of bench/rl_env.py (rollouts replayed turn by turn:
   render or bridge, then parse the engine's completion) for qwen3 and
   deepseek-v4 at R = 64 and 256 threads, an in-process process (one renderer
   behind a lock) and a remote one (one RenderClient, coalescing) taking turns
   block by block: turns per second, the env server's CPU per turn, the
   server's CPU per turn (every process under its supervisor), latency p50/p99
   by turn index, and that every turn's results equal the in-process ones.
   Ratios are taken block beside block, then the median over the rounds. A third
   process sends every call alone (coalesce_window=None): the client before
   coalescing, and a fourth runs the rollouts as asyncio tasks on one
   AsyncRenderClient (as an asyncio env server would), in the same rounds.
2. calls: each call kind alone (render, parse_response, bridge_to_next_turn)
   from R = 64 threads: the env server's CPU per call, remote over in-process.
3. group: a GRPO group of G = 16 rollouts of one 1024x1024-image prompt,
   started together: bytes the client received (a counting relay) over one
   render's, client memory held by the 16 results over one result's, with the
   client holding images (the default) and without (image_memory_mb=0), and
   the wall time beside 16 renders in-process (one renderer behind a lock).
4. multiturn: a 6-turn VLM rollout re-rendered whole every turn (verifiers
   skips the bridge for multimodal prompts): bytes received over its first
   turn's, and memory held by its 6 prompts over one.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.images_wire import noise_image
from bench.load import server_cpu
from render_client import RenderClient
from tests.reference import reference_renderer
from tests.support import ROOT, ServerProcess, counting_relay, running_server

TEXT_MODELS = ("qwen3", "deepseek-v4")
THREADS = (64, 256)
CALL_THREADS = 64
KINDS = ("render", "parse", "bridge")
VLM = "qwen3-vl"
GROUP = 16
TURNS = 6
# One connection: two batches in flight (coalescing.IN_FLIGHT_PER_CONNECTION), both render
# processes of one worker busy; more connections make smaller batches for no more throughput here.
CONNECTIONS = 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class EnvProcess:
    """A bench.rl_env process, in-process (no target) or remote, driven command by command."""

    def __init__(self, model: str, target: str | None, *, coalesce: bool = True, asyncio: bool = False) -> None:
        command = [sys.executable, "-m", "bench.rl_env", "--model", model]
        if target is not None:
            command += ["--target", target, "--connections", str(CONNECTIONS)]
            if not coalesce:
                command += ["--coalesce-window", "-1"]
            if asyncio:
                command += ["--asyncio"]
        self._process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self._readline())

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("bench.rl_env died")
        return line

    def run(self, **command: Any) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        result: dict[str, Any] = json.loads(self._readline())
        return result

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=120)


def measured(server: ServerProcess, env: EnvProcess, **command: Any) -> dict[str, Any]:
    """One block of `env`, with the server's CPU over the same window."""
    before = server_cpu(server.process.pid)
    result = env.run(**command)
    result["server_cpu_seconds"] = server_cpu(server.process.pid) - before
    return result


def env_part(server: ServerProcess, quick: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    block, rounds = (3.0, 2) if quick else (6.0, 3)
    call_block = 2.0 if quick else 4.0
    rows, call_rows = [], []
    for model in TEXT_MODELS:
        local, remote = EnvProcess(model, None), EnvProcess(model, server.target)
        alone = EnvProcess(model, server.target, coalesce=False)  # each call on its own, as before Calls
        tasks = EnvProcess(model, server.target, asyncio=True)  # R asyncio tasks, one AsyncRenderClient
        for threads in THREADS:
            pairs, alone_pairs, task_pairs = [], [], []
            for _ in range(rounds):
                anchor = measured(server, local, run="rollouts", threads=threads, seconds=block)
                pairs.append((anchor, measured(server, remote, run="rollouts", threads=threads, seconds=block)))
                alone_pairs.append((anchor, measured(server, alone, run="rollouts", threads=threads, seconds=block)))
                task_pairs.append((anchor, measured(server, tasks, run="rollouts", threads=threads, seconds=block)))
            row = env_row(model, threads, pairs)
            row["each_call_alone"] = env_row(model, threads, alone_pairs)
            row["asyncio"] = env_row(model, threads, task_pairs)
            rows.append(row)
            print_env_row(row)
        for kind in KINDS:
            pairs = []
            for _ in range(rounds):
                anchor = local.run(run="calls", kind=kind, threads=CALL_THREADS, seconds=call_block)
                service = remote.run(run="calls", kind=kind, threads=CALL_THREADS, seconds=call_block)
                pairs.append((anchor, service))
            row = calls_row(model, kind, pairs)
            call_rows.append(row)
            print(
                f"{model:12} {kind:7} c={CALL_THREADS}: env CPU/call in-process {row['in_process_cpu_ms']:.3f} ms, "
                f"remote {row['remote_cpu_ms']:.3f} ms (x{row['cpu_ratio']:.2f}, per round "
                f"{' '.join(f'{r:.2f}' for r in row['cpu_ratio_per_round'])}); differences {row['differences']}",
                flush=True,
            )
        for env in (local, remote, alone, tasks):
            env.close()
    return rows, call_rows


def per_turn(block: dict[str, Any], key: str) -> float:
    return float(block[key]) / max(int(block["turns"]), 1)


def env_row(model: str, threads: int, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    def pooled(blocks: list[dict[str, Any]]) -> dict[str, Any]:
        turns = sum(b["turns"] for b in blocks)
        seconds = sum(b["seconds"] for b in blocks)
        by_turn: dict[int, list[float]] = {}
        for b in blocks:
            for turn, values in b["latencies_ms"].items():
                by_turn.setdefault(int(turn), []).extend(values)
        return {
            "turns_per_s": turns / seconds,
            "cpu_ms_per_turn": sum(b["cpu_seconds"] for b in blocks) / turns * 1e3,
            "server_cpu_ms_per_turn": sum(b["server_cpu_seconds"] for b in blocks) / turns * 1e3,
            "bridged_share": sum(b["bridged"] for b in blocks) / turns,
            "differences": sum(b["differences"] for b in blocks),
            "errors": sum(b.get("errors", 0) for b in blocks),
            "first_errors": sorted({e for b in blocks for e in b.get("first_errors", [])})[:3],
            "turns": turns,
            "latency_ms_by_turn": {
                turn + 1: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
                for turn, v in sorted(by_turn.items())
            },
            "batch_mean": (
                sum(b.get("calls_sent", 0) for b in blocks) / max(sum(b.get("batches_sent", 0) for b in blocks), 1)
            ),
        }

    anchors, services = [a for a, _ in pairs], [s for _, s in pairs]
    env_ratios = [per_turn(s, "cpu_seconds") / per_turn(a, "cpu_seconds") for a, s in pairs]
    rate_ratios = [(s["turns"] / s["seconds"]) / (a["turns"] / a["seconds"]) for a, s in pairs]
    server_ratios = [per_turn(s, "server_cpu_seconds") / per_turn(a, "cpu_seconds") for a, s in pairs]
    return {
        "model": model,
        "threads": threads,
        "in_process": pooled(anchors),
        "remote": pooled(services),
        "env_cpu_ratio": statistics.median(env_ratios),
        "env_cpu_ratio_per_round": env_ratios,
        "turns_per_s_ratio": statistics.median(rate_ratios),
        "turns_per_s_ratio_per_round": rate_ratios,
        "server_cpu_ratio": statistics.median(server_ratios),
        "server_cpu_ratio_per_round": server_ratios,
    }


def print_env_row(row: dict[str, Any]) -> None:
    local, remote = row["in_process"], row["remote"]
    print(
        f"{row['model']:12} R={row['threads']:<3} in-process {local['turns_per_s']:6.0f} turns/s "
        f"{local['cpu_ms_per_turn']:.2f} ms CPU/turn | remote {remote['turns_per_s']:6.0f} turns/s, env "
        f"{remote['cpu_ms_per_turn']:.2f} ms, server {remote['server_cpu_ms_per_turn']:.2f} ms CPU/turn, "
        f"batches of {remote['batch_mean']:.1f} | env CPU x{row['env_cpu_ratio']:.2f}, turns/s "
        f"x{row['turns_per_s_ratio']:.2f}, server CPU x{row['server_cpu_ratio']:.2f} of in-process | "
        f"differences {local['differences'] + remote['differences']} of {local['turns'] + remote['turns']} turns, "
        f"errors {local['errors'] + remote['errors']}",
        flush=True,
    )
    alone = row["each_call_alone"]
    print(
        f"    each call alone (coalesce_window=None): {alone['remote']['turns_per_s']:.0f} turns/s, env CPU "
        f"x{alone['env_cpu_ratio']:.2f}, turns/s x{alone['turns_per_s_ratio']:.2f}, server CPU "
        f"x{alone['server_cpu_ratio']:.2f} of in-process; differences {alone['remote']['differences']}, "
        f"rollouts ended by an error {alone['remote']['errors']} {alone['remote']['first_errors']}"
    )
    tasks = row["asyncio"]
    print(
        f"    asyncio tasks (AsyncRenderClient): {tasks['remote']['turns_per_s']:.0f} turns/s, env CPU "
        f"{tasks['remote']['cpu_ms_per_turn']:.2f} ms x{tasks['env_cpu_ratio']:.2f}, turns/s "
        f"x{tasks['turns_per_s_ratio']:.2f}, server CPU x{tasks['server_cpu_ratio']:.2f} of in-process, batches of "
        f"{tasks['remote']['batch_mean']:.1f}; differences {tasks['remote']['differences']}, "
        f"rollouts ended by an error {tasks['remote']['errors']} {tasks['remote']['first_errors']}"
    )
    turns = [t for t, v in remote["latency_ms_by_turn"].items() if v["n"] >= 20]
    print("    turn          " + " ".join(f"{t:>11}" for t in turns))
    for name, side in (("in-process", local), ("remote", remote)):
        cells = [side["latency_ms_by_turn"].get(t) for t in turns]
        print(f"    {name:10} ms " + " ".join(f"{c['p50']:5.1f}/{c['p99']:5.1f}" if c else f"{'-':>11}" for c in cells))


def calls_row(model: str, kind: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    def per_call(block: dict[str, Any]) -> float:
        return float(block["cpu_seconds"]) / max(int(block["calls"]), 1) * 1e3

    ratios = [per_call(s) / per_call(a) for a, s in pairs]
    return {
        "model": model,
        "kind": kind,
        "threads": CALL_THREADS,
        "in_process_cpu_ms": statistics.median(per_call(a) for a, _ in pairs),
        "remote_cpu_ms": statistics.median(per_call(s) for _, s in pairs),
        "cpu_ratio": statistics.median(ratios),
        "cpu_ratio_per_round": ratios,
        "differences": sum(a["differences"] + s["differences"] for a, s in pairs),
    }


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def prompt(image: bytes, turns: int = 0) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Describe the picture."}, {"type": "image", "image": image}],
        }
    ]
    for turn in range(turns):
        messages.append({"role": "assistant", "content": f"It looks like noise, part {turn}: grey, then grain."})
        messages.append({"role": "user", "content": "Look again, closer, and tell me more."})
    return messages


def distinct_bytes(results: list[Any]) -> int:
    """Bytes of the distinct buffers under the results' arrays (a view counts its base once)."""
    buffers: dict[int, int] = {}
    for result in results:
        media = result.multi_modal_data
        for items in media.mm_items.values() if media is not None else ():
            for item in items:
                for array in item.values():
                    base = array
                    while isinstance(base, np.ndarray) and base.base is not None:
                        base = base.base
                    buffers[id(base)] = max(buffers.get(id(base), 0), int(array.nbytes))
    return sum(buffers.values())


def equal(got: Any, want: Any) -> bool:
    if got.token_ids != want.token_ids or got.multi_modal_data.mm_hashes != want.multi_modal_data.mm_hashes:
        return False
    return all(
        np.array_equal(a[name], b[name])
        for a, b in zip(got.multi_modal_data.mm_items["image"], want.multi_modal_data.mm_items["image"], strict=True)
        for name in b
    )


def traced(work: Callable[[], list[Any]]) -> tuple[list[Any], int, float, float]:
    """`work()`'s results, the Python memory they hold after it, its wall time and this process's CPU."""
    tracemalloc.start()
    started, cpu = time.perf_counter(), time.process_time()
    results = work()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return results, held, seconds, cpu


def at_once(call: Callable[[], Any], count: int) -> list[Any]:
    results: list[Any] = [None] * count

    def rollout(slot: int) -> None:
        results[slot] = call()

    threads = [threading.Thread(target=rollout, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def group_part(server: ServerProcess, seed: int) -> list[dict[str, Any]]:
    messages = prompt(noise_image(1024, seed))
    local = reference_renderer(VLM)
    want = local.render(messages, add_generation_prompt=True)
    local_lock = threading.Lock()

    def locally() -> Any:
        with local_lock:
            return local.render(messages, add_generation_prompt=True)

    local._image_cache.clear()  # a renderer that has not seen the image, as a fresh rollout's
    rows = []
    _, in_process_one, in_process_seconds_one, _ = traced(lambda: [locally()])
    local._image_cache.clear()
    in_process, in_process_held, in_process_seconds, in_process_cpu = traced(lambda: at_once(locally, GROUP))
    for memory_mb, name in ((256.0, "images held (default)"), (0.0, "image_memory_mb=0")):
        with (
            counting_relay(server.target) as (address, counted),
            RenderClient(address, timeout=600, image_memory_mb=memory_mb) as client,
        ):
            renderer = client.renderer(VLM)
            before = counted[0]
            (one,), one_held, one_seconds, _ = traced(
                lambda renderer=renderer: [renderer.render(messages, add_generation_prompt=True)]
            )
            one_bytes = counted[0] - before
        with (
            counting_relay(server.target) as (address, counted),
            RenderClient(address, timeout=600, image_memory_mb=memory_mb) as client,
        ):
            renderer = client.renderer(VLM)
            before = counted[0]
            results, held, seconds, cpu = traced(
                lambda renderer=renderer: at_once(lambda: renderer.render(messages, add_generation_prompt=True), GROUP)
            )
            group_bytes = counted[0] - before
        row = {
            "client": name,
            "one_render_bytes": one_bytes,
            "group_bytes": group_bytes,
            "bytes_ratio": group_bytes / one_bytes,
            "one_result_mib": distinct_bytes([one]) / 2**20,
            "group_results_mib": distinct_bytes(results) / 2**20,
            "memory_ratio": distinct_bytes(results) / distinct_bytes([one]),
            "traced_one_mib": one_held / 2**20,
            "traced_group_mib": held / 2**20,
            "group_seconds": seconds,
            "one_seconds": one_seconds,
            "group_client_cpu_s": cpu,
            "in_process_group_seconds": in_process_seconds,
            "in_process_group_cpu_s": in_process_cpu,
            "in_process_one_seconds": in_process_seconds_one,
            "in_process_memory_ratio": distinct_bytes(in_process) / distinct_bytes([want]),
            "in_process_traced_one_mib": in_process_one / 2**20,
            "in_process_traced_group_mib": in_process_held / 2**20,
            "equal": all(equal(result, want) for result in results),
        }
        rows.append(row)
        print(
            f"GRPO group, G={GROUP}, 1024x1024, {name}: received {row['bytes_ratio']:.2f}x one render's bytes "
            f"({group_bytes:,} vs {one_bytes:,}); results hold {row['group_results_mib']:.1f} MiB = "
            f"{row['memory_ratio']:.2f}x one result ({row['one_result_mib']:.1f} MiB; traced "
            f"{row['traced_group_mib']:.1f} vs {row['traced_one_mib']:.1f} MiB); {seconds:.2f} s, client CPU "
            f"{cpu:.2f} s | in-process (one renderer behind a lock) {in_process_seconds:.2f} s, CPU "
            f"{in_process_cpu:.2f} s, {row['in_process_memory_ratio']:.2f}x one result | equal {row['equal']}",
            flush=True,
        )
    return rows


def multiturn_part(server: ServerProcess, seed: int) -> list[dict[str, Any]]:
    image = noise_image(1024, seed)
    local = reference_renderer(VLM)
    rows = []
    for memory_mb, name in ((256.0, "images held (default)"), (0.0, "image_memory_mb=0")):
        with (
            counting_relay(server.target) as (address, counted),
            RenderClient(address, timeout=600, image_memory_mb=memory_mb) as client,
        ):
            renderer = client.renderer(VLM)
            sizes, results, same = [], [], True
            for turn in range(TURNS):
                messages = prompt(image, turn)
                before = counted[0]
                result = renderer.render(messages, add_generation_prompt=True)
                sizes.append(counted[0] - before)
                results.append(result)
                same = same and equal(result, local.render(messages, add_generation_prompt=True))
        row = {
            "client": name,
            "bytes_per_turn": sizes,
            "bytes_ratio": sum(sizes) / sizes[0],
            "memory_ratio": distinct_bytes(results) / distinct_bytes(results[:1]),
            "equal": same,
        }
        rows.append(row)
        print(
            f"VLM rollout, {TURNS} turns re-rendered whole, 1024x1024, {name}: received {row['bytes_ratio']:.2f}x "
            f"its first turn's bytes (per turn {', '.join(f'{size:,}' for size in sizes)}); its {TURNS} prompts "
            f"hold {row['memory_ratio']:.2f}x one's memory | equal {same}",
            flush=True,
        )
    return rows


def rl(quick: bool) -> dict[str, Any]:
    with running_server("--workers", "2") as server:
        group = group_part(server, seed=2101)
        multiturn = multiturn_part(server, seed=2102)
        env, calls = env_part(server, quick)
    result = {"env": env, "calls": calls, "group": group, "multiturn": multiturn}
    print_targets(result)
    return result


def print_targets(result: dict[str, Any]) -> None:
    print("\ntargets:")
    for row in result["env"]:
        where = f"{row['model']} R={row['threads']}"
        print(f"  env-server CPU per turn <= 0.25x in-process, {where}: x{row['env_cpu_ratio']:.2f}")
        print(f"  turns/s >= in-process, {where}: x{row['turns_per_s_ratio']:.2f}")
        print(f"  server CPU per turn <= 1.2x in-process CPU per turn, {where}: x{row['server_cpu_ratio']:.2f}")
    for row in result["calls"]:
        print(f"  {row['model']} {row['kind']} cheaper for the client than in-process: x{row['cpu_ratio']:.2f}")
    held = result["group"][0]
    print(
        f"  group of {GROUP}: bytes <= 1.2x one render: x{held['bytes_ratio']:.2f}; memory <= 2x: x{held['memory_ratio']:.2f}"
    )
    print(f"  {TURNS}-turn VLM rollout: bytes <= 1.5x its first turn: x{result['multiturn'][0]['bytes_ratio']:.2f}")
