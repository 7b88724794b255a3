"""Small requests that would buy large work, and large ones that would be decoded before a limit refuses them.

Against a real server, each is refused with INVALID_ARGUMENT naming the field and
the limit, within a second or two, while the render processes' memory grows by
less than 64 MiB (the request's own bytes included), and the next call is served:

- the issue's cases: BridgeToNextTurn with 60M token ids (before: 1.3 GiB, refused
  naming "messages"), ParseResponse with 10M (before: ~540 MiB), a compact tensor of
  2**32 - 1 copies in 12 KiB (before: INTERNAL, "Unable to allocate 192. TiB") and
  zero rows of 2**24 copies (before: a core busy 15 s past the caller's deadline);
- every repeated field of every method's request (tests/methods.py), found in
  the descriptors, filled with 8M empty values or ids (upb alone would spend
  ~1 GiB on as many empty messages): a field added later is attacked too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from render_wire.pb import render_pb2 as pb
from render_wire.wireformat import varint
from tests.methods import METHODS, Method, call, call_batch
from tests.server.test_image_bombs import memory_growth_mib, status_kib
from tests.server.test_workers import cpu_seconds
from tests.support import ServerProcess

MAX_GROWTH_MIB = 64
MAX_SECONDS = 2.0  # ~0.1-0.4 s here; room for a shared machine


def length_delimited(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def compact_bridge(rows: int, span: int, repeats: int) -> bytes:
    """A qwen3-vl BridgeToNextTurnRequest carrying one compact pixel tensor of three groups."""
    tensor = pb.Tensor(
        dtype="<f4",
        shape=[rows, 3 * repeats * span],
        compact=pb.CompactTensor(
            codes=bytes(rows * 3 * span), tables=bytes(12), table_sizes=[1, 1, 1], repeats=repeats
        ),
    )
    item = pb.MultiModalItem(fields=[pb.NamedTensor(name="pixel_values", tensor=tensor)])
    return pb.BridgeToNextTurnRequest(
        model="qwen3-vl",
        previous_prompt_ids=[151644],
        new_messages=[pb.Message(role="user", text="hi")],
        previous_multi_modal_data=pb.MultiModalData(mm_items=[pb.ModalityItems(modality="image", items=[item])]),
    ).SerializeToString()


TENSOR = "previous_multi_modal_data.mm_items['image'][0]['pixel_values']"

# The issue's cases: (method, request bytes, deadline, the refusal).
ISSUE_BOMBS = {
    "BridgeToNextTurn, 60M token ids": (
        "BridgeToNextTurn",
        lambda: METHODS["BridgeToNextTurn"].example.SerializeToString() + length_delimited(2, b"\x01" * 60_000_000),
        60,
        "previous_prompt_ids: 60000002 token ids exceed the limit of 262144 (--max-tokens)",
    ),
    "ParseResponse, 10M token ids": (
        "ParseResponse",
        lambda: (
            pb.ParseResponseRequest(model="qwen3").SerializeToString()
            + length_delimited(2, varint(151643) * 10_000_000)
        ),
        60,
        "token_ids: 10000000 token ids exceed the limit of 262144 (--max-tokens)",
    ),
    "a compact tensor of 2**32 - 1 copies in 12 KiB": (
        "BridgeToNextTurn",
        lambda: compact_bridge(rows=4096, span=1, repeats=2**32 - 1),
        60,
        f"{TENSOR}: tensors of {4096 * 3 * (2**32 - 1) * 4} bytes exceed the limit of 536870912 bytes "
        "(--max-tensor-mb)",
    ),
    "zero rows of 2**24 copies, 3 s deadline": (
        "BridgeToNextTurn",
        lambda: compact_bridge(rows=0, span=1, repeats=2**24),
        3,
        "previous_multi_modal_data: not a valid render.v1.MultiModalData (malformed tensor (dtype '<f4'): "
        "3 groups of 16777216 copies: the compact form has at most 256 of 16)",
    ),
    "64 KiB of codes of 2048 copies": (
        "BridgeToNextTurn",
        lambda: compact_bridge(rows=65536 // 3, span=1, repeats=2048),
        60,
        "previous_multi_modal_data: not a valid render.v1.MultiModalData (malformed tensor (dtype '<f4'): "
        "3 groups of 2048 copies: the compact form has at most 256 of 16)",
    ),
}


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", -1)]) as opened:
        yield opened


def refused_cheaply(server: ServerProcess, send: Callable[[], tuple[grpc.StatusCode, str]], expected: str) -> None:
    """`send()` answers INVALID_ARGUMENT (`expected`, if given) quickly, without the render processes'
    memory moving."""
    outcome: list[tuple[grpc.StatusCode, str]] = []
    elapsed: list[float] = []

    def timed() -> None:
        started = time.monotonic()
        outcome.append(send())
        elapsed.append(time.monotonic() - started)

    growth = memory_growth_mib(server.render_processes(), timed)
    assert outcome[0][0] == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert not expected or outcome[0][1] == expected, outcome
    assert max(growth.values()) < MAX_GROWTH_MIB, growth
    assert elapsed[0] < MAX_SECONDS, elapsed


@pytest.mark.parametrize("case", list(ISSUE_BOMBS))
def test_the_issue_s_bombs_are_refused_cheaply(server: ServerProcess, channel: grpc.Channel, case: str) -> None:
    name, make, deadline, expected = ISSUE_BOMBS[case]
    data = make()
    resident = {pid: status_kib(pid, "VmRSS") for pid in server.render_processes()}
    refused_cheaply(server, lambda: call(channel, METHODS[name], data, timeout=deadline), expected)
    # No work goes on behind the answer (zero rows of 2**24 copies kept a core busy 15 s past its deadline).
    busy = {pid: cpu_seconds(pid) for pid in server.render_processes()}
    time.sleep(1.0)
    assert all(cpu_seconds(pid) - busy[pid] < 0.5 for pid in busy), busy
    # Nor is the request kept once refused (an error's traceback held its bytes until the next GC).
    kept = {pid: (status_kib(pid, "VmRSS") - resident[pid]) / 1024 for pid in resident}
    assert max(kept.values()) < 16, kept
    method = METHODS[name]
    assert call(channel, method, method.example.SerializeToString()) == (grpc.StatusCode.OK, "")
    assert "Traceback" not in server.log()


# -- every repeated field of every request -------------------------------------------------------

BOMB_VALUES = 8_000_000  # 8-16 MB on the wire


def repeated_paths(
    descriptor: Descriptor, path: tuple[FieldDescriptor, ...] = ()
) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every repeated field reachable from `descriptor` through message fields (a type at most once a path)."""
    for field in descriptor.fields:
        here = (*path, field)
        if field.is_repeated:
            yield here
        inner = field.message_type
        if inner is not None and all(step.message_type is not inner for step in path) and inner is not descriptor:
            yield from repeated_paths(inner, here)


def bomb(path: tuple[FieldDescriptor, ...]) -> bytes:
    """Wire bytes setting the last field of `path` to BOMB_VALUES empty values (packed ids for numbers),
    inside one value of each field before it."""
    last = path[-1]
    if last.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        data = (varint(last.number << 3 | 2) + b"\x00") * BOMB_VALUES
    else:
        data = length_delimited(last.number, b"\x01" * BOMB_VALUES)
    for field in reversed(path[:-1]):
        data = length_delimited(field.number, data)
    return data


BOMBS = [
    (method, ".".join(field.name for field in path), path)
    for method in METHODS.values()
    if method.name != "ListModels"  # takes nothing: answered from what the server holds
    for path in repeated_paths(method.request_class.DESCRIPTOR)
]


@pytest.mark.parametrize(("method", "path_name", "path"), BOMBS, ids=[f"{m.name}-{p}" for m, p, _ in BOMBS])
def test_every_repeated_field_is_counted_before_it_is_parsed(
    server: ServerProcess, channel: grpc.Channel, method: Method, path_name: str, path: tuple[FieldDescriptor, ...]
) -> None:
    data = method.example.SerializeToString() + bomb(path)
    outcome: list[tuple[grpc.StatusCode, str]] = []

    def send() -> tuple[grpc.StatusCode, str]:
        outcome.append(call(channel, method, data))
        return outcome[-1]

    refused_cheaply(server, send, "")
    _, details = outcome[0]
    assert details.startswith(path[0].name) and "--max-" in details, details  # the field, and the limit's flag
    assert call(channel, method, method.example.SerializeToString()) == (grpc.StatusCode.OK, "")


def test_a_calls_batch_of_millions_of_calls_is_refused_at_once(server: ServerProcess, channel: grpc.Channel) -> None:
    batch = (varint(1 << 3 | 2) + b"\x00") * BOMB_VALUES  # calls = [{}] * 8 million
    path = f"/{METHODS['Calls'].example.DESCRIPTOR.file.services_by_name['RenderService'].full_name}/Calls"

    def send() -> tuple[grpc.StatusCode, str]:
        try:
            channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)(batch, timeout=120)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    refused_cheaply(server, send, "calls: more requests than the limit of 1024 (--max-batch-requests)")


@pytest.mark.parametrize("method", [m for m in METHODS.values() if m.batch], ids=lambda m: m.name)
def test_a_stream_batch_of_millions_of_requests_ends_the_stream_at_once(
    server: ServerProcess, channel: grpc.Channel, method: Method
) -> None:
    batch = (varint(1 << 3 | 2) + b"\x00") * BOMB_VALUES
    expected = "request batch after index 0: more requests than the limit of 1024 (--max-batch-requests)"
    refused_cheaply(server, lambda: call_batch(channel, method, batch), expected)
