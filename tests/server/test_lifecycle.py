"""Under load: graceful shutdown, a worker killed, overload. No accepted request is lost."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from render_client import RenderClient, RenderError, SampleRequest
from tests.support import ROOT, Load, Outcome, ServerProcess, corpus, running_server


def image_messages(side: int, seed: int) -> list[dict]:
    """A user turn with a distinct image (so no cache answers), then an answer."""
    picture = Image.effect_noise((side, side), 40 + seed % 50).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=80)
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": buffer.getvalue()}],
        },
        {"role": "assistant", "content": "Noise."},
    ]


def readyz(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"{server.http}/readyz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_sigterm_lets_a_render_in_progress_finish_and_refuses_new_calls() -> None:
    with running_server("--workers", "1", "--grace", "60") as server:
        client = RenderClient(server.target, timeout=120)
        finished: list = []

        def slow_call() -> None:
            started = time.monotonic()
            sample = client.render(SampleRequest("qwen3-vl", image_messages(4096, 1)))
            finished.append((started, time.monotonic(), sample))

        slow = threading.Thread(target=slow_call)
        slow.start()
        time.sleep(1.0)  # the 4096x4096 image takes seconds to render
        sigterm_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(RenderError) as refused:
            client.render(SampleRequest("qwen3-vl", image_messages(64, 2)), timeout=30)
        slow.join(timeout=120)
        assert server.process.wait(timeout=120) == 0
        client.close()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(finished) == 1
    started, ended, sample = finished[0]
    assert started < sigterm_at < ended, "the slow call was not in flight at SIGTERM: the test proved nothing"
    assert sample.multi_modal_data is not None


def test_a_replica_draining_under_load_costs_no_request() -> None:
    with (
        running_server("--workers", "2", "--grace", "60") as server,
        running_server("--workers", "1") as other,
    ):
        client = RenderClient([server.target, other.target], connections=8, timeout=120)
        requests = [SampleRequest("qwen3-vl", image_messages(1024, seed)) for seed in range(16)]
        load = Load(client, requests, threads=16).start()
        time.sleep(3)
        assert readyz(server) == 200
        # A render of seconds in flight on the draining replica, so that the drain lasts long enough to watch.
        slow_client = RenderClient(server.target, timeout=120)
        slow_request = SampleRequest("qwen3-vl", image_messages(4096, 99))
        slow_samples: list = []
        slow = threading.Thread(target=lambda: slow_samples.append(slow_client.render(slow_request)))
        slow.start()
        time.sleep(1.0)
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            # The signal goes supervisor -> worker; on a loaded machine that takes a
            # moment, so ask until the answer changes, and check what it changes to.
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - sigterm_at < 10, "still SERVING 10 s after SIGTERM"
                time.sleep(0.05)
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    assert status in (
                        health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING,
                    )
                except grpc.RpcError as exc:
                    # This worker already stopped taking calls: refused, or received
                    # and then cancelled by the shutting-down server (as below).
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                    break
            assert server.process.poll() is None, "the server had stopped before its health said so"
        # While the workers drain, the HTTP process says so; it stops last.
        readiness = []
        while server.process.poll() is None:
            try:
                readiness.append(readyz(server))
            except OSError:
                break
            time.sleep(0.05)
        assert readiness and set(readiness) == {503}, readiness
        assert server.process.wait(timeout=120) == 0
        stopped_at = time.monotonic()
        slow.join(timeout=120)
        slow_client.close()
        assert len(slow_samples) == 1 and slow_samples[0].multi_modal_data is not None
        time.sleep(1)  # calls keep going to the remaining replica
        outcomes = load.join()
        client.close()
    # In flight on the draining replica, a call finished there. Refused there
    # (UNAVAILABLE), or received but not yet taken up by a handler when it shut
    # down (gRPC then cancels it), it was sent again to the other replica.
    assert [f"{type(o.error).__name__}: {o.error}" for o in outcomes if o.error] == []
    assert [o for o in outcomes if o.started < sigterm_at < o.finished], "nothing in flight at SIGTERM"
    assert [o for o in outcomes if o.started > stopped_at], "no call after the drain"


def test_a_worker_killed_under_load_costs_no_request() -> None:
    conversations = [c for c in corpus() if "images" not in c["tags"]][:40]
    with running_server("--workers", "2") as server, RenderClient(server.target, connections=8, timeout=120) as client:
        renderer = client.renderer("qwen3")
        requests = [renderer.request(c["messages"], tools=c.get("tools")) for c in conversations]
        requests += [SampleRequest("qwen3-vl", image_messages(512, seed)) for seed in range(8)]
        load = Load(client, requests, threads=8).start()
        many: list = []
        streaming = threading.Thread(
            target=lambda: many.extend(client.render_many(requests * 6, concurrency=16, return_exceptions=True))
        )
        streaming.start()
        time.sleep(2)
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(4)
        outcomes = load.join()
        streaming.join(timeout=300)
        assert "died: killed by SIGKILL" in server.log()
        coalescer = client._in_this_process.coalescer  # the load's calls went in batches, resent alike
        assert coalescer is not None and coalescer.calls_sent > coalescer.batches_sent
        expected = [client.render(request).token_ids for request in requests]
    assert len(outcomes) > 50
    assert [f"{type(o.error).__name__}: {o.error}" for o in outcomes if o.error] == []
    assert len(many) == len(requests) * 6
    assert [str(r) for r in many if isinstance(r, RenderError)] == []
    # Each result is its own request's sample: none lost, none duplicated, none out of place.
    assert [result.token_ids for result in many] == expected * 6


def test_overload_is_refused_at_once_and_memory_stays_bounded() -> None:
    limit = 3
    with running_server("--workers", "1", "--max-concurrent-rpcs", str(limit), "--threads", str(limit)) as server:
        (worker,) = server.workers()
        with RenderClient(server.target, connections=4, timeout=300) as client:
            requests = [SampleRequest("qwen3-vl", image_messages(1024, seed)) for seed in range(40)]
            outcomes: list[Outcome] = []

            def call(request: SampleRequest) -> None:
                started = time.monotonic()
                try:
                    client.render(request)
                    outcomes.append(Outcome(started, time.monotonic(), None))
                except RenderError as exc:
                    outcomes.append(Outcome(started, time.monotonic(), exc))

            threads = [threading.Thread(target=call, args=(request,)) for request in requests]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
        peak_kib = int(
            next(
                line for line in Path(f"/proc/{worker}/status").read_text().splitlines() if line.startswith("VmHWM")
            ).split()[1]
        )
    refused = [o for o in outcomes if o.error is not None]
    served = [o for o in outcomes if o.error is None]
    assert len(outcomes) == 40 and served and refused
    assert all(o.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused), {str(o.error) for o in refused}
    slowest_refusal = max(o.finished - o.started for o in refused)
    typical_render = sorted(o.finished - o.started for o in served)[len(served) // 2]
    assert slowest_refusal < typical_render, (slowest_refusal, typical_render)
    # At most `limit` requests held at once: far below 40 images' worth of pixel tensors.
    assert peak_kib < 2_500_000, f"worker peaked at {peak_kib} KiB"


@pytest.mark.parametrize("as_pid_1", [False, True], ids=["process", "pid-1"])
def test_sigterm_while_the_models_load_stops_at_once(as_pid_1: bool) -> None:
    # In a container render-server is PID 1: the kernel delivers it no signal it has no handler for,
    # so without one a pod deleted while loading would wait out its grace period, then be killed.
    command = [sys.executable, "-m", "render_server", "--port", "0", "--http-port", "0", "--workers", "1"]
    if as_pid_1:
        if shutil.which("unshare") is None or os.geteuid() != 0:
            pytest.skip("needs root and unshare(1) for a PID namespace")
        command = ["unshare", "--pid", "--fork", "--kill-child", *command]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:  # until the first model has loaded: the others are loading
            lines.append(line)
            if "loaded model" in line:
                break
        server = process.pid
        if as_pid_1:  # the server is unshare's child, PID 1 of its namespace
            server = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
            (ns_pids,) = [
                line for line in Path(f"/proc/{server}/status").read_text().splitlines() if line.startswith("NSpid:")
            ]
            assert ns_pids.split()[-1] == "1", ns_pids  # its pid in the innermost namespace
        signalled = time.monotonic()
        os.kill(server, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after SIGTERM while loading:\n" + "".join(lines))
        took = time.monotonic() - signalled
        output = "".join(lines) + process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "SIGTERM while starting: stopping" in output, output
    assert "listening" not in output
    assert took < 5, took
