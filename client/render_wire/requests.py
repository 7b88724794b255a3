"""Requests, both directions: the caller's Python arguments <-> every request message.

Client side, `encode_*` turn a method's arguments (build_training_sample's, or a
Renderer protocol method's) into its request; server side, `decode_*` give the
renderer its arguments back: the same dicts the caller had. Every problem with a
request raises InvalidArgumentError with a one-line message naming the field, e.g.
`messages[3].tool_calls[0].function.arguments: not valid JSON (...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer, RepeatedScalarFieldContainer
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from .compact import materialize_all
from .errors import InvalidArgumentError, RenderError, invalid
from .jsonvalue import JSONValue, dump_json, load_json
from .media import check_not_a_reference, media_bytes
from .pb import render_pb2 as pb
from .tensors import TensorBudget, decode_multi_modal_data, encode_multi_modal_data
from .types import (
    Message,
    MultiModalDataLike,
    SampleRequest,
    TokensRequest,
    result_types,
)
from .wireformat import WireFormatError, WireMessage, as_list, merged, split_field

# Message keys with a field of their own in pb.Message besides role and content.
_MESSAGE_TEXT_KEYS = ("tool_call_id", "name", "reasoning_content", "reasoning")
# Message keys that may be present with the value None (pb.Message.null_keys).
_NULLABLE_MESSAGE_KEYS = frozenset({"content", "tool_calls", *_MESSAGE_TEXT_KEYS})
_MODELLED_MESSAGE_KEYS = _NULLABLE_MESSAGE_KEYS | {"role"}
# The "type" spellings renderers accepts for each kind of media part.
_MEDIA_TYPES = {"image": ("image", "image_url"), "video": ("video", "video_url")}
_MEDIA_KIND_BY_TYPE = {spelling: kind for kind, spellings in _MEDIA_TYPES.items() for spelling in spellings}


@dataclass
class MediaRef:
    """A media part of a decoded request, so the server can decode it in place."""

    field: str  # e.g. "messages[1].content[0].image"
    kind: str  # "image" or "video"
    # The part dict; part[kind] holds the encoded bytes (the server may put the decoded image there).
    part: dict[str, Any]


# A decoded message, content part or tool call: the dict the caller had.
DecodedDict = dict[str, object]


@dataclass
class RenderArguments:
    """A decoded request: the arguments of one build_training_sample call."""

    model: str
    messages: list[DecodedDict]
    tools: list[JSONValue] | None
    # role_to_mask(message) per message, as the client evaluated it; None: role_to_mask=None.
    trainable: list[bool] | None
    message_loss_mask: list[bool] | None
    content_sft_roles: frozenset[str] | None
    ensure_final_stop: bool
    chat_template_kwargs: dict[str, JSONValue] | None
    media: list[MediaRef]


# ---------------------------------------------------------------------------
# Client side: Python arguments -> request
# ---------------------------------------------------------------------------


def encode_request(
    model: str,
    messages: Sequence[Message],
    *,
    role_to_mask: Callable[[Message], bool] | None = None,
    tools: Sequence[Mapping[str, object]] | None = None,
    content_sft_roles: Iterable[str] | None = None,
    ensure_final_stop: bool = False,
    message_loss_mask: Sequence[bool | int] | None = None,
    chat_template_kwargs: Mapping[str, object] | None = None,
) -> pb.RenderTrainingSampleRequest:
    """The request for one build_training_sample call with these arguments."""
    request = pb.RenderTrainingSampleRequest()
    _set_text(request, "model", model, "model")
    if not isinstance(messages, (list, tuple)):
        raise invalid("messages", f"expected a list of message dicts, got {type(messages).__name__}")
    if message_loss_mask is not None:
        # The same checks, in the same words, as renderers.build_training_sample.
        if len(message_loss_mask) != len(messages):
            raise invalid("message_loss_mask", "message_loss_mask must have one entry per message")
        if any(not isinstance(value, (bool, int)) or value not in (0, 1) for value in message_loss_mask):
            raise invalid("message_loss_mask", "message_loss_mask entries must be booleans or integers 0/1")
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        out = request.messages.add()
        encode_message(message, field, out)
        if role_to_mask is not None:
            trainable = role_to_mask(message)
            if not isinstance(trainable, (bool, np.bool_)):
                # In-process, the predicate's raw return value lands in loss_mask;
                # only a real bool can cross the wire unchanged.
                raise invalid(field, f"role_to_mask returned {type(trainable).__name__}, not a bool")
            out.trainable = bool(trainable)
        if message_loss_mask is not None:
            out.message_loss_mask = bool(message_loss_mask[index])
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise invalid("tools", f"expected a list of tool specs, got {type(tools).__name__}")
        request.tools_json = dump_json(list(tools), "tools")
    if content_sft_roles:
        for role in content_sft_roles:
            _append_text(request.content_sft_roles, role, "content_sft_roles")
    request.ensure_final_stop = bool(ensure_final_stop)
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise invalid("chat_template_kwargs", f"expected a mapping, got {type(chat_template_kwargs).__name__}")
        request.chat_template_kwargs_json = dump_json(dict(chat_template_kwargs), "chat_template_kwargs")
    return request


def encode_sample_request(request: SampleRequest) -> pb.RenderTrainingSampleRequest:
    """The request for a SampleRequest (its fields are encode_request's arguments)."""
    return encode_request(**{field.name: getattr(request, field.name) for field in fields(request)})


def encode_message(message: object, field: str, out: pb.Message, *, with_media: bool = True) -> None:
    """`message` into `out`. Without `with_media`, media parts go without their data (for a
    renderer told process_multimodal=False, which renders a placeholder and reads no image)."""
    if not isinstance(message, Mapping):
        raise invalid(field, f"expected a message dict, got {type(message).__name__}")
    if "role" not in message:
        raise invalid(f"{field}.role", "missing")
    extra: dict[object, object] = {}
    for key, value in message.items():
        if key == "role":
            _set_text(out, "role", value, f"{field}.role")
        elif value is None and key in _NULLABLE_MESSAGE_KEYS:
            out.null_keys.append(key)
        elif key == "content":
            if isinstance(value, str):
                _set_text(out, "text", value, f"{field}.content")
            elif isinstance(value, (list, tuple)):
                out.parts.SetInParent()
                for index, part in enumerate(value):
                    _encode_part(part, f"{field}.content[{index}]", out.parts.parts.add(), with_media)
            else:
                raise invalid(
                    f"{field}.content", f"expected a str, a list of parts or None, got {type(value).__name__}"
                )
        elif key == "tool_calls":
            if not isinstance(value, (list, tuple)):
                raise invalid(f"{field}.tool_calls", f"expected a list, got {type(value).__name__}")
            out.tool_calls.SetInParent()
            for index, call in enumerate(value):
                _encode_tool_call(call, f"{field}.tool_calls[{index}]", out.tool_calls.calls.add())
        elif key in _MESSAGE_TEXT_KEYS:
            _set_text(out, key, value, f"{field}.{key}")
        else:
            extra[key] = value
    if extra:
        out.extra_json = dump_json(extra, field)


def _encode_part(part: object, field: str, out: pb.ContentPart, with_media: bool) -> None:
    if not isinstance(part, Mapping):
        raise invalid(field, f"expected a content part dict, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text" or kind == "thinking":
        payload_key = kind
        _set_text(out, kind, part.get(kind), f"{field}.{kind}")
    elif kind in _MEDIA_KIND_BY_TYPE:
        media_kind = _MEDIA_KIND_BY_TYPE[kind]
        payload_key, source = _media_source(part, media_kind)
        media = getattr(out, media_kind)
        if with_media:
            media.data = media_bytes(source, f"{field}.{payload_key}")
        media.type = kind
    else:
        raise invalid(
            f"{field}.type",
            f"unsupported content part type {kind!r} (text, thinking, image, image_url, video, video_url)",
        )
    for key, value in part.items():
        if key == "type" or key == payload_key:
            continue
        if value is not None:
            raise invalid(f"{field}.{key}", f"unsupported key for a {kind!r} part")
        _append_text(out.null_keys, key, f"{field}.{key}")


def _media_source(part: Mapping[str, object], kind: str) -> tuple[str, object]:
    """The key and value renderers would load a media part from, in its precedence."""
    url_key = f"{kind}_url"
    if kind in part:
        return kind, part[kind]
    if url_key in part:
        wrapped = part[url_key]
        return url_key, wrapped.get("url") if isinstance(wrapped, Mapping) else wrapped
    for key in ("url", "path"):
        if part.get(key):
            return key, part[key]
    return kind, None


def _encode_tool_call(call: object, field: str, out: pb.ToolCall) -> None:
    if not isinstance(call, Mapping):
        raise invalid(field, f"expected a tool call dict, got {type(call).__name__}")
    for key, value in call.items():
        if key == "id" or key == "type":
            _set_text(out, key, value, f"{field}.{key}")
        elif key == "function":
            if not isinstance(value, Mapping):
                raise invalid(f"{field}.function", f"expected a dict, got {type(value).__name__}")
            function = out.function
            function.SetInParent()
            for function_key, function_value in value.items():
                function_field = f"{field}.function.{function_key}"
                if function_key == "name":
                    _set_text(function, "name", function_value, function_field)
                elif function_key == "arguments":
                    if isinstance(function_value, str):
                        _set_text(function, "arguments_text", function_value, function_field)
                    else:
                        function.arguments_json = dump_json(function_value, function_field)
                else:
                    raise invalid(function_field, "unsupported key (name, arguments)")
        else:
            raise invalid(f"{field}.{key}", "unsupported key (id, type, function)")


def _set_text(message: ProtoMessage, name: str, value: object, field: str) -> None:
    if not isinstance(value, str):
        raise invalid(field, f"expected a str, got {type(value).__name__}")
    try:
        setattr(message, name, value)
    except UnicodeEncodeError:
        raise invalid(field, "not encodable as UTF-8 (lone surrogate)") from None


def _append_text(container: RepeatedScalarFieldContainer[str], value: object, field: str) -> None:
    if not isinstance(value, str):
        raise invalid(field, f"expected a str, got {type(value).__name__}")
    try:
        container.append(value)
    except UnicodeEncodeError:
        raise invalid(field, "not encodable as UTF-8 (lone surrogate)") from None


# ---------------------------------------------------------------------------
# Server side: request -> renderers arguments
# ---------------------------------------------------------------------------


def decode_request(request: pb.RenderTrainingSampleRequest) -> RenderArguments:
    """The build_training_sample arguments a request carries."""
    trainable: list[bool | None] = []
    selected: list[bool | None] = []
    conversation = decode_conversation(request, request.messages, "messages", trainable, selected)
    return RenderArguments(
        model=conversation.model,
        messages=conversation.messages,
        tools=conversation.tools,
        trainable=_all_or_none(trainable, "trainable"),
        message_loss_mask=_all_or_none(selected, "message_loss_mask"),
        content_sft_roles=frozenset(request.content_sft_roles) or None,
        ensure_final_stop=request.ensure_final_stop,
        chat_template_kwargs=conversation.chat_template_kwargs,
        media=conversation.media,
    )


@dataclass
class Conversation:
    """What every request that carries messages has: a decoded conversation for a model's renderer."""

    model: str
    messages: list[DecodedDict]
    tools: list[JSONValue] | None
    chat_template_kwargs: dict[str, JSONValue] | None
    media: list[MediaRef]


class ModelRequest(Protocol):
    """A request naming a model, with optional chat-template kwargs (every request but ListModels's)."""

    model: str
    chat_template_kwargs_json: str

    def HasField(self, field_name: str) -> bool: ...


class ToolsRequest(ModelRequest, Protocol):
    """A request with optional tool specs too: RenderTrainingSample, Render, ParseResponse, BridgeToNextTurn."""

    tools_json: str


def decode_conversation(
    request: ToolsRequest,
    messages: Iterable[pb.Message],
    field: str,
    trainable: list[bool | None] | None = None,
    selected: list[bool | None] | None = None,
) -> Conversation:
    """The model, `messages` (named `field`), tools and chat-template kwargs of `request`.

    `request` has `model` and optional `tools_json` and `chat_template_kwargs_json` fields.
    The messages' `trainable` and `message_loss_mask` flags are appended to the lists given.
    """
    if not request.model:
        raise invalid("model", "missing")
    media: list[MediaRef] = []
    decoded = [
        decode_message(
            message, index, media, [] if trainable is None else trainable, [] if selected is None else selected, field
        )
        for index, message in enumerate(messages)
    ]
    return Conversation(
        model=request.model,
        messages=decoded,
        tools=decode_tools(request),
        chat_template_kwargs=decode_chat_template_kwargs(request),
        media=media,
    )


def decode_tools(request: ToolsRequest) -> list[JSONValue] | None:
    """A request's `tools_json`: None when absent."""
    if not request.HasField("tools_json"):
        return None
    tools = load_json(request.tools_json, "tools_json")
    if type(tools) is not list:
        raise invalid("tools_json", "must be a JSON array of tool specs")
    return tools


def decode_chat_template_kwargs(request: ModelRequest) -> dict[str, JSONValue] | None:
    """A request's `chat_template_kwargs_json`: None when absent or empty."""
    if not request.HasField("chat_template_kwargs_json"):
        return None
    kwargs = load_json(request.chat_template_kwargs_json, "chat_template_kwargs_json")
    if type(kwargs) is not dict:
        raise invalid("chat_template_kwargs_json", "must be a JSON object")
    return kwargs or None


def _all_or_none(flags: list[bool | None], name: str) -> list[bool] | None:
    """A per-message flag's values: set on every message, or on none (None)."""
    if None in flags:
        if any(flag is not None for flag in flags):
            raise invalid(
                f"messages[{flags.index(None)}].{name}",
                "unset here but set on other messages; set it on every message or none",
            )
        return None
    return flags  # type: ignore[return-value]


def decode_message(
    message: pb.Message,
    index: int,
    media: list[MediaRef],
    trainable: list[bool | None],
    selected: list[bool | None],
    field: str = "messages",
) -> DecodedDict:
    """One message dict; `field` names the list it is in, for errors."""
    # ListFields walks only the fields that are set, in one call: this runs
    # for every message of every request, so no HasField per key.
    where = f"{field}[{index}]"
    out: DecodedDict = {"role": message.role}
    is_trainable = is_selected = nulls = extra = None
    for descriptor, value in message.ListFields():
        name = descriptor.name
        if name == "text":
            out["content"] = value
        elif name == "parts":
            out["content"] = [_decode_part(part, where, number, media) for number, part in enumerate(value.parts)]
        elif name == "tool_calls":
            out["tool_calls"] = [_decode_tool_call(call, where, number) for number, call in enumerate(value.calls)]
        elif name in _MESSAGE_TEXT_KEYS:
            out[name] = value
        elif name == "trainable":
            is_trainable = value
        elif name == "message_loss_mask":
            is_selected = value
        elif name == "null_keys":
            nulls = value
        elif name == "extra_json":
            extra = value
    trainable.append(is_trainable)
    selected.append(is_selected)
    if not out["role"]:
        raise invalid(f"{where}.role", "missing")
    if nulls:
        for key in nulls:
            if key not in _NULLABLE_MESSAGE_KEYS:
                raise invalid(
                    f"{where}.null_keys",
                    f"{key!r} is not one of {', '.join(sorted(_NULLABLE_MESSAGE_KEYS))}",
                )
            if key in out:
                raise invalid(f"{where}.null_keys", f"{key!r} is both set and null")
            out[key] = None
    if extra is not None:
        values = load_json(extra, f"{where}.extra_json")
        if type(values) is not dict:
            raise invalid(f"{where}.extra_json", "must be a JSON object")
        for key in values:
            if key in _MODELLED_MESSAGE_KEYS:
                raise invalid(f"{where}.extra_json", f"key {key!r} has a field of its own")
        out.update(values)
    return out


def _decode_part(part: pb.ContentPart, message: str, index: int, media: list[MediaRef]) -> DecodedDict:
    field = f"{message}.content[{index}]"
    kind = part.WhichOneof("part")
    if kind == "text":
        out: DecodedDict = {"type": "text", "text": part.text}
    elif kind == "thinking":
        out = {"type": "thinking", "thinking": part.thinking}
    elif kind == "image" or kind == "video":
        source = part.image if kind == "image" else part.video
        spelling = source.type or kind
        if spelling not in _MEDIA_TYPES[kind]:
            raise invalid(f"{field}.{kind}.type", f"must be one of {', '.join(_MEDIA_TYPES[kind])}")
        check_not_a_reference(source.data, f"{field}.{kind}.data")
        out = {"type": spelling, kind: source.data}
        media.append(MediaRef(field=f"{field}.{kind}", kind=kind, part=out))
    else:
        raise invalid(field, "empty content part (set text, thinking, image or video)")
    for key in part.null_keys:
        if key in out:
            raise invalid(f"{field}.null_keys", f"{key!r} is both set and null")
        out[key] = None
    return out


def _decode_tool_call(call: pb.ToolCall, message: str, index: int) -> DecodedDict:
    out: DecodedDict = {}
    if call.HasField("id"):
        out["id"] = call.id
    if call.HasField("type"):
        out["type"] = call.type
    if call.HasField("function"):
        function: DecodedDict = {}
        if call.function.HasField("name"):
            function["name"] = call.function.name
        arguments_kind = call.function.WhichOneof("arguments")
        if arguments_kind == "arguments_json":
            function["arguments"] = load_json(
                call.function.arguments_json, f"{message}.tool_calls[{index}].function.arguments"
            )
        elif arguments_kind == "arguments_text":
            function["arguments"] = call.function.arguments_text
        out["function"] = function
    return out


# ---------------------------------------------------------------------------
# Client side: a method's arguments -> its request
# ---------------------------------------------------------------------------


def _set_conversation_options(
    request: ToolsRequest,
    model: str,
    tools: Sequence[Mapping[str, object]] | None,
    chat_template_kwargs: Mapping[str, object] | None,
) -> None:
    _set_model(request, model)
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise invalid("tools", f"expected a list of tool specs, got {type(tools).__name__}")
        request.tools_json = dump_json(list(tools), "tools")
    _set_chat_template_kwargs(request, chat_template_kwargs)


def _set_model(request: ModelRequest, model: str) -> None:
    if not isinstance(model, str) or not model:
        raise invalid("model", "must be a non-empty string")
    request.model = model


def _set_chat_template_kwargs(request: ModelRequest, chat_template_kwargs: Mapping[str, object] | None) -> None:
    if chat_template_kwargs is not None:
        request.chat_template_kwargs_json = dump_json(dict(chat_template_kwargs), "chat_template_kwargs")


def _add_messages(
    container: RepeatedCompositeFieldContainer[pb.Message],
    messages: Sequence[Message],
    field: str,
    with_media: bool = True,
) -> None:
    if not isinstance(messages, (list, tuple)):
        raise invalid(field, f"expected a list of message dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        encode_message(message, f"{field}[{index}]", container.add(), with_media=with_media)


def _set_process_multimodal(request: pb.RenderRequest | pb.BridgeToNextTurnRequest, value: bool | None) -> None:
    if value is not None:
        if not isinstance(value, bool):
            raise invalid("process_multimodal", f"expected a bool, got {type(value).__name__}")
        request.process_multimodal = value


def _set_ids(container: RepeatedScalarFieldContainer[int], ids: Sequence[int], field: str) -> None:
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
    tools: Sequence[Mapping[str, object]] | None,
    add_generation_prompt: bool,
    chat_template_kwargs: Mapping[str, object] | None,
    ids_only: bool,
    process_multimodal: bool | None = None,
) -> pb.RenderRequest:
    """The request for one Renderer.render (or render_ids) call; `process_multimodal` None
    leaves the argument out (the renderer's default)."""
    request = pb.RenderRequest(add_generation_prompt=bool(add_generation_prompt), ids_only=ids_only)
    _set_conversation_options(request, model, tools, chat_template_kwargs)
    _set_process_multimodal(request, process_multimodal)
    _add_messages(request.messages, messages, "messages", with_media=process_multimodal is not False)
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
        process_multimodal=request.process_multimodal,
    )


def encode_parse_request(
    model: str,
    token_ids: Sequence[int],
    *,
    tools: Sequence[Mapping[str, object]] | None,
    prompt_ids: Sequence[int] | None,
    chat_template_kwargs: Mapping[str, object] | None,
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
    tools: Sequence[Mapping[str, object]] | None,
    previous_multi_modal_data: MultiModalDataLike | None,
    chat_template_kwargs: Mapping[str, object] | None,
    process_multimodal: bool | None = None,
    held_mm_hashes: Sequence[str] = (),
    keep_previous_tensors: bool = False,
) -> bytes:
    """The serialised request for one Renderer.bridge_to_next_turn call.

    Serialised here, because the previous turn's pixel tensors are joined in
    as they are (wireformat.WireMessage), as the server does for samples. With
    `keep_previous_tensors` they stay with the client instead: each previous
    item goes as a held item (for a server that takes them; ServerModels.held_images).
    """
    request = pb.BridgeToNextTurnRequest()
    _set_conversation_options(request, model, tools, chat_template_kwargs)
    _set_ids(request.previous_prompt_ids, previous_prompt_ids, "previous_prompt_ids")
    _set_ids(request.previous_completion_ids, previous_completion_ids, "previous_completion_ids")
    _set_process_multimodal(request, process_multimodal)
    _add_messages(request.new_messages, new_messages, "new_messages", with_media=process_multimodal is not False)
    request.held_mm_hashes.extend(held_mm_hashes)
    message = WireMessage(request.SerializeToString())
    if previous_multi_modal_data is not None:
        try:
            media = encode_multi_modal_data(previous_multi_modal_data, all_held=keep_previous_tensors)
        except (TypeError, AttributeError) as exc:
            raise invalid("previous_multi_modal_data", str(exc)) from None
        message.append_message_field(pb.BridgeToNextTurnRequest.PREVIOUS_MULTI_MODAL_DATA_FIELD_NUMBER, media)
    return message.join()


def encode_describe_request(
    model: str, chat_template_kwargs: Mapping[str, object] | None
) -> pb.DescribeRendererRequest:
    request = pb.DescribeRendererRequest()
    _set_model(request, model)
    _set_chat_template_kwargs(request, chat_template_kwargs)
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
    process_multimodal: bool | None  # None: not passed


@dataclass
class ParseArgs:
    """A decoded ParseResponse request."""

    model: str
    token_ids: list[int]
    tools: list[JSONValue] | None
    prompt_ids: list[int] | None
    chat_template_kwargs: dict[str, JSONValue] | None


@dataclass
class BridgeArgs:
    """A decoded BridgeToNextTurn request; `conversation` holds its new_messages."""

    conversation: Conversation
    previous_prompt_ids: list[int]
    previous_completion_ids: list[int]
    previous_multi_modal_data: MultiModalDataLike | None  # renderers.MultiModalData (types' without renderers)
    # The bytes of its new_messages, tools and kwargs: all but the ids and previous_multi_modal_data,
    # which are no text to limit.
    text_bytes: int
    process_multimodal: bool | None  # None: not passed
    held_mm_hashes: frozenset[str]  # images whose tensors the client holds


def decode_render_request(request: pb.RenderRequest) -> RenderArgs:
    return RenderArgs(
        conversation=decode_conversation(request, request.messages, "messages"),
        add_generation_prompt=request.add_generation_prompt,
        ids_only=request.ids_only,
        process_multimodal=request.process_multimodal if request.HasField("process_multimodal") else None,
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


def split_bridge_request(data: bytes | memoryview) -> tuple[pb.BridgeToNextTurnRequest, memoryview | None, int]:
    """A serialised BridgeToNextTurnRequest parsed but for its previous_multi_modal_data, whose
    wire bytes come apart (its tensors stay views of `data`); and the size of the rest."""
    field = pb.BridgeToNextTurnRequest.PREVIOUS_MULTI_MODAL_DATA_FIELD_NUMBER
    try:
        rest, media = split_field(memoryview(data), field)
        request = pb.BridgeToNextTurnRequest.FromString(rest)
    except (WireFormatError, DecodeError) as exc:
        raise invalid("request", f"not a valid render.v1.BridgeToNextTurnRequest ({exc})") from None
    return request, merged(media) if media else None, len(rest)


def decode_bridge_request(
    data: bytes | memoryview,
    *,
    budget: TensorBudget | None = None,
    check: Callable[[], None] | None = None,
    parsed: tuple[pb.BridgeToNextTurnRequest, memoryview | None, int] | None = None,
) -> BridgeArgs:
    """A serialised BridgeToNextTurnRequest's arguments (`parsed`: split_bridge_request's of it).

    With `budget`, the tensors of previous_multi_modal_data are refused past it before they
    are allocated; `check` runs as they are (it raises to stop: a deadline passed).
    """
    request, media, request_bytes = parsed or split_bridge_request(data)
    types = result_types()
    previous = None
    if media is not None:
        try:
            previous = decode_multi_modal_data(media, types.MultiModalData, types.PlaceholderRange, budget=budget)
        except InvalidArgumentError:  # past the budget
            raise
        except (WireFormatError, DecodeError, RenderError) as exc:  # RenderError: a malformed tensor
            raise invalid("previous_multi_modal_data", f"not a valid render.v1.MultiModalData ({exc})") from None
        materialize_all(previous, check)  # the renderer takes arrays; codes were checked against tables
    prompt_ids, completion_ids = as_list(request.previous_prompt_ids), as_list(request.previous_completion_ids)
    ids = pb.BridgeToNextTurnRequest(
        previous_prompt_ids=request.previous_prompt_ids, previous_completion_ids=request.previous_completion_ids
    ).ByteSize()
    return BridgeArgs(
        conversation=decode_conversation(request, request.new_messages, "new_messages"),
        previous_prompt_ids=prompt_ids,
        previous_completion_ids=completion_ids,
        previous_multi_modal_data=previous,
        text_bytes=request_bytes - ids,
        process_multimodal=request.process_multimodal if request.HasField("process_multimodal") else None,
        held_mm_hashes=frozenset(request.held_mm_hashes),
    )


# ---------------------------------------------------------------------------
# Client side: a serialised request's images, and the images the client holds
# ---------------------------------------------------------------------------

# Per method whose answer can carry images: its request's conversation field and held_mm_hashes field.
_IMAGE_FIELDS = {
    "RenderTrainingSample": (
        pb.RenderTrainingSampleRequest.MESSAGES_FIELD_NUMBER,
        pb.RenderTrainingSampleRequest.HELD_MM_HASHES_FIELD_NUMBER,
    ),
    "Render": (pb.RenderRequest.MESSAGES_FIELD_NUMBER, pb.RenderRequest.HELD_MM_HASHES_FIELD_NUMBER),
    "BridgeToNextTurn": (
        pb.BridgeToNextTurnRequest.NEW_MESSAGES_FIELD_NUMBER,
        pb.BridgeToNextTurnRequest.HELD_MM_HASHES_FIELD_NUMBER,
    ),
}


def request_images(request: bytes, method: str) -> list[memoryview]:
    """The encoded images of a serialised request of `method` (a key of _IMAGE_FIELDS), in order;
    image parts without data (process_multimodal false) left out."""
    messages_field = _IMAGE_FIELDS[method][0]
    images: list[memoryview] = []
    _, messages = split_field(memoryview(request), messages_field)
    for message in messages:
        _, parts = split_field(message, pb.Message.PARTS_FIELD_NUMBER)
        for content in parts:
            _, items = split_field(content, pb.ContentParts.PARTS_FIELD_NUMBER)
            for part in items:
                _, media = split_field(part, pb.ContentPart.IMAGE_FIELD_NUMBER)
                for image in media:
                    _, data = split_field(image, pb.MediaPart.DATA_FIELD_NUMBER)
                    if data and len(data[-1]):  # none with process_multimodal false: not rendered
                        images.append(data[-1])
    return images


def with_held_mm_hashes(request: bytes, method: str, hashes: Iterable[str]) -> bytes:
    """A serialised request of `method` with `hashes` added to its held_mm_hashes."""
    extra = WireMessage()
    for mm_hash in hashes:
        extra.append_bytes_field(_IMAGE_FIELDS[method][1], mm_hash.encode())
    return request + extra.join()


def message_images(messages: Iterable[pb.Message]) -> list[bytes]:
    """The encoded images of a request's messages, in order (as request_images)."""
    images: list[bytes] = []
    for message in messages:
        if message.WhichOneof("content") == "parts":
            images.extend(
                part.image.data
                for part in message.parts.parts
                if part.WhichOneof("part") == "image" and part.image.data
            )
    return images
