"""The HTTP port's JSON calls, answered in the HTTP process's render process.

A POST's body is a request in the protobuf JSON mapping; the answer is the
response in the same mapping. The HTTP process only moves bytes (http_app.py)
and hands each body here through handoff.py, as a gRPC process hands its
requests to its render processes: parsing tens of MiB of JSON holds the GIL
for seconds (json.loads is one C call), and the HTTP process's event loop must
stay free to answer /healthz, /readyz and /metrics meanwhile.

The JSON is bounded before it is parsed into Python values (each id ~36 bytes
as an int in a list, each empty object ~64): the token id lists are counted in
the body's bytes (`_check_id_arrays`), and the numbers, objects and arrays of
the whole body are counted as json.loads makes them, up to what a request within
the limits can hold (`json_values_limit`). Then the request takes the same road
as a gRPC call: RenderPipeline.render (samples) or RenderPipeline.call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from render_wire.errors import InvalidArgumentError, RenderError, invalid
from render_wire.jsonvalue import DuplicateKey, object_without_duplicates
from render_wire.pb import render_pb2 as pb
from render_wire.samples import encode_response

from .handoff import Answer, Kind, Request
from .limits import Limits, check_ids
from .metrics import IN_FLIGHT
from .pipeline import RenderPipeline, cancellation


@dataclass(frozen=True)
class Route:
    """A POST route: a gRPC method's request and response in the protobuf JSON mapping."""

    method: str
    request_class: Any
    response_class: Any
    kind: Kind  # how the HTTP process hands it over; SAMPLE: RenderPipeline.render, else RenderPipeline.call


ROUTES = {
    "/v1/render_training_sample": Route(
        "RenderTrainingSample", pb.RenderTrainingSampleRequest, pb.RenderTrainingSampleResponse, Kind.SAMPLE
    ),
    "/v1/render": Route("Render", pb.RenderRequest, pb.RenderResponse, Kind.RENDER),
    "/v1/parse_response": Route("ParseResponse", pb.ParseResponseRequest, pb.ParseResponseResponse, Kind.PARSE),
    "/v1/bridge_to_next_turn": Route(
        "BridgeToNextTurn", pb.BridgeToNextTurnRequest, pb.BridgeToNextTurnResponse, Kind.BRIDGE
    ),
    "/v1/describe_renderer": Route("DescribeRenderer", pb.DescribeRendererRequest, pb.RendererInfo, Kind.DESCRIBE),
}
_BY_KIND = {route.kind: route for route in ROUTES.values()}


def json_values_limit(limits: Limits) -> int:
    """The most numbers, objects or arrays (each kind counted alone) a JSON body may hold:
    both token id lists of a request at their limit, and one more per 16 bytes of its text."""
    return 2 * limits.max_tokens + limits.max_text_bytes // 16


class JsonCalls:
    """Answers the HTTP process's calls (handoff.Request, its body JSON) with JSON bodies."""

    def __init__(self, pipeline: RenderPipeline, limits: Limits) -> None:
        self._pipeline = pipeline
        self._limits = limits

    def answer(self, request: Request, is_cancelled: Callable[[], bool]) -> Generator[Answer, None, None]:
        """The JSON answer to a call the HTTP process handed over, or its status."""
        route = _BY_KIND[request.kind]
        method = f"http:{route.method}"  # its label in the metrics

        def stop_if_cancelled() -> None:
            if is_cancelled():
                raise cancellation(request.deadline)

        try:
            with IN_FLIGHT.labels(method).track_inprogress():
                message = self.parse(request.body, route.request_class)
                if route.kind is Kind.SAMPLE:
                    answer = encode_response(
                        self._pipeline.render(message, method=method, stop_if_cancelled=stop_if_cancelled)
                    )
                else:
                    answer = self._pipeline.call(
                        route.kind, message.SerializeToString(), method=method, stop_if_cancelled=stop_if_cancelled
                    )
            response = route.response_class.FromString(answer)
            text = json_format.MessageToJson(response, preserving_proto_field_name=True, indent=None)
            yield Answer(grpc.StatusCode.OK, text.encode())
        except RenderError as error:
            yield Answer.of_error(error)

    def parse(self, body: bytes, request_class: Any) -> Any:
        """`body`, JSON, as a `request_class` message; InvalidArgumentError naming what is wrong."""
        most = json_values_limit(self._limits)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgumentError(f"request: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        _check_id_arrays(text, self._limits)
        if text.count("[") > most:  # arrays are made without a hook to count them; this counts those in strings too
            raise invalid("request", f"more than {most} JSON arrays, more than a request within the limits holds")
        counter = _ValueCounter(most)
        try:
            values = json.loads(
                text, object_pairs_hook=counter.object, parse_int=counter.integer, parse_float=counter.real
            )
        except _TooManyValues as exc:
            raise invalid(
                "request", f"more than {most} JSON {exc.args[0]}, more than a request within the limits holds"
            ) from None
        except DuplicateKey as exc:
            raise invalid("request", f"duplicate key {exc.args[0]!r}") from None
        except RecursionError:
            raise invalid("request", "JSON nested too deeply") from None
        except ValueError as exc:
            raise invalid("request", f"not valid JSON ({exc})") from None
        if type(values) is not dict:
            raise invalid("request", f"must be a JSON object, not {type(values).__name__}")
        message = request_class()
        try:
            json_format.ParseDict(values, message)
        except json_format.ParseError as exc:
            raise invalid("request", str(exc).splitlines()[0] if str(exc) else "not a valid request") from None
        except Exception as exc:  # what json_format.Parse would have wrapped as a ParseError
            raise invalid("request", f"{type(exc).__name__}: {exc}") from None
        return message


class _TooManyValues(Exception):
    pass


class _ValueCounter:
    """json.loads hooks that count the numbers and objects it makes, refusing duplicate keys
    as json_format.Parse does; past `most` of either, _TooManyValues stops the parse."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._numbers = 0
        self._objects = 0

    def object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self._objects += 1
        if self._objects > self._most:
            raise _TooManyValues("objects")
        return object_without_duplicates(pairs)

    def integer(self, text: str) -> int:
        self._count_number()
        return int(text)

    def real(self, text: str) -> float:
        self._count_number()
        return float(text)

    def _count_number(self) -> None:
        self._numbers += 1
        if self._numbers > self._most:
            raise _TooManyValues("numbers")


# A token id list's key (either spelling of the JSON mapping) and its array's opening bracket.
# A quote inside a JSON string is escaped, so an unescaped one starts a key or a string.
_ID_ARRAY = re.compile(
    r'(?<!\\)"(token_ids|tokenIds|ids|previous_prompt_ids|previousPromptIds'
    r'|previous_completion_ids|previousCompletionIds)"\s*:\s*\['
)
_ID_FIELDS = {
    "tokenIds": "token_ids",
    "ids": "prompt_ids",
    "previousPromptIds": "previous_prompt_ids",
    "previousCompletionIds": "previous_completion_ids",
}


def _check_id_arrays(text: str, limits: Limits) -> None:
    """Refuse a body whose token id lists are past --max-tokens, counted in its text.

    An id list holds numbers only, so its array ends at the next "]" and holds one more
    id than commas. Runs of C code (the regex, find, count): milliseconds per MiB.
    """
    for match in _ID_ARRAY.finditer(text):
        end = text.find("]", match.end())
        if end < 0:
            return  # not valid JSON: json.loads says where
        ids = text.count(",", match.end(), end) + 1
        check_ids(_ID_FIELDS.get(match.group(1), match.group(1)), ids, limits)
