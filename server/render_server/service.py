"""The render service: request -> convert -> render -> convert -> response.

`RenderService.render` is the one path every render takes, whatever it
came by (unary call, stream item, HTTP POST): limits, metrics and error
handling live there. In a worker it runs in the render process, which
`answer`s the calls its gRPC process hands over (handoff.py, servicer.py).
Every answer is a response or a status from render_client.errors; anything
unexpected is logged here and answered INTERNAL, without a traceback on the wire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from render_client._pb import render_pb2 as pb
from render_client.convert import decode_request, encode_response, encode_result, encode_sample
from render_client.errors import CallCancelledError, InvalidArgumentError, RenderError
from render_client.wire import WireMessage

from .handoff import Answer, Kind, Request
from .limits import Limits, check_request
from .metrics import IMAGES, LATENCY, REQUESTS, TOKENS, UNKNOWN_MODEL
from .registry import ModelRegistry
from .rendering import render_sample

log = logging.getLogger(__name__)

# A stream's answer to a batch is sent early once it holds this much.
_RESPONSE_FLUSH_BYTES = 8 * 1024 * 1024


class RenderService:
    def __init__(self, registry: ModelRegistry, limits: Limits) -> None:
        self._registry = registry
        self._limits = limits

    # -- the one render path --------------------------------------------------

    def render(
        self,
        request: pb.RenderTrainingSampleRequest,
        *,
        method: str,
        received: float | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> WireMessage:
        """`request`'s sample as a RenderedTrainingSample message, or raise the RenderError to answer with.

        `received`: when the call arrived (time.monotonic()), if before now.
        """
        started = time.monotonic() if received is None else received
        model_label, code = UNKNOWN_MODEL, grpc.StatusCode.OK
        try:
            arguments = decode_request(request)
            model = self._registry.get(arguments.model)
            model_label = model.info.id
            check_request(arguments, self._limits)
            sample = render_sample(model, arguments, self._limits, is_cancelled)
            encoded = encode_sample(sample)
            TOKENS.labels(model_label).inc(len(sample.token_ids))
            if model.accepts_images:
                IMAGES.labels(model_label).inc(sum(ref.kind == "image" for ref in arguments.media))
            return encoded
        except Exception as exc:
            error = as_render_error(exc)
            code = error.code
            raise error from None
        finally:
            REQUESTS.labels(method, model_label, code.name).inc()
            LATENCY.labels(method, model_label).observe(time.monotonic() - started)

    # -- the render process's answers (handoff.py) ----------------------------------

    def answer(self, request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        """The answer to a call the gRPC process handed over: response bytes or a status."""
        if request.kind == Kind.SAMPLE:
            try:
                message = _parse(pb.RenderTrainingSampleRequest, request.body, "request")
                sample = self.render(
                    message, method="RenderTrainingSample", received=request.received, is_cancelled=is_cancelled
                )
                answer = Answer(grpc.StatusCode.OK, encode_response(sample))
            except RenderError as error:
                answer = Answer.of_error(error)
            yield answer
        else:
            yield from self._answer_batch(request, is_cancelled)

    def _answer_batch(self, request: Request, is_cancelled: Callable[[], bool]) -> Iterator[Answer]:
        """A batch's results, in parts of at most about _RESPONSE_FLUSH_BYTES."""
        index = request.first_index
        try:
            # Its requests cannot be counted, so no later index would be right: the stream ends.
            batch = _parse(pb.RenderTrainingSamplesRequest, request.body, f"request batch after index {index}")
        except RenderError as error:
            yield Answer.of_error(error, index)
            return
        response = WireMessage()  # a RenderTrainingSamplesResponse
        for item in batch.requests:
            if is_cancelled():
                yield Answer.of_error(CallCancelledError("the stream was cancelled"), index)
                return
            outcome: WireMessage | RenderError
            try:
                outcome = self.render(
                    item, method="RenderTrainingSamples", received=request.received, is_cancelled=is_cancelled
                )
            except RenderError as error:
                outcome = error
            response.extend(encode_result(index, outcome))
            index += 1
            if response.size >= _RESPONSE_FLUSH_BYTES:
                # Pixel tensors: do not pile up a batch of them.
                yield Answer(grpc.StatusCode.OK, response.join(), last=False)
                response = WireMessage()
        yield Answer(grpc.StatusCode.OK, response.join() if response.pieces else b"", next_index=index)


def _parse(message_class: Any, data: bytes, field: str) -> Any:
    try:
        return message_class.FromString(data)
    except DecodeError:
        raise InvalidArgumentError(
            f"{field}: not a valid {message_class.DESCRIPTOR.full_name} protobuf message"
        ) from None


def as_render_error(exc: Exception) -> RenderError:
    """The status to answer `exc` with; unexpected exceptions are logged and INTERNAL."""
    if isinstance(exc, RenderError):
        return exc
    log.exception("unexpected error rendering a request")
    return RenderError("internal error; the server log has the details")
