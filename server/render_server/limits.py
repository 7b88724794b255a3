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
from render_wire.wireformat import TooManyValues, WireFormatError, count_fields

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
    max_batch_requests: int = 1024  # --max-batch-requests: requests per batch message of a stream

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


# -- before a request is parsed -------------------------------------------------------------


@dataclass(frozen=True)
class _Counted:
    """What a counted field holds and the limit on how many."""

    unit: str  # e.g. "token ids"
    limit: Callable[[Limits], int]
    flag: str
    packed: bool = False  # a packed repeated int field (else: one value per occurrence)


_IDS = _Counted("token ids", lambda limits: limits.max_tokens, "--max-tokens", packed=True)
_MESSAGES = _Counted("messages", lambda limits: limits.max_messages, "--max-messages")
_REQUESTS = _Counted("requests", lambda limits: limits.max_batch_requests, "--max-batch-requests")
_TOKEN_IDS = pb.TokenIds.IDS_FIELD_NUMBER


def _fields(message_class: Any, **counted: _Counted) -> dict[int, tuple[str, _Counted]]:
    return {message_class.DESCRIPTOR.fields_by_name[name].number: (name, what) for name, what in counted.items()}


# Per request message, its fields a limit bounds. prompt_ids is a TokenIds message: its ids are counted.
_COUNTED: dict[type, dict[int, tuple[str, _Counted]]] = {
    pb.RenderTrainingSampleRequest: _fields(pb.RenderTrainingSampleRequest, messages=_MESSAGES),
    pb.RenderRequest: _fields(pb.RenderRequest, messages=_MESSAGES),
    pb.ParseResponseRequest: _fields(pb.ParseResponseRequest, token_ids=_IDS, prompt_ids=_IDS),
    pb.BridgeToNextTurnRequest: _fields(
        pb.BridgeToNextTurnRequest, previous_prompt_ids=_IDS, previous_completion_ids=_IDS, new_messages=_MESSAGES
    ),
    pb.RenderTrainingSamplesRequest: _fields(pb.RenderTrainingSamplesRequest, requests=_REQUESTS),
    pb.RendersRequest: _fields(pb.RendersRequest, requests=_REQUESTS),
}
_NESTED_IDS = {pb.ParseResponseRequest.PROMPT_IDS_FIELD_NUMBER}

# Smaller requests are parsed and then counted: upb spends at most ~75 x their size on them.
COUNT_FROM_BYTES = 64 * 1024


def check_counts(
    message_class: Any, data: memoryview, limits: Limits, check: Callable[[], None] = lambda: None
) -> None:
    """Refuse a request whose token id lists, messages or batched requests are past their limits,
    counted on its wire bytes before it is parsed (`check` raises once the call is over).

    A malformed request is INVALID_ARGUMENT, as upb's refusal would be.
    """
    counted = _COUNTED.get(message_class)
    if not counted or len(data) < COUNT_FROM_BYTES:
        return
    limit = {number: what.limit(limits) for number, (_, what) in counted.items()}
    packed = {number for number, (_, what) in counted.items() if what.packed and number not in _NESTED_IDS}
    try:
        try:
            counts = count_fields(data, limit, packed=packed, check=check)
        except TooManyValues as exc:
            name, what = counted[exc.number]
            raise _too_many(what, name, exc.values, limits, exact=exc.exact) from None
        for number in _NESTED_IDS & counted.keys():
            name, what = counted[number]
            try:
                ids = sum(
                    count_fields(payload, {_TOKEN_IDS: limit[number]}, packed={_TOKEN_IDS}, check=check)[
                        _TOKEN_IDS
                    ].values
                    for payload in counts[number].payloads
                )
            except TooManyValues as exc:
                raise _too_many(what, name, exc.values, limits, exact=False) from None
            if ids > limit[number]:
                raise _too_many(what, name, ids, limits)
    except WireFormatError as exc:
        raise InvalidArgumentError(
            f"request: not a valid {message_class.DESCRIPTOR.full_name} protobuf message ({exc})"
        ) from None


def _too_many(what: _Counted, field: str, count: int, limits: Limits, exact: bool = True) -> InvalidArgumentError:
    most = what.limit(limits)
    amount = str(count) if exact else f"more than {most}"
    return invalid(field, f"{amount} {what.unit} exceed the limit of {most} ({what.flag})")


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
            if request.HasField(field):
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
