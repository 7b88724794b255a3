"""What one request may ask of the server, and the checks that enforce it.

Every limit has a flag (cli.py) and a default below. A request over a limit is
refused with INVALID_ARGUMENT and a one-line message naming the field, the
limit and its value, before the work the limit guards is done, and before the
memory it guards is spent: image pixels are counted from the file's header,
before the image is decoded; token ids, messages and batched requests are
counted on the request's wire bytes (`check_counts`), before upb parses them
(each id costs 4 bytes there and ~36 as a Python int, an empty message ~150 for
2 on the wire); JSON texts are measured before they are parsed
(`check_text_before_decode`); tensors from their shapes before they are
allocated (render_wire.tensors.TensorBudget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from render_wire.errors import InvalidArgumentError, invalid
from render_wire.pb import render_pb2 as pb
from render_wire.requests import Conversation, RenderArguments
from render_wire.wireformat import Census, TooManyValues, WireFormatError, count_values

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-request and per-worker limits; see the README for each flag."""

    max_request_bytes: int = 64 * MiB  # --max-request-mb: one gRPC message (answered RESOURCE_EXHAUSTED by gRPC)
    max_messages: int = 4096  # --max-messages: messages per request
    max_images: int = 64  # --max-images: image parts per request
    max_image_bytes: int = 32 * MiB  # --max-image-mb: encoded bytes per image
    max_image_pixels: int = 8192 * 8192  # --max-image-pixels: width x height per image
    # --image-formats: the Pillow formats decoded (JPEG includes its MPO kind); what users send
    # VLMs, and no container whose reader decodes embedded images (ICO, ICNS) unless asked for.
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    max_tokens: int = 262_144  # --max-tokens: rendered tokens per sample
    # --max-text-bytes-per-token: a request's text (all but its media bytes) may be at most
    # max_tokens times this, so that text which cannot fit is refused before it is tokenized.
    max_text_bytes_per_token: int = 16
    max_concurrent_rpcs: int = 256  # --max-concurrent-rpcs: calls per worker at once (a stream is one)
    # --max-tensor-mb: what the tensors of one request (BridgeToNextTurn's previous_multi_modal_data)
    # may decode to, counted from dtype, shape and repeats before anything is allocated. 8 x the
    # default request: float32 pixels in compact form (two temporal copies) are 1/8 of their bytes.
    max_tensor_bytes: int = 512 * MiB
    max_batch_requests: int = 1024  # --max-batch-requests: requests per batch message of a stream, calls per Calls

    @property
    def max_text_bytes(self) -> int:
        """A request's text may be at most this long (--max-tokens x --max-text-bytes-per-token)."""
        return self.max_tokens * self.max_text_bytes_per_token


def check_request(
    arguments: RenderArguments | Conversation, text_bytes: int, limits: Limits, field: str = "messages"
) -> None:
    """Refuse a decoded request whose `field` (its messages), `text_bytes` long on the wire with
    their media, ask for more than the limits allow."""
    if len(arguments.messages) > limits.max_messages:
        raise _too_many(_MESSAGES, field, len(arguments.messages), limits)
    images = [ref for ref in arguments.media if ref.kind == "image"]
    if len(images) > limits.max_images:
        raise invalid(
            images[limits.max_images].field,
            f"{len(images)} images exceed the limit of {limits.max_images} per request (--max-images)",
        )
    for ref in images:
        size = len(ref.part["image"])
        if size > limits.max_image_bytes:
            raise invalid(
                f"{ref.field}.data", f"{size} bytes exceed the limit of {limits.max_image_bytes} bytes (--max-image-mb)"
            )
    # Tokenizing is linear in the text (~1 MB/s) and --max-tokens is only known
    # to be exceeded afterwards; text this long cannot fit in any realistic
    # tokenization (the corpus has at most ~6 bytes per token), so refuse it unread.
    check_text_bytes(text_bytes - sum(len(ref.part[ref.kind]) for ref in arguments.media), field, limits)


def check_text_bytes(text_bytes: int, field: str, limits: Limits) -> None:
    if text_bytes > limits.max_text_bytes:
        raise invalid(
            field,
            f"{text_bytes} bytes of text exceed the limit of {limits.max_text_bytes} bytes "
            f"(--max-tokens {limits.max_tokens} x --max-text-bytes-per-token {limits.max_text_bytes_per_token})",
        )


def check_ids(field: str, count: int, limits: Limits) -> None:
    """A list of token ids a request carries (ParseResponse's, BridgeToNextTurn's) is a sample's worth at most."""
    if count > limits.max_tokens:
        raise _too_many(_IDS, field, count, limits)


def check_batch(requests: int, field: str, limits: Limits) -> None:
    if requests > limits.max_batch_requests:
        raise _too_many(_REQUESTS, field, requests, limits)


# -- before a request is parsed -------------------------------------------------------------


@dataclass(frozen=True)
class _Counted:
    """A field with a limit of its own on how many values it holds."""

    unit: str  # e.g. "token ids"
    limit: Callable[[Limits], int]
    flag: str


_IDS = _Counted("token ids", lambda limits: limits.max_tokens, "--max-tokens")
_MESSAGES = _Counted("messages", lambda limits: limits.max_messages, "--max-messages")
_REQUESTS = _Counted("requests", lambda limits: limits.max_batch_requests, "--max-batch-requests")

# The fields a limit of their own bounds, by full name, and how errors name them.
_COUNTED: dict[str, tuple[str, _Counted]] = {
    **{
        f"render.v1.{name}.messages": ("messages", _MESSAGES)
        for name in ("RenderTrainingSampleRequest", "RenderRequest")
    },
    "render.v1.BridgeToNextTurnRequest.new_messages": ("new_messages", _MESSAGES),
    "render.v1.ParseResponseRequest.token_ids": ("token_ids", _IDS),
    "render.v1.TokenIds.ids": ("prompt_ids", _IDS),  # ParseResponseRequest.prompt_ids's
    "render.v1.BridgeToNextTurnRequest.previous_prompt_ids": ("previous_prompt_ids", _IDS),
    "render.v1.BridgeToNextTurnRequest.previous_completion_ids": ("previous_completion_ids", _IDS),
    **{
        f"render.v1.{name}.requests": ("requests", _REQUESTS)
        for name in ("RenderTrainingSamplesRequest", "RendersRequest")
    },
    "render.v1.CallsRequest.calls": ("calls", _REQUESTS),
}
# A batch's requests are counted here, and each one's contents as it is taken (pipeline.py).
_BATCHED = frozenset(
    {
        "render.v1.RenderTrainingSamplesRequest.requests",
        "render.v1.RendersRequest.requests",
        "render.v1.CallsRequest.calls",
    }
)

# Smaller requests are parsed and then counted: upb spends at most ~75 x their size on them.
COUNT_FROM_BYTES = 64 * 1024


def max_values(limits: Limits) -> int:
    """The most values (sub-messages, strings, numbers but token ids) one request may hold:
    64 a message on average, at --max-messages; each request of a batch is counted alone."""
    return 64 * limits.max_messages


def check_counts(
    message_class: Any, data: memoryview, limits: Limits, check: Callable[[], None] = lambda: None
) -> None:
    """Refuse a request past its limits on values, counted on its wire bytes before upb parses it:
    token ids, messages and batched requests each against their own limit, and everything it
    holds against `max_values` (`check` runs as it goes, raising once the call is over).

    A malformed request is INVALID_ARGUMENT, as upb's refusal would be.
    """
    if len(data) < COUNT_FROM_BYTES:
        return
    census = Census(
        most=max_values(limits),
        limits={name: what.limit(limits) for name, (_, what) in _COUNTED.items()},
        opaque=_BATCHED,
        check=check,
    )
    try:
        count_values(data, message_class.DESCRIPTOR, census)
    except TooManyValues as exc:
        if exc.limit is not None:
            name, what = _COUNTED[exc.limit]
            raise _too_many(what, name, exc.values, limits, exact=exc.exact) from None
        raise invalid(
            exc.field,
            f"more values than the limit of {census.most} in one request (sub-messages, strings, numbers "
            f"other than token ids: 64 x --max-messages {limits.max_messages})",
        ) from None
    except WireFormatError as exc:
        raise InvalidArgumentError(
            f"request: not a valid {message_class.DESCRIPTOR.full_name} protobuf message ({exc})"
        ) from None


def _too_many(what: _Counted, field: str, count: int, limits: Limits, exact: bool = True) -> InvalidArgumentError:
    most = what.limit(limits)
    if not exact:  # counting stopped at the first past the limit
        return invalid(field, f"more {what.unit} than the limit of {most} ({what.flag})")
    return invalid(field, f"{count} {what.unit} exceed the limit of {most} ({what.flag})")


def check_text_before_decode(request: Any, request_bytes: int, limits: Limits) -> None:
    """Refuse a parsed request, `request_bytes` long, whose text is past the limit, before its
    JSON texts and messages are decoded.

    `check_request` counts the text exactly once decoded; this counts each media part's
    tags as media too, and runs only when the request could be over, so it never refuses
    more than that does, and keeps a large JSON text (tools, kwargs, extras) from being parsed.
    """
    if request_bytes <= limits.max_text_bytes:
        return
    if isinstance(request, (pb.ParseResponseRequest, pb.DescribeRendererRequest)):
        for field in ("tools_json", "chat_template_kwargs_json"):
            if field in request.DESCRIPTOR.fields_by_name and request.HasField(field):
                check_text_bytes(len(getattr(request, field).encode()), field, limits)
        return
    field = "new_messages" if isinstance(request, pb.BridgeToNextTurnRequest) else "messages"
    not_text = sum(
        part.ByteSize()
        for message in getattr(request, field)
        if message.WhichOneof("content") == "parts"
        for part in message.parts.parts
        if part.WhichOneof("part") in ("image", "video")
    )
    if isinstance(request, pb.BridgeToNextTurnRequest):
        ids = pb.BridgeToNextTurnRequest(
            previous_prompt_ids=request.previous_prompt_ids, previous_completion_ids=request.previous_completion_ids
        )
        not_text += ids.ByteSize()
    check_text_bytes(request_bytes - not_text, field, limits)


def check_pixels(width: int, height: int, field: str, limits: Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise invalid(
            field, f"{width}x{height} pixels exceed the limit of {limits.max_image_pixels} pixels (--max-image-pixels)"
        )


def check_tokens(count: int, limits: Limits) -> None:
    """A rendered sample (or RenderedTokens) is at most --max-tokens long."""
    if count > limits.max_tokens:
        raise invalid(
            "messages", f"the sample has {count} tokens, over the limit of {limits.max_tokens} (--max-tokens)"
        )
