"""render_many: a dataset's requests through RenderTrainingSamples streams, results in input order.

One stream per connection (see RenderClient's `connections`), so that a server's
worker processes all get work; each request goes to the stream with the fewest
unanswered requests. At most `concurrency` requests are in flight or waiting to
be taken by the caller, so memory stays bounded however long the dataset.
Every request yields exactly one result: its sample, or its own error. A
stream that breaks (the server went away) answers each request it still owed
with that error.
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


_END = object()


async def _as_async(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _encode(item: SampleRequest | pb.RenderTrainingSampleRequest) -> pb.RenderTrainingSampleRequest:
    return item if isinstance(item, pb.RenderTrainingSampleRequest) else encode_sample_request(item)


def _check(concurrency: int) -> None:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")


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

    def send(self, position: int, request: pb.RenderTrainingSampleRequest) -> None:
        with self._lock:
            if self._failure is not None:
                self._results.put((position, self._failure))
                return
            self._positions.append(position)
        self._outbox.put(request)

    def finish(self) -> None:
        self._outbox.put(None)

    def _read(self) -> None:
        try:
            for result in self.call:
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
    requests: Iterable[SampleRequest | pb.RenderTrainingSampleRequest],
    *,
    concurrency: int,
    timeout: float | None,
    return_exceptions: bool,
) -> Iterator[Result]:
    _check(concurrency)
    results: queue.SimpleQueue[Any] = queue.SimpleQueue()
    streams = [_Stream(stub, timeout, results) for stub in stubs[:concurrency]]
    slots = threading.Semaphore(concurrency)
    closed = threading.Event()

    def feed() -> None:
        position = 0
        items = iter(requests)
        try:
            while True:
                # Take a slot before taking the next request: nothing is read ahead.
                while not slots.acquire(timeout=0.1):
                    if closed.is_set():
                        return
                if closed.is_set():
                    return
                item = next(items, _END)
                if item is _END:
                    return
                try:
                    request = _encode(item)
                except RenderError as exc:
                    results.put((position, exc))
                else:
                    min(streams, key=lambda stream: stream.unanswered).send(position, request)
                position += 1
        except BaseException as exc:
            results.put((position, _Failed(exc)))
            position += 1
        finally:
            for stream in streams:
                stream.finish()
            results.put(_Done(position))

    feeder = threading.Thread(target=feed, daemon=True, name="render-many-feeder")
    feeder.start()
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

    async def send(self, position: int, request: pb.RenderTrainingSampleRequest) -> None:
        if self._failure is None:
            self._positions.append(position)
            try:
                await self.call.write(request)
                return
            except (grpc.RpcError, asyncio.InvalidStateError):
                # The reader reports the broken stream for every request it owed.
                return
        self._results.put_nowait((position, self._failure))

    async def finish(self) -> None:
        if self._failure is None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self.call.done_writing()

    async def _read(self) -> None:
        try:
            while True:
                result = await self.call.read()
                if result is grpc.aio.EOF:
                    return
                self._results.put_nowait((self._positions[result.index], decode_result(result)))
                self._answered += 1
        except grpc.RpcError as exc:
            self._failure = error_from_rpc(exc)
            for position in self._positions[self._answered :]:
                self._results.put_nowait((position, self._failure))
            self._answered = len(self._positions)


async def render_many_async(
    stubs: Sequence[RenderServiceStub],
    requests: Iterable[SampleRequest | pb.RenderTrainingSampleRequest]
    | AsyncIterable[SampleRequest | pb.RenderTrainingSampleRequest],
    *,
    concurrency: int,
    timeout: float | None,
    return_exceptions: bool,
) -> AsyncIterator[Result]:
    _check(concurrency)
    results: asyncio.Queue[Any] = asyncio.Queue()
    streams = [_AsyncStream(stub, timeout, results) for stub in stubs[:concurrency]]
    slots = asyncio.Semaphore(concurrency)

    if isinstance(requests, AsyncIterable):
        items: AsyncIterator[Any] = aiter(requests)
    else:
        items = _as_async(requests)

    async def feed() -> None:
        position = 0
        try:
            while True:
                await slots.acquire()  # before taking the next request: nothing is read ahead
                item = await anext(items, _END)
                if item is _END:
                    return
                try:
                    request = _encode(item)
                except RenderError as exc:
                    results.put_nowait((position, exc))
                else:
                    await min(streams, key=lambda stream: stream.unanswered).send(position, request)
                position += 1
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
                # Only now, with the caller back for more, may another request start.
                slots.release()
    finally:
        feeder.cancel()
        for stream in streams:
            stream.call.cancel()
            stream.reader.cancel()
