"""render_many's threaded engine, behind RenderClient.render_many and render_many_tokens.

A feeder thread takes the caller's requests and writes them in batches to the
streams; a reader thread per stream reads its responses, and opens the call
again when it breaks. Both hand results to the caller's thread through one
queue. What they decide (batches, order, resends, outcomes) is streaming.py's,
shared with the asyncio engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, Protocol

import grpc
from google.protobuf.message import Message

from render_wire.errors import RenderError, error_from_rpc
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


class _Call(Protocol):
    """A blocking stream call: its responses (serialised, see RenderStub), its metadata, and its cancel."""

    def __iter__(self) -> Iterator[bytes]: ...

    def initial_metadata(self) -> Any: ...

    def cancel(self) -> bool: ...


class _Open(Protocol):
    """A stub's stream method: its request iterator in, the call out."""

    def __call__(self, requests: Iterator[Message], *, timeout: float | None, metadata: Metadata) -> _Call: ...


class _Stream(Generic[ItemT, RequestT, ResultT]):
    """A stream call (opened again if it breaks) and the requests it owes."""

    def __init__(
        self,
        stub: RenderStub,
        timeout: float | None,
        metadata: Metadata,
        results: queue.SimpleQueue[Report[ResultT]],
        method: StreamMethod[ItemT, RequestT, ResultT],
        check: ModelCheck | None,
    ) -> None:
        self._open: _Open = getattr(stub, method.name)
        self._timeout, self._metadata = timeout, metadata
        self._results = results
        self._lock = threading.Lock()  # the state is shared by the feeder and the reader
        self._state = StreamState(method, check)
        self._call = self._new_call(None)
        threading.Thread(target=self._read, args=(self._call,), daemon=True, name="render-many-reader").start()

    @property
    def unanswered(self) -> int:
        return self._state.unanswered

    def _new_call(self, first: Message | None) -> _Call:
        """A call whose request stream starts with `first` (and ends if finished)."""
        self._outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        if first is not None:
            self._outbox.put(first)
        if self._state.finished:
            self._outbox.put(None)
        return self._open(iter(self._outbox.get, None), timeout=self._timeout, metadata=self._metadata)

    def send(self, positions: list[int], requests: list[RequestT]) -> None:
        with self._lock:
            refused = self._state.refused(positions)
            if refused is not None:
                for report in refused:
                    self._results.put(report)
                return
            self._outbox.put(self._state.sent(positions, requests))

    def finish(self) -> None:
        with self._lock:
            self._state.finished = True
            self._outbox.put(None)

    def cancel(self) -> None:
        with self._lock:
            self._state.finished = True
            self._state.close()
            call = self._call
        call.cancel()

    def _read(self, call: _Call) -> None:
        state = self._state
        while True:
            try:
                state.identity = None
                for response in call:
                    if state.identity is None:  # the replica's declaration came before its first answer
                        state.identity = decode_identity(call.initial_metadata())
                    answers = state.method.decode(response)
                    with self._lock:
                        reports = state.answered(answers)
                    for report in reports:
                        self._results.put(report)
                error = state.ended()
                if error is None:
                    return  # ended normally, everything answered
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            except RenderError as exc:  # a response that does not decode
                call.cancel()
                error = exc
            delay = state.resend_delay(error)
            if delay is not None:
                time.sleep(delay)
                with self._lock:
                    if state.failure is None:  # not closed meanwhile
                        # Open the call again and send what it owed; read on from the new one.
                        try:
                            call = self._call = self._new_call(state.resend())
                            continue
                        except ValueError:  # the client, and so its channel, was closed
                            error = RenderError(CLIENT_CLOSED)
            with self._lock:
                failed = state.fail(error)
                for report in failed:
                    self._results.put(report)
            return


def render_many(
    stubs: Sequence[RenderStub],
    requests: Iterable[ItemT | RequestT],
    *,
    method: StreamMethod[ItemT, RequestT, ResultT],
    concurrency: int,
    timeout: float | None,
    metadata: Metadata,
    return_exceptions: bool,
    check: ModelCheck | None = None,
) -> Iterator[ResultT | RenderError]:
    """Each request's result (or error) in input order, over a stream per stub; see streaming.py.

    `check` refuses answers of a replica that disagrees with those met before (consistency.py).
    """
    wanted = streams_wanted(len(stubs), concurrency)
    size = batch_size(concurrency, wanted)
    results: queue.SimpleQueue[Report[ResultT]] = queue.SimpleQueue()
    streams = [_Stream(stub, timeout, metadata, results, method, check) for stub in stubs[:wanted]]
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
                item = next(items, END)
                if item is END:
                    return
                batch = [(position, item)]
                position += 1
                while len(batch) < size and slots.acquire(blocking=False):
                    item = next(items, END)
                    if item is END:
                        break
                    batch.append((position, item))
                    position += 1
                positions, encoded = encode_batch(batch, method, results.put_nowait)
                if encoded:
                    least_loaded(streams).send(positions, encoded)
                if item is END:
                    return
        except BaseException as exc:
            results.put((position, Failed(exc)))
            position += 1
        finally:
            for stream in streams:
                stream.finish()
            results.put(Done(position))

    threading.Thread(target=feed, daemon=True, name="render-many-feeder").start()
    in_order: InOrder[ResultT] = InOrder()
    try:
        while not in_order.complete:
            for result in in_order.add(results.get()):
                yield outcome(result, return_exceptions)
                # Only now, with the caller back for more, may another request start.
                slots.release()
    finally:
        closed.set()
        for stream in streams:
            stream.cancel()
