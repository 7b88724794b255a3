"""A batch of calls (Calls), both directions: several calls' requests in, each one's answer out.

Client side, `encode_calls` joins calls already serialised for their own
methods into one CallsRequest, and `decode_call_results` hands each call its
own method's answer back (the bytes that method would have answered, as a view
of the batch's) or its error. Server side, `decode_calls` gives each call's
method, request bytes and deadline, and `encode_call_result` wraps its answer.
Requests and answers are never re-serialised on the way: a call's bytes are the
ones its own method takes, so every other codec applies to them unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from .errors import RenderError, invalid
from .pb import render_pb2 as pb
from .samples import decode_error, encode_error
from .wireformat import WireFormatError, WireMessage, split_field, split_fields, varint

# The methods a batch carries, by the number of their field in CallRequest's and CallResult's oneof.
METHODS: Final = {
    "RenderTrainingSample": pb.CallRequest.SAMPLE_FIELD_NUMBER,
    "Render": pb.CallRequest.RENDER_FIELD_NUMBER,
    "ParseResponse": pb.CallRequest.PARSE_FIELD_NUMBER,
    "BridgeToNextTurn": pb.CallRequest.BRIDGE_FIELD_NUMBER,
}
_METHOD_BY_NUMBER = {number: method for method, number in METHODS.items()}
_ERROR = pb.CallResult.ERROR_FIELD_NUMBER
assert all(getattr(pb.CallResult, f"{name.upper()}_FIELD_NUMBER") == number for name, number in (
    ("sample", METHODS["RenderTrainingSample"]),
    ("render", METHODS["Render"]),
    ("parse", METHODS["ParseResponse"]),
    ("bridge", METHODS["BridgeToNextTurn"]),
))  # fmt: skip
_TIMEOUT_TAG = varint(pb.CallRequest.TIMEOUT_FIELD_NUMBER << 3 | 1)  # a double: fixed 64 bits
_DOUBLE = struct.Struct("<d")
_CALLS = pb.CallsRequest.CALLS_FIELD_NUMBER
_RESULTS = pb.CallsResponse.RESULTS_FIELD_NUMBER


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


def encode_calls(calls: list[tuple[str, bytes, float | None]]) -> bytes:
    """A serialised CallsRequest of (method, its serialised request, seconds it may take or None)."""
    batch = WireMessage()
    for method, request, timeout in calls:
        call = WireMessage()
        call.append_bytes_field(METHODS[method], request)
        if timeout is not None:
            call.extend(WireMessage(_TIMEOUT_TAG + _DOUBLE.pack(max(0.0, timeout))))
        batch.append_message_field(_CALLS, call)
    return batch.join()


def decode_call_results(data: bytes, methods: list[str]) -> list[memoryview | RenderError]:
    """For each call of a batch, in order (`methods` names each one's method): the bytes of its own
    method's answer, or its error. RenderError if the answer does not match the batch."""
    try:
        rest, results = split_field(memoryview(data), _RESULTS)
        pb.CallsResponse.FromString(rest)  # fields a newer server may add; or junk
        if len(results) != len(methods):
            raise WireFormatError(f"{len(results)} results for {len(methods)} calls")
        return [_decode_result(result, method) for result, method in zip(results, methods, strict=True)]
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


def _decode_result(data: memoryview, method: str) -> memoryview | RenderError:
    number = METHODS[method]
    rest, answers = split_field(data, number)
    rest, errors = split_field(memoryview(rest), _ERROR)
    pb.CallResult.FromString(rest)
    if len(answers) + len(errors) != 1:
        raise WireFormatError(f"a result of a {method} call carries {len(answers)} answers and {len(errors)} errors")
    if errors:
        return decode_error(pb.Error.FromString(bytes(errors[0])))
    return answers[0]


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call of a batch as the server gets it."""

    method: str  # a key of METHODS
    request: memoryview  # its serialised request, as its own method takes it
    timeout: float | None  # seconds from the batch's arrival; None: the batch's deadline only


def decode_calls(data: bytes) -> list[Call]:
    """The calls of a serialised CallsRequest; InvalidArgumentError naming the call that is malformed."""
    try:
        rest, calls = split_field(memoryview(data), _CALLS)
        pb.CallsRequest.FromString(rest)
    except (WireFormatError, DecodeError) as exc:
        raise invalid("request", f"not a valid render.v1.CallsRequest ({exc})") from None
    return [_decode_call(call, f"calls[{index}]") for index, call in enumerate(calls)]


def _decode_call(data: memoryview, field: str) -> Call:
    requests: list[tuple[str, memoryview]] = []
    try:
        rest, payloads = split_fields(data, _METHOD_BY_NUMBER)
        requests.extend((_METHOD_BY_NUMBER[number], payload) for number, payload in payloads)
        call = pb.CallRequest.FromString(rest)
    except (WireFormatError, DecodeError) as exc:
        raise invalid(field, f"not a valid render.v1.CallRequest ({exc})") from None
    if len(requests) != 1:
        raise invalid(field, "set exactly one of sample, render, parse and bridge")
    method, request = requests[0]
    timeout = call.timeout if call.HasField("timeout") else None
    if timeout is not None and not timeout >= 0:  # NaN too
        raise invalid(f"{field}.timeout", f"must be a number of seconds, at least 0; got {timeout}")
    return Call(method, request, timeout)


def encode_call_result(method: str, answer: WireMessage | RenderError) -> WireMessage:
    """One `results` entry of a CallsResponse: a call's answer (its own method's response message) or its error."""
    result = WireMessage()
    if isinstance(answer, RenderError):
        result.append_bytes_field(_ERROR, encode_error(answer).SerializeToString())
    else:
        result.append_message_field(METHODS[method], answer)
    entry = WireMessage()
    entry.append_message_field(_RESULTS, result)
    return entry
