"""The render pipeline: request -> render_wire (decode) -> renderers -> render_wire (encode) -> answer.

`RenderPipeline.render` is the one path every render takes, whatever it
came by (unary call, stream item, HTTP POST): limits, metrics and error
handling live there. In a worker it runs in the render process, which
`answer`s the calls its gRPC process hands over (handoff.py, server.py).
Every answer is a response or a status from render_wire.errors; anything
unexpected is logged here and answered INTERNAL, without a traceback on the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from render_wire.calls import decode_calls, encode_call_result
from render_wire.errors import (
    CallCancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    RenderError,
    ResourceExhaustedError,
    invalid,
)
from render_wire.models import encode_renderer_info
from render_wire.pb import render_pb2 as pb
from render_wire.requests import (
    decode_bridge_request,
    decode_chat_template_kwargs,
    decode_parse_request,
    decode_render_request,
    decode_request,
    split_bridge_request,
)
from render_wire.samples import (
    encode_parsed_response,
    encode_rendered_tokens,
    encode_result,
    encode_sample,
    sample_response,
    tokens_response,
)
from render_wire.tensors import TensorBudget
from render_wire.wireformat import WireFormatError, WireMessage, split_field

from .handoff import Answer, Kind, Request
from .limits import (
    Limits,
    check_batch,
    check_counts,
    check_ids,
    check_request,
    check_text_before_decode,
)
from .metrics import IMAGES, LATENCY, REQUESTS, TOKENS, UNKNOWN_MODEL
from .registry import LoadedModel, ModelRegistry
from .rendering import bridge_to_next_turn, describe_renderer, parse_response, render_sample, render_tokens

T = TypeVar("T")
Body = bytes | memoryview  # a request's bytes (a Calls batch's calls are views of it)

log = logging.getLogger(__name__)

# A stream's answer to a batch is sent early once it holds this much.
_RESPONSE_FLUSH_BYTES = 8 * 1024 * 1024


class RenderPipeline:
    def __init__(self, registry: ModelRegistry, limits: Limits, *, compact_tensors: bool = True) -> None:
        """`compact_tensors`: send pixel tensors in their exact compact form (compact.py) where it holds."""
        self._registry = registry
        self._limits = limits
        self._compact_tensors = compact_tensors
        # The calls besides samples, by the kind the gRPC process hands them over as.
        self._calls: dict[Kind, tuple[str, Callable[[Body, Callable[[], None], _Labels], WireMessage]]] = {
            Kind.RENDER: ("Render", self._render_tokens),
            Kind.PARSE: ("ParseResponse", self._parse_response),
            Kind.BRIDGE: ("BridgeToNextTurn", self._bridge_to_next_turn),
            Kind.DESCRIBE: ("DescribeRenderer", self._describe_renderer),
        }

    # -- the one render path --------------------------------------------------

    def render(
        self,
        request: pb.RenderTrainingSampleRequest,
        *,
        method: str,
        received: float | None = None,
        stop_if_cancelled: Callable[[], None] = lambda: None,
    ) -> WireMessage:
        """`request`'s sample as a RenderedTrainingSample message, or raise the RenderError to answer with.

        `received`: when the call arrived (time.monotonic()), if before now.
        `stop_if_cancelled`: raises the status to answer once the caller left or the deadline passed.
        """

        def work(labels: _Labels) -> WireMessage:
            request_bytes = request.ByteSize()
            check_text_before_decode(request, request_bytes, self._limits)
            arguments = decode_request(request)
            model = self._model(arguments.model, labels)
            check_request(arguments, request_bytes, self._limits)
            sample = render_sample(model, arguments, self._limits, stop_if_cancelled)
            encoded = encode_sample(
                sample, compact_tensors=self._compact_tensors, held=frozenset(request.held_mm_hashes)
            )
            TOKENS.labels(labels.model).inc(len(sample.token_ids))
            if model.accepts_images:
                IMAGES.labels(labels.model).inc(sum(ref.kind == "image" for ref in arguments.media))
            return encoded

        return _measured(method, received, work)

    # -- the rest of the Renderer protocol -------------------------------------------

    def call(
        self,
        kind: Kind,
        body: bytes,
        *,
        method: str | None = None,
        received: float | None = None,
        stop_if_cancelled: Callable[[], None] = lambda: None,
    ) -> bytes:
        """The serialised answer to a Render, ParseResponse, BridgeToNextTurn or DescribeRenderer request.

        `method` labels its metrics (by default the gRPC method's name).
        """
        return self._answer_call(kind, body, method, received, stop_if_cancelled).join()

    def _answer_call(
        self,
        kind: Kind,
        body: Body,
        method: str | None,
        received: float | None,
        stop_if_cancelled: Callable[[], None],
    ) -> WireMessage:
        """The answer to a unary call's request (a sample's too), its tensors not yet joined in."""
        if kind == Kind.SAMPLE:
            message = self._request(pb.RenderTrainingSampleRequest, body, stop_if_cancelled)
            sample = self.render(
                message,
                method=method or "RenderTrainingSample",
                received=received,
                stop_if_cancelled=stop_if_cancelled,
            )
            return sample_response(sample)
        name, handle = self._calls[kind]
        return _measured(method or name, received, lambda labels: handle(body, stop_if_cancelled, labels))

    def _request(self, message_class: Any, body: Body, stop_if_cancelled: Callable[[], None]) -> Any:
        """`body` parsed as a `message_class`, once the lists it holds are known to be within the limits."""
        check_counts(message_class, memoryview(body), self._limits, stop_if_cancelled)
        return _parse(message_class, body, "request")

    def _render_tokens(self, body: Body, stop_if_cancelled: Callable[[], None], labels: _Labels) -> WireMessage:
        request = self._request(pb.RenderRequest, body, stop_if_cancelled)
        return tokens_response(self._rendered_tokens(request, stop_if_cancelled, labels))

    def _rendered_tokens(
        self, request: pb.RenderRequest, stop_if_cancelled: Callable[[], None], labels: _Labels
    ) -> WireMessage:
        """A Render request's answer: its RenderedTokens message (for Render and each item of Renders)."""
        request_bytes = request.ByteSize()
        check_text_before_decode(request, request_bytes, self._limits)
        arguments = decode_render_request(request)
        model = self._model(arguments.conversation.model, labels)
        check_request(arguments.conversation, request_bytes, self._limits)
        rendered = render_tokens(model, arguments, self._limits, stop_if_cancelled)
        TOKENS.labels(labels.model).inc(len(rendered.token_ids))
        return encode_rendered_tokens(
            rendered, compact_tensors=self._compact_tensors, held=frozenset(request.held_mm_hashes)
        )

    def _bridge_to_next_turn(self, body: Body, stop_if_cancelled: Callable[[], None], labels: _Labels) -> WireMessage:
        check_counts(pb.BridgeToNextTurnRequest, memoryview(body), self._limits, stop_if_cancelled)
        parsed = split_bridge_request(body)
        check_text_before_decode(parsed[0], parsed[2], self._limits)
        budget = TensorBudget(self._limits.max_tensor_bytes, "--max-tensor-mb", "previous_multi_modal_data")
        arguments = decode_bridge_request(body, budget=budget, check=stop_if_cancelled, parsed=parsed)
        model = self._model(arguments.conversation.model, labels)
        check_ids("previous_prompt_ids", len(arguments.previous_prompt_ids), self._limits)
        check_ids("previous_completion_ids", len(arguments.previous_completion_ids), self._limits)
        check_request(arguments.conversation, arguments.text_bytes, self._limits, field="new_messages")
        bridged = bridge_to_next_turn(model, arguments, self._limits, stop_if_cancelled)
        return tokens_response(
            None
            if bridged is None
            else encode_rendered_tokens(bridged, compact_tensors=self._compact_tensors, held=arguments.held_mm_hashes)
        )

    def _parse_response(self, body: Body, stop_if_cancelled: Callable[[], None], labels: _Labels) -> WireMessage:
        request = self._request(pb.ParseResponseRequest, body, stop_if_cancelled)
        check_text_before_decode(request, len(body), self._limits)
        check_ids("token_ids", len(request.token_ids), self._limits)
        check_ids("prompt_ids", len(request.prompt_ids.ids), self._limits)
        arguments = decode_parse_request(request)
        model = self._model(arguments.model, labels)
        parsed = parse_response(model, arguments, stop_if_cancelled)
        return WireMessage(encode_parsed_response(parsed).SerializeToString())

    def _describe_renderer(self, body: Body, stop_if_cancelled: Callable[[], None], labels: _Labels) -> WireMessage:
        request = self._request(pb.DescribeRendererRequest, body, stop_if_cancelled)
        check_text_before_decode(request, len(body), self._limits)
        model = self._model(request.model, labels)
        info = describe_renderer(model, decode_chat_template_kwargs(request))
        return WireMessage(encode_renderer_info(info).SerializeToString())

    def _model(self, model_id: str, labels: _Labels) -> LoadedModel:
        if not model_id:
            raise invalid("model", "missing")
        model = self._registry.get(model_id)
        labels.model = model.info.id
        return model

    # -- the render process's answers (handoff.py) ----------------------------------

    def answer(self, request: Request, is_cancelled: Callable[[], bool]) -> Generator[Answer, None, None]:
        """The answer to a call the gRPC process handed over: response bytes or a status."""

        def stop_if_cancelled() -> None:
            if is_cancelled():
                raise cancellation(request.deadline)

        if request.kind in (Kind.BATCH, Kind.RENDER_BATCH):
            yield from self._answer_batch(request, stop_if_cancelled)
            return
        try:
            if request.kind == Kind.CALLS:
                body = self._answer_calls(request, stop_if_cancelled)
            else:
                body = self._answer_call(request.kind, request.body, None, request.received, stop_if_cancelled)
            answer = Answer(grpc.StatusCode.OK, body.join())
        except RenderError as error:
            answer = Answer.of_error(error)
        yield answer

    def _answer_calls(self, request: Request, stop_if_cancelled: Callable[[], None]) -> WireMessage:
        """A Calls batch's answer: each call answered in turn as its own method would answer it
        (its metrics under that method's name), each within its own deadline."""
        check_counts(pb.CallsRequest, memoryview(request.body), self._limits, stop_if_cancelled)
        calls = decode_calls(request.body)
        check_batch(len(calls), "calls", self._limits)  # a small batch is not counted before (check_counts)
        response = WireMessage()
        for call in calls:
            deadline = (
                request.deadline if call.timeout is None else min(request.deadline, request.received + call.timeout)
            )

            def stop_call(deadline: float = deadline) -> None:
                stop_if_cancelled()
                if time.monotonic() > deadline:
                    raise cancellation(deadline)

            answer: WireMessage | RenderError
            try:
                answer = self._answer_call(_CALL_KINDS[call.method], call.request, None, request.received, stop_call)
            except RenderError as error:
                answer = error
            response.extend(encode_call_result(call.method, answer))
        return response

    def _answer_batch(self, request: Request, stop_if_cancelled: Callable[[], None]) -> Iterator[Answer]:
        """A batch's results, in parts of at most about _RESPONSE_FLUSH_BYTES.

        A RenderTrainingSamples batch's results are samples; a Renders batch's,
        RenderedTokens (its messages are the same on the wire, see encode_result).
        """
        index = request.first_index
        render_item: Callable[[Any], WireMessage]
        batch_class: type[pb.RenderTrainingSamplesRequest] | type[pb.RendersRequest]
        item_class: type[pb.RenderTrainingSampleRequest] | type[pb.RenderRequest]
        if request.kind == Kind.BATCH:
            batch_class, item_class = pb.RenderTrainingSamplesRequest, pb.RenderTrainingSampleRequest

            def render_item(item: Any) -> WireMessage:
                return self.render(
                    item, method="RenderTrainingSamples", received=request.received, stop_if_cancelled=stop_if_cancelled
                )
        else:
            batch_class, item_class = pb.RendersRequest, pb.RenderRequest

            def render_item(item: Any) -> WireMessage:
                return _measured(
                    "Renders", request.received, lambda labels: self._rendered_tokens(item, stop_if_cancelled, labels)
                )

        try:
            # Its requests cannot be counted, so no later index would be right: the stream ends.
            items = self._batch_items(batch_class, request.body, index, stop_if_cancelled)
        except RenderError as error:
            yield Answer.of_error(error, index)
            return
        response = WireMessage()  # a RenderTrainingSamplesResponse, or a RendersResponse
        for payload in items:
            try:
                stop_if_cancelled()
            except RenderError as error:  # the stream ends
                yield Answer.of_error(error, index)
                return
            outcome: WireMessage | RenderError
            try:
                # Each request parsed on its own, once its lists are counted: a bad one is its own result.
                outcome = render_item(self._request(item_class, payload, stop_if_cancelled))
            except RenderError as error:
                outcome = error
            response.extend(encode_result(index, outcome))
            index += 1
            if response.size >= _RESPONSE_FLUSH_BYTES:
                # Pixel tensors: do not pile up a batch of them.
                yield Answer(grpc.StatusCode.OK, response.join(), last=False)
                response = WireMessage()
        yield Answer(grpc.StatusCode.OK, response.join() if response.pieces else b"", next_index=index)

    def _batch_items(
        self, batch_class: Any, body: bytes, index: int, stop_if_cancelled: Callable[[], None]
    ) -> list[memoryview]:
        """A batch message's requests, as wire bytes; at most --max-batch-requests of them."""
        where = f"request batch after index {index}"
        try:
            check_counts(batch_class, memoryview(body), self._limits, stop_if_cancelled)
        except InvalidArgumentError as error:  # "requests: 2000 requests exceed ..." or "request: not a valid ..."
            raise InvalidArgumentError(f"{where}: {error.details.partition(': ')[2]}") from None
        try:
            rest, items = split_field(memoryview(body), batch_class.REQUESTS_FIELD_NUMBER)
            batch_class.FromString(rest)  # fields a newer client may add; or junk
        except (WireFormatError, DecodeError):
            raise InvalidArgumentError(
                f"{where}: not a valid {batch_class.DESCRIPTOR.full_name} protobuf message"
            ) from None
        check_batch(len(items), where, self._limits)  # a small batch is not counted before (check_counts)
        return items


# The kind each method of a Calls batch is answered as.
_CALL_KINDS = {
    "RenderTrainingSample": Kind.SAMPLE,
    "Render": Kind.RENDER,
    "ParseResponse": Kind.PARSE,
    "BridgeToNextTurn": Kind.BRIDGE,
}


class _Labels:
    """A call's metric labels, filled in as they become known."""

    model: str = UNKNOWN_MODEL


def _measured(method: str, received: float | None, work: Callable[[_Labels], T]) -> T:
    """`work`'s result, counted and timed under `method`; what it raises becomes the RenderError to answer."""
    started = time.monotonic() if received is None else received
    labels, code = _Labels(), grpc.StatusCode.OK
    try:
        return work(labels)
    except Exception as exc:
        error = as_render_error(exc)
        code = error.code
        try:
            raise error from None
        finally:
            # Else this frame, in the error's traceback, would hold the error: a cycle that keeps
            # every frame of the traceback (a 64 MiB request's bytes) until the garbage collector runs.
            del error
    finally:
        REQUESTS.labels(method, labels.model, code.name).inc()
        LATENCY.labels(method, labels.model).observe(time.monotonic() - started)


def _parse(message_class: Any, data: Body, field: str) -> Any:
    try:
        return message_class.FromString(data)
    except DecodeError:
        raise InvalidArgumentError(
            f"{field}: not a valid {message_class.DESCRIPTOR.full_name} protobuf message"
        ) from None


def cancellation(deadline: float) -> RenderError:
    """Why a call is not rendered: its deadline passed (DEADLINE_EXCEEDED), or its caller left (CANCELLED)."""
    if time.monotonic() >= deadline:
        return DeadlineExceededError("the call's deadline passed before it was rendered")
    return CallCancelledError("the caller cancelled the call before it was rendered")


def as_render_error(exc: Exception) -> RenderError:
    """The status to answer `exc` with; unexpected exceptions are logged and INTERNAL.

    Running out of memory is RESOURCE_EXHAUSTED (retry later, elsewhere): the limits keep
    any one request well below a process's memory, but not a pod's share of several.
    """
    if isinstance(exc, RenderError):
        return exc
    if isinstance(exc, MemoryError):
        log.warning("out of memory answering a request")
        return ResourceExhaustedError("the server ran out of memory answering this request; retry later")
    log.exception("unexpected error rendering a request")
    return RenderError("internal error; the server log has the details")
