"""Benchmarks: in-process renderers beside render-service, measured in the same run.

    .venv/bin/python -m bench              # everything (about 15 minutes on 2 cores)
    .venv/bin/python -m bench --quick      # shorter runs, same tables
    .venv/bin/python -m bench --only throughput,latency

Prints one table per part and writes bench/results/latest.json. Every service
figure stands beside an in-process figure measured minutes (for throughput:
seconds) earlier on the same machine, and ratios are taken between the two,
because this class of machine changes speed from minute to minute.

Parts:
- throughput: per model, in-process build_training_sample on one core (the
  anchor) beside the service through render_client, unary and streaming,
  workers 1 and all cores, concurrency 1, 8 and 64; server CPU per sample, over
  the anchor's and over the server's own render CPU (drift-free).
- latency: added latency at concurrency 1 for a sample of about 1k tokens.
- length: time per token for samples of about 1k, 4k, 16k and 64k tokens.
- images: time per pixel for qwen3-vl images from 256x256 to 4096x4096.
- memory: peak RSS and PSS per worker with the default registry loaded.
- floor: gRPC Python's own CPU per call with no rendering, and what this
  machine charges a thread per wake-up (bench/floor.py).
- protocol: renderers' Renderer protocol through a remote renderer beside the
  same calls in-process: rates and client CPU per call (bench/protocol.py).
- images_wire: pixel tensors raw beside their compact form (issue 13): bytes per
  image, images/s over a 1 Gbit/s link, client CPU, peak RSS (bench/images_wire.py).
- rl: an RL env server's turns in-process beside a remote renderer (coalesced calls),
  and VLM images held once per client: GRPO groups, multi-turn rollouts (bench/rl.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import renderers
from PIL import Image

from bench.floor import floor
from bench.images_wire import images_wire
from bench.load import metric_total
from bench.protocol import protocol
from bench.rl import rl
from bench.work import assistant_only, working_set
from render_client import RenderClient
from tests.reference import reference_renderer
from tests.support import DEFAULT_MODELS, ROOT, ServerProcess, corpus, running_server

RESULTS = ROOT / "bench" / "results" / "latest.json"
CORES = len(os.sched_getaffinity(0))
PARTS = ("throughput", "latency", "length", "images", "memory", "floor", "protocol", "images_wire", "rl")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def in_process(model: str, conversations: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The anchor: build_training_sample in this process, on one core, for `seconds`."""
    renderer = reference_renderer(model)
    latencies: list[float] = []
    tokens = 0
    cpu = time.process_time()
    started = time.perf_counter()
    index = 0
    while time.perf_counter() - started < seconds:
        conversation = conversations[index % len(conversations)]
        index += 1
        begun = time.perf_counter()
        sample = renderers.build_training_sample(
            renderer, conversation["messages"], tools=conversation.get("tools"), role_to_mask=assistant_only
        )
        latencies.append((time.perf_counter() - begun) * 1e3)
        tokens += len(sample.token_ids)
    return {
        "samples": len(latencies),
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "latencies_ms": latencies,
    }


def summarize(samples: int, tokens: int, seconds: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "samples": samples,
    }


class LoadProcess:
    """A bench.load process driving one model on a server, command by command."""

    def __init__(self, server: ServerProcess, model: str, connections: int, requests_file: Path) -> None:
        command = [
            sys.executable, "-m", "bench.load", "--target", server.target, "--model", model,
            "--connections", str(connections), "--requests", str(requests_file),
            "--server-pid", str(server.process.pid), "--metrics-url", f"{server.http}/metrics",
        ]  # fmt: skip
        self._process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._readline())["ready"]

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("bench.load died")
        return line

    def run(self, mode: str, concurrency: int, seconds: float) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"mode": mode, "concurrency": concurrency, "seconds": seconds}) + "\n")
        self._process.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=60)


def combine(service_blocks: list[dict[str, Any]], anchor_blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from alternating blocks: pooled rates, median per-block ratios."""
    samples = sum(block["samples"] for block in service_blocks)
    seconds = sum(block["seconds"] for block in service_blocks)
    latencies = [ms for block in service_blocks for ms in block["latencies_ms"]]
    service = summarize(samples, sum(block["tokens"] for block in service_blocks), seconds, latencies)
    service["errors"] = sum(block["errors"] for block in service_blocks)
    service["server_cpu_per_sample_ms"] = sum(b["server_cpu_seconds"] for b in service_blocks) / max(samples, 1) * 1e3
    service["client_cpu_per_sample_ms"] = sum(b["client_cpu_seconds"] for b in service_blocks) / max(samples, 1) * 1e3
    # Server CPU over the CPU its renders took, both read from the same processes in the
    # same windows: the service's own cost, free of the machine's drift.
    service["overhead_ratio"] = sum(b["server_cpu_seconds"] for b in service_blocks) / max(
        sum(b["renderer_cpu_seconds"] for b in service_blocks), 1e-9
    )
    anchor_samples = sum(block["samples"] for block in anchor_blocks)
    anchor = summarize(
        anchor_samples,
        sum(block["tokens"] for block in anchor_blocks),
        sum(block["seconds"] for block in anchor_blocks),
        [ms for block in anchor_blocks for ms in block["latencies_ms"]],
    )
    anchor["cpu_per_sample_ms"] = sum(block["cpu_seconds"] for block in anchor_blocks) / anchor_samples * 1e3
    pairs = list(zip(service_blocks, anchor_blocks, strict=True))
    return {
        "in_process": anchor,
        "service": service,
        # Per pair of neighbouring blocks, then the median: robust to the machine's drift.
        "throughput_ratio": statistics.median(
            (s["samples"] / s["seconds"]) / (a["samples"] / a["seconds"]) for s, a in pairs
        ),
        "server_cpu_ratio": statistics.median(
            (s["server_cpu_seconds"] / max(s["samples"], 1)) / (a["cpu_seconds"] / a["samples"]) for s, a in pairs
        ),
    }


def throughput(quick: bool, models: list[str]) -> list[dict[str, Any]]:
    block, rounds = (1.0, 3) if quick else (1.5, 4)
    rows = []
    sets = {model: working_set(model) for model in models}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, CORES}):
            with running_server("--workers", str(workers)) as server:
                for model in models:
                    requests_file = Path(tmp) / f"{model}.json"
                    requests_file.write_text(json.dumps(sets[model]))
                    # Several connections per worker: the kernel assigns each to a worker at random.
                    load = LoadProcess(server, model, 4 * workers, requests_file)
                    load.run("unary", 8, 1.0)  # warm up connections, workers and caches
                    in_process(model, sets[model], 0.5)
                    for mode in ("unary", "stream"):
                        for concurrency in (1, 8, 64):
                            anchors, services = [], []
                            for _ in range(rounds):
                                anchors.append(in_process(model, sets[model], block))
                                services.append(load.run(mode, concurrency, block))
                            row = {"model": model, "mode": mode, "workers": workers, "concurrency": concurrency}
                            row |= combine(services, anchors)
                            rows.append(row)
                            print_row(row)
                    load.close()
    return rows


def print_row(row: dict[str, Any]) -> None:
    service, anchor = row["service"], row["in_process"]
    print(
        f"{row['model']:15} {row['mode']:6} w={row['workers']} c={row['concurrency']:<3} "
        f"{service['samples_per_s']:7.1f}/s {service['tokens_per_s']:9.0f} tok/s "
        f"p50 {service['p50_ms']:7.2f} p99 {service['p99_ms']:8.2f} ms | in-process {anchor['samples_per_s']:6.1f}/s "
        f"| ratio {row['throughput_ratio']:.2f} | server CPU/sample x{row['server_cpu_ratio']:.2f} "
        f"(x{service['overhead_ratio']:.2f} of its render CPU) | errors {service['errors']}",
        flush=True,
    )


def synthesized(tokens: int) -> list[dict[str, Any]]:
    """A conversation of about `tokens` Qwen3 tokens, built from corpus text."""
    texts = [m["content"] for c in corpus() for m in c["messages"] if isinstance(m["content"], str) and m["content"]]
    renderer = reference_renderer("qwen3")
    messages: list[dict[str, Any]] = []
    index = 0
    while True:
        messages.append({"role": "user", "content": texts[index % len(texts)]})
        messages.append({"role": "assistant", "content": texts[(index + 1) % len(texts)]})
        index += 2
        if len(renderers.build_training_sample(renderer, messages).token_ids) >= tokens:
            return messages


def paired(local: Callable[[], Any], remote: Callable[[], Any], rounds: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of `local` and `remote`, alternating call by call."""
    local_ms, remote_ms = [], []
    for _ in range(rounds):
        for call, into in ((local, local_ms), (remote, remote_ms)):
            begun = time.perf_counter()
            call()
            into.append((time.perf_counter() - begun) * 1e3)
    return local_ms, remote_ms


def latency(client: RenderClient, quick: bool) -> dict[str, Any]:
    messages = synthesized(1000)
    renderer = reference_renderer("qwen3")
    remote = client.renderer("qwen3")
    tokens = len(renderers.build_training_sample(renderer, messages).token_ids)
    local_ms, remote_ms = paired(
        lambda: renderers.build_training_sample(renderer, messages),
        lambda: client.render(remote.request(messages)),
        100 if quick else 400,
    )
    result = {
        "tokens": tokens,
        "in_process_p50_ms": percentile(local_ms, 50),
        "service_p50_ms": percentile(remote_ms, 50),
        "added_p50_ms": percentile(remote_ms, 50) - percentile(local_ms, 50),
        "in_process_p99_ms": percentile(local_ms, 99),
        "service_p99_ms": percentile(remote_ms, 99),
    }
    print(
        f"latency, concurrency 1, {tokens} tokens: in-process p50 {result['in_process_p50_ms']:.2f} ms, "
        f"service p50 {result['service_p50_ms']:.2f} ms, added {result['added_p50_ms']:.2f} ms",
        flush=True,
    )
    return result


def length_sweep(client: RenderClient, quick: bool) -> list[dict[str, Any]]:
    rows = []
    renderer = reference_renderer("qwen3")
    remote = client.renderer("qwen3")
    for target in (1000, 4000, 16000, 64000):
        messages = synthesized(target)
        tokens = len(renderers.build_training_sample(renderer, messages).token_ids)
        rounds = max(3, (20 if quick else 60) * 1000 // target)
        local_ms, remote_ms = paired(
            lambda messages=messages: renderers.build_training_sample(renderer, messages),
            lambda messages=messages: client.render(remote.request(messages)),
            rounds,
        )
        row = {
            "tokens": tokens,
            "in_process_us_per_token": statistics.median(local_ms) * 1e3 / tokens,
            "service_us_per_token": statistics.median(remote_ms) * 1e3 / tokens,
        }
        row["ratio"] = row["service_us_per_token"] / row["in_process_us_per_token"]
        rows.append(row)
        print(
            f"length {tokens:6} tokens: in-process {row['in_process_us_per_token']:.2f} us/token, "
            f"service {row['service_us_per_token']:.2f} us/token, ratio {row['ratio']:.2f}",
            flush=True,
        )
    return rows


def image(side: int, seed: int) -> bytes:
    """A distinct JPEG per seed, so the renderer's image cache never answers."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_sweep(client: RenderClient, server: ServerProcess, quick: bool) -> list[dict[str, Any]]:
    """In-process beside service time per image size, and the service time split in two:
    the server's own (decode, render, encode: from /metrics) and the rest, the transport
    (which includes the one copy of the answer's bytes, made after the server's timer stops)."""
    rows = []
    renderer = reference_renderer("qwen3-vl")
    remote = client.renderer("qwen3-vl")
    metrics_url = f"{server.http}/metrics"
    seed = 0
    for side in (256, 1024, 2048, 4096):
        rounds = {256: 20, 1024: 6, 2048: 3, 4096: 2}[side] // (2 if quick else 1) or 1
        local_ms, remote_ms, server_ms, wire_mb = [], [], [], 0.0
        for _ in range(rounds):
            for into in (local_ms, remote_ms):
                seed += 1
                messages = [
                    {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": image(side, seed)}]},
                    {"role": "assistant", "content": "A picture."},
                ]  # fmt: skip
                if into is remote_ms:
                    inside_before = metric_total(metrics_url, "render_request_duration_seconds_sum")
                begun = time.perf_counter()
                if into is local_ms:
                    renderers.build_training_sample(renderer, messages)
                else:
                    sample = client.render(remote.request(messages))
                    wire_mb = sample.multi_modal_data.mm_items["image"][0]["pixel_values"].nbytes / 2**20
                into.append((time.perf_counter() - begun) * 1e3)
                if into is remote_ms:
                    inside = metric_total(metrics_url, "render_request_duration_seconds_sum") - inside_before
                    server_ms.append(inside * 1e3)
                del messages
        pixels = side * side
        row = {
            "side": side,
            "pixel_values_mib": wire_mb,
            "in_process_ms": statistics.median(local_ms),
            "service_ms": statistics.median(remote_ms),
            "in_process_ns_per_pixel": statistics.median(local_ms) * 1e6 / pixels,
            "service_ns_per_pixel": statistics.median(remote_ms) * 1e6 / pixels,
        }
        row["service_over_in_process"] = row["service_ms"] / row["in_process_ms"] - 1
        row["server_ms"] = statistics.median(server_ms)
        row["transport_ms"] = statistics.median(r - s for r, s in zip(remote_ms, server_ms, strict=True))
        row["transport_overhead"] = row["transport_ms"] / row["server_ms"]
        rows.append(row)
        print(
            f"image {side}x{side} ({wire_mb:.0f} MiB of pixel_values): in-process {row['in_process_ms']:.1f} ms, "
            f"service {row['service_ms']:.1f} ms ({row['service_over_in_process'] * 100:+.1f}%); inside the server "
            f"{row['server_ms']:.1f} ms, transport {row['transport_ms']:.1f} ms: "
            f"adds {row['transport_overhead'] * 100:+.1f}% to the render",
            flush=True,
        )
    return rows


def memory(server: ServerProcess) -> list[dict[str, Any]]:
    rows = []
    processes = [("supervisor", server.process.pid)]
    processes += [("worker gRPC", pid) for pid in server.workers()]
    processes += [("worker render", pid) for pid in server.render_processes()]
    for role, pid in processes:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        rollup = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        row = {
            "role": role,
            "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
            "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "pss_mib": int(rollup["Pss"].split()[0]) / 1024,
        }
        rows.append(row)
        print(
            f"{role:13} peak RSS {row['peak_rss_mib']:.0f} MiB, RSS {row['rss_mib']:.0f} MiB, PSS {row['pss_mib']:.0f} MiB"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated models (throughput)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict[str, Any] = {
        # Load averages (1, 5, 15 min) at the start and the end: the machine may be shared.
        "machine": {"cores": CORES, "cpu": cpu_model(), "python": sys.version.split()[0], "load": [os.getloadavg()]},
        "renderers": renderers.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if "throughput" in parts:
        results["throughput"] = throughput(args.quick, args.models.split(","))
    if parts & {"latency", "length", "images", "memory"}:
        with running_server("--workers", "1") as server, RenderClient(server.target, timeout=600) as client:
            if "memory" in parts:
                results["memory_after_load"] = memory(server)
            if "latency" in parts:
                results["latency"] = latency(client, args.quick)
            if "length" in parts:
                results["length"] = length_sweep(client, args.quick)
            if "images" in parts:
                results["images"] = image_sweep(client, server, args.quick)
            if "memory" in parts:
                results["memory_after_runs"] = memory(server)
    if "floor" in parts:
        results["floor"] = floor(args.quick)
    if "protocol" in parts:
        results["protocol"] = protocol(args.quick)
    if "images_wire" in parts:
        results["images_wire"] = images_wire(args.quick)
    if "rl" in parts:
        results["rl"] = rl(args.quick)
    results["machine"]["load"].append(os.getloadavg())
    print(f"load average at the start {results['machine']['load'][0]}, at the end {results['machine']['load'][1]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
