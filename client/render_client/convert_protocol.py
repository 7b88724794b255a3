"""The conversion layer for renderers' Renderer protocol: Render, ParseResponse,
BridgeToNextTurn and DescribeRenderer, both directions.

Client side, `encode_*_request` turn a method's Python arguments into its
request and `decode_*` turn the answer into what the method returns
in-process (renderers' own classes where renderers is importable,
types.result_types). Server side, `decode_*_request` give the renderer its
arguments back and `encode_*` turn its results into the answer. Messages,
tools, chat-template kwargs and media share convert.py's code with
RenderTrainingSample, so every request carrying a conversation reads it alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from ._pb import render_pb2 as pb
from .compact import materialize_all
from .convert import (
    Conversation,
    as_list,
    decode_chat_template_kwargs,
    decode_conversation,
    decode_multi_modal_data,
    decode_tools,
    encode_message,
    encode_multi_modal_data,
    packed_bools,
)
from .errors import RenderError, invalid
from .jsonvalue import dump_json, load_json
from .types import TokensRequest, result_types
from .wire import WireFormatError, WireMessage, merged, split_field

Message = Mapping[str, Any]

# ---------------------------------------------------------------------------
# Client side: a method's arguments -> its request
# ---------------------------------------------------------------------------


def _set_conversation_options(
    request: Any, model: str, tools: Sequence[Any] | None, chat_template_kwargs: Mapping[str, Any] | None
) -> None:
    if not isinstance(model, str) or not model:
        raise invalid("model", "must be a non-empty string")
    request.model = model
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise invalid("tools", f"expected a list of tool specs, got {type(tools).__name__}")
        request.tools_json = dump_json(list(tools), "tools")
    if chat_template_kwargs is not None:
        request.chat_template_kwargs_json = dump_json(dict(chat_template_kwargs), "chat_template_kwargs")


def _add_messages(container: Any, messages: Sequence[Message], field: str) -> None:
    if not isinstance(messages, (list, tuple)):
        raise invalid(field, f"expected a list of message dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        encode_message(message, f"{field}[{index}]", container.add())


def _set_ids(container: Any, ids: Sequence[int], field: str) -> None:
    if not isinstance(ids, (list, tuple, np.ndarray)):
        raise invalid(field, f"expected a list of token ids, got {type(ids).__name__}")
    try:
        container.extend(ids)
    except (TypeError, ValueError):
        raise invalid(field, "token ids must be integers from 0 to 4294967295") from None


def encode_render_request(
    model: str,
    messages: Sequence[Message],
    *,
    tools: Sequence[Any] | None,
    add_generation_prompt: bool,
    chat_template_kwargs: Mapping[str, Any] | None,
    ids_only: bool,
) -> pb.RenderRequest:
    """The request for one Renderer.render (or render_ids) call."""
    request = pb.RenderRequest(add_generation_prompt=bool(add_generation_prompt), ids_only=ids_only)
    _set_conversation_options(request, model, tools, chat_template_kwargs)
    _add_messages(request.messages, messages, "messages")
    return request


def encode_tokens_request(request: TokensRequest) -> pb.RenderRequest:
    """The request for a TokensRequest (its fields are encode_render_request's arguments)."""
    return encode_render_request(
        request.model,
        request.messages,
        tools=request.tools,
        add_generation_prompt=request.add_generation_prompt,
        chat_template_kwargs=request.chat_template_kwargs,
        ids_only=request.ids_only,
    )


def encode_parse_request(
    model: str,
    token_ids: Sequence[int],
    *,
    tools: Sequence[Any] | None,
    prompt_ids: Sequence[int] | None,
    chat_template_kwargs: Mapping[str, Any] | None,
) -> pb.ParseResponseRequest:
    """The request for one Renderer.parse_response call."""
    request = pb.ParseResponseRequest()
    _set_conversation_options(request, model, tools, chat_template_kwargs)
    _set_ids(request.token_ids, token_ids, "token_ids")
    if prompt_ids is not None:
        request.prompt_ids.SetInParent()  # present even when empty
        _set_ids(request.prompt_ids.ids, prompt_ids, "prompt_ids")
    return request


def encode_bridge_request(
    model: str,
    previous_prompt_ids: Sequence[int],
    previous_completion_ids: Sequence[int],
    new_messages: Sequence[Message],
    *,
    tools: Sequence[Any] | None,
    previous_multi_modal_data: Any,
    chat_template_kwargs: Mapping[str, Any] | None,
) -> bytes:
    """The serialised request for one Renderer.bridge_to_next_turn call.

    Serialised here, because the previous turn's pixel tensors are joined in
    as they are (wire.WireMessage), as the server does for samples.
    """
    request = pb.BridgeToNextTurnRequest()
    _set_conversation_options(request, model, tools, chat_template_kwargs)
    _set_ids(request.previous_prompt_ids, previous_prompt_ids, "previous_prompt_ids")
    _set_ids(request.previous_completion_ids, previous_completion_ids, "previous_completion_ids")
    _add_messages(request.new_messages, new_messages, "new_messages")
    message = WireMessage(request.SerializeToString())
    if previous_multi_modal_data is not None:
        try:
            media = encode_multi_modal_data(previous_multi_modal_data)
        except (TypeError, AttributeError) as exc:
            raise invalid("previous_multi_modal_data", str(exc)) from None
        message.append_message_field(pb.BridgeToNextTurnRequest.PREVIOUS_MULTI_MODAL_DATA_FIELD_NUMBER, media)
    return message.join()


def encode_describe_request(model: str, chat_template_kwargs: Mapping[str, Any] | None) -> pb.DescribeRendererRequest:
    request = pb.DescribeRendererRequest()
    _set_conversation_options(request, model, None, chat_template_kwargs)
    return request


# ---------------------------------------------------------------------------
# Server side: request -> the renderer's arguments
# ---------------------------------------------------------------------------


@dataclass
class RenderArgs:
    """A decoded Render request."""

    conversation: Conversation
    add_generation_prompt: bool
    ids_only: bool


@dataclass
class ParseArgs:
    """A decoded ParseResponse request."""

    model: str
    token_ids: list[int]
    tools: list[Any] | None
    prompt_ids: list[int] | None
    chat_template_kwargs: dict[str, Any] | None


@dataclass
class BridgeArgs:
    """A decoded BridgeToNextTurn request; `conversation` holds its new_messages."""

    conversation: Conversation
    previous_prompt_ids: list[int]
    previous_completion_ids: list[int]
    previous_multi_modal_data: Any  # renderers.MultiModalData or None
    # The request's size without previous_multi_modal_data: its pixel tensors are no text to limit.
    request_bytes: int


def decode_render_request(request: pb.RenderRequest) -> RenderArgs:
    return RenderArgs(
        conversation=decode_conversation(request, request.messages, "messages"),
        add_generation_prompt=request.add_generation_prompt,
        ids_only=request.ids_only,
    )


def decode_parse_request(request: pb.ParseResponseRequest) -> ParseArgs:
    if not request.model:
        raise invalid("model", "missing")
    return ParseArgs(
        model=request.model,
        token_ids=as_list(request.token_ids),
        tools=decode_tools(request),
        prompt_ids=as_list(request.prompt_ids.ids) if request.HasField("prompt_ids") else None,
        chat_template_kwargs=decode_chat_template_kwargs(request),
    )


def decode_bridge_request(data: bytes) -> BridgeArgs:
    """A serialised BridgeToNextTurnRequest's arguments; its tensors are views of `data`."""
    field = pb.BridgeToNextTurnRequest.PREVIOUS_MULTI_MODAL_DATA_FIELD_NUMBER
    try:
        rest, media = split_field(memoryview(data), field)
        request = pb.BridgeToNextTurnRequest.FromString(rest)
        types = result_types()
        previous = (
            decode_multi_modal_data(merged(media), types.MultiModalData, types.PlaceholderRange) if media else None
        )
        materialize_all(previous)  # the renderer takes arrays
    except (WireFormatError, DecodeError, RenderError) as exc:
        raise invalid("request", f"not a valid render.v1.BridgeToNextTurnRequest ({exc})") from None
    return BridgeArgs(
        conversation=decode_conversation(request, request.new_messages, "new_messages"),
        previous_prompt_ids=as_list(request.previous_prompt_ids),
        previous_completion_ids=as_list(request.previous_completion_ids),
        previous_multi_modal_data=previous,
        request_bytes=len(rest),
    )


# ---------------------------------------------------------------------------
# Server side: the renderer's results -> answer
# ---------------------------------------------------------------------------


def encode_rendered_tokens(tokens: Any, *, compact_tensors: bool = False) -> WireMessage:
    """A renderers.RenderedTokens as a RenderedTokens message (its tensors joined in as they are;
    with `compact_tensors`, pixel tensors in compact form where it is exact)."""
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
            encode_multi_modal_data(tokens.multi_modal_data, compact_tensors=compact_tensors),
        )
    return encoded


def encode_tokens_response(tokens: WireMessage | None) -> bytes:
    """A RenderResponse or BridgeToNextTurnResponse carrying encoded `tokens` (None: unset), serialised."""
    response = WireMessage()
    if tokens is not None:
        response.append_message_field(_TOKENS_FIELD, tokens)
    return response.join()


# Render's and BridgeToNextTurn's answers are the same message under two names.
_TOKENS_FIELD = pb.RenderResponse.TOKENS_FIELD_NUMBER
assert _TOKENS_FIELD == pb.BridgeToNextTurnResponse.TOKENS_FIELD_NUMBER


def encode_parsed_response(parsed: Any) -> pb.ParseResponseResponse:
    """A renderers.ParsedResponse as the ParseResponse answer."""
    message = pb.ParsedResponse(content=parsed.content)
    if parsed.reasoning_content is not None:
        message.reasoning_content = parsed.reasoning_content
    if parsed.reasoning_complete is not None:
        message.reasoning_complete = parsed.reasoning_complete
    for index, call in enumerate(parsed.tool_calls):
        out = message.tool_calls.add(raw=call.raw, status=str(call.status))
        if call.name is not None:
            out.name = call.name
        try:
            if isinstance(call.arguments, str):
                out.arguments_text = call.arguments
            elif call.arguments is not None:
                out.arguments_json = dump_json(call.arguments, f"tool_calls[{index}].arguments")
        except UnicodeEncodeError:
            # A lone surrogate (the model wrote a JSON "\ud800" escape) is no UTF-8 protobuf string;
            # as an ASCII JSON escape it comes back exactly (a str argument as a JSON string).
            out.arguments_json = json.dumps(call.arguments, separators=(",", ":"))
        if call.token_span is not None:
            out.token_span.start, out.token_span.end = call.token_span
        if call.id is not None:
            out.id = call.id
    return pb.ParseResponseResponse(parsed=message)


# ---------------------------------------------------------------------------
# Client side: answer -> what the method returns in-process
# ---------------------------------------------------------------------------


def decode_rendered_tokens(data: memoryview) -> Any:
    """A RenderedTokens message as renderers.RenderedTokens (or types.RenderedTokens)."""
    types = result_types()
    rest, media = split_field(data, pb.RenderedTokens.MULTI_MODAL_DATA_FIELD_NUMBER)
    message = pb.RenderedTokens.FromString(rest)
    return types.RenderedTokens(
        token_ids=as_list(message.token_ids),
        message_indices=as_list(message.message_indices),
        sampled_mask=as_list(message.sampled_mask),
        is_content=as_list(message.is_content),
        message_roles=list(message.message_roles),
        message_tool_names=[entry.name if entry.HasField("name") else None for entry in message.message_tool_names],
        multi_modal_data=(
            decode_multi_modal_data(merged(media), types.MultiModalData, types.PlaceholderRange) if media else None
        ),
    )


def decode_tokens_response(data: bytes) -> Any:
    """The RenderedTokens of a serialised RenderResponse or BridgeToNextTurnResponse; None when unset."""
    try:
        rest, fields = split_field(memoryview(data), _TOKENS_FIELD)
        pb.RenderResponse.FromString(rest)  # fields a newer server may add; or junk
        return decode_rendered_tokens(merged(fields)) if fields else None
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


def decode_parsed_response(response: pb.ParseResponseResponse) -> Any:
    """The ParseResponse answer as renderers.ParsedResponse (or types.ParsedResponse)."""
    types = result_types()
    parsed = response.parsed
    calls = []
    for index, call in enumerate(parsed.tool_calls):
        kind = call.WhichOneof("arguments")
        arguments: Any = None
        if kind == "arguments_json":
            arguments = load_json(call.arguments_json, f"tool_calls[{index}].arguments")
        elif kind == "arguments_text":
            arguments = call.arguments_text
        try:
            status = types.ToolCallParseStatus(call.status)
        except ValueError:
            raise RenderError(f"malformed response: unknown tool-call status {call.status!r}") from None
        calls.append(
            types.ParsedToolCall(
                raw=call.raw,
                name=call.name if call.HasField("name") else None,
                arguments=arguments,
                token_span=(call.token_span.start, call.token_span.end) if call.HasField("token_span") else None,
                status=status,
                id=call.id if call.HasField("id") else None,
            )
        )
    return types.ParsedResponse(
        content=parsed.content,
        reasoning_content=parsed.reasoning_content if parsed.HasField("reasoning_content") else None,
        tool_calls=calls,
        reasoning_complete=parsed.reasoning_complete if parsed.HasField("reasoning_complete") else None,
    )
