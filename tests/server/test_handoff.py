"""The hand-over protocol between a worker's gRPC process and its render process, over a real socket pair."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from render_server.handoff import (
    SLOW_RENDER,
    Answer,
    Kind,
    RenderProcessPool,
    RenderProcessProxy,
    Request,
    serve_renders,
)
from render_wire.errors import InvalidArgumentError, RenderError, UnavailableError

SAMPLE, BATCH = Kind.SAMPLE, Kind.BATCH

Answerer = Callable[[Request, Callable[[], bool]], Iterator[Answer]]


class Pair:
    """A RenderProcessProxy end and a serve_renders loop (in a thread) joined by a socket pair."""

    def __init__(self, answer: Answerer) -> None:
        grpc_end, render_end = socket.socketpair()
        self.render_end = render_end
        self.lost = threading.Event()
        self.loop = threading.Thread(target=serve_renders, args=(render_end, answer, internal), daemon=True)
        self.loop.start()
        self.process = RenderProcessProxy(grpc_end, on_lost=self.lost.set)

    def close(self) -> None:
        self.process.close()
        self.loop.join(timeout=10)
        assert not self.loop.is_alive(), "the render loop did not end at end-of-file"
        self.render_end.close()


def internal(exc: Exception) -> RenderError:
    return RenderError(f"internal: {exc}")


def echo(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
    if request.body == b"bad":
        yield Answer.of_error(InvalidArgumentError("messages[0].role: nope", error_type="ValueError"))
    else:
        yield Answer(grpc.StatusCode.OK, request.body[::-1])


def test_answers_come_back_to_their_own_calls_byte_for_byte() -> None:
    pair = Pair(echo)
    try:
        bodies = [bytes([n % 256]) * n for n in (0, 1, 255, 70_000)] + [bytes(range(256)) * 40_000]  # 10 MB
        results: dict[int, bytes] = {}

        def send(n: int) -> None:
            answer = pair.process.start(SAMPLE, bodies[n], deadline=math.inf).answers.get(timeout=30)
            assert answer.code is grpc.StatusCode.OK and answer.last
            results[n] = answer.body

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {n: body[::-1] for n, body in enumerate(bodies)}
    finally:
        pair.close()
    assert not pair.lost.is_set(), "closing is not losing the render process"


def test_a_status_crosses_with_its_code_details_and_error_type() -> None:
    pair = Pair(echo)
    try:
        answer = pair.process.start(SAMPLE, b"bad", deadline=math.inf).answers.get(timeout=30)
    finally:
        pair.close()
    error = answer.error()
    assert isinstance(error, InvalidArgumentError)
    assert (error.code, error.details, error.error_type) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].role: nope",
        "ValueError",
    )


def test_a_batch_answer_comes_in_parts_with_the_next_index() -> None:
    def in_parts(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        assert request.kind == BATCH
        yield Answer(grpc.StatusCode.OK, b"first", last=False)
        yield Answer(grpc.StatusCode.OK, b"second", last=False)
        yield Answer(grpc.StatusCode.OK, b"", next_index=request.first_index + 3)

    pair = Pair(in_parts)
    try:
        parts = list(pair.process.start(BATCH, b"x", deadline=math.inf, first_index=7))  # takes each part
    finally:
        pair.close()
    assert [(part.body, part.last) for part in parts] == [(b"first", False), (b"second", False), (b"", True)]
    assert parts[-1].next_index == 10


def test_a_cancelled_call_wakes_its_waiter_and_the_render_side_sees_it() -> None:
    started, release = threading.Event(), threading.Event()
    seen: dict[bytes, bool] = {}

    def slow(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        if request.body == b"first":
            started.set()
            release.wait(10)
        seen[request.body] = is_cancelled()
        yield Answer(grpc.StatusCode.OK, request.body)

    pair = Pair(slow)
    try:
        first = pair.process.start(SAMPLE, b"first", deadline=math.inf)
        assert started.wait(10)
        queued = pair.process.start(SAMPLE, b"queued", deadline=math.inf)
        queued.cancel()
        assert queued.answers.get(timeout=5).code is grpc.StatusCode.CANCELLED  # at once, not after the render
        expired = pair.process.start(SAMPLE, b"expired", deadline=time.monotonic() + 0.05)
        time.sleep(0.1)
        release.set()
        assert first.answers.get(timeout=10).body == b"first"
        assert expired.answers.get(timeout=10).body == b"expired"  # its caller's gRPC deadline answers it
    finally:
        pair.close()
    assert seen == {b"first": False, b"queued": True, b"expired": True}


def test_losing_the_render_process_fails_waiting_calls_unavailable() -> None:
    started = threading.Event()

    def hang(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        started.set()
        time.sleep(30)
        yield Answer(grpc.StatusCode.OK, b"")

    grpc_end, render_end = socket.socketpair()
    lost = threading.Event()
    threading.Thread(target=serve_renders, args=(render_end, hang, internal), daemon=True).start()
    process = RenderProcessProxy(grpc_end, on_lost=lost.set)
    try:
        waiting = process.start(SAMPLE, b"x", deadline=math.inf)
        assert started.wait(10)
        render_end.shutdown(socket.SHUT_RDWR)  # what the kernel does when the render process dies
        answer = waiting.answers.get(timeout=10)
        assert lost.wait(10)
        assert isinstance(answer.error(), UnavailableError)
        assert "render process" in answer.error().details
        later = process.start(SAMPLE, b"y", deadline=math.inf).answers.get(timeout=10)
        assert isinstance(later.error(), UnavailableError)
    finally:
        process.close()
        render_end.close()


@pytest.mark.parametrize("kind", [SAMPLE, BATCH])
def test_the_render_side_gets_what_was_sent(kind: int) -> None:
    got: list[Request] = []

    def record(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        got.append(request)
        yield Answer(grpc.StatusCode.OK, b"")

    pair = Pair(record)
    try:
        before = time.monotonic()
        pair.process.start(kind, b"body", deadline=before + 30, first_index=5).answers.get(timeout=10)
    finally:
        pair.close()
    [request] = got
    assert (request.kind, request.body, request.first_index, request.deadline) == (kind, b"body", 5, before + 30)
    assert before <= request.received <= time.monotonic()


def test_an_answer_that_raises_fails_its_call_and_the_loop_goes_on() -> None:
    def broken(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        if request.body == b"boom":
            raise RuntimeError("a bug")
        yield Answer(grpc.StatusCode.OK, request.body)

    pair = Pair(broken)
    try:
        failed = pair.process.start(SAMPLE, b"boom", deadline=math.inf).answers.get(timeout=10)
        fine = pair.process.start(SAMPLE, b"fine", deadline=math.inf).answers.get(timeout=10)
    finally:
        pair.close()
    assert (failed.code, failed.error().details, failed.last) == (grpc.StatusCode.INTERNAL, "internal: a bug", True)
    assert (fine.code, fine.body) == (grpc.StatusCode.OK, b"fine")
    assert not pair.lost.is_set()


def test_a_batch_part_waits_until_the_one_before_was_taken() -> None:
    built: list[int] = []

    def many_parts(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        for part in range(4):
            built.append(part)
            yield Answer(grpc.StatusCode.OK, bytes([part]), last=part == 3, next_index=4)

    pair = Pair(many_parts)
    try:
        call = pair.process.start(BATCH, b"", deadline=math.inf)
        time.sleep(0.5)
        # Part 0 was sent; part 1 is built but waits for part 0 to be taken.
        assert built == [0, 1]
        assert [part.body for part in call] == [b"\x00", b"\x01", b"\x02", b"\x03"]
    finally:
        pair.close()
    assert built == [0, 1, 2, 3]


def test_a_caller_leaving_mid_batch_stops_its_parts() -> None:
    built: list[int] = []

    def endless(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        if request.kind == SAMPLE:
            yield Answer(grpc.StatusCode.OK, b"")
            return
        for part in range(1000):
            built.append(part)
            yield Answer(grpc.StatusCode.OK, b"part", last=False)
        yield Answer(grpc.StatusCode.OK, b"", next_index=1000)

    pair = Pair(endless)
    try:
        call = pair.process.start(BATCH, b"", deadline=math.inf)
        assert call.answers.get(timeout=10).body == b"part"
        call.cancel()
        assert call.answers.get(timeout=10).code is grpc.StatusCode.CANCELLED
        after = pair.process.start(SAMPLE, b"", deadline=math.inf)  # served once the batch has stopped
        assert after.answers.get(timeout=10).code is grpc.StatusCode.OK
    finally:
        pair.close()
    assert len(built) == 2, "parts were built after the caller left"


def test_calls_go_to_the_render_process_not_held_by_a_long_render() -> None:
    long_started, release = threading.Event(), threading.Event()
    served_by: dict[bytes, str] = {}

    def answerer(name: str) -> Answerer:
        def answer(request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
            served_by[request.body] = name
            if request.body == b"long":
                long_started.set()
                release.wait(10)
            elif request.body.startswith(b"short"):
                time.sleep(0.05)
            yield Answer(grpc.StatusCode.OK, request.body)

        return answer

    first, second = Pair(answerer("first")), Pair(answerer("second"))
    renders = RenderProcessPool([first.process, second.process])
    try:
        # Idle: ties go to the first, which a lightly loaded worker uses alone.
        assert renders.start(SAMPLE, b"alone", deadline=math.inf).answers.get(timeout=10).body == b"alone"
        long = renders.start(SAMPLE, b"long", deadline=math.inf)
        assert long_started.wait(10)
        # Fewest calls waiting or rendering: the second, while the first renders the long call.
        assert renders.start(SAMPLE, b"small", deadline=math.inf).answers.get(timeout=10).body == b"small"
        # The second is busy with a queue of short renders (1 s of them); the first has one call,
        # but its render has run past SLOW_RENDER: the second takes the next call all the same.
        shorts = [second.process.start(SAMPLE, b"short %d" % n, deadline=math.inf) for n in range(20)]
        time.sleep(SLOW_RENDER + 0.1)
        late = renders.start(SAMPLE, b"late", deadline=math.inf)
        assert late.answers.get(timeout=10).body == b"late"
        assert not long.answers.qsize(), "the long render ended early: the test proved nothing"
        release.set()
        assert long.answers.get(timeout=10).body == b"long"
        assert all(call.answers.get(timeout=10).code is grpc.StatusCode.OK for call in shorts)
    finally:
        release.set()
        first.close()
        second.close()
    assert (served_by[b"alone"], served_by[b"long"], served_by[b"small"], served_by[b"late"]) == (
        "first",
        "first",
        "second",
        "second",
    )


def test_an_error_crosses_to_the_grpc_process_with_its_type_and_detail() -> None:
    detail = {
        "title": "Qwen3RendererConfig",
        "errors": [{"type": "bool_parsing", "loc": ["enable_thinking"], "input": "x"}],
    }
    for error in (
        InvalidArgumentError(
            "chat_template_kwargs.enable_thinking: no",
            error_type="pydantic_core._pydantic_core.ValidationError",
            error_detail=detail,
        ),
        InvalidArgumentError("messages: UndefinedError: x", error_type="jinja2.exceptions.UndefinedError"),
        UnavailableError("going away"),
    ):
        crossed = Answer.of_error(error).error()
        assert isinstance(crossed, type(error)) and (crossed.code, crossed.details) == (error.code, error.details)
        assert (crossed.error_type, crossed.error_detail) == (error.error_type, error.error_detail)
