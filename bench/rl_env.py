"""An RL environment server, simulated: the process `python -m bench --only rl` measures.

    python -m bench.rl_env --model qwen3 [--target HOST:PORT --connections N [--asyncio]]

It replays corpus conversations as rollouts, turn by turn, the way a
verifiers-style env server drives a renderer while an inference engine
generates: per turn k it has the prompt (turn 1: `render(messages before the
k-th assistant message, add_generation_prompt=True)`; later turns:
`bridge_to_next_turn(previous prompt, previous completion, the messages between
the two assistant messages)`, and a full render when the bridge declines), then
parses the engine's completion (`parse_response(completion, prompt_ids=...)`).
The engine's completions are made up front by rendering the real next assistant
message (its tokens after the prompt's). Without --target one renderer serves
every thread behind one lock, as verifiers' ElasticRendererPool does (render and
bridge under the lock, parse_response without it); with --target, one remote
renderer shared by all threads. With --asyncio the R rollouts are tasks on one
event loop sharing one AsyncRenderClient's renderer, as an asyncio env server's
(verifiers') would be; only "rollouts" then.

It reads one JSON command per line and answers one JSON line:
    {"run": "rollouts", "threads": R, "seconds": S}  -> turns, CPU, wall, latency per turn index
    {"run": "calls", "kind": "render"|"parse"|"bridge", "threads": R, "seconds": S}  -> calls, CPU
Every result a block got is compared with the in-process one computed once at
start (after the block: the comparison costs no block CPU); "differences" counts
those that differ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from bench.work import working_set
from render_client import RenderClient, RenderError
from tests.reference import reference_renderer


@dataclass(frozen=True)
class Turn:
    prompt_messages: list[dict[str, Any]]  # what a full render of this turn's prompt renders
    completion: list[int]  # the engine's answer: the next assistant message's tokens
    new_messages: list[dict[str, Any]]  # the messages after it, up to the next assistant message


@dataclass(frozen=True)
class Rollout:
    tools: list[Any] | None
    turns: list[Turn]


def rollouts(model: str) -> list[Rollout]:
    """Every conversation of the corpus the model renders, as a rollout of its assistant turns
    (up to the first turn whose full render does not extend its prompt)."""
    local = reference_renderer(model)
    made = []
    for conversation in working_set(model):
        messages, tools = conversation["messages"], conversation.get("tools")
        assistant = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
        turns = []
        for number, index in enumerate(assistant):
            try:
                prompt = local.render_ids(messages[:index], tools=tools, add_generation_prompt=True)
                full = local.render_ids(messages[: index + 1], tools=tools)
            except Exception:
                break
            if not index or full[: len(prompt)] != prompt:
                break
            following = assistant[number + 1] if number + 1 < len(assistant) else len(messages)
            turns.append(Turn(messages[:index], full[len(prompt) :], messages[index + 1 : following]))
        if turns:
            made.append(Rollout(tools, turns))
    return made


class Env:
    """An env server's renderer: a local one behind a lock (render and bridge under it,
    parse_response without, as verifiers' pool), or a remote one as it is."""

    def __init__(self, renderer: Any, lock: threading.Lock | None) -> None:
        self.renderer = renderer
        self._lock = lock

    def _locked(self, call: Callable[[], Any]) -> Any:
        if self._lock is None:
            return call()
        with self._lock:
            return call()

    def render(self, messages: Any, **options: Any) -> Any:
        return self._locked(lambda: self.renderer.render(messages, **options))

    def bridge_to_next_turn(self, prompt_ids: Any, completion: Any, new_messages: Any, **options: Any) -> Any:
        return self._locked(lambda: self.renderer.bridge_to_next_turn(prompt_ids, completion, new_messages, **options))

    def parse_response(self, completion: Any, **options: Any) -> Any:
        return self.renderer.parse_response(completion, **options)


# One call of a rollout: the renderer method's name, its arguments and keyword arguments.
Step = tuple[str, tuple[Any, ...], dict[str, Any]]
Record = Callable[[int, float, Any, Any, bool], None]


def steps(rollout: Rollout, record: Record, stop: Callable[[], bool]) -> Generator[Step, Any, None]:
    """One rollout's calls, turn by turn, until its end or `stop()`: each is yielded, and its result
    sent back (play and play_async make them); `record(turn, seconds, prompt, parsed, bridged)`."""
    prompt = None
    for number, turn in enumerate(rollout.turns):
        if stop():
            return
        started = time.perf_counter()
        bridged = False
        if prompt is not None:
            previous = rollout.turns[number - 1]
            prompt = yield (
                "bridge_to_next_turn",
                (prompt.token_ids, previous.completion, previous.new_messages),
                {"tools": rollout.tools},
            )
            bridged = prompt is not None
        if prompt is None:
            prompt = yield ("render", (turn.prompt_messages,), {"tools": rollout.tools, "add_generation_prompt": True})
        parsed = yield ("parse_response", (turn.completion,), {"tools": rollout.tools, "prompt_ids": prompt.token_ids})
        record(number, time.perf_counter() - started, prompt, parsed, bridged)


def play(env: Env, rollout: Rollout, record: Record, stop: Callable[[], bool]) -> None:
    """A rollout's calls, made on `env`."""
    calls = steps(rollout, record, stop)
    with contextlib.suppress(StopIteration):
        name, args, kwargs = next(calls)
        while True:
            name, args, kwargs = calls.send(getattr(env, name)(*args, **kwargs))


async def play_async(renderer: Any, rollout: Rollout, record: Record, stop: Callable[[], bool]) -> None:
    """A rollout's calls, awaited on an AsyncRemoteRenderer."""
    calls = steps(rollout, record, stop)
    with contextlib.suppress(StopIteration):
        name, args, kwargs = next(calls)
        while True:
            name, args, kwargs = calls.send(await getattr(renderer, name)(*args, **kwargs))


class Tally:
    """What a block of rollouts got (threads or tasks record into it)."""

    def __init__(self, work: list[Rollout], seconds: float) -> None:
        self._work = work
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._latencies: dict[int, list[float]] = {}
        self._bridged = 0
        self._errors: list[str] = []
        self.results: list[tuple[int, int, Any, Any]] = []  # (rollout, turn, prompt, parsed)
        self._deadline = time.perf_counter() + seconds
        self._cpu, self._started = time.process_time(), time.perf_counter()

    def stop(self) -> bool:
        return time.perf_counter() >= self._deadline

    def next_rollout(self) -> tuple[Rollout, Record]:
        """The next rollout of the corpus to play, and how its turns are recorded."""
        with self._lock:
            index = next(self._next) % len(self._work)

        def record(turn: int, elapsed: float, prompt: Any, parsed: Any, bridged: bool) -> None:
            with self._lock:
                self._latencies.setdefault(turn, []).append(elapsed * 1e3)
                self.results.append((index, turn, prompt, parsed))
                self._bridged += bridged

        return self._work[index], record

    def error(self, error: RenderError) -> None:
        """A rollout ended by an error: counted (each call alone can exceed the server's limit)."""
        with self._lock:
            self._errors.append(f"{type(error).__name__}: {error}")

    def summary(self) -> dict[str, Any]:
        return {
            "turns": len(self.results),
            "bridged": self._bridged,
            "errors": len(self._errors),
            "first_errors": sorted(set(self._errors))[:3],
            "seconds": time.perf_counter() - self._started,
            "cpu_seconds": time.process_time() - self._cpu,
            "latencies_ms": {str(turn): values for turn, values in sorted(self._latencies.items())},
        }


def run_rollouts(env: Env, work: list[Rollout], threads: int, seconds: float) -> tuple[dict[str, Any], list[Any]]:
    """`threads` threads playing rollouts (the next of the corpus each) for `seconds`."""
    tally = Tally(work, seconds)

    def worker() -> None:
        while not tally.stop():
            rollout, record = tally.next_rollout()
            try:
                play(env, rollout, record, tally.stop)
            except RenderError as error:
                tally.error(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return tally.summary(), tally.results


def run_rollouts_async(
    renderer: Any, work: list[Rollout], tasks: int, seconds: float
) -> tuple[dict[str, Any], list[Any]]:
    """run_rollouts with `tasks` tasks on one event loop (LOOP, the client's: see main_asyncio)."""
    tally = Tally(work, seconds)

    async def worker() -> None:
        while not tally.stop():
            rollout, record = tally.next_rollout()
            try:
                await play_async(renderer, rollout, record, tally.stop)
            except RenderError as error:
                tally.error(error)

    async def all_workers() -> None:
        await asyncio.gather(*(worker() for _ in range(tasks)))

    LOOP.run_until_complete(all_workers())
    return tally.summary(), tally.results


# The event loop of --asyncio: the client is made on it and every block runs on it.
LOOP = asyncio.new_event_loop()


def call_of(env: Env, kind: str) -> Callable[[tuple[Rollout, Turn, Any]], Any]:
    """One `kind` call on a turn: (rollout, turn, its in-process prompt) -> the result."""
    if kind == "render":
        return lambda case: env.render(case[1].prompt_messages, tools=case[0].tools, add_generation_prompt=True)
    if kind == "parse":
        return lambda case: env.parse_response(case[1].completion, tools=case[0].tools, prompt_ids=case[2].token_ids)
    return lambda case: env.bridge_to_next_turn(
        case[2].token_ids, case[1].completion, case[1].new_messages, tools=case[0].tools
    )


def run_calls(
    env: Env, kind: str, cases: list[tuple[Rollout, Turn, Any]], threads: int, seconds: float
) -> tuple[dict[str, Any], list[tuple[int, Any]]]:
    """`threads` threads making only `kind` calls, over the turns in `cases`, for `seconds`."""
    call = call_of(env, kind)
    counter = itertools.count()
    lock = threading.Lock()
    results: list[tuple[int, Any]] = []
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter) % len(cases)
            result = call(cases[index])
            with lock:
                results.append((index, result))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    cpu, started = time.process_time(), time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return {
        "calls": len(results),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }, results


def expected_results(model: str, work: list[Rollout]) -> tuple[dict[tuple[int, int], Any], list[Any]]:
    """Each turn's (prompt, parsed) in-process, one thread; and per turn, the in-process prompt (for `calls`)."""
    env = Env(reference_renderer(model), None)
    expected: dict[tuple[int, int], Any] = {}
    for index, rollout in enumerate(work):

        def record(turn: int, _: float, prompt: Any, parsed: Any, __: bool, index: int = index) -> None:
            expected[index, turn] = (prompt, parsed)

        play(env, rollout, record, lambda: False)
    cases = [
        (rollout, turn, expected[index, number][0])
        for index, rollout in enumerate(work)
        for number, turn in enumerate(rollout.turns)
    ]
    return expected, cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--target", help="a render-server; without it, in-process")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--coalesce-window", type=float, default=0.001, help="seconds; negative: no coalescing")
    parser.add_argument("--asyncio", action="store_true", help="with --target: tasks on one event loop")
    args = parser.parse_args()
    if args.asyncio:
        if not args.target:
            parser.error("--asyncio needs --target")
        main_asyncio(args)
        return
    work = rollouts(args.model)
    expected, cases = expected_results(args.model, work)
    client = None
    if args.target:
        window = None if args.coalesce_window < 0 else args.coalesce_window
        client = RenderClient(args.target, timeout=600, connections=args.connections, coalesce_window=window)
        env = Env(client.renderer(args.model), None)
    else:
        env = Env(reference_renderer(args.model), threading.Lock())
    # Warm up: every code path once, and the connections.
    run_rollouts(env, work, 8, 1.0)
    print(json.dumps({"ready": True, "rollouts": len(work), "turns": len(cases)}), flush=True)
    local = Env(reference_renderer(args.model), None)
    expected_calls: dict[str, dict[int, Any]] = {}
    coalescer = client._in_this_process.coalescer if client is not None else None
    for line in sys.stdin:
        command = json.loads(line)
        differences = 0
        sent = (coalescer.batches_sent, coalescer.calls_sent) if coalescer is not None else (0, 0)
        if command["run"] == "rollouts":
            result, got = run_rollouts(env, work, command["threads"], command["seconds"])
            for index, turn, prompt, parsed in got:
                differences += (prompt, parsed) != expected[index, turn]
        else:
            kind = command["kind"]
            # A bridge needs messages to add: the last turn of a rollout has none.
            kind_cases = [case for case in cases if kind != "bridge" or case[1].new_messages]
            result, calls = run_calls(env, kind, kind_cases, command["threads"], command["seconds"])
            table = expected_calls.setdefault(kind, {})
            in_process = call_of(local, kind)
            for index, value in calls:
                if index not in table:
                    table[index] = in_process(kind_cases[index])
                differences += value != table[index]
        result["differences"] = differences
        if coalescer is not None:  # how the calls travelled: calls / batches is the mean batch
            result["batches_sent"] = coalescer.batches_sent - sent[0]
            result["calls_sent"] = coalescer.calls_sent - sent[1]

        print(json.dumps(result), flush=True)
    if client is not None:
        client.close()


def main_asyncio(args: argparse.Namespace) -> None:
    """main, for --asyncio: rollouts only."""
    from render_client.aio import AsyncRenderClient

    work = rollouts(args.model)
    expected, _ = expected_results(args.model, work)
    window = None if args.coalesce_window < 0 else args.coalesce_window

    async def made() -> AsyncRenderClient:  # a grpc.aio channel belongs to the loop it is made on
        return AsyncRenderClient(args.target, timeout=600, connections=args.connections, coalesce_window=window)

    client = LOOP.run_until_complete(made())
    renderer = client.renderer(args.model)
    run_rollouts_async(renderer, work, 8, 1.0)  # warm up
    print(json.dumps({"ready": True, "rollouts": len(work), "turns": sum(len(r.turns) for r in work)}), flush=True)
    coalescer = client._coalescer
    for line in sys.stdin:
        command = json.loads(line)
        if command["run"] != "rollouts":
            raise SystemExit(f"--asyncio runs rollouts only, not {command['run']!r}")
        sent = (coalescer.batches_sent, coalescer.calls_sent) if coalescer is not None else (0, 0)
        result, got = run_rollouts_async(renderer, work, command["threads"], command["seconds"])
        result["differences"] = sum((prompt, parsed) != expected[index, turn] for index, turn, prompt, parsed in got)
        if coalescer is not None:
            result["batches_sent"] = coalescer.batches_sent - sent[0]
            result["calls_sent"] = coalescer.calls_sent - sent[1]
        print(json.dumps(result), flush=True)
    LOOP.run_until_complete(client.close())


if __name__ == "__main__":
    main()
