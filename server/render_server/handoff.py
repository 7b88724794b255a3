"""The hand-over between a worker's gRPC process and its render process.

Each worker is two processes joined by a Unix socket pair (workers.py). The
gRPC process takes calls and passes each request's bytes on unparsed; the
render process decodes, renders and encodes, and passes back the answer's
bytes or its status. Why two: a render holds the GIL for milliseconds, and
grpcio's threads need it for every event of every call; in one process they
queue behind renders and each call costs the render thread ~1.3 ms
(`python -m bench --only floor`). Split, the render process renders back to
back and the gRPC process's I/O runs beside it on another core.

Frames, both ways: a fixed header, then `length` bytes of body.

    to render:  call id, kind (SAMPLE, BATCH or CANCEL), time received and
                deadline (time.monotonic(), one clock for every process), the
                batch's first result index, body length; body: the request
    to gRPC:    call id, status code, last (a batch's answer may come in
                several parts), next result index, body length; body: the
                response bytes, or "error_type\\ndetails" for a status

The render process takes frames in order, one at a time; a CANCEL frame,
read whenever the render asks whether its call is still wanted, stops work on
a call the caller has left.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from render_client.errors import RenderError, UnavailableError, error_from_status

log = logging.getLogger(__name__)

SAMPLE, BATCH, CANCEL = 1, 2, 3
_TO_RENDER = struct.Struct("<QBddQI")
_TO_GRPC = struct.Struct("<QB?QI")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Request:
    """A call as the render process gets it."""

    call_id: int
    kind: int
    received: float
    deadline: float  # math.inf: none
    first_index: int
    body: bytes


@dataclass(frozen=True)
class Answer:
    """The render process's answer to a call, or one part of a batch's answer."""

    code: grpc.StatusCode
    body: bytes  # response bytes; for a status, its error_type and details
    last: bool = True
    next_index: int = 0

    @classmethod
    def of_error(cls, error: RenderError, next_index: int = 0) -> Answer:
        return cls(error.code, f"{error.error_type or ''}\n{error.details}".encode(), next_index=next_index)

    def error(self) -> RenderError:
        error_type, _, details = self.body.decode().partition("\n")
        return error_from_status(self.code, details, error_type or None)


_LEFT = Answer(grpc.StatusCode.CANCELLED, b"\nthe caller left")


def _lost() -> Answer:
    return Answer.of_error(UnavailableError("the worker's render process stopped; the worker is starting again"))


# -- the gRPC process's end ----------------------------------------------------------


class RenderProcess:
    """Hands calls to the render process over `sock` and routes its answers back.

    Any thread may start calls; one thread reads answers. If the render
    process goes away, every call waiting gets UNAVAILABLE and `on_lost` runs.
    """

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None]) -> None:
        self._sock = sock
        self._on_lost = on_lost
        self._send_lock = threading.Lock()
        self._calls: dict[int, queue.SimpleQueue[Answer]] = {}
        self._call_ids = itertools.count(1)
        self._lost = False
        self._closing = False
        self._reader = threading.Thread(target=self._read_answers, name="render-answers", daemon=True)
        self._reader.start()

    def start(self, kind: int, body: bytes, *, deadline: float, first_index: int = 0) -> Call:
        """Send a request on; its Call yields the answer (a batch's: in parts)."""
        call = Call(self, next(self._call_ids))
        self._calls[call.call_id] = call.answers
        header = _TO_RENDER.pack(call.call_id, kind, time.monotonic(), deadline, first_index, len(body))
        try:
            with self._send_lock:
                if self._lost:
                    raise OSError("render process gone")
                _send(self._sock, header, body)
        except OSError:
            self._calls.pop(call.call_id, None)
            call.answers.put(_lost())
        return call

    def cancel(self, call: Call) -> None:
        """The caller left: wake whoever waits for `call` and tell the render process to skip it."""
        if self._calls.pop(call.call_id, None) is None:
            return  # answered already
        call.answers.put(_LEFT)
        header = _TO_RENDER.pack(call.call_id, CANCEL, 0.0, 0.0, 0, 0)
        try:
            with self._send_lock:
                if not self._lost:
                    _send(self._sock, header, b"")
        except OSError:
            pass  # the reader finds out and reports it

    def close(self) -> None:
        """End the render process (it reads end-of-file) and wait for the reader."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        self._sock.close()

    def _read_answers(self) -> None:
        try:
            while True:
                call_id, code, last, next_index, length = _TO_GRPC.unpack(_receive(self._sock, _TO_GRPC.size))
                body = _receive(self._sock, length)
                answers = self._calls.pop(call_id, None) if last else self._calls.get(call_id)
                if answers is not None:  # else: the caller left
                    answers.put(Answer(_CODES[code], body, last, next_index))
        except (OSError, EOFError):
            pass
        with self._send_lock:
            self._lost = True
        calls, self._calls = self._calls, {}
        for answers in calls.values():
            answers.put(_lost())
        if not self._closing:
            self._on_lost()


class Call:
    """One request handed to the render process."""

    def __init__(self, process: RenderProcess, call_id: int) -> None:
        self.call_id = call_id
        self.answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self._process = process

    def __iter__(self) -> Iterator[Answer]:
        """The answer's parts as they come, up to the last."""
        while True:
            answer = self.answers.get()
            yield answer
            if answer.last:
                return

    def cancel(self) -> None:
        self._process.cancel(self)


# -- the render process's end ----------------------------------------------------------


class Inbox:
    """The render process's queue of requests, read off the socket as they arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._waiting: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._closed = False

    def next(self) -> Request:
        """The oldest request not yet taken; waits for one. EOFError once the gRPC process is gone."""
        while not self._waiting:
            if self._closed:
                raise EOFError("the gRPC process closed the socket")
            self._take(self._read())
        return self._waiting.popleft()

    def is_cancelled(self, request: Request) -> bool:
        """Whether `request`'s caller has left or its deadline has passed (or the gRPC process has gone)."""
        try:
            while not self._closed and select.select([self._sock], [], [], 0)[0]:
                self._take(self._read())
        except (EOFError, ConnectionError):
            self._closed = True  # nobody is left to answer
        return self._closed or request.call_id in self._cancelled or time.monotonic() > request.deadline

    def done(self, request: Request) -> None:
        # Calls are taken in order, so no cancellation can matter for this one or any before.
        if self._cancelled:
            self._cancelled = {call_id for call_id in self._cancelled if call_id > request.call_id}

    def _read(self) -> Request:
        call_id, kind, received, deadline, first_index, length = _TO_RENDER.unpack(
            _receive(self._sock, _TO_RENDER.size)
        )
        return Request(call_id, kind, received, deadline, first_index, _receive(self._sock, length))

    def _take(self, request: Request) -> None:
        if request.kind == CANCEL:
            self._cancelled.add(request.call_id)
        else:
            self._waiting.append(request)


def serve_renders(sock: socket.socket, answer: Callable[[Request, Callable[[], bool]], Iterator[Answer]]) -> None:
    """The render process's loop: each request's answers, in order, until the gRPC process closes the socket."""
    inbox = Inbox(sock)
    while True:
        try:
            request = inbox.next()
        except (EOFError, ConnectionError):
            return
        for part in answer(request, lambda request=request: inbox.is_cancelled(request)):
            header = _TO_GRPC.pack(request.call_id, part.code.value[0], part.last, part.next_index, len(part.body))
            try:
                _send(sock, header, part.body)
            except OSError:
                return
        inbox.done(request)


# -- the socket ----------------------------------------------------------------------


def deadline_in(seconds: float | None) -> float:
    """The monotonic time `seconds` from now; math.inf for no deadline."""
    return math.inf if seconds is None else time.monotonic() + seconds


def _send(sock: socket.socket, header: bytes, body: bytes) -> None:
    # One system call for header and body, and no copy of the body to join them.
    sent = sock.sendmsg([header, body])
    if sent < len(header) + len(body):
        sock.sendall((header + body)[sent:] if sent < len(header) else memoryview(body)[sent - len(header) :])


def _receive(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes; EOFError if the socket closes first."""
    if size == 0:
        return b""
    # MSG_WAITALL: the kernel fills the one bytes object recv allocates, with no joins.
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) == size:
        return data
    parts = [data]
    received = len(data)
    while received < size:
        if not parts[-1]:
            raise EOFError("socket closed mid-frame" if received else "socket closed")
        parts.append(sock.recv(size - received, socket.MSG_WAITALL))
        received += len(parts[-1])
    return b"".join(parts)
