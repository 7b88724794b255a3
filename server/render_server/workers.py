"""Worker processes: one gRPC server per core, all on one port, under a supervisor.

One Python process renders on one core, so the server forks N workers, each a
complete gRPC server (service, health, reflection) bound to the same port with
SO_REUSEPORT; the kernel spreads incoming connections across them. This is
gRPC Python's own multiprocessing pattern. The supervisor loads the models
before forking, so workers start (and restart) without loading anything and
share the loaded pages copy-on-write. It never touches gRPC itself: gRPC must
not be initialised before a fork.

A worker that dies is forked again. On SIGTERM or SIGINT the supervisor passes
the signal on, every worker stops gracefully (see server.py), and the
supervisor exits 0 once all have.
"""

from __future__ import annotations

import contextlib
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

from .registry import ModelRegistry
from .server import ServerOptions, start_server

log = logging.getLogger(__name__)

# A worker that keeps dying is forked again at most this often.
_RESTART_INTERVAL = 1.0
_READY_TIMEOUT = 60.0


@dataclass
class _Worker:
    slot: int
    pid: int
    started: float


class Supervisor:
    """Forks, watches and stops the worker processes."""

    def __init__(self, registry: ModelRegistry, options: ServerOptions, workers: int, grace: float) -> None:
        self._registry = registry
        self._options = options
        self._count = workers
        self._grace = grace
        self._workers: dict[int, _Worker] = {}
        self._missing: dict[int, float] = {}  # slot -> when its worker last started
        self._stopping = threading.Event()
        self.restarts = 0

    def run(self, on_ready: Callable[[], None]) -> int:
        """Serve until told to stop; `on_ready()` once every worker listens. Returns the exit code.

        The options' port must be held by `reserved_port` meanwhile.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self._stopping.set())
        # The loaded models live as long as the process: keep them out of the
        # garbage collector's passes, which would otherwise walk them again and
        # again while renders allocate, and would dirty the pages workers share.
        gc.freeze()
        try:
            for slot in range(self._count):
                self._fork(slot)
        except RuntimeError:
            self._stop()
            raise
        on_ready()
        self._watch()
        return self._stop()

    def _fork(self, slot: int) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_end)
            code = 1
            try:
                code = _serve_worker(self._registry, self._options, self._grace, write_end)
            except BaseException:
                log.exception("worker %d failed", slot)
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            # The worker writes one byte once it listens; EOF means it died first.
            if not _wait_readable(ready.fileno(), _READY_TIMEOUT) or ready.read(1) != b"1":
                raise RuntimeError(f"worker {slot} did not start (pid {pid})")
        self._workers[pid] = _Worker(slot=slot, pid=pid, started=time.monotonic())
        log.info("worker %d serving (pid %d)", slot, pid)

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for pid, status in _reaped():
                worker = self._workers.pop(pid, None)
                if worker is not None:
                    log.error("worker %d (pid %d) died: %s; starting it again", worker.slot, pid, _describe(status))
                    self._missing[worker.slot] = worker.started
            for slot, started in list(self._missing.items()):
                if time.monotonic() - started < _RESTART_INTERVAL:
                    continue
                del self._missing[slot]
                self.restarts += 1
                try:
                    self._fork(slot)
                except RuntimeError:
                    log.exception("worker %d did not start again; retrying", slot)
                    self._missing[slot] = time.monotonic()

    def _stop(self) -> int:
        log.info("stopping %d workers (grace %.0fs)", len(self._workers), self._grace)
        for pid in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self._grace + 10
        failed = False
        while self._workers and time.monotonic() < deadline:
            for pid, status in _reaped():
                if self._workers.pop(pid, None) is not None and os.waitstatus_to_exitcode(status) != 0:
                    failed = True
            time.sleep(0.05)
        for pid in self._workers:
            log.error("worker pid %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            failed = True
        return 1 if failed else 0


def _serve_worker(registry: ModelRegistry, options: ServerOptions, grace: float, ready_fd: int) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    running = start_server(registry, replace(options, reuse_port=True))
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    stop.wait()
    # Health goes NOT_SERVING first so balancers stop sending, then new calls are
    # refused and in-flight ones get `grace` seconds to finish.
    running.set_serving(False)
    running.server.stop(grace).wait()
    return 0


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


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
