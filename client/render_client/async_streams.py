"""render_many's asyncio engine, behind AsyncRenderClient.render_many and render_many_tokens.

A feeder task takes the caller's requests and writes them in batches to the
streams; a reader task per stream reads its responses, and opens the call
again when it breaks. Both hand results to the caller's async iteration
through one queue. What they decide (batches, order, resends, outcomes) is
streaming.py's, shared with the threaded engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import Message

from render_wire.errors import CallCancelledError, RenderError, UnavailableError, error_from_rpc
from render_wire.identity import decode_identity

from .channel import RenderStub
from .streaming import (
    CLIENT_CLOSED,
    END,
    Done,
    Failed,
    InOrder,
    ItemT,
    Metadata,
    ModelCheck,
    Report,
    RequestT,
    ResultT,
    StreamMethod,
    StreamState,
    batch_size,
    encode_batch,
    least_loaded,
    outcome,
    streams_wanted,
)

T = TypeVar("T")


class _Call(Protocol):
    """An asyncio stream call: batches written, responses (serialised, see RenderStub) read."""

    async def write(self, request: Message) -> None: ...

    async def done_writing(self) -> None: ...

    async def read(self) -> object: ...  # a response's bytes, or grpc.aio.EOF

    async def initial_metadata(self) -> Any: ...

    def cancel(self) -> bool: ...


class _Open(Protocol):
    """A stub's stream method, on an asyncio channel: the call, its requests written later."""

    def __call__(self, *, timeout: float | None, metadata: Metadata) -> _Call: ...


CALL_CANCELLED = "the call was cancelled"

# The status grpc.aio gives a call whose write gRPC core refused because the call
# had just ended (a server cancelling its calls as it shuts down, a connection
# reset): it stands in for the status the call ended with, which the blocking
# API reports (CANCELLED, UNAVAILABLE). The call broke; no request failed.
_WRITE_INTO_ENDED_CALL = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def cancelled_by_grpc() -> bool:
    """Whether the asyncio.CancelledError just caught is grpc.aio's, not this task's own.

    grpc.aio ends a call cancelled on this side (its channel closed by the
    client's close) with CancelledError where the blocking API reports a status
    (CANCELLED); this task, not being cancelled itself, takes it as that status.
    """
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


async def _write(writing: Awaitable[None]) -> None:
    """Await a write (or done_writing) to a call. A call that broke, or that the client
    closed, fails it: its reader finds that out and opens a new call, which sends
    its requests again."""
    try:
        await writing
    except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.InternalError):
        # InternalError: done_writing to a call gRPC core has ended (ExecuteBatchError).
        pass
    except asyncio.CancelledError:
        if not cancelled_by_grpc():
            raise


def _call_error(exc: grpc.RpcError) -> RenderError:
    """The error a call that failed with `exc` ends its stream with (or is resent after)."""
    error = error_from_rpc(exc)
    if (error.code, error.details) == _WRITE_INTO_ENDED_CALL:
        broken = UnavailableError("the stream broke while a batch was being sent")
        broken.rpc_error = exc
        return broken
    return error


class _Stream(Generic[ItemT, RequestT, ResultT]):
    """A stream call (opened again if it breaks) and the requests it owes."""

    def __init__(
        self,
        stub: RenderStub,
        timeout: float | None,
        metadata: Metadata,
        results: asyncio.Queue[Report[ResultT]],
        method: StreamMethod[ItemT, RequestT, ResultT],
        check: ModelCheck | None,
    ) -> None:
        self._open_call: _Open = getattr(stub, method.name)
        self._timeout, self._metadata = timeout, metadata
        self._results = results
        self._state = StreamState(method, check)
        self._ready = asyncio.Event()  # set while self.call accepts writes
        self.call = self._open()
        self._ready.set()
        self.reader = asyncio.ensure_future(self._read())

    @property
    def unanswered(self) -> int:
        return self._state.unanswered

    def _open(self) -> _Call:
        return self._open_call(timeout=self._timeout, metadata=self._metadata)

    async def send(self, positions: list[int], requests: list[RequestT]) -> None:
        # Not while the reader reopens the call: it sends what was pending then, and
        # these would go twice.
        await self._ready.wait()
        refused = self._state.refused(positions)
        if refused is not None:
            for report in refused:
                self._results.put_nowait(report)
            return
        await _write(self.call.write(self._state.sent(positions, requests)))

    async def finish(self) -> None:
        self._state.finished = True
        await self._ready.wait()
        await _write(self.call.done_writing())

    def cancel(self) -> None:
        self._state.close()
        self.call.cancel()
        self.reader.cancel()

    async def _read(self) -> None:
        state = self._state
        while True:
            try:
                state.identity = None
                while (response := await self.call.read()) is not grpc.aio.EOF:
                    if state.identity is None:  # the replica's declaration came before its first answer
                        state.identity = decode_identity(await self.call.initial_metadata())
                    for report in state.answered(state.method.decode(cast(bytes, response))):
                        self._results.put_nowait(report)
                error = state.ended()
                if error is None:
                    return  # ended normally, everything answered
            except grpc.RpcError as exc:
                error = _call_error(exc)
            except RenderError as exc:  # a response that does not decode
                self.call.cancel()
                error = exc
            except asyncio.CancelledError:
                if not cancelled_by_grpc():
                    raise  # render_many is closing
                error = CallCancelledError(CALL_CANCELLED)
            delay = state.resend_delay(error)
            if delay is not None:
                self._ready.clear()
                await asyncio.sleep(delay)
                # Open the call again and send what it owed.
                first = state.resend()
                try:
                    self.call = self._open()
                except grpc.aio.UsageError:  # the client, and so its channel, was closed
                    error = RenderError(CLIENT_CLOSED)
                else:
                    if first is not None:
                        await _write(self.call.write(first))
                    if state.finished:
                        await _write(self.call.done_writing())
                    self._ready.set()
                    continue
            for report in state.fail(error):
                self._results.put_nowait(report)
            self._ready.set()
            return


async def _as_async(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


async def render_many(
    stubs: Sequence[RenderStub],
    requests: Iterable[ItemT | RequestT] | AsyncIterable[ItemT | RequestT],
    *,
    method: StreamMethod[ItemT, RequestT, ResultT],
    concurrency: int,
    timeout: float | None,
    metadata: Metadata,
    return_exceptions: bool,
    check: ModelCheck | None = None,
) -> AsyncIterator[ResultT | RenderError]:
    """Each request's result (or error) in input order, over a stream per stub; see streaming.py.

    `check` refuses answers of a replica that disagrees with those met before (consistency.py).
    """
    wanted = streams_wanted(len(stubs), concurrency)
    size = batch_size(concurrency, wanted)
    results: asyncio.Queue[Report[ResultT]] = asyncio.Queue()
    streams = [_Stream(stub, timeout, metadata, results, method, check) for stub in stubs[:wanted]]
    slots = asyncio.Semaphore(concurrency)
    items = aiter(requests) if isinstance(requests, AsyncIterable) else _as_async(requests)

    async def feed() -> None:
        position = 0
        try:
            while True:
                await slots.acquire()  # a slot before each request taken
                item = await anext(items, END)
                if item is END:
                    return
                batch = [(position, item)]
                position += 1
                while len(batch) < size and not slots.locked():
                    await slots.acquire()
                    item = await anext(items, END)
                    if item is END:
                        break
                    batch.append((position, item))
                    position += 1
                positions, encoded = encode_batch(batch, method, results.put_nowait)
                if encoded:
                    await least_loaded(streams).send(positions, encoded)
                if item is END:
                    return
        except Exception as exc:
            results.put_nowait((position, Failed(exc)))
            position += 1
        finally:
            for stream in streams:
                await stream.finish()
            results.put_nowait(Done(position))

    feeder = asyncio.ensure_future(feed())
    in_order: InOrder[ResultT] = InOrder()
    try:
        while not in_order.complete:
            for result in in_order.add(await results.get()):
                yield outcome(result, return_exceptions)
                # Only now, with the caller back for more, may another request start.
                slots.release()
    finally:
        feeder.cancel()
        for stream in streams:
            stream.cancel()
