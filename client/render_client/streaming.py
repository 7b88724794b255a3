"""render_many: a dataset's requests through RenderTrainingSamples streams, results in input order.

One stream per connection (see RenderClient's `connections`), so that each of
a server's worker processes gets work. Requests go in batches to the stream
with the fewest unanswered requests; a batch holds whatever requests are
ready, up to a size that keeps about two batches in flight per stream, so the
server renders one while the other travels. At most `concurrency` requests are
taken from the caller's iterable and not yet handed back, so memory stays
bounded however long the dataset. Every request yields exactly one result: its
sample or its own error. A stream that breaks (the server went away) answers
every request it still owed with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ._pb import render_pb2 as pb
from ._pb.render_pb2_grpc import RenderServiceStub
from .convert import decode_result, encode_sample_request
from .errors import RenderError, error_from_rpc
from .types import RenderedTrainingSample, SampleRequest

Result = RenderedTrainingSample | RenderError
Item = SampleRequest | pb.RenderTrainingSampleRequest

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


def _batch_size(concurrency: int, streams: int) -> int:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return max(1, min(_MAX_BATCH, concurrency // (2 * streams)))


def _encode(items: list[tuple[int, Item]], results: Any) -> tuple[list[int], list[pb.RenderTrainingSampleRequest]]:
    """The batch's encodable requests; the others get their error as their result."""
    positions, requests = [], []
    for position, item in items:
        try:
            request = item if isinstance(item, pb.RenderTrainingSampleRequest) else encode_sample_request(item)
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
    """One RenderTrainingSamples call and the input positions it carries."""

    def __init__(self, stub: RenderServiceStub, timeout: float | None, results: queue.SimpleQueue[Any]) -> None:
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._results = results
        self._lock = threading.Lock()
        self._positions: list[int] = []  # input position of the k-th request sent here
        self._answered = 0
        self._failure: RenderError | None = None
        self.call = stub.RenderTrainingSamples(iter(self._outbox.get, None), timeout=timeout)
        threading.Thread(target=self._read, daemon=True, name="render-many-reader").start()

    @property
    def unanswered(self) -> int:
        return len(self._positions) - self._answered

    def send(self, positions: list[int], requests: list[pb.RenderTrainingSampleRequest]) -> None:
        with self._lock:
            if self._failure is not None:
                for position in positions:
                    self._results.put((position, self._failure))
                return
            self._positions.extend(positions)
        self._outbox.put(pb.RenderTrainingSamplesRequest(requests=requests))

    def finish(self) -> None:
        self._outbox.put(None)

    def _read(self) -> None:
        try:
            for response in self.call:
                for result in response.results:
                    self._results.put((self._positions[result.index], decode_result(result)))
                    self._answered += 1
        except grpc.RpcError as exc:
            with self._lock:
                self._failure = error_from_rpc(exc)
                for position in self._positions[self._answered :]:
                    self._results.put((position, self._failure))
                self._answered = len(self._positions)


def render_many(
    stubs: Sequence[RenderServiceStub],
    requests: Iterable[Item],
    *,
    concurrency: int,
    timeout: float | None,
    return_exceptions: bool,
) -> Iterator[Result]:
    streams_wanted = min(len(stubs), concurrency) if concurrency > 0 else 1
    batch_size = _batch_size(concurrency, streams_wanted)
    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    streams = [_Stream(stub, timeout, results) for stub in stubs[:streams_wanted]]
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
                positions, encoded = _encode(batch, results)
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
            stream.call.cancel()


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


class _AsyncStream:
    """One asyncio RenderTrainingSamples call and the input positions it carries."""

    def __init__(self, stub: RenderServiceStub, timeout: float | None, results: asyncio.Queue[Any]) -> None:
        self._results = results
        self._positions: list[int] = []
        self._answered = 0
        self._failure: RenderError | None = None
        self.call = stub.RenderTrainingSamples(timeout=timeout)
        self.reader = asyncio.ensure_future(self._read())

    @property
    def unanswered(self) -> int:
        return len(self._positions) - self._answered

    async def send(self, positions: list[int], requests: list[pb.RenderTrainingSampleRequest]) -> None:
        if self._failure is not None:
            for position in positions:
                self._results.put_nowait((position, self._failure))
            return
        self._positions.extend(positions)
        # A broken stream fails the write; the reader then answers what it owed.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await self.call.write(pb.RenderTrainingSamplesRequest(requests=requests))

    async def finish(self) -> None:
        if self._failure is None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self.call.done_writing()

    async def _read(self) -> None:
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                for result in response.results:
                    self._results.put_nowait((self._positions[result.index], decode_result(result)))
                    self._answered += 1
        except grpc.RpcError as exc:
            self._failure = error_from_rpc(exc)
            for position in self._positions[self._answered :]:
                self._results.put_nowait((position, self._failure))
            self._answered = len(self._positions)


async def _as_async(items: Iterable[Item]) -> AsyncIterator[Item]:
    for item in items:
        yield item


async def render_many_async(
    stubs: Sequence[RenderServiceStub],
    requests: Iterable[Item] | AsyncIterable[Item],
    *,
    concurrency: int,
    timeout: float | None,
    return_exceptions: bool,
) -> AsyncIterator[Result]:
    streams_wanted = min(len(stubs), concurrency) if concurrency > 0 else 1
    batch_size = _batch_size(concurrency, streams_wanted)
    results: asyncio.Queue[Any] = asyncio.Queue()
    streams = [_AsyncStream(stub, timeout, results) for stub in stubs[:streams_wanted]]
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
                positions, encoded = _encode(batch, results)
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
            stream.call.cancel()
            stream.reader.cancel()
