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

This module is what both engines share, and does no I/O: the methods, batch
sizes, a stream's bookkeeping and resend policy (`StreamState`), the results'
order (`InOrder`) and outcomes. The engines do the waiting: `sync_streams`
with threads (RenderClient), `async_streams` on an event loop (AsyncRenderClient).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, Protocol, TypeAlias, TypeVar, cast

from google.protobuf.message import Message

from render_wire.errors import RenderError
from render_wire.identity import ReplicaIdentity
from render_wire.pb import render_pb2 as pb
from render_wire.requests import encode_sample_request, encode_tokens_request
from render_wire.samples import decode_rendered_tokens, decode_results
from render_wire.types import RenderedTrainingSample, SampleRequest, TokensRequest

from .channel import resend_delay

ItemT = TypeVar("ItemT")  # what callers pass: a SampleRequest or TokensRequest
RequestT = TypeVar("RequestT", bound=Message)  # its request message, which callers may pass instead
ResultT = TypeVar("ResultT")  # what a request renders to: a sample, or RenderedTokens

Metadata: TypeAlias = tuple[tuple[str, str], ...] | None
# An answer's check: (its request's model, the answering replica) -> the error to report in its place, or None.
ModelCheck: TypeAlias = Callable[[str, ReplicaIdentity | None], RenderError | None]


@dataclass(frozen=True)
class StreamMethod(Generic[ItemT, RequestT, ResultT]):
    """A stream method render_many can drive: how its items are sent and its results read."""

    name: Literal["RenderTrainingSamples", "Renders"]  # the stub's method
    request_class: type[RequestT]  # items of this class are sent as they are
    encode: Callable[[ItemT], RequestT]  # an item -> its request message
    batch_class: Callable[..., Message]  # the batch message: batch_class(requests=[...])
    decode: Callable[[bytes], list[tuple[int, ResultT | RenderError]]]  # a response -> (index, result or error)


SAMPLES: StreamMethod[SampleRequest, pb.RenderTrainingSampleRequest, RenderedTrainingSample] = StreamMethod(
    "RenderTrainingSamples",
    pb.RenderTrainingSampleRequest,
    encode_sample_request,
    pb.RenderTrainingSamplesRequest,
    decode_results,
)
# Its results are renderers.RenderedTokens, or render_wire.types' mirror without renderers.
TOKENS: StreamMethod[TokensRequest, pb.RenderRequest, Any] = StreamMethod(
    "Renders",
    pb.RenderRequest,
    encode_tokens_request,
    pb.RendersRequest,
    lambda data: decode_results(data, decode_rendered_tokens),
)

# Beyond this many requests per message, batching saves nothing measurable.
_MAX_BATCH = 32


class End(enum.Enum):
    """The marker `next(items, END)` returns once the caller's requests run out."""

    END = enum.auto()


END: Final = End.END

CLOSED = "render_many was closed"
ENDED_EARLY = "the stream ended without answering every request"
CLIENT_CLOSED = "the client was closed"


@dataclass(frozen=True)
class Failed:
    """The caller's request iterable raised: re-raised at its position."""

    exc: BaseException


@dataclass(frozen=True)
class Done:
    """No more requests: `total` were taken."""

    total: int


# What an engine's results queue carries: a position's outcome, or the end of the requests.
Report: TypeAlias = "tuple[int, ResultT | RenderError | Failed] | Done"


def batch_size(concurrency: int, streams: int) -> int:
    """How many requests a batch may hold: about two batches in flight per stream."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return max(1, min(_MAX_BATCH, concurrency // (2 * streams)))


def streams_wanted(stubs: int, concurrency: int) -> int:
    """One stream per connection, but no more streams than requests in flight."""
    return min(stubs, concurrency) if concurrency > 0 else 1


def encode_batch(
    items: Iterable[tuple[int, object]],
    method: StreamMethod[ItemT, RequestT, ResultT],
    refuse: Callable[[tuple[int, RenderError]], None],
) -> tuple[list[int], list[RequestT]]:
    """The batch's encodable requests and their positions; the others `refuse`d with their error.

    `items` are the caller's, (position, an ItemT or a RequestT): render_many's signature says which.
    """
    positions: list[int] = []
    requests: list[RequestT] = []
    for position, item in items:
        try:
            request = item if isinstance(item, method.request_class) else method.encode(cast(ItemT, item))
        except RenderError as exc:
            refuse((position, exc))
        else:
            positions.append(position)
            requests.append(request)
    return positions, requests


class Loaded(Protocol):
    """What `least_loaded` compares streams by."""

    @property
    def unanswered(self) -> int: ...


StreamT = TypeVar("StreamT", bound=Loaded)


def least_loaded(streams: Sequence[StreamT]) -> StreamT:
    """The stream with the fewest unanswered requests: the next batch's."""
    return min(streams, key=lambda stream: stream.unanswered)


def outcome(result: ResultT | RenderError | Failed, return_exceptions: bool) -> ResultT | RenderError:
    """What render_many hands the caller for `result`: it, or its error raised."""
    if isinstance(result, Failed):
        raise result.exc
    if isinstance(result, RenderError) and not return_exceptions:
        raise result
    return result


class InOrder(Generic[ResultT]):
    """Takes an engine's reports in any order, hands the results out in input order."""

    def __init__(self) -> None:
        self._waiting: dict[int, ResultT | RenderError | Failed] = {}
        self._next = 0
        self._total: int | None = None

    @property
    def complete(self) -> bool:
        """Whether every request taken has been handed out."""
        return self._total is not None and self._next >= self._total

    def add(self, report: Report[ResultT]) -> Iterator[ResultT | RenderError | Failed]:
        """The results `report` lets out, in order: none until the one next in line comes."""
        if isinstance(report, Done):
            self._total = report.total
            return
        position, result = report
        self._waiting[position] = result
        while self._next in self._waiting:
            yield self._waiting.pop(self._next)
            self._next += 1


class _Pending(Generic[RequestT]):
    """The requests a stream has sent and not had answered, in the order sent."""

    def __init__(self) -> None:
        self._items: deque[tuple[int, RequestT]] = deque()
        self._first_index = 0  # index in the current call of the oldest unanswered request

    def __len__(self) -> int:
        return len(self._items)

    def sent(self, positions: list[int], requests: list[RequestT]) -> None:
        self._items.extend(zip(positions, requests, strict=True))

    def answered(self, index: int) -> tuple[int, RequestT]:
        """The input position and request of the one at `index` in the call; it is no longer pending."""
        # The server answers in request order, so the answer is to the oldest.
        assert index == self._first_index, (index, self._first_index)
        self._first_index += 1
        return self._items.popleft()

    def restart(self) -> list[RequestT]:
        """Everything unanswered, to send again on a new call (whose indices start at 0)."""
        self._first_index = 0
        return [request for _, request in self._items]

    def drain(self) -> list[int]:
        positions = [position for position, _ in self._items]
        self._items.clear()
        return positions


class StreamState(Generic[ItemT, RequestT, ResultT]):
    """One stream's bookkeeping, without its I/O: what it owes, whether it failed, when to resend.

    An engine opens the calls, writes batches and reads responses, tells its
    StreamState what happened, and hands on the results it returns. A call that
    breaks is opened again (`resend_delay`, `resend`) while the policy allows;
    then everything owed fails with its error (`fail`), and so does whatever is
    sent after (`refused`).
    """

    def __init__(self, method: StreamMethod[ItemT, RequestT, ResultT], check: ModelCheck | None = None) -> None:
        self.method = method
        # An answer is checked against the replicas met before (consistency.py): the replica
        # of the current call (`identity`, from its initial metadata) renders the request's model so.
        self.check = check
        self.identity: ReplicaIdentity | None = None
        self._pending: _Pending[RequestT] = _Pending()
        self.failure: RenderError | None = None
        self.finished = False  # no more requests will be sent: a new call's writes end after `resend`
        self._attempt = 0

    @property
    def unanswered(self) -> int:
        return len(self._pending)

    def refused(self, positions: list[int]) -> list[tuple[int, RenderError]] | None:
        """Each of `positions` with the stream's error if it has failed; None if they may be sent."""
        if self.failure is None:
            return None
        failure = self.failure
        return [(position, failure) for position in positions]

    def sent(self, positions: list[int], requests: list[RequestT]) -> Message:
        """The batch message to write for `requests`, now owed."""
        self._pending.sent(positions, requests)
        return self.method.batch_class(requests=requests)

    def answered(self, answers: list[tuple[int, ResultT | RenderError]]) -> list[tuple[int, ResultT | RenderError]]:
        """A response's answers (`method.decode`: index in the call, result) as (input position, result)."""
        self._attempt = 0  # the call works: a break after this starts the backoff afresh
        reports: list[tuple[int, ResultT | RenderError]] = []
        for index, result in answers:
            position, request = self._pending.answered(index)
            if self.check is not None and not isinstance(result, RenderError):
                mismatch = self.check(getattr(request, "model", ""), self.identity)
                if mismatch is not None:
                    result = mismatch
            reports.append((position, result))
        return reports

    def ended(self) -> RenderError | None:
        """The error of a call whose responses ran out: None if it owes nothing."""
        return RenderError(ENDED_EARLY) if len(self._pending) else None

    def resend_delay(self, error: RenderError) -> float | None:
        """Seconds to wait before opening the call again after `error`; None to fail instead."""
        delay = resend_delay(error, self._attempt)
        if self.failure is not None or delay is None:
            return None
        self._attempt += 1
        return delay

    def resend(self) -> Message | None:
        """The batch a call opened again starts with: everything unanswered (None: nothing)."""
        requests = self._pending.restart()
        return self.method.batch_class(requests=requests) if requests else None

    def fail(self, error: RenderError) -> list[tuple[int, RenderError]]:
        """The stream gives up (with its first error): everything owed, with that error."""
        failure = self.failure = self.failure or error
        return [(position, failure) for position in self._pending.drain()]

    def close(self) -> None:
        """render_many ends: nothing is sent or resent any more."""
        self.failure = self.failure or RenderError(CLOSED)
