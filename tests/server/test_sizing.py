"""render_server.sizing: the worst case it states holds what a server under the heaviest load its flags allow uses."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from render_client import RenderClient, SampleRequest
from render_server.cli import parse_args
from render_server.sizing import GiB, MiB, Sizing
from tests.support import ServerProcess, running_server

FLAGS = [
    "--workers", "1",
    "--render-processes", "2",
    "--threads", "4",
    "--max-concurrent-rpcs", "4",
    "--max-images", "2",
    "--max-image-pixels", str(1024 * 1024),
    "--max-request-mb", "8",
    "--image-cache-mb", "32",
    "--max-tensor-mb", "48",  # T = P: the requests' images, not bridged tensors, set the bounds
    "--raw-tensors",  # answers at their largest
]  # fmt: skip


def test_the_defaults_bound_nothing_a_deployment_can_afford() -> None:
    # 64 images of 8192x8192 per request: terabytes. Deployments set the image limits (deploy/k8s does).
    assert Sizing.from_args(parse_args(["--workers", "2"])).pod_bytes() > 1000 * GiB


def test_the_formula_adds_up_its_terms() -> None:
    sizing = Sizing.from_args(parse_args(FLAGS))
    assert sizing.request_pixels == 24 * 2 * 1024 * 1024  # float32 x 3 channels x 2 temporal copies per pixel
    counts = {kind: count for kind, (count, _) in sizing.processes().items()}
    assert counts == {
        "supervisor": 1,
        "render process": 2,
        "gRPC process": 1,
        "HTTP process": 1,
        "HTTP render process": 1,
    }
    # One more worker costs one more gRPC process and its render processes, nothing else.
    more = Sizing.from_args(parse_args([*FLAGS, "--workers", "2"]))
    each = {kind: size for kind, (_, size) in sizing.processes().items()}
    assert more.pod_bytes() - sizing.pod_bytes() == pytest.approx(each["gRPC process"] + 2 * each["render process"])
    without_http = Sizing.from_args(parse_args([*FLAGS, "--no-http"])).processes()
    assert not without_http.get("HTTP process") and not without_http.get("HTTP render process")
    # Bridged tensors past the images' P set the render processes' share.
    tensors = Sizing.from_args(parse_args([*FLAGS, "--max-tensor-mb", "512"]))
    assert tensors.request_tensors == 512 * MiB
    assert tensors.processes()["render process"][1] > each["render process"]


def test_python_m_render_server_sizing_prints_the_memory_to_set() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "render_server.sizing", *FLAGS], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert printed.splitlines()[-1].endswith(
        f"memory request = limit: {Sizing.from_args(parse_args(FLAGS)).memory_quantity()}"
    )


def image(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((1024, 1024), 30 + seed % 60).convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def messages(seed: int) -> list[dict]:
    """The largest request the flags let in, pixel-wise: two 1024x1024 images, new ones each time (no cache hits)."""
    content = [{"type": "text", "text": "Compare."}, *({"type": "image", "image": image(seed + n)} for n in (0, 1))]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "Noise."}]


def json_body(seed: int) -> bytes:
    parts = [{"text": "Compare."}, *({"image": {"data": base64.b64encode(image(seed + n)).decode()}} for n in (0, 1))]
    return json.dumps(
        {
            "model": "qwen3-vl",
            "messages": [{"role": "user", "parts": {"parts": parts}}, {"role": "assistant", "text": "Noise."}],
        }
    ).encode()


def rss(pid: int, field: str = "VmHWM") -> int:
    """A process's peak RSS (VmHWM) or its RSS now (VmRSS), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]


def processes(server: ServerProcess) -> dict[str, list[int]]:
    http, http_render_process = server.http_processes()
    return {
        "supervisor": [server.process.pid],
        "gRPC process": server.workers(),
        "render process": server.render_processes(),
        "HTTP process": [http],
        "HTTP render process": [http_render_process],
    }


def test_no_process_outgrows_its_share_under_the_heaviest_load_the_flags_allow() -> None:
    sizing = Sizing.from_args(parse_args(FLAGS))
    stop = threading.Event()
    failures: list[str] = []
    with running_server(*FLAGS) as server, RenderClient(server.target, connections=4, timeout=300) as client:
        at_start = {pid: rss(pid, "VmRSS") for pid in server.render_processes()}

        def grpc_calls(n: int) -> None:
            seed = 1000 * n
            while not stop.is_set():
                client.render(SampleRequest("qwen3-vl", messages(seed)))
                seed += 2

        def http_calls(n: int) -> None:
            seed = 100_000 * (n + 1)
            while not stop.is_set():
                request = urllib.request.Request(f"{server.http}/v1/render_training_sample", data=json_body(seed))
                try:
                    with urllib.request.urlopen(request, timeout=300) as response:
                        response.read()
                except urllib.error.HTTPError as error:
                    failures.append(f"HTTP {error.code}: {error.read()[:200]!r}")
                seed += 2

        threads = [threading.Thread(target=grpc_calls, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=http_calls, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(25)
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        peaks = {kind: [rss(pid) for pid in pids] for kind, pids in processes(server).items()}
        grown = max(rss(pid) - start for pid, start in at_start.items())
    assert not failures, failures
    report = {
        kind: f"{max(values) / MiB:.0f} of {sizing.process_rss(kind) / MiB:.0f} MiB" for kind, values in peaks.items()
    }
    for kind, values in peaks.items():
        assert len(values) == sizing.processes()[kind][0], (kind, values)
        assert max(values) <= sizing.process_rss(kind), report
    # ...and the load did reach the render processes' working sets (the test measured something).
    assert grown > sizing.request_pixels, (grown, report)
    print(report)
