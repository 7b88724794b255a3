"""Answers, both directions: renderers' results <-> RenderedTrainingSample, RenderedTokens,
ParsedResponse and the stream results that carry them.

Server side, `encode_*` turn what a renderer returned into the answer's bytes;
client side, `decode_*` turn them into what the call returns in-process
(renderers' own classes where renderers is importable, types.result_types).
Decoding walks the wire format down to each tensor (tensors.py) and shares its
bytes; everything else is parsed by upb.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar, overload

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from .errors import (
    InvalidArgumentError,
    RenderError,
    UnimplementedError,
    decode_error_detail,
    encode_error_detail,
    error_from_status,
)
from .jsonvalue import JSONValue, dump_json, load_json
from .pb import render_pb2 as pb
from .tensors import decode_multi_modal_data, encode_multi_modal_data
from .types import (
    ParsedResponseLike,
    ParsedToolCallLike,
    RenderedTokensLike,
    RenderedTrainingSample,
    RenderedTrainingSampleLike,
    result_types,
)
from .wireformat import WireFormatError, WireMessage, as_list, merged, split_field

# ---------------------------------------------------------------------------
# Server side: renderers result -> response
# ---------------------------------------------------------------------------


def encode_sample(
    sample: RenderedTrainingSampleLike, *, compact_tensors: bool = False, held: Collection[str] = ()
) -> WireMessage:
    """A renderers.RenderedTrainingSample (or a mirror of one) as a RenderedTrainingSample message.

    Its arrays stay in place until the message is joined (see wireformat.py); with
    `compact_tensors`, pixel tensors go in compact form where it is exact; the items
    whose hash is in `held` go without them (the client holds them).
    """
    loss_mask = packed_bools(sample.loss_mask)
    if loss_mask is None:
        message = WireMessage(
            pb.RenderedTrainingSample(token_ids=sample.token_ids, loss_mask=sample.loss_mask).SerializeToString()
        )
    else:
        message = WireMessage(pb.RenderedTrainingSample(token_ids=sample.token_ids).SerializeToString())
        if loss_mask:  # upb leaves an empty repeated field out
            message.append_bytes_field(pb.RenderedTrainingSample.LOSS_MASK_FIELD_NUMBER, loss_mask)
    if sample.multi_modal_data is not None:
        message.append_message_field(
            pb.RenderedTrainingSample.MULTI_MODAL_DATA_FIELD_NUMBER,
            encode_multi_modal_data(sample.multi_modal_data, compact_tensors=compact_tensors, held=held),
        )
    if sample.mm_token_type_ids is not None:
        message.append_message_field(
            pb.RenderedTrainingSample.MM_TOKEN_TYPE_IDS_FIELD_NUMBER,
            WireMessage(pb.TokenTypeIds(ids=sample.mm_token_type_ids).SerializeToString()),
        )
    return message


def packed_bools(values: object) -> bytes | None:
    """A packed repeated bool field's payload, or None to leave the values to upb.

    A bool's varint is one byte, 0 or 1, so for a list of bools `bytes` writes
    the payload in C: 3x faster than upb taking them one by one. Anything
    else (other values, other sequences) goes through upb and its checks.
    """
    if type(values) is not list:
        return None
    try:
        payload = bytes(values)
    except (TypeError, ValueError):
        return None
    return None if payload.translate(None, b"\x00\x01") else payload


def encode_response(sample: WireMessage) -> bytes:
    """A RenderTrainingSampleResponse carrying `sample`, serialised."""
    return sample_response(sample).join()


def sample_response(sample: WireMessage) -> WireMessage:
    """A RenderTrainingSampleResponse carrying `sample`, its tensors not yet joined in."""
    response = WireMessage()
    response.append_message_field(pb.RenderTrainingSampleResponse.SAMPLE_FIELD_NUMBER, sample)
    return response


def encode_result(index: int, outcome: WireMessage | RenderError) -> WireMessage:
    """One `results` entry of a RenderTrainingSamplesResponse: the sample or the error of request `index`.

    A response is its entries one after another (WireMessage.extend). A
    RendersResponse is the same on the wire, with a RenderedTokens message as
    `outcome` (RenderResult numbers its fields as RenderTrainingSampleResult does).
    """
    if isinstance(outcome, RenderError):
        result = WireMessage(
            pb.RenderTrainingSampleResult(index=index, error=encode_error(outcome)).SerializeToString()
        )
    else:
        result = WireMessage(pb.RenderTrainingSampleResult(index=index).SerializeToString())
        result.append_message_field(pb.RenderTrainingSampleResult.SAMPLE_FIELD_NUMBER, outcome)
    entry = WireMessage()
    entry.append_message_field(pb.RenderTrainingSamplesResponse.RESULTS_FIELD_NUMBER, result)
    return entry


def encode_error(error: RenderError) -> pb.Error:
    """A failed request's status, for a result that carries it instead of an answer."""
    return pb.Error(
        code=error.code.value[0],
        message=error.details,
        error_type=error.error_type or "",
        error_detail_json=encode_error_detail(error.error_detail),
    )


# ---------------------------------------------------------------------------
# Client side: response -> Python values
# ---------------------------------------------------------------------------


def decode_response(data: bytes | memoryview) -> RenderedTrainingSample:
    """The RenderedTrainingSample a serialised RenderTrainingSampleResponse carries."""
    try:
        rest, samples = split_field(memoryview(data), pb.RenderTrainingSampleResponse.SAMPLE_FIELD_NUMBER)
        pb.RenderTrainingSampleResponse.FromString(rest)  # fields a newer server may add; or junk
        return _decode_sample(merged(samples) if samples else memoryview(b""))
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


PayloadT = TypeVar("PayloadT")


@overload
def decode_results(data: bytes) -> list[tuple[int, RenderedTrainingSample | RenderError]]: ...


@overload
def decode_results(
    data: bytes, decode_payload: Callable[[memoryview], PayloadT]
) -> list[tuple[int, PayloadT | RenderError]]: ...


def decode_results(
    data: bytes, decode_payload: Callable[[memoryview], object] | None = None
) -> Sequence[tuple[int, object]]:
    """Each (index, sample or error) a serialised RenderTrainingSamplesResponse carries.

    With `decode_payload` (for RenderedTokens), each (index, tokens or error) of a
    RendersResponse, which is the same on the wire (see encode_result).
    """
    try:
        rest, results = split_field(memoryview(data), pb.RenderTrainingSamplesResponse.RESULTS_FIELD_NUMBER)
        pb.RenderTrainingSamplesResponse.FromString(rest)
        return [_decode_result(result, decode_payload or _decode_sample) for result in results]
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


# Decoding walks the wire format down to each Tensor.data and shares its bytes
# (wireformat.split_field); everything else is parsed by upb.


def _decode_result(
    data: memoryview, decode_payload: Callable[[memoryview], PayloadT]
) -> tuple[int, PayloadT | RenderError]:
    rest, samples = split_field(data, pb.RenderTrainingSampleResult.SAMPLE_FIELD_NUMBER)
    result = pb.RenderTrainingSampleResult.FromString(rest)
    if samples and result.HasField("error"):
        # Valid protobuf (the last one wins) but never sent: refuse rather than guess.
        raise WireFormatError(f"result {result.index} carries both a sample and an error")
    if samples:
        return result.index, decode_payload(merged(samples))
    return result.index, decode_error(result.error)


def decode_error(error: pb.Error) -> RenderError:
    """The RenderError a result's status stands for: the one a unary call would have raised."""
    status = _STATUS_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    return error_from_status(
        status, error.message, error.error_type or None, decode_error_detail(error.error_detail_json)
    )


_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _decode_sample(data: memoryview) -> RenderedTrainingSample:
    rest, media = split_field(data, pb.RenderedTrainingSample.MULTI_MODAL_DATA_FIELD_NUMBER)
    message = pb.RenderedTrainingSample.FromString(rest)
    return RenderedTrainingSample(
        token_ids=as_list(message.token_ids),
        loss_mask=as_list(message.loss_mask),
        multi_modal_data=decode_multi_modal_data(merged(media)) if media else None,
        mm_token_type_ids=as_list(message.mm_token_type_ids.ids) if message.HasField("mm_token_type_ids") else None,
    )


# ---------------------------------------------------------------------------
# Server side: the renderer's results -> answer
# ---------------------------------------------------------------------------


def encode_rendered_tokens(
    tokens: RenderedTokensLike, *, compact_tensors: bool = False, held: Collection[str] = ()
) -> WireMessage:
    """A renderers.RenderedTokens as a RenderedTokens message (its tensors joined in as they are;
    with `compact_tensors`, pixel tensors in compact form where it is exact; none for the items
    whose hash is in `held`)."""
    message = pb.RenderedTokens(
        token_ids=tokens.token_ids,
        message_indices=tokens.message_indices,
        message_roles=tokens.message_roles,
        message_tool_names=[
            pb.ToolName() if name is None else pb.ToolName(name=name) for name in tokens.message_tool_names
        ],
    )
    packed = WireMessage()
    for number, values in (
        (pb.RenderedTokens.SAMPLED_MASK_FIELD_NUMBER, tokens.sampled_mask),
        (pb.RenderedTokens.IS_CONTENT_FIELD_NUMBER, tokens.is_content),
    ):
        payload = packed_bools(values)
        if payload is None:  # not a plain list of bools: upb checks and writes them
            getattr(message, message.DESCRIPTOR.fields_by_number[number].name).extend(values)
        elif payload:
            packed.append_bytes_field(number, payload)
    encoded = WireMessage(message.SerializeToString())
    encoded.extend(packed)
    if tokens.multi_modal_data is not None:
        encoded.append_message_field(
            pb.RenderedTokens.MULTI_MODAL_DATA_FIELD_NUMBER,
            encode_multi_modal_data(tokens.multi_modal_data, compact_tensors=compact_tensors, held=held),
        )
    return encoded


def encode_tokens_response(tokens: WireMessage | None) -> bytes:
    """A RenderResponse or BridgeToNextTurnResponse carrying encoded `tokens` (None: unset), serialised."""
    return tokens_response(tokens).join()


def tokens_response(tokens: WireMessage | None) -> WireMessage:
    """A RenderResponse or BridgeToNextTurnResponse carrying `tokens`, its tensors not yet joined in."""
    response = WireMessage()
    if tokens is not None:
        response.append_message_field(_TOKENS_FIELD, tokens)
    return response


# Render's and BridgeToNextTurn's answers are the same message under two names.
_TOKENS_FIELD = pb.RenderResponse.TOKENS_FIELD_NUMBER
assert _TOKENS_FIELD == pb.BridgeToNextTurnResponse.TOKENS_FIELD_NUMBER


def encode_parsed_response(parsed: ParsedResponseLike) -> pb.ParseResponseResponse:
    """A renderers.ParsedResponse as the ParseResponse answer.

    Every value goes as parse_response returned it: a text field holding anything but a
    UTF-8 str (a tool-call name the model wrote as 5) in its *_json twin; a value JSON
    cannot hold either is UnimplementedError, never a changed value.
    """
    message = pb.ParsedResponse()
    _set_value(message, "content", parsed.content, "content")
    if parsed.reasoning_content is not None:
        _set_value(message, "reasoning_content", parsed.reasoning_content, "reasoning_content")
    if parsed.reasoning_complete is not None:
        if type(parsed.reasoning_complete) is not bool:
            raise _cannot_carry("reasoning_complete", parsed.reasoning_complete)
        message.reasoning_complete = parsed.reasoning_complete
    for index, call in enumerate(parsed.tool_calls):
        where = f"tool_calls[{index}]"
        out = message.tool_calls.add(status=str(call.status))
        _set_value(out, "raw", call.raw, f"{where}.raw")
        if call.name is not None:
            _set_value(out, "name", call.name, f"{where}.name")
        if isinstance(call.arguments, str):
            _set_value(out, "arguments_text", call.arguments, f"{where}.arguments", twin="arguments_json")
        elif call.arguments is not None:
            _set_json(out, "arguments_json", call.arguments, f"{where}.arguments")
        if call.token_span is not None:
            try:
                out.token_span.start, out.token_span.end = call.token_span
            except (TypeError, ValueError):
                raise _cannot_carry(f"{where}.token_span", call.token_span) from None
        if call.id is not None:
            _set_value(out, "id", call.id, f"{where}.id")
    return pb.ParseResponseResponse(parsed=message)


def _set_value(message: ProtoMessage, name: str, value: object, where: str, twin: str | None = None) -> None:
    """Set string field `name` to `value`, or its JSON twin (`name`_json) to any other value's JSON text."""
    if type(value) is str:
        try:
            setattr(message, name, value)
            return
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 string holds it
            pass
    _set_json(message, twin or f"{name}_json", value, where)


def _set_json(message: ProtoMessage, name: str, value: object, where: str) -> None:
    """Set string field `name` to `value`'s JSON text, which load_json gives back exactly."""
    try:
        text = dump_json(value, where)
    except InvalidArgumentError:
        raise _cannot_carry(where, value) from None
    try:
        setattr(message, name, text)
    except UnicodeEncodeError:
        # Lone surrogates: as ASCII escapes ("\\ud800") they come back exactly.
        setattr(message, name, json.dumps(value, separators=(",", ":")))


def _cannot_carry(where: str, value: object) -> UnimplementedError:
    return UnimplementedError(
        f"{where}: the renderer returned a {type(value).__name__}, which is no JSON value: the service cannot carry it"
    )


# ---------------------------------------------------------------------------
# Client side: answer -> what the method returns in-process
# ---------------------------------------------------------------------------


def decode_rendered_tokens(data: memoryview) -> RenderedTokensLike:
    """A RenderedTokens message as renderers.RenderedTokens (or types.RenderedTokens)."""
    if len(data) < _WHOLE_BELOW:
        return _rendered_tokens(pb.RenderedTokens.FromString(data))  # type: ignore[arg-type]  # upb takes any buffer
    rest, media = split_field(data, pb.RenderedTokens.MULTI_MODAL_DATA_FIELD_NUMBER)
    return _rendered_tokens(pb.RenderedTokens.FromString(rest), merged(media) if media else None)


# An answer this small carries no tensor worth sharing (tensors.py copies those below 1 MiB anyway):
# upb parses it whole, rather than wireformat.split_field walking its fields in Python.
_WHOLE_BELOW = 256 * 1024


def _rendered_tokens(message: pb.RenderedTokens, media: memoryview | None = None) -> RenderedTokensLike:
    """renderers.RenderedTokens from a parsed message; its media from `media` when split off before."""
    types = result_types()
    if media is None and message.HasField("multi_modal_data"):
        media = memoryview(message.multi_modal_data.SerializeToString())
    return types.RenderedTokens(
        token_ids=as_list(message.token_ids),
        message_indices=as_list(message.message_indices),
        sampled_mask=as_list(message.sampled_mask),
        is_content=as_list(message.is_content),
        message_roles=list(message.message_roles),
        message_tool_names=[entry.name if entry.HasField("name") else None for entry in message.message_tool_names],
        multi_modal_data=(
            None if media is None else decode_multi_modal_data(media, types.MultiModalData, types.PlaceholderRange)
        ),
    )


def decode_tokens_response(data: bytes | memoryview) -> RenderedTokensLike | None:
    """The RenderedTokens of a serialised RenderResponse or BridgeToNextTurnResponse; None when unset."""
    try:
        if len(data) < _WHOLE_BELOW:
            response = pb.RenderResponse.FromString(data)  # type: ignore[arg-type]  # upb takes any buffer
            return _rendered_tokens(response.tokens) if response.HasField("tokens") else None
        rest, fields = split_field(memoryview(data), _TOKENS_FIELD)
        pb.RenderResponse.FromString(rest)  # fields a newer server may add; or junk
        return decode_rendered_tokens(merged(fields)) if fields else None
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


def decode_parsed_response(response: pb.ParseResponseResponse) -> ParsedResponseLike:
    """The ParseResponse answer as renderers.ParsedResponse (or types.ParsedResponse)."""
    types = result_types()
    parsed = response.parsed
    calls: list[ParsedToolCallLike] = []
    try:
        for index, call in enumerate(parsed.tool_calls):
            where = f"tool_calls[{index}]"
            try:
                status = types.ToolCallParseStatus(call.status)
            except ValueError:
                raise RenderError(f"malformed response: unknown tool-call status {call.status!r}") from None
            calls.append(
                types.ParsedToolCall(
                    raw=_value(call, "raw_value", f"{where}.raw", ""),
                    name=_value(call, "name_value", f"{where}.name"),
                    arguments=_value(call, "arguments", f"{where}.arguments"),
                    token_span=(call.token_span.start, call.token_span.end) if call.HasField("token_span") else None,
                    status=status,
                    id=_value(call, "id_value", f"{where}.id"),
                )
            )
        return types.ParsedResponse(
            content=_value(parsed, "content_value", "content", ""),
            reasoning_content=_value(parsed, "reasoning_content_value", "reasoning_content"),
            tool_calls=calls,
            reasoning_complete=parsed.reasoning_complete if parsed.HasField("reasoning_complete") else None,
        )
    except InvalidArgumentError as exc:  # JSON text that does not parse
        raise RenderError(f"malformed response: {exc}") from None


def _value(message: ProtoMessage, oneof: str, where: str, unset: JSONValue = None) -> Any:
    """The value a string field or its JSON twin holds (oneof `oneof`); `unset` when neither is set."""
    field = message.WhichOneof(oneof)
    if field is None:
        return unset
    if field.endswith("_json"):
        return load_json(getattr(message, field), where)
    return getattr(message, field)
