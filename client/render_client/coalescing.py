"""Coalescing: a client's concurrent unary calls travel together, in Calls batches.

gRPC Python charges each call ~0.2 ms of the client's CPU and ~0.3 ms of the
server's whatever its size, and a batch of N calls about 1/N of that per call
(bench/README.md, "RL rollouts"): for the small calls an RL rollout makes every
turn (parse_response, bridge_to_next_turn) that cost is larger than the work.
So RenderClient and AsyncRenderClient send their render, render_tokens,
parse_response and bridge_to_next_turn calls through a Coalescer:

- A call made while no other is in flight or waiting goes at once, alone, as
  the plain unary call it is: a lone caller is neither delayed nor charged for
  batching (threads waking each other cost more CPU than the call itself).
- A call made while others are in flight opens a batch, or joins the open
  one; the batch's first call waits at most `window` seconds (a millisecond by
  default) for companions, or until the batch is full (MAX_BATCH_CALLS,
  MAX_BATCH_BYTES), and the batch goes as one Calls call.
- At most IN_FLIGHT_PER_CONNECTION batches per connection are at the server at
  once; a batch whose window has passed meanwhile keeps gathering calls until
  one comes back (it would only have queued at the server): fewer, larger
  batches, the server's cost per call paid once per batch.
- asyncio only (its tasks resume together, so a batch's calls come back
  together): a batch far smaller than those in flight waits for one to come
  back (a few windows at most), and a large batch sent while none is in flight
  goes in two halves, so the tasks keep in step, in two batches of about half
  of them each (STRAGGLER_SHARE, STRAGGLER_HOLD_WINDOWS, ASYNC_SPLIT_CALLS).

Each call keeps what it has as a unary call: its own deadline (it raises
DeadlineExceededError when its time is up, and the server skips it if its time
is up before its turn), its own result or error (with a CallStatus as its
rpc_error), resends on UNAVAILABLE (the batch is sent again, without the calls
that are done), and cancellation (asyncio: a cancelled call leaves its batch if
the batch has not gone yet; once it has, the server renders it with the others
and its answer is dropped). Requests over MAX_CALL_BYTES go alone, as do all
calls to a server without Calls (it answers UNIMPLEMENTED once; the coalescer
then stands aside).

The coalescer hands back each call's answer as its own method's unary answer
(render_wire.calls carries the bytes unchanged), so the client decodes it as
it decodes a unary answer. Two engines, as for streams: `Coalescer` for threads
(the first call of a batch sends it with grpcio's future API, and every call
waits for its own answer), `AsyncCoalescer` for one event loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from render_wire.calls import METHODS, decode_call_results, encode_calls
from render_wire.errors import (
    ERROR_TYPE_KEY,
    CallCancelledError,
    DeadlineExceededError,
    RenderError,
    error_from_rpc,
    error_from_status,
)
from render_wire.identity import ReplicaIdentity, decode_identity
from render_wire.pb import render_pb2 as pb

from .channel import Connection

T = TypeVar("T")

# The methods a coalescer carries.
COALESCED: Final = frozenset(METHODS)
# A request larger than this goes alone: it gains nothing from a batch, and a batch
# must stay below the server's limit on a message (--max-request-mb, 64 MiB by default).
MAX_CALL_BYTES = 1 << 20
MAX_BATCH_BYTES = 4 << 20
MAX_BATCH_CALLS = 64
DEFAULT_WINDOW = 0.001  # seconds
# Batches at the server at once, per connection: a worker's two render processes busy. A batch
# whose window has passed while this many are out keeps gathering calls until one comes back:
# it would only have waited in the server's queue, and fewer, larger batches cost both sides
# less (bench/README.md: at 64 threads, two in flight made batches of 17 where four made 11,
# with 10 % less CPU per turn on each side).
IN_FLIGHT_PER_CONNECTION = 2
# asyncio: the tasks a batch answers all resume in one turn of the loop, so its calls come back
# together; a task out of step (its call went alone) would make batches of one beside them for
# ever (bench/README.md: 861 batches of one beside 60 of 63 at 64 tasks, 0.75 ms of env CPU a
# turn). So a batch under 1/STRAGGLER_SHARE of the calls in flight waits for a batch to come
# back (it then goes with that batch's calls), for at most STRAGGLER_HOLD_WINDOWS windows from
# its first call (small quick calls do not wait out a slow batch); and a batch of at least
# ASYNC_SPLIT_CALLS sent while none is in flight goes in two halves, one per slot: the halves
# come back apart and stay apart, keeping both of the worker's render processes busy.
STRAGGLER_SHARE = 4
STRAGGLER_HOLD_WINDOWS = 10
ASYNC_SPLIT_CALLS = 16


def serialized(request: ProtoMessage | bytes) -> bytes:
    """A request as its method's bytes (BridgeToNextTurn's come serialised already)."""
    return request if isinstance(request, bytes) else request.SerializeToString()


def answer_of(method: str, answer: memoryview) -> Any:
    """A coalesced call's answer as its unary call returns it: bytes, except ParseResponse's message."""
    if method == "ParseResponse":
        return pb.ParseResponseResponse.FromString(bytes(answer))
    return answer


class SendAlone:
    """The outcome of a call the coalescer does not carry: the caller sends it as a unary call."""


SEND_ALONE: Final = SendAlone()
Outcome = memoryview | RenderError | SendAlone

# The error of a call whose deadline passed: what grpcio's own deadline gives a unary call.
DEADLINE_DETAILS = "Deadline Exceeded"
CALL_CANCELLED = "the call was cancelled"


def _expired(deadline: float | None, now: float) -> bool:
    return deadline is not None and now >= deadline


class _Call:
    """A call waiting in a batch, and how its outcome reaches it."""

    __slots__ = ("_done", "abandoned", "deadline", "identity", "method", "outcome", "request")

    def __init__(self, method: str, request: bytes, deadline: float | None) -> None:
        self.method = method
        self.request = request
        self.deadline = deadline
        self.outcome: Outcome | None = None  # None until done
        self.identity: ReplicaIdentity | None = None  # the replica that answered its batch
        self.abandoned = False  # its caller stopped waiting (its deadline passed)
        # A lock held until the outcome is in: cheaper to wait on than an Event.
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, outcome: Outcome) -> None:
        """Give the call its outcome. Only the thread that sent its batch, then the one its
        answer came on, finish a call, one after the other: never two at once."""
        if self.outcome is None:
            self.outcome = outcome
            self._done.release()

    def wait(self, timeout: float | None) -> bool:
        return self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout))


class _Batch:
    """Calls collected to go together."""

    __slots__ = ("calls", "full", "opened", "size")

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.size = 0
        self.full = threading.Event()
        self.opened = time.monotonic()

    def add(self, call: Any) -> bool:
        """Add `call`; whether the batch is now full."""
        self.calls.append(call)
        self.size += len(call.request)
        return len(self.calls) >= MAX_BATCH_CALLS or self.size >= MAX_BATCH_BYTES


def _encoded(calls: list[Any], now: float) -> tuple[bytes, float | None]:
    """The CallsRequest for `calls` and the batch's timeout: the latest of theirs (None if one has none)."""
    timeouts = [None if call.deadline is None else call.deadline - now for call in calls]
    batch_timeout = None if None in timeouts else max(t for t in timeouts if t is not None)
    return encode_calls(
        [(call.method, call.request, t) for call, t in zip(calls, timeouts, strict=True)]
    ), batch_timeout


def _outcomes(data: bytes, calls: list[Any]) -> list[Outcome] | RenderError:
    try:
        outcomes: list[Outcome] = list(decode_call_results(data, [call.method for call in calls]))
    except RenderError as error:
        return error
    for outcome in outcomes:
        if isinstance(outcome, RenderError):
            outcome.rpc_error = CallStatus(outcome)
    return outcomes


class CallStatus(grpc.RpcError, grpc.Call):
    """A coalesced call's failure as its own unary call would have failed (`RenderError.rpc_error`):
    its status, details and error-type trailer. Its batch carried it; nothing of it is active."""

    def __init__(self, error: RenderError) -> None:
        self._error = error

    def code(self) -> grpc.StatusCode:
        return self._error.code

    def details(self) -> str:
        return self._error.details

    # Metadata as grpcio gives it at run time: (key, value) tuples (its stubs say otherwise).
    def initial_metadata(self) -> Any:
        return ()

    def trailing_metadata(self) -> Any:
        error_type = self._error.error_type
        return ((ERROR_TYPE_KEY, error_type),) if error_type else ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Any:
        return None  # as grpcio's, for a call without a deadline

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def __str__(self) -> str:
        return f"<coalesced call: {self._error.code} {self._error.details!r}>"


class Coalescer:
    """Coalesces the unary calls of a RenderClient's threads (see the module's docstring)."""

    def __init__(self, connection: Connection, window: float) -> None:
        self._connection = connection
        self._window = window
        self._lock = threading.Lock()
        self._open: _Batch | None = None  # the batch later calls join
        self.supported = True  # False once the server has answered that it has no Calls
        self._in_flight = 0  # batches (and calls that went alone) sent and not yet answered
        self._limit = IN_FLIGHT_PER_CONNECTION * len(connection.stubs)
        self._held: _Batch | None = None  # the open batch, once its window has passed
        self.batches_sent = self.calls_sent = 0  # what it has coalesced: calls / batches is the mean batch

    def call(
        self,
        method: str,
        request: bytes,
        deadline: float | None,
        alone: Callable[[], T],
        check: Callable[[ReplicaIdentity | None], None] | None = None,
    ) -> T | Any:
        """The answer to one call, as `answer_of` gives it; its error raised. `alone()` sends it on its own
        (a unary call): when no other call is in flight or waiting, or when it cannot go in a batch.
        `check` is given the identity of the replica that answered a batch (consistency.py); it raises
        to refuse the answer, as a unary call's check does."""
        if not self.supported or len(request) > MAX_CALL_BYTES:
            return alone()
        with self._lock:
            idle = self._open is None and not self._in_flight
            if idle:
                self._in_flight += 1
        if idle:  # nothing to wait for: no delay, no batch; calls that come meanwhile gather
            try:
                return alone()
            finally:
                self._slot_freed()
        outcome, identity = self._batched(method, request, deadline)
        if isinstance(outcome, RenderError):
            raise outcome
        if isinstance(outcome, SendAlone):
            return alone()
        if check is not None:
            check(identity)
        return answer_of(method, outcome)

    def _batched(self, method: str, request: bytes, deadline: float | None) -> tuple[Outcome, ReplicaIdentity | None]:
        """The outcome of a call sent in a batch (its own method's answer bytes, its error, or SEND_ALONE),
        and the identity of the replica that answered the batch."""
        call = _Call(method, request, deadline)
        with self._lock:
            batch = self._open
            leads = batch is None
            if batch is None:
                batch = self._open = _Batch()
            filled = batch.add(call)
            if filled:
                self._open = None
                batch.full.set()
            # A held batch that fills goes now, at once, whatever is in flight; this call sends it.
            sends = filled and self._held is batch
            if sends:
                self._held = None
                self._in_flight += 1
        if leads and not sends:
            # The first call waits for companions, then sends the batch (unless it filled and went,
            # or too many are in flight: then it is held, and goes when one comes back).
            if self._window > 0 and not filled:
                batch.full.wait(self._window)
            with self._lock:
                if self._open is batch and self._in_flight >= self._limit:
                    self._held = batch
                else:
                    if self._open is batch:
                        self._open = None
                    self._in_flight += 1
                    sends = True
        if sends:
            self._send(batch.calls, 0)
        if not call.wait(None if deadline is None else deadline - time.monotonic()):
            call.abandoned = True  # not sent again
            return DeadlineExceededError(DEADLINE_DETAILS), None
        assert call.outcome is not None
        return call.outcome, call.identity

    def _send(self, calls: list[_Call], attempt: int) -> None:
        """Send the calls still waiting, in one of the slots in flight (grpcio's future: this
        thread does not wait for the answer)."""
        now = time.monotonic()
        live = []
        for call in calls:
            if _expired(call.deadline, now):
                call.finish(DeadlineExceededError(DEADLINE_DETAILS))
            elif call.outcome is None and not call.abandoned:
                live.append(call)
        if not live:
            self._slot_freed()
            return
        data, timeout = _encoded(live, now)
        self.batches_sent += 1
        self.calls_sent += len(live)
        try:
            future = self._connection.next_stub().Calls.future(
                data, timeout=timeout, metadata=self._connection.metadata
            )
        except ValueError:  # the client, and so its channel, was closed
            for call in live:
                call.finish(CallCancelledError(CALL_CANCELLED))
            self._slot_freed()
            return
        future.add_done_callback(lambda done: self._answered(live, done, attempt))

    def _answered(self, calls: list[_Call], future: grpc.Future[bytes], attempt: int) -> None:
        """Hand each call its answer; or send the batch again (in the same slot), or fail it.
        Runs on gRPC's thread: it never waits."""
        try:
            data = future.result()
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
        except grpc.FutureCancelledError:
            error = CallCancelledError(CALL_CANCELLED)
        else:
            outcomes = _outcomes(data, calls)
            if not isinstance(outcomes, RenderError):
                identity = decode_identity(future.trailing_metadata())  # type: ignore[attr-defined]  # a grpc.Call too
                for call, outcome in zip(calls, outcomes, strict=True):
                    call.identity = identity
                    call.finish(outcome)
                self._slot_freed()
                return
            error = outcomes
        delay = _resend_delay(self, calls, error, attempt)
        if delay is None:
            self._slot_freed()
            return
        timer = threading.Timer(delay, self._send, (calls, attempt + 1))
        timer.daemon = True
        timer.start()

    def _slot_freed(self) -> None:
        """A batch is no longer in flight: the held batch, if any, takes its slot and goes."""
        with self._lock:
            self._in_flight -= 1
            held = self._held
            if held is not None:
                self._held = None
                if self._open is held:
                    self._open = None
                self._in_flight += 1
        if held is not None:
            self._send(held.calls, 0)

    @property
    def connection(self) -> Connection:
        return self._connection


def _resend_delay(
    coalescer: Coalescer | AsyncCoalescer, calls: list[Any], error: RenderError, attempt: int
) -> float | None:
    """A batch call failed with `error`: the delay before sending it again, while a unary call would
    be resent; else None, each call having failed with `error` (or, from a server without Calls, being
    sent alone, as every call is from then on)."""
    if error.code is grpc.StatusCode.UNIMPLEMENTED:
        coalescer.supported = False
        for call in calls:
            call.finish(SEND_ALONE)
        return None
    deadlines = [call.deadline for call in calls]
    latest = None if None in deadlines else max(d for d in deadlines if d is not None)
    delay = coalescer.connection.resend_delay(error, attempt, latest)
    if delay is None:
        for call in calls:
            call.finish(_own_copy(error))
    return delay


def _own_copy(error: RenderError) -> RenderError:
    """`error` for one of the calls it failed: each raises its own exception, as its unary call would."""
    copy = error_from_status(error.code, error.details, error.error_type)
    copy.rpc_error = error.rpc_error
    return copy


class _AsyncCall:
    """A call waiting in an asyncio batch: its outcome is its future's."""

    __slots__ = ("deadline", "future", "identity", "method", "request")

    def __init__(self, method: str, request: bytes, deadline: float | None, future: asyncio.Future[Outcome]) -> None:
        self.method = method
        self.request = request
        self.deadline = deadline
        self.future = future
        self.identity: ReplicaIdentity | None = None

    @property
    def outcome(self) -> Outcome | None:
        return self.future.result() if self.future.done() and not self.future.cancelled() else None

    def finish(self, outcome: Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class AsyncCoalescer:
    """Coalesces the unary calls of an AsyncRenderClient's tasks, on one event loop (as Coalescer)."""

    def __init__(self, connection: Connection, window: float) -> None:
        self._connection = connection
        self._window = window
        self._open: _Batch | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = 0
        self._limit = IN_FLIGHT_PER_CONNECTION * len(connection.stubs)
        self._held: _Batch | None = None
        self._in_flight_calls = 0  # the calls those batches carry
        self._sending: set[asyncio.Task[None]] = set()  # kept, so that they are not collected mid-call
        self.supported = True
        self.batches_sent = self.calls_sent = 0

    @property
    def connection(self) -> Connection:
        return self._connection

    async def call(
        self,
        method: str,
        request: bytes,
        deadline: float | None,
        alone: Callable[[], Awaitable[T]],
        check: Callable[[ReplicaIdentity | None], None] | None = None,
    ) -> T | Any:
        """As Coalescer.call, awaited; a cancelled call leaves its batch if that has not gone yet."""
        if not self.supported or len(request) > MAX_CALL_BYTES:
            return await alone()
        if self._open is None and not self._in_flight:
            self._in_flight += 1
            self._in_flight_calls += 1
            try:
                return await alone()
            finally:
                self._in_flight_calls -= 1
                self._slot_freed()
        outcome, identity = await self._batched(method, request, deadline)
        if isinstance(outcome, RenderError):
            raise outcome
        if isinstance(outcome, SendAlone):
            return await alone()
        if check is not None:
            check(identity)
        return answer_of(method, outcome)

    async def _batched(
        self, method: str, request: bytes, deadline: float | None
    ) -> tuple[Outcome, ReplicaIdentity | None]:
        loop = asyncio.get_running_loop()
        call = _AsyncCall(method, request, deadline, loop.create_future())
        batch = self._open
        if batch is None:
            batch = self._open = _Batch()
            self._timer = loop.call_later(self._window, self._window_passed, batch)
        if batch.add(call):
            self._close(batch)
            if self._held is batch:
                self._held = None
            self._start(batch)  # a full batch goes at once, whatever is in flight
        try:
            outcome = await asyncio.wait_for(call.future, None if deadline is None else deadline - time.monotonic())
        except TimeoutError:
            return DeadlineExceededError(DEADLINE_DETAILS), None
        return outcome, call.identity

    def _close(self, batch: _Batch) -> None:
        """No more calls join `batch`."""
        if self._open is batch:
            self._open = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _window_passed(self, batch: _Batch) -> None:
        if self._open is not batch:
            return  # it filled and went
        self._timer = None
        if self._in_flight >= self._limit:
            self._held = batch  # goes when a batch comes back
            return
        hold_until = batch.opened + STRAGGLER_HOLD_WINDOWS * self._window
        wait = hold_until - time.monotonic()
        if len(batch.calls) * STRAGGLER_SHARE < self._in_flight_calls and wait > 0:
            self._held = batch  # a straggler: goes with the calls of the batch that comes back, or when
            loop = batch.calls[0].future.get_loop()  # its time is up
            self._timer = loop.call_later(wait, self._window_passed, batch)
            return
        if self._held is batch:
            self._held = None
        self._close(batch)
        self._start(batch)

    def _start(self, batch: _Batch) -> None:
        """Send `batch`; in two halves when no batch is in flight, one per slot (see ASYNC_SPLIT_CALLS)."""
        calls = batch.calls
        if not self._in_flight and self._limit > 1 and len(calls) >= ASYNC_SPLIT_CALLS:
            half = len(calls) // 2
            self._go(calls[:half])
            self._go(calls[half:])
        else:
            self._go(calls)

    def _go(self, calls: list[_AsyncCall]) -> None:
        self._in_flight += 1
        self._in_flight_calls += len(calls)
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._sent, len(calls)))

    def _sent(self, calls: int, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight_calls -= calls
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._in_flight -= 1
        held, self._held = self._held, None
        if held is not None and self._open is held:
            # It goes after a window more: the tasks of the batch that came back may resume after
            # this callback (a call with a deadline wakes one step later), and join it first.
            if self._timer is not None:
                self._timer.cancel()
            # The batch's own loop: this may run in a task's `finally` when no loop is running.
            self._timer = held.calls[0].future.get_loop().call_later(self._window, self._window_passed, held)
        elif held is not None:
            self._start(held)

    async def _send(self, calls: list[_AsyncCall]) -> None:
        attempt = 0
        while True:
            now = time.monotonic()
            live = []
            for call in calls:
                if _expired(call.deadline, now):
                    call.finish(DeadlineExceededError(DEADLINE_DETAILS))
                elif not call.future.done():  # not answered, cancelled or timed out
                    live.append(call)
            if not live:
                return
            data, timeout = _encoded(live, now)
            self.batches_sent += 1
            self.calls_sent += len(live)
            try:
                stub = self._connection.next_stub()
                batch_call = stub.Calls(data, timeout=timeout, metadata=self._connection.metadata)
                answer = await batch_call
                identity = decode_identity(await batch_call.trailing_metadata())
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            except grpc.aio.UsageError:  # the client, and so its channel, was closed
                error = CallCancelledError(CALL_CANCELLED)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                error = CallCancelledError(CALL_CANCELLED)  # grpc.aio's, on a channel closed mid-call
            else:
                outcomes = _outcomes(answer, live)
                if not isinstance(outcomes, RenderError):
                    for call, outcome in zip(live, outcomes, strict=True):
                        call.identity = identity
                        call.finish(outcome)
                    return
                error = outcomes
            delay = _resend_delay(self, live, error, attempt)
            if delay is None:
                return
            await asyncio.sleep(delay)
            calls = live
            attempt += 1
