"""Pixel tensors on the wire (issue 13): raw float32 beside the exact compact form, in one run.

    .venv/bin/python -m bench --only images_wire [--quick]

Four tables, each raw (`render-server --raw-tensors`) beside compact (the default),
qwen3-vl from the default registry, one server set at a time:

1. bytes: the serialised RenderTrainingSampleResponse of one image, from a raw
   gRPC call (no response deserializer: the bytes as they travel), and what a
   `--compression gzip` server puts on the wire (a counting relay), for square
   noise-like JPEGs (bench/__main__.py's image()) and a smooth, natural-ish one,
   256 to 4096 px; the client decodes both answers and their samples must be
   the same (pixel_values bit for bit).
2. link: images per second through `render_many` (c=8, default workers) for
   1024x1024 JPEGs, server and client inside a network namespace made for the
   run (`unshare --net --pid`: when its first process ends the kernel ends the
   rest), loopback unshaped beside a tc tbf of 1 Gbit/s, raw and compact servers
   taking turns, shaped and unshaped blocks taking turns on each.
3. client CPU: this process's CPU per sample through render_many (c=8) over
   in-process CPU per sample (renderers.build_training_sample, reference
   renderer), block beside block, for every default model; the default client
   (one connection) with compact tensors materialised and kept
   (`compact_tensors=True`), eight connections, and a raw server for qwen3-vl.
4. memory: peak RSS (VmHWM) of the server's gRPC process, its render processes
   and a client process during a 4096x4096 row, fresh processes per config
   (VmHWM is a lifetime peak).

Also runnable on its own pieces (what the parts start in child processes):
    python -m bench.images_wire link --seconds 8 --rounds 3      # inside a namespace only
    python -m bench.images_wire rss-client --target HOST:PORT [--kept] IMAGE.jpg ...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import renderers
from PIL import Image

from bench.load import renderer_cpu, server_cpu
from bench.work import assistant_only, working_set
from render_client import RenderClient
from render_client.channel import channel_options
from render_wire.compact import materialize_all
from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_response
from tests.reference import reference_renderer
from tests.support import DEFAULT_MODELS, ROOT, ServerProcess, counting_relay, running_server

MODEL = "qwen3-vl"
SIDES = (256, 512, 1024, 2048, 4096)
CONCURRENCY = 8
LINK_RATE = "1gbit"
TBF = ["tbf", "rate", LINK_RATE, "burst", "256kb", "latency", "50ms"]
RAW_FLAG = ("--raw-tensors",)
METHOD = "/" + pb.DESCRIPTOR.services_by_name["RenderService"].full_name + "/RenderTrainingSample"


# ---------------------------------------------------------------------------
# Images and conversations
# ---------------------------------------------------------------------------


def noise_image(side: int, seed: int) -> bytes:
    """A distinct JPEG per seed, made as bench/__main__.py's image() makes them."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def smooth_image(side: int, seed: int = 0) -> bytes:
    """A natural-ish JPEG: a sky gradient, a soft sun, rolling hills, faint grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    sky = np.stack([90 + 80 * y, 140 + 70 * y, 235 - 40 * y], axis=-1)
    sun = np.exp(-(((x - 0.72) ** 2 + (y - 0.22) ** 2) / 0.004))[..., None] * np.array([160, 110, 0], np.float32)
    ridge = 0.62 + 0.06 * np.sin(7 * x + 1.3) + 0.03 * np.sin(23 * x)
    land = 1 / (1 + np.exp(np.clip((ridge - y) * side / 6, -50, 50)))  # a soft horizon
    hills = np.stack([60 + 50 * (1 - y), 120 + 40 * np.sin(3 * x) * (1 - y), 50 + 0 * y], axis=-1)
    picture = (sky + sun) * (1 - land[..., None]) + hills * land[..., None]
    grain = np.asarray(
        Image.fromarray(rng.integers(0, 255, (side // 8, side // 8), dtype=np.uint8)).resize((side, side))
    )
    picture += (grain[..., None].astype(np.float32) - 127) * 0.05
    buffer = io.BytesIO()
    Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_messages(data: bytes) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": data}]},
        {"role": "assistant", "content": "A picture."},
    ]


def image_request(data: bytes) -> pb.RenderTrainingSampleRequest:
    """The same conversation as image_messages, as a caller in any language builds it."""
    picture = pb.ContentPart(image=pb.MediaPart(data=data))
    return pb.RenderTrainingSampleRequest(
        model=MODEL,
        messages=[
            pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="Describe."), picture])),
            pb.Message(role="assistant", text="A picture."),
        ],
    )


def image_pool(count: int, side: int = 1024, first_seed: int = 10_000) -> list[bytes]:
    """Distinct images, more than the server's caches hold, so each render processes its image."""
    return [noise_image(side, first_seed + n) for n in range(count)]


def peak_rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


# ---------------------------------------------------------------------------
# 1. Bytes per image
# ---------------------------------------------------------------------------


def timed_answers(
    server: ServerProcess, cases: list[tuple[str, int, bytes]]
) -> Iterator[tuple[str, int, bytes, bytes, float, float]]:
    """Per case, one unary call on a raw channel (the answer's bytes as they travel):
    (kind, side, image, answer, wall seconds, this process's CPU seconds)."""
    with grpc.insecure_channel(server.target, options=channel_options()) as channel:
        call = channel.unary_unary(METHOD, request_serializer=pb.RenderTrainingSampleRequest.SerializeToString)
        call(image_request(noise_image(64, 1)), timeout=120)  # warm up
        for kind, side, data in cases:
            cpu, begun = time.process_time(), time.perf_counter()
            answer: bytes = call(image_request(data), timeout=600)
            yield kind, side, data, answer, time.perf_counter() - begun, time.process_time() - cpu


def response_bytes(server: ServerProcess, cases: list[tuple[str, int, bytes]]) -> list[dict[str, Any]]:
    """Per case: the serialised answer's size, the pixel tensor's share of it, a digest of the decoded sample."""
    out = []
    for kind, side, data, answer, elapsed, cpu in timed_answers(server, cases):
        [item] = pb.RenderTrainingSampleResponse.FromString(answer).sample.multi_modal_data.mm_items[0].items
        tensor = next(field.tensor for field in item.fields if field.name == "pixel_values")
        form = "compact" if tensor.HasField("compact") else "raw"
        pixel_bytes = len(tensor.compact.codes) + len(tensor.compact.tables) if form == "compact" else len(tensor.data)
        out.append(
            {
                "kind": kind,
                "side": side,
                "jpeg_bytes": len(data),
                "response_bytes": len(answer),
                "pixel_bytes": pixel_bytes,
                "form": form,
                "shape": list(tensor.shape),
                "table_sizes": list(tensor.compact.table_sizes),
                "call_ms": elapsed * 1e3,
                "client_cpu_ms": cpu * 1e3,
                "digest": sample_digest(answer),
            }
        )
        del answer, item, tensor
    return out


def gzip_wire_bytes(server: ServerProcess, cases: list[tuple[str, int, bytes]]) -> list[dict[str, Any]]:
    """Per case, from a `--compression gzip` server: the call's time and this process's CPU for it
    (gRPC inflating the answer), a digest of the decoded sample, then, on a second call through a
    counting relay (a fresh connection: HTTP/2 set-up included), the bytes that travel to the client."""
    out = []
    for kind, side, data, answer, elapsed, cpu in timed_answers(server, cases):
        with (
            counting_relay(server.target) as (address, counted),
            grpc.insecure_channel(address, options=channel_options()) as relayed,
        ):
            relayed.unary_unary(METHOD, request_serializer=pb.RenderTrainingSampleRequest.SerializeToString)(
                image_request(data), timeout=600
            )
        out.append(
            {
                "kind": kind,
                "side": side,
                "wire_bytes": counted[0],
                "call_ms": elapsed * 1e3,
                "client_cpu_ms": cpu * 1e3,
                "digest": sample_digest(answer),
            }
        )
        del answer
    return out


def sample_digest(answer: bytes) -> str:
    """sha256 of what the client decodes (tensors materialised): equal for equal samples."""
    sample = materialize_all(decode_response(answer))
    digest = hashlib.sha256()
    digest.update(np.asarray(sample.token_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(sample.loss_mask, dtype=np.int64).tobytes())
    for items in sample.multi_modal_data.mm_items.values():
        for item in items:
            for name in sorted(item):
                value = np.ascontiguousarray(item[name])
                digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
                digest.update(value.data)
    return digest.hexdigest()


def wire_bytes(quick: bool) -> list[dict[str, Any]]:
    cases = [("noise", side, noise_image(side, side)) for side in SIDES]
    cases += [("smooth", side, smooth_image(side)) for side in SIDES if not quick or side in (256, 1024, 4096)]
    answers: dict[str, list[dict[str, Any]]] = {}
    for form, flags in (("raw", RAW_FLAG), ("compact", ())):
        with running_server("--workers", "1", *flags) as server:
            answers[form] = response_bytes(server, cases)
    with running_server("--workers", "1", "--compression", "gzip") as server:
        gzipped = gzip_wire_bytes(server, cases)
    rows = []
    print(
        f"\n{'image':11} {'JPEG':>9} {'raw answer':>13} {'compact answer':>15} {'ratio':>7} {'pixels only':>11} "
        f"{'call ms raw':>11} {'compact':>8}  same sample?  | gzip: {'on wire':>12} {'ratio':>7} {'call ms':>8} "
        f"{'client CPU ms (compact)':>23} same?"
    )
    for raw, compact, squeezed in zip(answers["raw"], answers["compact"], gzipped, strict=True):
        assert raw["form"] == "raw", "the --raw-tensors server sent compact tensors"
        row = {
            "kind": raw["kind"],
            "side": raw["side"],
            "jpeg_bytes": raw["jpeg_bytes"],
            "pixel_values_shape": raw["shape"],
            "raw_response_bytes": raw["response_bytes"],
            "compact_response_bytes": compact["response_bytes"],
            "ratio": compact["response_bytes"] / raw["response_bytes"],
            "raw_pixel_bytes": raw["pixel_bytes"],
            "compact_pixel_bytes": compact["pixel_bytes"],
            "pixel_ratio": compact["pixel_bytes"] / raw["pixel_bytes"],
            "compact_form": compact["form"],
            "table_sizes": compact["table_sizes"],
            "over_one_eighth_bytes": compact["response_bytes"] - raw["response_bytes"] / 8,
            "same_sample": raw["digest"] == compact["digest"],
            "raw_call_ms": raw["call_ms"],
            "compact_call_ms": compact["call_ms"],
            "compact_client_cpu_ms": compact["client_cpu_ms"],
            "gzip_wire_bytes": squeezed["wire_bytes"],
            "gzip_ratio": squeezed["wire_bytes"] / raw["response_bytes"],
            "gzip_call_ms": squeezed["call_ms"],
            "gzip_client_cpu_ms": squeezed["client_cpu_ms"],
            "gzip_same_sample": squeezed["digest"] == raw["digest"],
        }
        rows.append(row)
        print(
            f"{row['kind']:6} {row['side']:4}^2 {row['jpeg_bytes']:9,} {row['raw_response_bytes']:13,} "
            f"{row['compact_response_bytes']:15,} {row['ratio']:7.4f} {row['pixel_ratio']:11.4f} "
            f"{row['raw_call_ms']:11.0f} {row['compact_call_ms']:8.0f}  "
            f"{'yes' if row['same_sample'] else 'NO'}{'' if row['compact_form'] == 'compact' else ' (sent raw)'}"
            f"  | {row['gzip_wire_bytes']:12,} {row['gzip_ratio']:7.4f} {row['gzip_call_ms']:8.0f} "
            f"{row['gzip_client_cpu_ms']:13.1f} ({row['compact_client_cpu_ms']:6.1f}) "
            f"{'yes' if row['gzip_same_sample'] else 'NO'}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------
# 2. Images per second over a shaped link (inside a network namespace)
# ---------------------------------------------------------------------------


def link(quick: bool) -> dict[str, Any]:
    """Runs `link_child` in a new network + pid namespace and returns its result.

    The child is pid 1 of its pid namespace: when it ends, however it ends, the kernel
    kills every process left in the namespace (the servers), and the network namespace
    (its shaped loopback) goes with its last process. --kill-child ends the child if
    unshare itself is killed; a timeout here kills unshare.
    """
    seconds, rounds = (5.0, 2) if quick else (8.0, 3)
    command = [
        "unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
        sys.executable, "-m", "bench.images_wire", "link", "--seconds", str(seconds), "--rounds", str(rounds),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)  # unshare; --kill-child takes its child, the kernel the rest
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"link benchmark failed ({process.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    print_link(result)
    return result


def lo_bytes() -> int:
    """Bytes loopback sent in this network namespace (/proc/net follows the caller's namespace)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    raise RuntimeError("no lo in /proc/self/net/dev")


def qdisc_drops() -> int:
    stats = json.loads(subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True).stdout)  # fmt: skip
    return sum(int(entry.get("drops", 0)) for entry in stats)


def shape(on: bool) -> None:
    if on:
        subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", *TBF], check=True)
    else:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)  # none there: fine


def stream_block(client: RenderClient, make: Callable[[int], Any], first: int, seconds: float) -> dict[str, Any]:
    """render_many at CONCURRENCY over requests make(first), make(first + 1), ... for `seconds`:
    samples, wall seconds (until the last answer), this process's CPU seconds."""

    def requests() -> Iterator[Any]:
        index = first
        while time.perf_counter() < deadline:
            yield make(index)
            index += 1

    cpu, started = time.process_time(), time.perf_counter()
    deadline = started + seconds
    samples = 0
    for _ in client.render_many(requests(), concurrency=CONCURRENCY):
        samples += 1
    return {"samples": samples, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def link_child(seconds: float, rounds: int) -> dict[str, Any]:
    """Inside the namespace: raw and compact servers in turn, shaped and unshaped blocks in turn on each."""
    if os.getpid() != 1:
        raise SystemExit("link runs inside its own namespaces: python -m bench --only images_wire")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    shape(False)
    pool = image_pool(128)
    blocks: list[dict[str, Any]] = []
    index = 0
    for round_ in range(rounds):
        forms = ("raw", "compact") if round_ % 2 == 0 else ("compact", "raw")
        for form in forms:
            with (
                running_server(*(RAW_FLAG if form == "raw" else ())) as server,
                RenderClient(server.target, timeout=600, connections=4 * 2) as client,
            ):
                renderer = client.renderer(MODEL)

                def make(n: int, renderer: Any = renderer) -> Any:
                    return renderer.request(image_messages(pool[n % len(pool)]))

                stream_block(client, make, index, 0.5)  # warm up streams, workers and processors
                index += 16
                shapings = (False, True) if (round_ + (form == "compact")) % 2 == 0 else (True, False)
                for shaped in shapings:
                    shape(shaped)
                    sent, drops = lo_bytes(), qdisc_drops()
                    server_before = server_cpu(server.process.pid)
                    renders_before = renderer_cpu(f"{server.http}/metrics")
                    block = stream_block(client, make, index, seconds)
                    index += block["samples"]
                    block |= {"round": round_, "form": form, "shaped": shaped, "lo_bytes": lo_bytes() - sent}
                    block["qdisc_drops"] = qdisc_drops() - drops
                    block["server_cpu_seconds"] = server_cpu(server.process.pid) - server_before
                    block["renderer_cpu_seconds"] = renderer_cpu(f"{server.http}/metrics") - renders_before
                    shape(False)
                    blocks.append(block)
                    print(
                        f"  round {round_} {form:7} {'1 Gbit/s' if shaped else 'unshaped':8} "
                        f"{block['samples'] / block['seconds']:5.2f} images/s "
                        f"({block['samples']} in {block['seconds']:.1f} s, {block['lo_bytes'] / block['seconds'] / 1e6:6.1f} MB/s on lo)",
                        file=sys.stderr,
                        flush=True,
                    )
    return summarize_link(blocks)


def summarize_link(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for form in ("raw", "compact"):
        for shaped in (False, True):
            mine = [b for b in blocks if b["form"] == form and b["shaped"] == shaped]
            samples, seconds = sum(b["samples"] for b in mine), sum(b["seconds"] for b in mine)
            rows.append(
                {
                    "form": form,
                    "link": f"tbf {LINK_RATE}" if shaped else "unshaped",
                    "images_per_s": samples / seconds,
                    "block_rates": [b["samples"] / b["seconds"] for b in mine],
                    "images": samples,
                    "seconds": seconds,
                    "lo_mb_per_s": sum(b["lo_bytes"] for b in mine) / seconds / 1e6,
                    "lo_bytes_per_image": sum(b["lo_bytes"] for b in mine) / samples,
                    "client_cpu_ms_per_image": sum(b["cpu_seconds"] for b in mine) / samples * 1e3,
                    "server_cpu_ms_per_image": sum(b["server_cpu_seconds"] for b in mine) / samples * 1e3,
                    "renderer_cpu_ms_per_image": sum(b["renderer_cpu_seconds"] for b in mine) / samples * 1e3,
                    "qdisc_drops": sum(b["qdisc_drops"] for b in mine),
                }
            )

    def rate(b: dict[str, Any]) -> float:
        return b["samples"] / b["seconds"]

    def pairs(form: str) -> list[float]:
        """Shaped over unshaped, per round (the two blocks ran back to back on one server)."""
        out = []
        for round_ in sorted({b["round"] for b in blocks}):
            [on] = [b for b in blocks if b["form"] == form and b["shaped"] and b["round"] == round_]
            [off] = [b for b in blocks if b["form"] == form and not b["shaped"] and b["round"] == round_]
            out.append(rate(on) / rate(off))
        return out

    def neighbours(shaped: bool) -> list[float]:
        """Compact over raw, per round (servers one after the other)."""
        out = []
        for round_ in sorted({b["round"] for b in blocks}):
            [raw] = [b for b in blocks if b["form"] == "raw" and b["shaped"] == shaped and b["round"] == round_]
            [compact] = [b for b in blocks if b["form"] == "compact" and b["shaped"] == shaped and b["round"] == round_]
            out.append(rate(compact) / rate(raw))
        return out

    by = {(row["form"], row["link"]): row["images_per_s"] for row in rows}
    ratios = {
        "raw_shaped_over_unshaped": pairs("raw"),
        "compact_shaped_over_unshaped": pairs("compact"),
        "compact_over_raw_unshaped": neighbours(False),
        "compact_over_raw_shaped": neighbours(True),
    }
    return {
        "rows": rows,
        "blocks": blocks,
        "per_round_ratios": ratios,
        "median_ratios": {name: statistics.median(values) for name, values in ratios.items()},
        "pooled": {
            "compact_shaped_over_compact_unshaped": by[("compact", f"tbf {LINK_RATE}")] / by[("compact", "unshaped")],
            "compact_shaped_over_raw_unshaped": by[("compact", f"tbf {LINK_RATE}")] / by[("raw", "unshaped")],
            "compact_unshaped_over_raw_unshaped": by[("compact", "unshaped")] / by[("raw", "unshaped")],
        },
    }


def print_link(result: dict[str, Any]) -> None:
    print(
        f"\n{'server':8} {'link':10} {'images/s':>9} {'per block':20} {'MB/s on lo':>10} {'MB/image':>8} "
        f"{'CPU ms/image: client':>20} {'server':>6} {'(renderer)':>10} {'drops':>6}"
    )
    for row in result["rows"]:
        blocks = " ".join(f"{r:.2f}" for r in row["block_rates"])
        print(
            f"{row['form']:8} {row['link']:10} {row['images_per_s']:9.2f} {blocks:20} {row['lo_mb_per_s']:10.1f} "
            f"{row['lo_bytes_per_image'] / 1e6:8.2f} {row['client_cpu_ms_per_image']:20.1f} "
            f"{row['server_cpu_ms_per_image']:6.1f} {row['renderer_cpu_ms_per_image']:10.1f} {row['qdisc_drops']:6}"
        )
    for name, values in result["per_round_ratios"].items():
        print(f"  {name:32} median {statistics.median(values):.3f}  per round {' '.join(f'{v:.3f}' for v in values)}")
    print(flush=True)


# ---------------------------------------------------------------------------
# 3. Client CPU per sample over in-process CPU per sample
# ---------------------------------------------------------------------------


class Work:
    """One model's requests: in-process calls and remote requests by index."""

    def __init__(self, model: str, pool: list[bytes]) -> None:
        self.model = model
        self.local = reference_renderer(model)
        if model == MODEL:
            self.items = [{"messages": image_messages(data), "tools": None} for data in pool]
        else:
            self.items = working_set(model)

    def in_process(self, seconds: float) -> dict[str, Any]:
        """build_training_sample on this thread for `seconds`: samples, CPU seconds."""
        cache = getattr(self.local, "_image_cache", None)
        samples, cpu, started = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - started < seconds:
            if cache is not None:
                cache.clear()  # renderers keeps 256 processed images: each render must process its image
            item = self.items[samples % len(self.items)]
            renderers.build_training_sample(
                self.local, item["messages"], tools=item["tools"], role_to_mask=assistant_only
            )
            samples += 1
        return {"samples": samples, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}

    def maker(self, client: RenderClient) -> Callable[[int], Any]:
        remote = client.renderer(self.model)

        def make(n: int) -> Any:
            item = self.items[n % len(self.items)]
            return remote.request(item["messages"], tools=item["tools"], role_to_mask=assistant_only)

        return make


def client_cpu(quick: bool) -> list[dict[str, Any]]:
    seconds, rounds = (2.0, 2) if quick else (4.0, 3)
    pool = image_pool(48, first_seed=20_000)
    works = {model: Work(model, pool) for model in DEFAULT_MODELS}
    rows = []
    print(f"\n{'model':15} {'client':30} {'in-process CPU':>15} {'client CPU':>11} {'share':>7}  per round")
    # The default client (one connection) first; eight connections cost the client more threads.
    compact_modes = {
        "compact, materialized": {},
        "compact, kept": {"compact_tensors": True},
        "compact, materialized, 8 conns": {"connections": 8},
    }
    plan: list[tuple[tuple[str, ...], list[str], dict[str, dict[str, Any]]]] = [
        ((), list(DEFAULT_MODELS), compact_modes),
        (RAW_FLAG, [MODEL], {"raw server": {}}),
    ]
    for flags, models, modes in plan:
        with running_server(*flags) as server:
            clients = {mode: RenderClient(server.target, timeout=600, **kwargs) for mode, kwargs in modes.items()}
            try:
                for model in models:
                    work = works[model]
                    makers = {mode: work.maker(client) for mode, client in clients.items()}
                    work.in_process(0.3)
                    for mode, client in clients.items():
                        stream_block(client, makers[mode], 0, 0.3)  # warm up
                    anchors: list[dict[str, Any]] = []
                    services: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
                    index = 1000
                    for _ in range(rounds):
                        anchors.append(work.in_process(seconds))
                        for mode, client in clients.items():
                            block = stream_block(client, makers[mode], index, seconds)
                            index += block["samples"]
                            services[mode].append(block)
                    for mode in modes:
                        rows.append(cpu_row(model, mode, anchors, services[mode]))
            finally:
                for client in clients.values():
                    client.close()
    return rows


def cpu_row(model: str, mode: str, anchors: list[dict[str, Any]], services: list[dict[str, Any]]) -> dict[str, Any]:
    def per_sample(block: dict[str, Any]) -> float:
        return block["cpu_seconds"] / block["samples"] * 1e3

    shares = [per_sample(s) / per_sample(a) for s, a in zip(services, anchors, strict=True)]
    target = 0.25 if model == MODEL else 0.10
    row = {
        "model": model,
        "client": mode,
        "in_process_cpu_ms": sum(a["cpu_seconds"] for a in anchors) / sum(a["samples"] for a in anchors) * 1e3,
        "client_cpu_ms": sum(s["cpu_seconds"] for s in services) / sum(s["samples"] for s in services) * 1e3,
        "client_samples_per_s": sum(s["samples"] for s in services) / sum(s["seconds"] for s in services),
        "share": statistics.median(shares),
        "per_round": shares,
        "target": target,
    }
    row["met"] = row["share"] <= target
    print(
        f"{model:15} {mode:30} {row['in_process_cpu_ms']:12.2f} ms {row['client_cpu_ms']:8.2f} ms "
        f"{row['share']:7.1%}  {' '.join(f'{s:.1%}' for s in shares)}  (target {target:.0%}: "
        f"{'met' if row['met'] else 'missed'})",
        flush=True,
    )
    return row


# ---------------------------------------------------------------------------
# 4. Peak RSS during a 4096x4096 row
# ---------------------------------------------------------------------------


def rss_client(target: str, kept: bool, files: list[Path]) -> dict[str, Any]:
    """In a fresh process: render each image once (unary), report this process's peak RSS."""
    with RenderClient(target, timeout=600, compact_tensors=kept) as client:
        renderer = client.renderer(MODEL)
        client.render(renderer.request(image_messages(noise_image(256, 1))))  # connection, first-call costs
        images = [path.read_bytes() for path in files]
        before = peak_rss_mib()
        for data in images:
            sample = client.render(renderer.request(image_messages(data)))
            value = sample.multi_modal_data.mm_items["image"][0]["pixel_values"]
            kind = type(value).__name__
            del sample, value
    return {"peak_rss_mib": peak_rss_mib(), "before_row_mib": before, "pixel_values_type": kind}


def memory(quick: bool) -> list[dict[str, Any]]:
    count = 1 if quick else 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for n in range(count):
            path = Path(tmp) / f"{n}.jpg"
            path.write_bytes(noise_image(4096, 30_000 + n))
            files.append(path)
        configs = [("raw", RAW_FLAG, False), ("compact, materialized", (), False), ("compact, kept", (), True)]
        print(f"\n4096x4096 row, {count} image(s), fresh processes per config: peak RSS (VmHWM), MiB")
        print(f"{'config':22} {'gRPC process':>20} {'render processes':>20} {'client':>20}")
        for name, flags, kept in configs:
            with running_server("--workers", "1", *flags) as server:
                [worker] = server.workers()
                with RenderClient(server.target, timeout=600) as warm:  # the model's first render, small
                    warm.render(warm.renderer(MODEL).request(image_messages(noise_image(256, 2))))
                grpc_before = peak_rss_mib(worker)
                renders_before = max(peak_rss_mib(pid) for pid in server.render_processes())
                command = [sys.executable, "-m", "bench.images_wire", "rss-client", "--target", server.target]
                command += ["--kept"] if kept else []
                done = subprocess.run([*command, *map(str, files)], cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
                if done.returncode != 0:
                    raise RuntimeError(f"rss-client failed:\n{done.stderr}")
                client = json.loads(done.stdout.strip().splitlines()[-1])
                row = {
                    "config": name,
                    "grpc_peak_mib": peak_rss_mib(worker),
                    "grpc_before_mib": grpc_before,
                    "render_peak_mib": max(peak_rss_mib(pid) for pid in server.render_processes()),
                    "render_before_mib": renders_before,
                    "client_peak_mib": client["peak_rss_mib"],
                    "client_before_mib": client["before_row_mib"],
                    "client_pixel_values": client["pixel_values_type"],
                }
                rows.append(row)
                print(
                    f"{name:22} {row['grpc_peak_mib']:8.0f} (from {row['grpc_before_mib']:4.0f}) "
                    f"{row['render_peak_mib']:8.0f} (from {row['render_before_mib']:4.0f}) "
                    f"{row['client_peak_mib']:8.0f} (from {row['client_before_mib']:4.0f})",
                    flush=True,
                )
    return rows


# ---------------------------------------------------------------------------


def images_wire(quick: bool) -> dict[str, Any]:
    """The four parts, one server set at a time."""
    print("images_wire 1/4: bytes per image, raw vs compact answers", flush=True)
    result: dict[str, Any] = {"bytes": wire_bytes(quick)}
    print(f"images_wire 2/4: images/s over loopback in a network namespace, unshaped vs tbf {LINK_RATE}", flush=True)
    result["link"] = link(quick)
    print("images_wire 3/4: client CPU per sample over in-process CPU per sample, render_many c=8", flush=True)
    result["client_cpu"] = client_cpu(quick)
    print("images_wire 4/4: peak RSS during a 4096x4096 row", flush=True)
    result["memory"] = memory(quick)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    link_parser = commands.add_parser("link", help="part 2's measurement; only inside its namespaces")
    link_parser.add_argument("--seconds", type=float, default=8.0)
    link_parser.add_argument("--rounds", type=int, default=3)
    rss_parser = commands.add_parser("rss-client", help="part 4's client process")
    rss_parser.add_argument("--target", required=True)
    rss_parser.add_argument("--kept", action="store_true", help="compact_tensors=True")
    rss_parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "link":
        print(json.dumps(link_child(args.seconds, args.rounds)), flush=True)
    else:
        print(json.dumps(rss_client(args.target, args.kept, args.images)), flush=True)


if __name__ == "__main__":
    main()
