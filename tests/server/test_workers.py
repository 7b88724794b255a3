"""Worker processes under a supervisor: one port, restarts, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from render_client import RenderClient, build_training_sample
from render_wire.pb.render_pb2_grpc import RenderServiceStub
from tests.support import ROOT, corpus, running_server, slow_request


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_one_port_and_a_dead_worker_is_replaced() -> None:
    conversation = corpus()[0]
    with running_server("--workers", "2") as server:
        workers = server.workers()
        assert len(workers) == 2
        with RenderClient(server.target, timeout=60, connections=4) as client:
            expected = build_training_sample(client.renderer("qwen3"), conversation["messages"])
            os.kill(workers[0], signal.SIGKILL)
            wait_for(lambda: len(server.workers()) == 2 and workers[0] not in server.workers())
            assert workers[1] in server.workers()
            # Fresh connections reach the new worker, which serves the same samples.
            with RenderClient(server.target, timeout=60, connections=4) as fresh:
                for _ in range(8):
                    assert build_training_sample(fresh.renderer("qwen3"), conversation["messages"]) == expected
        assert "died: killed by SIGKILL; starting it again" in server.log()
    assert server.process.returncode == 0


def test_a_dead_render_process_fails_its_calls_unavailable_and_its_worker_is_replaced() -> None:
    conversation = corpus()[0]
    with running_server("--workers", "1") as server:
        [worker] = server.workers()
        assert len(server.render_processes()) == 2  # the default
        with RenderClient(server.target, timeout=60) as client:
            expected = build_training_sample(client.renderer("qwen3"), conversation["messages"])
        with grpc.insecure_channel(server.target) as channel:  # no retries: see the status itself
            slow = RenderServiceStub(channel).RenderTrainingSample.future(slow_request(), timeout=120)
            time.sleep(1.0)  # the 4096x4096 image takes seconds to render
            render_process = max(server.render_processes(), key=cpu_seconds)  # the one rendering it
            os.kill(render_process, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as failed:
                slow.result()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "render process stopped" in failed.value.details()
        wait_for(lambda: server.workers() not in ([], [worker]))
        with RenderClient(server.target, timeout=60) as client:
            assert build_training_sample(client.renderer("qwen3"), conversation["messages"]) == expected
        assert f"its render process (pid {render_process}) died: killed by SIGKILL" in server.log()
        assert "worker 0 (pid" in server.log() and "starting it again" in server.log()
    assert server.process.returncode == 0


def test_a_dead_http_render_process_restarts_the_http_process() -> None:
    with running_server("--workers", "1") as server:
        http, render_process = server.http_processes()
        body = b'{"model": "qwen3", "messages": [{"role": "user", "text": "hi"}]}'
        url = f"{server.http}/v1/render"
        answer = urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60).read()
        os.kill(render_process, signal.SIGKILL)
        wait_for(lambda: len(server.http_processes()) == 2 and http not in server.http_processes())
        wait_for(lambda: urllib.request.urlopen(f"{server.http}/healthz", timeout=5).status == 200)
        assert (
            urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60).read() == answer
        )
        assert f"the HTTP process's render process (pid {render_process}) died: killed by SIGKILL" in server.log()
        assert "the HTTP process (pid" in server.log() and "starting it again" in server.log()
    assert server.process.returncode == 0


def cpu_seconds(pid: int) -> float:
    """The CPU time `pid` has used (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sigterm_stops_every_worker_and_exits_zero() -> None:
    with running_server("--workers", "2") as server:
        workers = server.workers()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (an orphan's reaper may be slow)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_children_do_not_outlive_a_supervisor_killed_outright() -> None:
    with running_server("--workers", "2") as server:
        children = [
            int(pid)
            for pid in Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        ]
        assert len(children) == 3  # two workers and the HTTP process
        render_processes = server.render_processes()
        assert len(render_processes) == 4  # two per worker
        http, http_render_process = server.http_processes()
        assert http in children
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        wait_for(lambda: all(exited(pid) for pid in [*children, *render_processes, http_render_process]))
        # Nothing listens on the port any more: a connection is refused. (Binding it is no test: a
        # connection of the killed server's still closing, FIN_WAIT or TIME_WAIT, holds the port.)
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", server.port))


def test_a_port_in_use_is_an_error_not_a_shared_port() -> None:
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "render_server", "--port", str(port), "--workers", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode != 0
    assert "Address already in use" in result.stderr
