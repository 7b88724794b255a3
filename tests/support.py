"""What the tests share: the fixture corpus, real server processes, Go tools."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image

from render_client import RenderClient, RenderError, SampleRequest
from render_wire.pb import render_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CORPUS_ENV = "RENDER_SERVICE_CORPUS"
DEFAULT_MODELS = ("qwen3", "qwen3-vl", "deepseek-v4", "qwen3-template")


FIXTURE_CORPUS = ROOT / "tests" / "fixtures" / "conversations.jsonl"


def corpus_paths() -> list[Path]:
    """The conversation corpora: this repository's own, then the extra one $RENDER_SERVICE_CORPUS names, if any."""
    paths = [FIXTURE_CORPUS]
    if os.environ.get(CORPUS_ENV):
        extra = Path(os.environ[CORPUS_ENV])
        if not extra.is_file():
            raise FileNotFoundError(
                f"{CORPUS_ENV}={extra}: no such file (a JSONL corpus; unset it to use only {FIXTURE_CORPUS})"
            )
        paths.append(extra)
    return paths


@cache
def corpus() -> tuple[dict[str, Any], ...]:
    """Every conversation of the corpora: {"id", "messages", "tags", maybe "tools"} (tests/fixtures/make_corpus.py)."""
    rows: list[dict[str, Any]] = []
    for path in corpus_paths():
        with path.open(encoding="utf-8") as lines:
            rows.extend(json.loads(line) for line in lines if line.strip())
    return tuple(rows)


def tool(name: str) -> str:
    """A Go tool (grpcurl, ghz, grpc-health-probe, ...) from .tools/bin or PATH."""
    local = ROOT / ".tools" / "bin" / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not installed: run scripts/setup.sh test")
    return found


@dataclass
class ServerProcess:
    """A render-server running as a child process on loopback."""

    process: subprocess.Popen[str]
    port: int
    http_port: int | None
    output: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return "".join(self.output)

    def kill(self) -> None:
        """SIGKILL the supervisor and every child: a replica lost without warning."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def workers(self) -> list[int]:
        """The pids of the gRPC worker processes the supervisor runs now (not the HTTP process)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        started = {int(pid) for pid in re.findall(r"worker \d+ serving \(pid (\d+)\)", self.log())}
        return [int(pid) for pid in children.split() if int(pid) in started]

    def http_processes(self) -> list[int]:
        """The pids of the HTTP process and of its render process (the one that parses and renders JSON);
        fewer while they start."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        workers = set(self.workers())
        found = []
        for http in (int(pid) for pid in children if int(pid) not in workers):  # none while it starts again
            found += [http, *map(int, Path(f"/proc/{http}/task/{http}/children").read_text().split())]
        return found

    def render_processes(self) -> list[int]:
        """The pids of the workers' render processes: each worker's children (--render-processes of them)."""
        return [
            int(pid)
            for worker in self.workers()
            for pid in Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
        ]


@contextmanager
def running_server(*args: str, timeout: float = 180.0, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """Start `render-server --port 0 --http-port 0 ARGS`, wait until it listens, stop it (SIGTERM) after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "render_server", "--port", "0", "--http-port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # a process group of its own, which kill() ends at once
    )
    output: list[str] = []
    ready = threading.Event()
    ports: list[int | None] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith("render-server listening on ") and not ports:
                # "render-server listening on HOST:PORT [http HOST:PORT] with models ..."
                words = line.split()
                ports.append(int(words[3].rsplit(":", 1)[1]))
                ports.append(int(words[5].rsplit(":", 1)[1]) if words[4] == "http" else None)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(timeout) or not ports:
            raise RuntimeError("render-server did not start:\n" + "".join(output))
        yield ServerProcess(process=process, port=ports[0], http_port=ports[1], output=output)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Outcome:
    """One call of a Load: when it started and ended, and its error if it failed."""

    started: float
    finished: float
    error: RenderError | None


@dataclass
class Load:
    """Threads calling a server in a loop until stopped, each call's outcome recorded."""

    client: RenderClient
    requests: list[SampleRequest]
    threads: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Load:
        # Daemons: a test that fails before join() must not keep the test run alive.
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.threads)]
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        index = n
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.client.render(self.requests[index % len(self.requests)])
                error = None
            except RenderError as exc:
                error = exc
            self.outcomes.append(Outcome(started, time.monotonic(), error))
            index += self.threads

    def join(self) -> list[Outcome]:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return self.outcomes


def slow_request() -> pb.RenderTrainingSampleRequest:
    """A RenderTrainingSampleRequest that takes seconds to render: a 4096x4096 image for qwen3-vl."""
    buffer = io.BytesIO()
    Image.effect_noise((4096, 4096), 60).convert("RGB").save(buffer, format="JPEG", quality=80)
    picture = pb.ContentPart(image=pb.MediaPart(data=buffer.getvalue()))
    return pb.RenderTrainingSampleRequest(
        model="qwen3-vl",
        messages=[
            pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(text="Describe."), picture])),
            pb.Message(role="assistant", text="Noise."),
        ],
    )


@contextmanager
def counting_relay(target: str) -> Iterator[tuple[str, list[int]]]:
    """A loopback relay to `target` for one connection: (its address, [bytes server -> client])."""
    host, port = target.rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    counted = [0]

    def pipe(source: socket.socket, sink: socket.socket, count: bool) -> None:
        # Either side hanging up ends both directions; the other direction's thread then
        # finds its socket shut down (or closed) and ends too.
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                if count:
                    counted[0] += len(chunk)
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        client_side, _ = listener.accept()
        server_side = socket.create_connection((host, int(port)))
        upstream = threading.Thread(target=pipe, args=(client_side, server_side, False), daemon=True)
        upstream.start()
        pipe(server_side, client_side, True)
        upstream.join()
        client_side.close()
        server_side.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}", counted
    finally:
        listener.close()


class Relay:
    """A loopback TCP front for replicas, standing in for a Service: each new connection goes to the next
    of the current `endpoints` ("host:port", round robin); connections already open stay where they are.

    A test changes `endpoints` as Kubernetes changes a Service's endpoints during a rollout (a pod added
    once ready, removed once terminating); gRPC clients reach new replicas as they reconnect.
    """

    def __init__(self) -> None:
        self.endpoints: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections: list[tuple[float, str]] = []  # (time.monotonic(), endpoint) of each connection
        self._turn = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client_side, _ = self._listener.accept()
            except OSError:
                return  # closed
            endpoints = list(self.endpoints)
            if not endpoints:
                client_side.close()  # no endpoint ready: the client retries
                continue
            endpoint = endpoints[self._turn % len(endpoints)]
            self._turn += 1
            host, port = endpoint.rsplit(":", 1)
            try:
                server_side = socket.create_connection((host, int(port)), timeout=5)
                server_side.settimeout(None)
            except OSError:
                client_side.close()
                continue
            self.connections.append((time.monotonic(), endpoint))
            for source, sink in ((client_side, server_side), (server_side, client_side)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        source.close()  # each socket is one pipe's source: closed once, by it

    def close(self) -> None:
        self._listener.close()


def free_port() -> int:
    """A loopback port free now (for a server whose port a test must know before it listens)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])
