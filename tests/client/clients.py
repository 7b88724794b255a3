"""Both clients behind one blocking interface, so that a test runs against RenderClient and AsyncRenderClient alike.

An AsyncRenderClient lives on an event loop in a helper thread (`LoopThread`);
`AsyncClientInThread` runs its coroutines there and steps its async iterators
one result at a time, so a test iterating its render_many sees what an
`async for` would, in the same order, at the same pace: the engine takes its
next request only once the test has taken a result. A RenderClient is used as
it is (`BlockingClient`), its iterators stepped from a helper thread likewise.
Every step has a deadline, so an engine that hangs fails its test instead of
stalling the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from PIL import Image

from render_client import RenderClient, RenderedTrainingSample, RenderError, SampleRequest, TokensRequest
from render_client.aio import AsyncRenderClient
from render_client.renderer import RemoteRenderer
from tests.support import ServerProcess

T = TypeVar("T")

STEP_TIMEOUT = 60.0  # seconds a call or one step of an iteration may take
_DONE = object()  # the end of an iteration


def noise_image(side: int, seed: int) -> bytes:
    """A distinct JPEG (so no cache answers) that takes a while to render when large."""
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 40 + seed).convert("RGB").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def slow_request(seed: int) -> SampleRequest:
    """A qwen3-vl request with a 3000x3000 image of its own: seconds to render."""
    messages: list[dict[str, object]] = [
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image", "image": noise_image(3000, seed)}]},
        {"role": "assistant", "content": "Noise."},
    ]  # fmt: skip
    return SampleRequest("qwen3-vl", messages)


class StreamingClient(Protocol):
    """What the tests call on either client: RenderClient's own signatures."""

    step_timeout: float  # seconds one step of an iteration may take before the test fails

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer: ...

    def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample: ...

    def render_many(
        self,
        requests: Iterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[RenderedTrainingSample | RenderError]: ...

    def render_many_tokens(
        self,
        requests: Iterable[TokensRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Any]: ...

    def close(self) -> None: ...


# new_client(target, **options): a client of the kind under test (tests/client/conftest.py)
NewClient = Callable[..., StreamingClient]


class BlockingClient:
    """A RenderClient; its iterators' steps run in a helper thread, each with a deadline."""

    def __init__(self, target: str, **options: Any) -> None:
        self.client = RenderClient(target, **options)
        self.step_timeout = STEP_TIMEOUT

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer:
        return self.client.renderer(model, chat_template_kwargs=chat_template_kwargs)

    def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample:
        return self.client.render(request, timeout=timeout)

    def render_many(
        self,
        requests: Iterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[RenderedTrainingSample | RenderError]:
        return _stepped(
            self.client.render_many(
                requests, concurrency=concurrency, return_exceptions=return_exceptions, timeout=timeout
            ),
            self.step_timeout,
        )

    def render_many_tokens(
        self,
        requests: Iterable[TokensRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        return _stepped(
            self.client.render_many_tokens(
                requests, concurrency=concurrency, return_exceptions=return_exceptions, timeout=timeout
            ),
            self.step_timeout,
        )

    def close(self) -> None:
        self.client.close()


def _stepped(results: Iterator[T], timeout: float) -> Iterator[T]:
    """`results`, each `next` taken in a daemon thread of its own and waited for at most `timeout` seconds;
    closed there when the caller stops early."""
    steps: queue.SimpleQueue[bool] = queue.SimpleQueue()  # True: take the next; False: close
    taken: queue.SimpleQueue[tuple[bool, object]] = queue.SimpleQueue()  # (raised, the result or exception)

    def step() -> None:
        while steps.get():
            try:
                taken.put((False, next(results, _DONE)))
            except BaseException as exc:
                taken.put((True, exc))
        results.close()  # type: ignore[attr-defined]  # a generator: its engine's streams end

    threading.Thread(target=step, daemon=True, name="test-steps").start()
    try:
        while True:
            steps.put(True)
            try:
                raised, result = taken.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"render_many took no step in {timeout:g} s") from None
            if raised:
                raise result  # type: ignore[misc]  # a BaseException
            if result is _DONE:
                return
            yield result  # type: ignore[misc]  # a T
    finally:
        steps.put(False)


class LoopThread:
    """An event loop running in a daemon thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-event-loop")
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT) -> T:
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)
        except concurrent.futures.TimeoutError:
            stacks = asyncio.run_coroutine_threadsafe(_stacks(), self.loop).result(10)
            raise TimeoutError(f"not done in {timeout:g} s; on the loop:\n{stacks}") from None

    def stop(self) -> None:
        """Cancel whatever still runs on the loop (a test that failed mid-stream), then end it."""
        self.run(_cancel_the_rest(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


async def _stacks() -> str:
    """Where each of the loop's other tasks waits."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            print(task, file=out)
            task.print_stack(limit=10, file=out)
    return out.getvalue()


async def _cancel_the_rest() -> None:
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class AsyncClientInThread:
    """An AsyncRenderClient, created and driven on a LoopThread, with RenderClient's blocking methods."""

    def __init__(self, loop: LoopThread, target: str, **options: Any) -> None:
        self._loop = loop

        async def connect() -> AsyncRenderClient:  # its channels belong to the loop
            return AsyncRenderClient(target, **options)

        self.client = loop.run(connect())
        self.step_timeout = STEP_TIMEOUT

    def renderer(self, model: str, *, chat_template_kwargs: Mapping[str, Any] | None = None) -> RemoteRenderer:
        return self.client.renderer(model, chat_template_kwargs=chat_template_kwargs)

    def render(self, request: SampleRequest, *, timeout: float | None = None) -> RenderedTrainingSample:
        return self._loop.run(self.client.render(request, timeout=timeout))

    def render_many(
        self,
        requests: Iterable[SampleRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[RenderedTrainingSample | RenderError]:
        return self._steps(
            self.client.render_many(
                requests, concurrency=concurrency, return_exceptions=return_exceptions, timeout=timeout
            )
        )

    def render_many_tokens(
        self,
        requests: Iterable[TokensRequest],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        return self._steps(
            self.client.render_many_tokens(
                requests, concurrency=concurrency, return_exceptions=return_exceptions, timeout=timeout
            )
        )

    def _steps(self, results: AsyncIterator[T]) -> Iterator[T]:
        """`results`, one `anext` on the loop per item; closed (aclose) when the caller stops early."""

        async def step() -> T | object:
            return await anext(results, _DONE)

        stepping = False
        try:
            while True:
                stepping = True
                result = self._loop.run(step(), self.step_timeout)
                stepping = False
                if result is _DONE:
                    return
                yield result  # type: ignore[misc]  # not _DONE
        finally:
            if not stepping:  # a step that timed out still runs: closing it would raise
                self._loop.run(results.aclose())  # type: ignore[attr-defined]

    def close(self) -> None:
        self._loop.run(self.client.close())


def workers_holding_connections(server: ServerProcess) -> list[int]:
    """The server's worker processes that hold an established TCP connection on its gRPC port.

    On a server of its own, those are the test's client's connections: killing
    one of these workers breaks a stream of the client's.
    """
    suffix = f":{server.port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "01":  # local port; TCP_ESTABLISHED
                inodes.add(f"socket:[{fields[9]}]")
    holding = []
    for pid in server.workers():
        links = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                links.add(os.readlink(fd))
            except OSError:  # closed meanwhile
                continue
        if links & inodes:
            holding.append(pid)
    return holding
