"""render_many: a dataset's requests through RenderTrainingSamples streams, results in input order.

(And the same for Renders streams, whose results are RenderedTokens: a
StreamMethod says which; everything else is common to both.)

One stream per connection (see RenderClient's `connections`), so that each of
a server's worker processes gets work. Requests go in batches to the stream
with the fewest unanswered requests; a batch holds whatever requests are
ready, up to a size that keeps about two batches in flight per stream, so the
server renders one while the other travels. At most `concurrency` requests are
taken from the caller's iterable and not yet handed back, so memory stays
bounded however long the dataset.

Every request yields exactly one result: its sample or its own error. A stream
that breaks with UNAVAILABLE (a worker or replica went away), or that a
shutting-down server CANCELLED, is opened again, with backoff, and the requests
it had not answered are sent again (rendering has no side effects); after the
last attempt each of them gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from render_wire.errors import RenderError, error_from_rpc
from render_wire.pb import render_pb2 as pb
from render_wire.requests import encode_sample_request, encode_tokens_request
from render_wire.samples import decode_rendered_tokens, decode_results

from .channel import RenderStub, resend_delay

Result = Any  # a sample, RenderedTokens, or a RenderError
Item = Any  # a SampleRequest or TokensRequest, or the request message itself
Metadata = tuple[tuple[str, str], ...] | None


@dataclass(frozen=True)
class StreamMethod:
    """A stream method render_many can drive: how its items are sent and its results read."""

    name: str  # the stub's method
    request_class: Any  # items of this class are sent as they are
    encode: Callable[[Any], Any]  # an item -> its request message
    batch_class: Any  # the batch message: batch_class(requests=[...])
    decode: Callable[[bytes], list[tuple[int, Any]]]  # a response -> (index, result or RenderError)


SAMPLES = StreamMethod(
    "RenderTrainingSamples",
    pb.RenderTrainingSampleRequest,
    encode_sample_request,
    pb.RenderTrainingSamplesRequest,
    decode_results,
)
TOKENS = StreamMethod(
    "Renders",
    pb.RenderRequest,
    encode_tokens_request,
    pb.RendersRequest,
    lambda data: decode_results(data, decode_rendered_tokens),
)

# Beyond this many requests per message, batching saves nothing measurable.
_MAX_BATCH = 32
_END = object()


@dataclass(frozen=True)
class _Failed:
    """The caller's request iterable raised: re-raised at its position."""

    exc: BaseException


@dataclass(frozen=True)
class _Done:
    """No more requests: `total` were taken."""

    total: int


class _InOrder:
    """Takes results in any order, hands them out in input order."""

    def __init__(self) -> None:
        self._waiting: dict[int, Any] = {}
        self.next = 0

    def add(self, position: int, result: Any) -> Iterator[Any]:
        self._waiting[position] = result
        while self.next in self._waiting:
            yield self._waiting.pop(self.next)
            self.next += 1


class _Pending:
    """The requests a stream has sent and not had answered, in the order sent."""

    def __init__(self) -> None:
        self._items: deque[tuple[int, Any]] = deque()
        self._first_index = 0  # index in the current call of the oldest unanswered request

    def __len__(self) -> int:
        return len(self._items)

    def sent(self, positions: list[int], requests: list[Any]) -> None:
        self._items.extend(zip(positions, requests, strict=True))

    def answered(self, index: int) -> int:
        """The input position of the request at `index` in the call; it is no longer pending."""
        # The server answers in request order, so the answer is to the oldest.
        assert index == self._first_index, (index, self._first_index)
        self._first_index += 1
        return self._items.popleft()[0]

    def restart(self) -> tuple[list[int], list[Any]]:
        """Everything unanswered, to send again on a new call (whose indices start at 0)."""
        self._first_index = 0
        return [position for position, _ in self._items], [request for _, request in self._items]

    def drain(self) -> list[int]:
        positions = [position for position, _ in self._items]
        self._items.clear()
        return positions


def _batch_size(concurrency: int, streams: int) -> int:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return max(1, min(_MAX_BATCH, concurrency // (2 * streams)))


def _encode(items: list[tuple[int, Item]], results: Any, method: StreamMethod) -> tuple[list[int], list[Any]]:
    """The batch's encodable requests; the others get their error as their result."""
    positions, requests = [], []
    for position, item in items:
        try:
            request = item if isinstance(item, method.request_class) else method.encode(item)
        except RenderError as exc:
            results.put_nowait((position, exc))
        else:
            positions.append(position)
            requests.append(request)
    return positions, requests


def _outcome(result: Any, return_exceptions: bool) -> Result:
    if isinstance(result, _Failed):
        raise result.exc
    if isinstance(result, RenderError) and not return_exceptions:
        raise result
    return result


# ---------------------------------------------------------------------------
# Blocking
# ---------------------------------------------------------------------------


class _Stream:
    """A RenderTrainingSamples call (opened again if it breaks) and the requests it owes."""

    def __init__(
        self,
        stub: RenderStub,
        timeout: float | None,
        metadata: Metadata,
        results: queue.SimpleQueue[Any],
        method: StreamMethod,
    ) -> None:
        self._stub, self._timeout, self._metadata = stub, timeout, metadata
        self._results = results
        self._method = method
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._failure: RenderError | None = None
        self._finished = False
        self._call = self._new_call([])
        threading.Thread(target=self._read, args=(self._call,), daemon=True, name="render-many-reader").start()

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    def _new_call(self, requests: list[Any]) -> Any:
        """A call whose request stream starts with `requests` (and ends if finished)."""
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if requests:
            self._outbox.put(self._method.batch_class(requests=requests))
        if self._finished:
            self._outbox.put(None)
        return getattr(self._stub, self._method.name)(
            iter(self._outbox.get, None), timeout=self._timeout, metadata=self._metadata
        )

    def send(self, positions: list[int], requests: list[Any]) -> None:
        with self._lock:
            if self._failure is not None:
                for position in positions:
                    self._results.put((position, self._failure))
                return
            self._pending.sent(positions, requests)
            self._outbox.put(self._method.batch_class(requests=requests))

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._outbox.put(None)

    def cancel(self) -> None:
        with self._lock:
            self._finished = True
            self._failure = self._failure or RenderError("render_many was closed")
            call = self._call
        call.cancel()

    def _read(self, call: Any) -> None:
        attempt = 0
        while True:
            try:
                for response in call:
                    attempt = 0
                    for index, outcome in self._method.decode(response):
                        with self._lock:
                            position = self._pending.answered(index)
                        self._results.put((position, outcome))
                if not len(self._pending):
                    return  # ended normally, everything answered
                error = RenderError("the stream ended without answering every request")
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            except RenderError as exc:  # a response that does not decode
                call.cancel()
                error = exc
            delay = resend_delay(error, attempt)
            if self._failure is None and delay is not None:
                time.sleep(delay)
                attempt += 1
                with self._lock:
                    if self._failure is None:  # not closed meanwhile
                        # Open the call again and send what it owed; read on from the new one.
                        _, owed = self._pending.restart()
                        try:
                            call = self._call = self._new_call(owed)
                            continue
                        except ValueError:  # the client, and so its channel, was closed
                            error = RenderError("the client was closed")
            with self._lock:
                self._failure = self._failure or error
                for position in self._pending.drain():
                    self._results.put((position, self._failure))
            return


def render_many(
    stubs: Sequence[RenderStub],
    requests: Iterable[Item],
    *,
    concurrency: int,
    timeout: float | None,
    metadata: Metadata,
    return_exceptions: bool,
    method: StreamMethod = SAMPLES,
) -> Iterator[Result]:
    streams_wanted = min(len(stubs), concurrency) if concurrency > 0 else 1
    batch_size = _batch_size(concurrency, streams_wanted)
    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    streams = [_Stream(stub, timeout, metadata, results, method) for stub in stubs[:streams_wanted]]
    slots = threading.Semaphore(concurrency)
    closed = threading.Event()

    def take_slot() -> bool:
        while not slots.acquire(timeout=0.1):
            if closed.is_set():
                return False
        return not closed.is_set()

    def feed() -> None:
        position = 0
        items = iter(requests)
        try:
            # A slot before each request taken: nothing is read ahead of the bound.
            while take_slot():
                item = next(items, _END)
                if item is _END:
                    return
                batch = [(position, item)]
                position += 1
                while len(batch) < batch_size and slots.acquire(blocking=False):
                    item = next(items, _END)
                    if item is _END:
                        break
                    batch.append((position, item))
                    position += 1
                positions, encoded = _encode(batch, results, method)
                if encoded:
                    min(streams, key=lambda stream: stream.unanswered).send(positions, encoded)
                if item is _END:
                    return
        except BaseException as exc:
            results.put((position, _Failed(exc)))
            position += 1
        finally:
            for stream in streams:
                stream.finish()
            results.put(_Done(position))

    threading.Thread(target=feed, daemon=True, name="render-many-feeder").start()
    in_order = _InOrder()
    total: int | None = None
    try:
        while total is None or in_order.next < total:
            message = results.get()
            if isinstance(message, _Done):
                total = message.total
                continue
            for result in in_order.add(*message):
                yield _outcome(result, return_exceptions)
                # Only now, with the caller back for more, may another request start.
                slots.release()
    finally:
        closed.set()
        for stream in streams:
            stream.cancel()


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


class _AsyncStream:
    """An asyncio RenderTrainingSamples call (opened again if it breaks) and the requests it owes."""

    def __init__(
        self,
        stub: RenderStub,
        timeout: float | None,
        metadata: Metadata,
        results: asyncio.Queue[Any],
        method: StreamMethod,
    ) -> None:
        self._stub, self._timeout, self._metadata = stub, timeout, metadata
        self._results = results
        self._method = method
        self._pending = _Pending()
        self._failure: RenderError | None = None
        self._finished = False
        self._ready = asyncio.Event()  # set while self.call accepts writes
        self.call = self._open()
        self._ready.set()
        self.reader = asyncio.ensure_future(self._read())

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    async def send(self, positions: list[int], requests: list[Any]) -> None:
        # Not while the reader reopens the call: it sends what was pending then, and
        # these would go twice.
        await self._ready.wait()
        if self._failure is not None:
            for position in positions:
                self._results.put_nowait((position, self._failure))
            return
        self._pending.sent(positions, requests)
        # A broken call fails the write; the reader opens a new one and sends these again.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self.call.write(self._method.batch_class(requests=requests))

    def _open(self) -> Any:
        return getattr(self._stub, self._method.name)(timeout=self._timeout, metadata=self._metadata)

    async def finish(self) -> None:
        self._finished = True
        await self._ready.wait()
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self.call.done_writing()

    def cancel(self) -> None:
        self._failure = self._failure or RenderError("render_many was closed")
        self.call.cancel()
        self.reader.cancel()

    async def _read(self) -> None:
        attempt = 0
        while True:
            try:
                while (response := await self.call.read()) is not grpc.aio.EOF:
                    attempt = 0
                    for index, outcome in self._method.decode(response):
                        self._results.put_nowait((self._pending.answered(index), outcome))
                if not len(self._pending):
                    return  # ended normally, everything answered
                error = RenderError("the stream ended without answering every request")
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            except RenderError as exc:  # a response that does not decode
                self.call.cancel()
                error = exc
            delay = resend_delay(error, attempt)
            if self._failure is None and delay is not None:
                self._ready.clear()
                await asyncio.sleep(delay)
                attempt += 1
                # Open the call again and send what it owed.
                _, requests = self._pending.restart()
                self.call = self._open()
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    if requests:
                        await self.call.write(self._method.batch_class(requests=requests))
                    if self._finished:
                        await self.call.done_writing()
                self._ready.set()
                continue
            self._failure = self._failure or error
            for position in self._pending.drain():
                self._results.put_nowait((position, self._failure))
            self._ready.set()
            return


async def _as_async(items: Iterable[Item]) -> AsyncIterator[Item]:
    for item in items:
        yield item


async def render_many_async(
    stubs: Sequence[RenderStub],
    requests: Iterable[Item] | AsyncIterable[Item],
    *,
    concurrency: int,
    timeout: float | None,
    metadata: Metadata,
    return_exceptions: bool,
    method: StreamMethod = SAMPLES,
) -> AsyncIterator[Result]:
    streams_wanted = min(len(stubs), concurrency) if concurrency > 0 else 1
    batch_size = _batch_size(concurrency, streams_wanted)
    results: asyncio.Queue[Any] = asyncio.Queue()
    streams = [_AsyncStream(stub, timeout, metadata, results, method) for stub in stubs[:streams_wanted]]
    slots = asyncio.Semaphore(concurrency)
    items = aiter(requests) if isinstance(requests, AsyncIterable) else _as_async(requests)

    async def feed() -> None:
        position = 0
        try:
            while True:
                await slots.acquire()  # a slot before each request taken
                item = await anext(items, _END)
                if item is _END:
                    return
                batch = [(position, item)]
                position += 1
                while len(batch) < batch_size and not slots.locked():
                    await slots.acquire()
                    item = await anext(items, _END)
                    if item is _END:
                        break
                    batch.append((position, item))
                    position += 1
                positions, encoded = _encode(batch, results, method)
                if encoded:
                    await min(streams, key=lambda stream: stream.unanswered).send(positions, encoded)
                if item is _END:
                    return
        except Exception as exc:
            results.put_nowait((position, _Failed(exc)))
            position += 1
        finally:
            for stream in streams:
                await stream.finish()
            results.put_nowait(_Done(position))

    feeder = asyncio.ensure_future(feed())
    in_order = _InOrder()
    total: int | None = None
    try:
        while total is None or in_order.next < total:
            message = await results.get()
            if isinstance(message, _Done):
                total = message.total
                continue
            for result in in_order.add(*message):
                yield _outcome(result, return_exceptions)
                slots.release()
    finally:
        feeder.cancel()
        for stream in streams:
            stream.cancel()
