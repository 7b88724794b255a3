"""Processes: gRPC workers on one shared port and an HTTP process, under a supervisor.

One Python process renders on one core, so the supervisor forks N workers,
each a complete gRPC server (service, health, reflection) bound to the same
port with SO_REUSEPORT; the kernel spreads incoming connections across them.
This is gRPC Python's own multiprocessing pattern. Each worker is a gRPC
process, which moves bytes, and the render processes it forks first, which
render (handoff.py says why; two by default, so that one long render does not
hold up the calls behind it). One more child serves the HTTP port
(http_app.py), and with --health-port another answers probes (health.py). The supervisor loads the models before forking, so children
start (and restart) without loading anything and share the loaded pages
copy-on-write. It never touches gRPC itself: gRPC must not be initialised
before a fork.

A child that dies is forked again; a worker whose render process dies exits,
answering its waiting calls UNAVAILABLE, and is forked again too. On SIGTERM
or SIGINT the supervisor marks itself draining (/readyz answers 503), passes
the signal to the workers, which report NOT_SERVING, refuse new calls and give
in-flight ones the grace period, then stops the HTTP process, and exits 0 once
all children have.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from . import metrics
from .auth import TokenCheck
from .handoff import RenderProcessPool, RenderProcessProxy, serve_renders
from .health import serve_health
from .http_app import HttpApp, serve_http
from .json_calls import JsonCalls
from .pipeline import RenderPipeline, as_render_error
from .registry import ModelRegistry
from .server import ServerOptions, start_server
from .status import BEAT_INTERVAL, SharedStatus

log = logging.getLogger(__name__)

# A child that keeps dying is forked again at most this often.
_RESTART_INTERVAL = 1.0
# A worker whose render process died lets its calls end this long before it exits.
_LOST_GRACE = 1.0
# After its calls, a worker's render process gets this long to exit before it is killed.
_RENDER_EXIT_TIMEOUT = 2.0
_READY_TIMEOUT = 60.0
HTTP = "http"  # the HTTP child's slot
HEALTH = "health"  # the health port's child's slot (health.py)


@dataclass
class _Child:
    slot: int | str  # a worker's index, HTTP or HEALTH
    pid: int
    started: float


class Supervisor:
    """Forks, watches and stops the child processes."""

    def __init__(
        self,
        registry: ModelRegistry,
        options: ServerOptions,
        workers: int,
        grace: float,
        http_socket: socket.socket | None = None,
        health_socket: socket.socket | None = None,
    ) -> None:
        self._registry = registry
        self._options = options
        self._grace = grace
        self._http_socket = http_socket
        self._health_socket = health_socket
        self._slots: list[int | str] = [
            *range(workers),
            *([HTTP] if http_socket else []),
            *([HEALTH] if health_socket else []),
        ]
        self._children: dict[int, _Child] = {}
        self._missing: dict[int | str, float] = {}  # slot -> when its child last started
        self._stopping = threading.Event()
        self.status = SharedStatus(workers)

    def run(self, on_ready: Callable[[], None]) -> int:
        """Serve until told to stop; `on_ready()` once every child listens. Returns the exit code.

        The options' port must be held by `reserved_port` meanwhile.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)
        self.status.beat_supervisor()
        # The loaded models live as long as the process: keep them out of the
        # garbage collector's passes, which would otherwise walk them again and
        # again while renders allocate, and would dirty the pages children share.
        gc.freeze()
        try:
            for slot in self._slots:
                self._fork(slot)
        except RuntimeError:
            self._stop()
            raise
        on_ready()
        self._watch()
        return self._stop()

    def _on_stop_signal(self, *_: object) -> None:
        self.status.start_draining()  # /readyz says so at once
        self._stopping.set()

    def _fork(self, slot: int | str) -> None:
        read_end, write_end = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            code = 1
            try:
                _stop_with(supervisor)
                code = self._serve_child(slot, write_end)
            except BaseException:
                log.exception("%s failed", _name(slot))
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            # The child writes one byte once it listens; EOF means it died first.
            if not _wait_readable(ready.fileno(), _READY_TIMEOUT) or ready.read(1) != b"1":
                raise RuntimeError(f"{_name(slot)} did not start (pid {pid})")
        self._children[pid] = _Child(slot=slot, pid=pid, started=time.monotonic())
        if isinstance(slot, int):  # a worker
            self.status.beat(slot)  # it beats on its own from now on
        self._update_status()
        log.info("%s serving (pid %d)", _name(slot), pid)

    def _serve_child(self, slot: int | str, ready_fd: int) -> int:
        if slot == HTTP:
            return self._serve_http(ready_fd)
        if slot == HEALTH:
            assert self._health_socket is not None
            os.write(ready_fd, b"1")  # the socket already listens
            os.close(ready_fd)
            serve_health(self.status, self._health_socket)  # until SIGTERM ends the process
            return 0
        assert isinstance(slot, int)
        return _serve_worker(self._registry, self._options, self._grace, ready_fd, lambda: self.status.beat(slot))

    def _serve_http(self, ready_fd: int) -> int:
        """The HTTP process: its render process, forked first, then uvicorn (http_app.py)."""
        assert self._http_socket is not None  # SIGTERM: uvicorn installs its own handler
        http = os.getpid()
        http_end, render_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the HTTP process's render process
            code = 1
            try:
                http_end.close()
                os.close(ready_fd)
                self._http_socket.close()
                # JSON carries tensors raw: a client in any language reads them without the compact form.
                pipeline = RenderPipeline(self._registry, self._options.limits, compact_tensors=False)
                _serve_render_process(JsonCalls(pipeline, self._options.limits).answer, render_end, http)
                code = 0
            except BaseException:
                log.exception("the HTTP process's render process failed")
            finally:
                os._exit(code)
        render_end.close()
        lost = threading.Event()
        renders = RenderProcessProxy(http_end, on_lost=lost.set)
        app = HttpApp(
            renders,
            self.status,
            TokenCheck(self._options.tokens),
            self._options.limits.max_request_bytes,
            self._options.limits.max_concurrent_rpcs,
        )
        os.write(ready_fd, b"1")  # the socket already listens
        os.close(ready_fd)
        serve_http(app, self._http_socket, self._options.tls, self._grace, stop=lost)
        renders.close()  # the render process reads end-of-file and exits once its render is done
        status = _wait_or_kill(pid, time.monotonic() + _RENDER_EXIT_TIMEOUT)
        if lost.is_set():
            log.error("the HTTP process's render process (pid %d) died: %s", pid, _describe(status))
            return 1  # the supervisor starts the HTTP process again, render process and all
        return 0

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            self.status.beat_supervisor()
            for pid, status in _reaped():
                child = self._children.pop(pid, None)
                if child is not None:
                    log.error("%s (pid %d) died: %s; starting it again", _name(child.slot), pid, _describe(status))
                    metrics.process_died(pid)
                    self._missing[child.slot] = child.started
                    self._update_status()
            for slot, started in list(self._missing.items()):
                if time.monotonic() - started < _RESTART_INTERVAL:
                    continue
                del self._missing[slot]
                metrics.WORKER_RESTARTS.inc()
                try:
                    self._fork(slot)
                except RuntimeError:
                    log.exception("%s did not start again; retrying", _name(slot))
                    self._missing[slot] = time.monotonic()

    def _update_status(self) -> None:
        self.status.set_serving(sum(isinstance(child.slot, int) for child in self._children.values()))

    def _stop(self) -> int:
        self.status.start_draining()
        workers = [child for child in self._children.values() if isinstance(child.slot, int)]
        log.info("draining %d workers (grace %.0fs)", len(workers), self._grace)
        failed = self._terminate(workers)
        # The HTTP and health processes go last, so that /readyz says "draining" meanwhile.
        failed |= self._terminate(list(self._children.values()))
        return 1 if failed else 0

    def _terminate(self, children: list[_Child]) -> bool:
        """SIGTERM `children` and wait for them; True if any failed or had to be killed."""
        for running in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(running.pid, signal.SIGTERM)
        waiting = {child.pid for child in children}
        deadline = time.monotonic() + self._grace + 10
        failed = False
        while waiting and time.monotonic() < deadline:
            self.status.beat_supervisor()
            for pid, status in _reaped():
                child = self._children.pop(pid, None)
                if child is not None:
                    waiting.discard(pid)
                    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
                    stopped = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
                    if os.waitstatus_to_exitcode(status) != 0 and not stopped:
                        log.error("%s exited badly: %s", _name(child.slot), _describe(status))
                        failed = True
            time.sleep(0.05)
        for pid in waiting:
            log.error("pid %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self._children.pop(pid, None)
            failed = True
        return failed


def _serve_worker(
    registry: ModelRegistry, options: ServerOptions, grace: float, ready_fd: int, beat: Callable[[], None]
) -> int:
    """A worker: its render processes, forked first (gRPC must not start before a fork), then its gRPC server.

    `beat` says the worker is alive (status.py); a thread of its own calls it, never a handler thread.
    """
    worker = os.getpid()
    pids: list[int] = []
    grpc_ends: list[socket.socket] = []
    for _ in range(options.render_processes):
        grpc_end, render_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # a render process
            code = 1
            try:
                for sock in (*grpc_ends, grpc_end):  # the others' ends too: each sees its own EOF
                    sock.close()
                os.close(ready_fd)  # the supervisor's "started" pipe is the gRPC process's to write
                pipeline = RenderPipeline(registry, options.limits, compact_tensors=options.compact_tensors)
                _serve_render_process(pipeline.answer, render_end, worker)
                code = 0
            except BaseException:
                log.exception("the render process failed")
            finally:
                os._exit(code)
        render_end.close()
        pids.append(pid)
        grpc_ends.append(grpc_end)
    stop, lost = threading.Event(), threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def on_lost() -> None:
        lost.set()
        stop.set()

    renders = RenderProcessPool([RenderProcessProxy(sock, on_lost=on_lost) for sock in grpc_ends])
    running = start_server(registry, renders, replace(options, reuse_port=True))
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    threading.Thread(target=_beat_forever, args=(beat,), name="heartbeat", daemon=True).start()
    stop.wait()
    # Health goes NOT_SERVING first so balancers stop sending, then new calls are
    # refused and in-flight ones get `grace` seconds to finish.
    running.set_serving(False)
    # Without a render process, calls end at once (UNAVAILABLE); only idle streams would wait.
    running.server.stop(_LOST_GRACE if lost.is_set() else grace).wait()
    renders.close()  # each render process reads end-of-file and exits once its render is done...
    exit_by = time.monotonic() + _RENDER_EXIT_TIMEOUT
    statuses = {pid: _wait_or_kill(pid, exit_by) for pid in pids}  # ...which nobody is left to take
    if lost.is_set():
        # The supervisor starts the worker again, render processes and all.
        for pid, status in statuses.items():
            if status != 0:
                log.error("worker %d: its render process (pid %d) died: %s", worker, pid, _describe(status))
        return 1
    return 0


def _beat_forever(beat: Callable[[], None]) -> None:
    # Until the process exits, draining included: silence means stuck, not busy.
    while True:
        beat()
        time.sleep(BEAT_INTERVAL)


def _serve_render_process(answer: Callable[..., Any], sock: socket.socket, parent: int) -> None:
    """A render process: `answer`s the requests `parent` (a gRPC or the HTTP process) hands over."""
    # Only the parent decides when to stop: it closes the socket once its
    # calls are done, so signals to the group (^C) must not end renders early.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    _die_with(parent, signal.SIGKILL)
    serve_renders(sock, answer, as_render_error)


def _wait_or_kill(pid: int, deadline: float) -> int:
    """`pid`'s wait status once it exits; SIGKILLed if it has not by `deadline` (time.monotonic())."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork


def _stop_with(supervisor: int) -> None:
    """Have the kernel SIGTERM this child when the supervisor dies, however it dies.

    Otherwise a supervisor killed outright would leave its workers serving the
    port on their own, unsupervised. Until the child installs its own handlers,
    SIGTERM ends it: the supervisor's handlers, inherited through fork, must
    not run in it.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    _die_with(supervisor, signal.SIGTERM)


def _die_with(parent: int, signum: int) -> None:
    """Have the kernel send `signum` to this process when `parent` dies.

    (The signal is tied to the thread that forked: the parent's main thread,
    which lives as long as it serves.)
    """
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # it died before the prctl took hold
        os._exit(1)


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold `port` (or a free one, for 0) for the workers to share; yield its number."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    if port != 0:
        # SO_REUSEPORT would let us share a port another server already holds
        # (gRPC servers set it too); bind once without it to find out.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the HTTP process (bound here, so a restart keeps the port)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _reaped() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def _wait_readable(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


def _name(slot: int | str) -> str:
    if slot == HTTP:
        return "the HTTP process"
    return "the health process" if slot == HEALTH else f"worker {slot}"


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
