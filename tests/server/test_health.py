"""Health that answers under any load: the probes deploy/k8s gives the kubelet answer within a second while
a worker's every handler thread is held by an open stream and --max-concurrent-rpcs is reached, and the HTTP
port renders JSON, with TLS and tokens off and on; readiness covers every worker, not the one a connection
lands on."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from render_server.status import UNREADY_AFTER
from render_wire.pb import render_pb2 as pb
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.deploy.manifests import BASE, PRODUCTION, manifests, run_probe
from tests.server.test_security import make_ca, make_cert
from tests.support import ServerProcess, free_port, running_server

THREADS = 4  # the worker's handler threads, and its --max-concurrent-rpcs
TOKEN = "health-test-token"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    make_ca(folder, "ca")
    make_cert(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (folder / "tokens").write_text(TOKEN + "\n")
    return folder


def in_flight_streams(server: ServerProcess, scheme: str) -> float:
    """RenderTrainingSamples handlers running now, from /metrics (open to anyone, like the probes)."""
    context = ssl._create_unverified_context() if scheme == "https" else None
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{server.http_port}/metrics", timeout=10, context=context) as r:
        text = r.read().decode()
    found = re.search(r'^render_requests_in_flight\{method="RenderTrainingSamples"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


@contextmanager
def held_handler_threads(channel: grpc.Channel, count: int, metadata: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """`count` RenderTrainingSamples streams that send nothing: each holds a handler thread until released."""
    release = threading.Event()
    calls = []

    def nothing_until_released() -> Iterator[pb.RenderTrainingSamplesRequest]:
        release.wait()
        return
        yield  # a generator that ends without a request

    stub = RenderServiceStub(channel)
    for _ in range(count):
        calls.append(stub.RenderTrainingSamples(nothing_until_released(), timeout=120, metadata=metadata))
    try:
        yield
    finally:
        release.set()
        for call in calls:
            call.cancel()


def json_render_load(server: ServerProcess, scheme: str, headers: dict[str, str], stop: threading.Event) -> None:
    """JSON renders of a 1024x1024 image on the HTTP port, back to back, until `stop`: the probes' own process busy."""
    picture = Image.effect_noise((1024, 1024), 60).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    image = {"data": base64.b64encode(buffer.getvalue()).decode()}
    body = json.dumps(
        {
            "model": "qwen3-vl",
            "messages": [
                {"role": "user", "parts": {"parts": [{"text": "Describe."}, {"image": image}]}},
                {"role": "assistant", "text": "Noise."},
            ],
        }
    ).encode()
    context = ssl._create_unverified_context() if scheme == "https" else None
    while not stop.is_set():
        request = urllib.request.Request(
            f"{scheme}://127.0.0.1:{server.http_port}/v1/render_training_sample", data=body, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=60, context=context) as response:
                response.read()
        except urllib.error.HTTPError as error:
            assert error.code == 429, error.read()  # the port's own --max-concurrent-rpcs: busy, as meant


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls-and-tokens"])
def test_the_manifests_probes_answer_while_a_worker_is_saturated(secure: bool, certs: Path) -> None:
    health_port = free_port()  # where the manifests' probes go: --health-port
    args = ["--workers", "1", "--threads", str(THREADS), "--max-concurrent-rpcs", str(THREADS)]
    args += ["--health-port", str(health_port)]
    # The build whose probes the kubelet runs: the base, or with TLS and tokens from Secrets.
    built = manifests(PRODUCTION if secure else BASE)
    if secure:
        args += ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
        args += ["--auth-tokens-file", str(certs / "tokens")]
    assert {built.probe(kind)["port"] for kind in PROBES} == {built.port("health")}
    scheme = "https" if secure else "http"
    metadata = (("authorization", f"Bearer {TOKEN}"),) if secure else ()
    with running_server(*args) as server:
        if secure:
            credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
            channel = grpc.secure_channel(server.target, credentials)
        else:
            channel = grpc.insecure_channel(server.target)
        stop = threading.Event()
        renders = [
            threading.Thread(
                target=json_render_load,
                args=(server, scheme, {"authorization": f"Bearer {TOKEN}"} if secure else {}, stop),
                daemon=True,
            )
            for _ in range(2)
        ]
        with channel, held_handler_threads(channel, THREADS, metadata):
            deadline = time.monotonic() + 30
            while in_flight_streams(server, scheme) < THREADS:
                assert time.monotonic() < deadline, "the streams never took the worker's handler threads"
                time.sleep(0.1)
            # The worker is saturated: a native gRPC health probe (what the manifests used) is refused.
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                    health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata
                )
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for thread in renders:
                thread.start()
            time.sleep(1)  # the JSON renders under way
            results = {
                kind: [run_probe(built.probe(kind), "127.0.0.1", health_port) for _ in range(5)] for kind in PROBES
            }
            assert in_flight_streams(server, scheme) == THREADS  # still saturated throughout
        stop.set()
        for thread in renders:
            thread.join(timeout=120)
    for kind, probed in results.items():
        assert all(result.success for result in probed), (kind, probed)
        assert max(result.seconds for result in probed) < 1.0, (kind, probed)


def readyz(server: ServerProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{server.http}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readiness_covers_every_worker() -> None:
    # A worker whose process stops (here: SIGSTOP) makes the pod unready, whichever worker a probe would reach.
    with running_server("--workers", "2") as server:
        assert readyz(server)[0] == 200
        victim = server.workers()[1]
        os.kill(victim, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + UNREADY_AFTER + 10
            while (answer := readyz(server))[0] == 200:
                assert time.monotonic() < deadline, "still ready with a worker stopped"
                time.sleep(0.5)
        finally:
            os.kill(victim, signal.SIGCONT)
        status, reason = answer
        assert status == 503 and "silent" in reason, reason
        deadline = time.monotonic() + 10
        while readyz(server)[0] != 200:
            assert time.monotonic() < deadline, "not ready again after the worker resumed"
            time.sleep(0.5)
