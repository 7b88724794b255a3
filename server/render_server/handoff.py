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

    to render:  call id, kind, time received and deadline (time.monotonic(),
                one clock for every process), the batch's first result index,
                body length; body: the request (SAMPLE, BATCH) or nothing
                (CANCEL: the caller left; MORE: the last part was sent on)
    to gRPC:    call id, status code, last (a batch's answer may come in
                several parts), next result index, body length; body: the
                response bytes, or "error_type\\ndetails" for a status

Call ids grow in the order requests are sent, and the render process takes
them in that order. A thread in the render process reads frames as they come,
so that senders never wait on a render and a cancellation is seen mid-batch.
A batch's parts (up to 8 MiB of pixel tensors each) wait for MORE before the
next is sent, so that a slow caller does not pile a batch up in memory.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import math
import queue
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import grpc

from render_wire.errors import (
    RenderError,
    UnavailableError,
    decode_error_detail,
    encode_error_detail,
    error_from_status,
)

log = logging.getLogger(__name__)


class Kind(enum.IntEnum):
    SAMPLE = 1  # a RenderTrainingSampleRequest
    BATCH = 2  # a RenderTrainingSamplesRequest
    CANCEL = 3  # the caller left
    MORE = 4  # the batch's last part was sent on: send the next
    RENDER = 5  # a RenderRequest
    PARSE = 6  # a ParseResponseRequest
    BRIDGE = 7  # a BridgeToNextTurnRequest
    DESCRIBE = 8  # a DescribeRendererRequest
    RENDER_BATCH = 9  # a RendersRequest
    CALLS = 10  # a CallsRequest


# A render process busy on one call for longer than this gets no new calls while another is free of such a render.
SLOW_RENDER = 0.5

_TO_RENDER = struct.Struct("<QBddQQ")
_TO_GRPC = struct.Struct("<QB?QQ")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Request:
    """A call as the render process gets it."""

    call_id: int
    kind: Kind
    received: float
    deadline: float  # math.inf: none
    first_index: int
    body: bytes


@dataclass(frozen=True)
class Answer:
    """The render process's answer to a call, or one part of a batch's answer."""

    code: grpc.StatusCode
    body: bytes  # response bytes; for a status, its error_type, error_detail and details
    last: bool = True
    next_index: int = 0

    @classmethod
    def of_error(cls, error: RenderError, next_index: int = 0) -> Answer:
        # error_type and error_detail (one-line JSON) hold no newline; details come last.
        detail = encode_error_detail(error.error_detail)
        return cls(error.code, f"{error.error_type or ''}\n{detail}\n{error.details}".encode(), next_index=next_index)

    def error(self) -> RenderError:
        error_type, _, rest = self.body.decode().partition("\n")
        detail, _, details = rest.partition("\n")
        return error_from_status(self.code, details, error_type or None, decode_error_detail(detail))


_LEFT = Answer(grpc.StatusCode.CANCELLED, b"\n\nthe caller left")


def _lost() -> Answer:
    return Answer.of_error(UnavailableError("the worker's render process stopped; the worker is starting again"))


# -- the gRPC process's end ----------------------------------------------------------


class RenderProcessProxy:
    """Hands calls to the render process over `sock` and routes its answers back.

    Any thread may start calls; one thread reads answers. If the render
    process goes away, every call waiting gets UNAVAILABLE and `on_lost` runs.
    """

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None]) -> None:
        self._sock = sock
        self._on_lost = on_lost
        # Guards the socket's sending side, the calls waiting and whether the process is lost:
        # call ids are taken, registered and sent in one go, so they reach the render process in order.
        self._lock = threading.Lock()
        self._calls: dict[int, queue.SimpleQueue[Answer]] = {}
        # Calls sent that the render process has not answered to the end (left ones included: it
        # still takes them), and when it took the oldest of them (see `load`).
        self._unanswered = 0
        self._head_started = 0.0
        self._call_ids = itertools.count(1)
        self._lost = False
        self._closing = False
        self._reader = threading.Thread(target=self._read_answers, name="render-answers", daemon=True)
        self._reader.start()

    def start(self, kind: Kind, body: bytes, *, deadline: float, first_index: int = 0) -> Call:
        """Send a request on; its Call yields the answer (a batch's: in parts)."""
        answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        with self._lock:
            call = Call(self, next(self._call_ids), answers)
            if self._lost:
                answers.put(_lost())
                return call
            if not self._unanswered:
                self._head_started = time.monotonic()
            self._unanswered += 1
            self._calls[call.call_id] = answers
            header = _TO_RENDER.pack(call.call_id, kind, time.monotonic(), deadline, first_index, len(body))
            try:
                _send(self._sock, header, body)
            except OSError:
                self._unanswered -= 1
                self._calls.pop(call.call_id)
                answers.put(_lost())  # the reader finds out too, and reports it
        return call

    def load(self, now: float) -> tuple[bool, int]:
        """How busy the render process is, for RenderProcessPool to compare: whether one render has
        held it for over SLOW_RENDER seconds, and how many calls it has waiting or rendering."""
        calls = self._unanswered
        return calls > 0 and now - self._head_started > SLOW_RENDER, calls

    def cancel(self, call: Call) -> None:
        """The caller left: wake whoever waits for `call` and tell the render process to skip it."""
        with self._lock:
            if self._calls.pop(call.call_id, None) is None:
                return  # answered already
            call.answers.put(_LEFT)
            self._signal(Kind.CANCEL, call)

    def more(self, call: Call) -> None:
        """The last part of `call`'s answer was sent on: the render process may send the next."""
        with self._lock:
            if call.call_id in self._calls:
                self._signal(Kind.MORE, call)

    def close(self) -> None:
        """End the render process (it reads end-of-file) and wait for the reader."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        self._sock.close()

    def _signal(self, kind: Kind, call: Call) -> None:
        # The render process reads all the time (Inbox), so this small send does not wait on a render.
        if not self._lost:
            with contextlib.suppress(OSError):  # the reader finds out and reports it
                _send(self._sock, _TO_RENDER.pack(call.call_id, kind, 0.0, 0.0, 0, 0), b"")

    def _read_answers(self) -> None:
        try:
            while True:
                call_id, code, last, next_index, length = _TO_GRPC.unpack(_receive(self._sock, _TO_GRPC.size))
                body = _receive(self._sock, length)
                with self._lock:
                    answers = self._calls.pop(call_id, None) if last else self._calls.get(call_id)
                    if last:
                        self._unanswered -= 1
                        self._head_started = time.monotonic()  # the next call's render starts now
                if answers is not None:  # else: the caller left
                    answers.put(Answer(_CODES[code], body, last, next_index))
                # Not held while waiting for the next answer: an answer can be hundreds of MiB of pixels.
                del body
        except (OSError, EOFError):
            pass  # the render process is gone, or we are closing
        except Exception:
            log.exception("reading the render process's answers failed")
        finally:
            with self._lock:
                self._lost = True
                calls, self._calls = self._calls, {}
            for answers in calls.values():
                answers.put(_lost())
            if not self._closing:
                self._on_lost()


class RenderProcessPool:
    """A worker's render processes: each call goes to the one least busy.

    One render process renders one call at a time, so a call queued behind a
    long render (megabytes of text, a huge image, a big batch) would wait for
    all of it. A call goes to the process with the fewest calls waiting or
    rendering, never to one held by a single render for over SLOW_RENDER
    seconds while another is not: with two, small calls keep flowing while
    one long render runs. Ties go to the first, so a lightly loaded worker
    keeps its second process idle and ready.
    """

    def __init__(self, processes: list[RenderProcessProxy]) -> None:
        self._processes = processes

    def start(self, kind: Kind, body: bytes, *, deadline: float, first_index: int = 0) -> Call:
        now = time.monotonic()
        process = min(self._processes, key=lambda process: process.load(now))
        return process.start(kind, body, deadline=deadline, first_index=first_index)

    def close(self) -> None:
        for process in self._processes:
            process.close()


class Call:
    """One request handed to the render process."""

    def __init__(self, process: RenderProcessProxy, call_id: int, answers: queue.SimpleQueue[Answer]) -> None:
        self.call_id = call_id
        self.answers = answers
        self._process = process

    def __iter__(self) -> Iterator[Answer]:
        """The answer's parts as they come, up to the last; each one taken asks for the next."""
        while True:
            answer = self.answers.get()
            yield answer
            if answer.last:
                return
            self._process.more(self)

    def cancel(self) -> None:
        self._process.cancel(self)


# -- the render process's end ----------------------------------------------------------


class Inbox:
    """The render process's view of its socket: requests in order, cancellations and MOREs as they come.

    A thread reads the socket all the time and files what it reads here.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._changed = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._more: set[int] = set()
        self._closed = False
        threading.Thread(target=self._read, name="render-inbox", daemon=True).start()

    def next(self) -> Request:
        """The oldest request not yet taken; waits for one. EOFError once the gRPC process is gone."""
        with self._changed:
            while not self._waiting:
                if self._closed:
                    raise EOFError("the gRPC process closed the socket")
                self._changed.wait()
            return self._waiting.popleft()

    def is_cancelled(self, request: Request) -> bool:
        """Whether `request`'s caller has left or its deadline has passed (or the gRPC process has gone)."""
        return self._closed or request.call_id in self._cancelled or time.monotonic() > request.deadline

    def wait_for_more(self, request: Request) -> bool:
        """Wait until the last part sent for `request` was taken; False if its caller left meanwhile."""
        with self._changed:
            while request.call_id not in self._more:
                if self.is_cancelled(request):
                    return False
                # Wakes for every frame; the timeout only notices a deadline passing.
                self._changed.wait(timeout=max(0.0, min(request.deadline - time.monotonic(), 1.0)))
            self._more.discard(request.call_id)
            return True

    def done(self, request: Request) -> None:
        # Requests are taken in the order their ids were sent: nothing can concern this one or any before.
        with self._changed:
            self._cancelled = {call_id for call_id in self._cancelled if call_id > request.call_id}
            self._more = {call_id for call_id in self._more if call_id > request.call_id}

    def _read(self) -> None:
        try:
            while True:
                call_id, kind, received, deadline, first_index, length = _TO_RENDER.unpack(
                    _receive(self._sock, _TO_RENDER.size)
                )
                body = _receive(self._sock, length)
                with self._changed:
                    if kind == Kind.CANCEL:
                        self._cancelled.add(call_id)
                    elif kind == Kind.MORE:
                        self._more.add(call_id)
                    else:
                        self._waiting.append(Request(call_id, Kind(kind), received, deadline, first_index, body))
                    self._changed.notify()
                del body  # not held while waiting for the next frame: a request can be 64 MiB
        except (OSError, EOFError):
            pass
        except Exception:
            log.exception("reading requests from the gRPC process failed")
        finally:
            with self._changed:
                self._closed = True
                self._changed.notify()


def serve_renders(
    sock: socket.socket,
    answer: Callable[[Request, Callable[[], bool]], Generator[Answer, None, None]],
    on_error: Callable[[Exception], RenderError],
) -> None:
    """The render process's loop: each request's answers, in order, until the gRPC process closes the socket.

    `on_error` turns an exception `answer` raises into the status to send (the loop goes on).
    """
    inbox = Inbox(sock)
    while True:
        try:
            request = inbox.next()
        except EOFError:
            return
        parts = answer(request, functools.partial(inbox.is_cancelled, request))
        part: Answer | None = None
        sent_parts = 0
        while True:
            try:
                part = next(parts)
            except StopIteration:
                break
            except Exception as exc:  # a bug, or out of memory: this call fails, the process goes on
                part = Answer.of_error(on_error(exc), request.first_index)
            if not part.last and sent_parts and not inbox.wait_for_more(request):
                parts.close()  # the caller left: no more parts
                part = _LEFT
            header = _TO_GRPC.pack(request.call_id, part.code.value[0], part.last, part.next_index, len(part.body))
            try:
                _send(sock, header, part.body)
            except OSError:
                return
            sent_parts += 1
            if part.last:
                break
        inbox.done(request)
        # Not kept until the next request comes: an answer can hold hundreds of MiB of pixels,
        # a request 64 MiB.
        del parts, request
        part = None


# -- the socket ----------------------------------------------------------------------


def deadline_in(seconds: float | None) -> float:
    """The monotonic time `seconds` from now (math.inf for None)."""
    return math.inf if seconds is None else time.monotonic() + seconds


def _send(sock: socket.socket, header: bytes, body: bytes) -> None:
    # One system call for header and body, and no copy of the body to join them.
    sent = sock.sendmsg([header, body])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        sock.sendall(memoryview(body)[sent - len(header) :])


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
