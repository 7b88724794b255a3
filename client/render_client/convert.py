"""The one conversion layer between the protobuf contract and Python values.

Client side, `encode_request` turns `build_training_sample`'s arguments into a
request and `decode_response` turns the answer into a RenderedTrainingSample.
Server side, `decode_request` turns a request back into the arguments
renderers takes and `encode_sample` turns renderers' result into the answer.
Both directions live here so that they cannot drift apart.

Every problem with a request raises InvalidArgumentError with a one-line
message naming the field, e.g.
`messages[3].tool_calls[0].function.arguments: not valid JSON (...)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ._pb import render_pb2 as pb
from .compact import CompactTensor, compact
from .errors import RenderError, error_from_status, invalid
from .jsonvalue import dump_json, load_json
from .media import check_not_a_reference, media_bytes
from .types import (
    ModelInfo,
    MultiModalData,
    PlaceholderRange,
    RenderedTrainingSample,
    RendererInfo,
    SampleRequest,
    ServerModels,
)
from .wire import WireFormatError, WireMessage, byte_view, merged, split_field

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
    part: dict[str, Any]  # the part dict; part[kind] holds the encoded bytes


@dataclass
class RenderArguments:
    """A decoded request: the arguments of one build_training_sample call."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[Any] | None
    # role_to_mask(message) per message, as the client evaluated it; None: role_to_mask=None.
    trainable: list[bool] | None
    message_loss_mask: list[bool] | None
    content_sft_roles: frozenset[str] | None
    ensure_final_stop: bool
    chat_template_kwargs: dict[str, Any] | None
    media: list[MediaRef]


# ---------------------------------------------------------------------------
# Client side: Python arguments -> request
# ---------------------------------------------------------------------------


def encode_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    role_to_mask: Callable[[Mapping[str, Any]], bool] | None = None,
    tools: Sequence[Any] | None = None,
    content_sft_roles: Iterable[str] | None = None,
    ensure_final_stop: bool = False,
    message_loss_mask: Sequence[bool | int] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
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


def encode_message(message: Any, field: str, out: pb.Message) -> None:
    if not isinstance(message, Mapping):
        raise invalid(field, f"expected a message dict, got {type(message).__name__}")
    if "role" not in message:
        raise invalid(f"{field}.role", "missing")
    extra: dict[str, Any] = {}
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
                    _encode_part(part, f"{field}.content[{index}]", out.parts.parts.add())
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


def _encode_part(part: Any, field: str, out: pb.ContentPart) -> None:
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


def _media_source(part: Mapping[str, Any], kind: str) -> tuple[str, Any]:
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


def _encode_tool_call(call: Any, field: str, out: pb.ToolCall) -> None:
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


def _set_text(message: Any, name: str, value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise invalid(field, f"expected a str, got {type(value).__name__}")
    try:
        setattr(message, name, value)
    except UnicodeEncodeError:
        raise invalid(field, "not encodable as UTF-8 (lone surrogate)") from None


def _append_text(container: Any, value: Any, field: str) -> None:
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
    messages: list[dict[str, Any]]
    tools: list[Any] | None
    chat_template_kwargs: dict[str, Any] | None
    media: list[MediaRef]


def decode_conversation(
    request: Any,
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


def decode_tools(request: Any) -> list[Any] | None:
    """A request's `tools_json`: None when absent."""
    if not request.HasField("tools_json"):
        return None
    tools = load_json(request.tools_json, "tools_json")
    if type(tools) is not list:
        raise invalid("tools_json", "must be a JSON array of tool specs")
    return tools


def decode_chat_template_kwargs(request: Any) -> dict[str, Any] | None:
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
) -> dict[str, Any]:
    """One message dict; `field` names the list it is in, for errors."""
    # ListFields walks only the fields that are set, in one call: this runs
    # for every message of every request, so no HasField per key.
    where = f"{field}[{index}]"
    out: dict[str, Any] = {"role": message.role}
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


def _decode_part(part: pb.ContentPart, message: str, index: int, media: list[MediaRef]) -> dict[str, Any]:
    field = f"{message}.content[{index}]"
    kind = part.WhichOneof("part")
    if kind == "text":
        out: dict[str, Any] = {"type": "text", "text": part.text}
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


def _decode_tool_call(call: pb.ToolCall, message: str, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if call.HasField("id"):
        out["id"] = call.id
    if call.HasField("type"):
        out["type"] = call.type
    if call.HasField("function"):
        function: dict[str, Any] = {}
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
# Server side: renderers result -> response
# ---------------------------------------------------------------------------


def encode_sample(sample: Any, *, compact_tensors: bool = False) -> WireMessage:
    """A renderers.RenderedTrainingSample (or a mirror of one) as a RenderedTrainingSample message.

    Its arrays stay in place until the message is joined (see wire.py); with
    `compact_tensors`, pixel tensors go in compact form where it is exact.
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
            encode_multi_modal_data(sample.multi_modal_data, compact_tensors=compact_tensors),
        )
    if sample.mm_token_type_ids is not None:
        message.append_message_field(
            pb.RenderedTrainingSample.MM_TOKEN_TYPE_IDS_FIELD_NUMBER,
            WireMessage(pb.TokenTypeIds(ids=sample.mm_token_type_ids).SerializeToString()),
        )
    return message


def packed_bools(values: Any) -> bytes | None:
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
    response = WireMessage()
    response.append_message_field(pb.RenderTrainingSampleResponse.SAMPLE_FIELD_NUMBER, sample)
    return response.join()


def encode_result(index: int, outcome: WireMessage | RenderError) -> WireMessage:
    """One `results` entry of a RenderTrainingSamplesResponse: the sample or the error of request `index`.

    A response is its entries one after another (WireMessage.extend). A
    RendersResponse is the same on the wire, with a RenderedTokens message as
    `outcome` (RenderResult numbers its fields as RenderTrainingSampleResult does).
    """
    if isinstance(outcome, RenderError):
        error = pb.Error(code=outcome.code.value[0], message=outcome.details, error_type=outcome.error_type or "")
        result = WireMessage(pb.RenderTrainingSampleResult(index=index, error=error).SerializeToString())
    else:
        result = WireMessage(pb.RenderTrainingSampleResult(index=index).SerializeToString())
        result.append_message_field(pb.RenderTrainingSampleResult.SAMPLE_FIELD_NUMBER, outcome)
    entry = WireMessage()
    entry.append_message_field(pb.RenderTrainingSamplesResponse.RESULTS_FIELD_NUMBER, result)
    return entry


def encode_multi_modal_data(data: Any, *, compact_tensors: bool = False) -> WireMessage:
    """A MultiModalData message; with `compact_tensors`, each tensor that compact.py's form
    holds exactly travels in it (a CompactTensor value always does)."""
    message = WireMessage(
        pb.MultiModalData(
            mm_hashes=[pb.ModalityHashes(modality=m, hashes=hashes) for m, hashes in data.mm_hashes.items()],
            mm_placeholders=[
                pb.ModalityPlaceholders(
                    modality=m, ranges=[pb.PlaceholderRange(offset=r.offset, length=r.length) for r in ranges]
                )
                for m, ranges in data.mm_placeholders.items()
            ],
        ).SerializeToString()
    )
    for modality, items in data.mm_items.items():
        entry = WireMessage(pb.ModalityItems(modality=modality).SerializeToString())
        for item in items:
            encoded_item = WireMessage()
            for name, value in item.items():
                named = WireMessage(pb.NamedTensor(name=name).SerializeToString())
                named.append_message_field(pb.NamedTensor.TENSOR_FIELD_NUMBER, _encode_tensor(value, compact_tensors))
                encoded_item.append_message_field(pb.MultiModalItem.FIELDS_FIELD_NUMBER, named)
            entry.append_message_field(pb.ModalityItems.ITEMS_FIELD_NUMBER, encoded_item)
        message.append_message_field(pb.MultiModalData.MM_ITEMS_FIELD_NUMBER, entry)
    return message


def _encode_tensor(value: Any, compact_tensors: bool) -> WireMessage:
    if isinstance(value, CompactTensor):
        return _encode_compact(value)
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise TypeError(f"mm_items values must be numeric numpy arrays, got {type(value).__name__}")
    if compact_tensors and value.nbytes >= _COMPACT_FROM_BYTES:
        compacted = compact(value)  # None unless it decodes back to these very bytes
        if compacted is not None:
            return _encode_compact(compacted)
    tensor = WireMessage(pb.Tensor(dtype=value.dtype.str, shape=value.shape).SerializeToString())
    data = byte_view(value)  # C order whatever the array's layout
    if len(data):  # proto3 leaves an empty bytes field out
        tensor.append_bytes_field(pb.Tensor.DATA_FIELD_NUMBER, data)
    return tensor


# Below this, the tables cost more than the codes save.
_COMPACT_FROM_BYTES = 64 * 1024


def _encode_compact(value: CompactTensor) -> WireMessage:
    tensor = WireMessage(pb.Tensor(dtype=value.dtype.str, shape=value.shape).SerializeToString())
    form = WireMessage(
        pb.CompactTensor(
            tables=b"".join(table.tobytes() for table in value.tables),
            table_sizes=[len(table) for table in value.tables],
            repeats=value.repeats,
        ).SerializeToString()
    )
    form.append_bytes_field(pb.CompactTensor.CODES_FIELD_NUMBER, byte_view(value.codes))
    tensor.append_message_field(pb.Tensor.COMPACT_FIELD_NUMBER, form)
    return tensor


# ---------------------------------------------------------------------------
# Client side: response -> Python values
# ---------------------------------------------------------------------------


def decode_response(data: bytes) -> RenderedTrainingSample:
    """The RenderedTrainingSample a serialised RenderTrainingSampleResponse carries."""
    try:
        rest, samples = split_field(memoryview(data), pb.RenderTrainingSampleResponse.SAMPLE_FIELD_NUMBER)
        pb.RenderTrainingSampleResponse.FromString(rest)  # fields a newer server may add; or junk
        return _decode_sample(merged(samples) if samples else memoryview(b""))
    except (WireFormatError, DecodeError) as exc:
        raise RenderError(f"malformed response: {exc}") from None


def decode_results(data: bytes, decode_payload: Callable[[memoryview], Any] | None = None) -> list[tuple[int, Any]]:
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
# (wire.split_field); everything else is parsed by upb.


def _decode_result(data: memoryview, decode_payload: Callable[[memoryview], Any]) -> tuple[int, Any]:
    rest, samples = split_field(data, pb.RenderTrainingSampleResult.SAMPLE_FIELD_NUMBER)
    result = pb.RenderTrainingSampleResult.FromString(rest)
    if samples and result.HasField("error"):
        # Valid protobuf (the last one wins) but never sent: refuse rather than guess.
        raise WireFormatError(f"result {result.index} carries both a sample and an error")
    if samples:
        return result.index, decode_payload(merged(samples))
    error = result.error
    status = _STATUS_BY_NUMBER.get(error.code, grpc.StatusCode.UNKNOWN)
    return result.index, error_from_status(status, error.message, error.error_type or None)


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


def as_list(values: Any) -> list[Any]:
    """A repeated int or bool field as a list of Python ints or bools.

    numpy reads upb's container in C: 1.7x (ids) to 3.5x (bools) faster than
    list() for a sample's thousands of tokens. An empty field is an empty list.
    """
    return np.array(values).tolist() if values else []


def decode_multi_modal_data(
    data: memoryview, data_class: Any = MultiModalData, range_class: Any = PlaceholderRange
) -> Any:
    """A MultiModalData message as `data_class` (this package's, or renderers' own) of `range_class`es."""
    rest, entries = split_field(data, pb.MultiModalData.MM_ITEMS_FIELD_NUMBER)
    message = pb.MultiModalData.FromString(rest)
    mm_items: dict[str, list[dict[str, np.ndarray]]] = {}
    for entry in entries:
        entry_rest, items = split_field(entry, pb.ModalityItems.ITEMS_FIELD_NUMBER)
        mm_items[pb.ModalityItems.FromString(entry_rest).modality] = [_decode_item(item) for item in items]
    return data_class(
        mm_hashes={entry.modality: list(entry.hashes) for entry in message.mm_hashes},
        mm_placeholders={
            entry.modality: [range_class(offset=r.offset, length=r.length) for r in entry.ranges]
            for entry in message.mm_placeholders
        },
        mm_items=mm_items,
    )


def _decode_item(data: memoryview) -> dict[str, np.ndarray | CompactTensor]:
    _, fields = split_field(data, pb.MultiModalItem.FIELDS_FIELD_NUMBER)
    item: dict[str, np.ndarray | CompactTensor] = {}
    for field in fields:
        rest, tensors = split_field(field, pb.NamedTensor.TENSOR_FIELD_NUMBER)
        item[pb.NamedTensor.FromString(rest).name] = _decode_tensor(merged(tensors) if tensors else memoryview(b""))
    return item


def _decode_tensor(data: memoryview) -> np.ndarray | CompactTensor:
    """A Tensor message as an array, or as a CompactTensor when it came in that form
    (compact.materialize_all turns those into arrays, unless the caller keeps them)."""
    rest, payloads = split_field(data, pb.Tensor.DATA_FIELD_NUMBER)
    rest, forms = split_field(memoryview(rest), pb.Tensor.COMPACT_FIELD_NUMBER)
    tensor = pb.Tensor.FromString(rest)
    try:
        dtype = np.dtype(tensor.dtype)
        if dtype.hasobject:
            raise TypeError("object arrays are not accepted")
        if forms:
            return _decode_compact(merged(forms), dtype, tuple(tensor.shape))
        # A view of the response's bytes (the last occurrence wins): no copy, read-only.
        array = np.frombuffer(payloads[-1] if payloads else b"", dtype=dtype).reshape(tuple(tensor.shape))
    except (TypeError, ValueError) as exc:
        raise RenderError(f"malformed tensor in response (dtype {tensor.dtype!r}): {exc}") from None
    if array.nbytes < _SHARE_FROM_BYTES or not array.flags.aligned:
        # A small view would keep a whole response alive; an unaligned one slows
        # numpy and is refused by some consumers. Those are copied, read-only alike.
        array = array.copy()
        array.flags.writeable = False
    return array


_SHARE_FROM_BYTES = 1 << 20


def _decode_compact(data: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> CompactTensor:
    rest, codes = split_field(data, pb.CompactTensor.CODES_FIELD_NUMBER)
    form = pb.CompactTensor.FromString(rest)
    sizes = list(form.table_sizes)
    groups = len(sizes)
    if len(shape) != 2 or not groups or form.repeats < 1 or shape[1] % (groups * form.repeats):
        raise ValueError(f"shape {shape} does not split into {groups} groups of {form.repeats} copies")
    span = shape[1] // (groups * form.repeats)
    code_array = np.frombuffer(codes[-1] if codes else b"", dtype=np.uint8).reshape(shape[0], groups, span)
    values = np.frombuffer(form.tables, dtype=dtype)
    if len(values) != sum(sizes):
        raise ValueError(f"{len(values)} table values for table sizes {sizes}")
    tables = tuple(np.split(values, np.cumsum(sizes)[:-1]))
    for group, table in enumerate(tables):
        if code_array.size and int(code_array[:, group].max()) >= len(table):
            raise ValueError(f"a code of group {group} is past its table of {len(table)}")
    return CompactTensor(dtype, shape, form.repeats, code_array, tables)


# ---------------------------------------------------------------------------
# ListModels
# ---------------------------------------------------------------------------


def encode_models(models: ServerModels) -> pb.ListModelsResponse:
    """The ListModels answer for a server's models."""
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                id=model.id,
                renderer=model.renderer,
                accepts_images=model.accepts_images,
                tokenizer_fingerprint=model.tokenizer_fingerprint,
                roles=model.roles,
                renderer_config_json=json.dumps(model.renderer_config, ensure_ascii=False),
                renderer_info=None if model.renderer_info is None else encode_renderer_info(model.renderer_info),
            )
            for model in models.models
        ],
        renderers_version=models.renderers_version,
        transformers_version=models.transformers_version,
    )


def decode_models(message: pb.ListModelsResponse) -> ServerModels:
    """The ServerModels a ListModels answer carries."""
    return ServerModels(
        models=tuple(
            ModelInfo(
                id=model.id,
                renderer=model.renderer,
                accepts_images=model.accepts_images,
                tokenizer_fingerprint=model.tokenizer_fingerprint,
                roles=tuple(model.roles),
                renderer_config=json.loads(model.renderer_config_json or "{}"),
                renderer_info=decode_renderer_info(model.renderer_info) if model.HasField("renderer_info") else None,
            )
            for model in message.models
        ),
        renderers_version=message.renderers_version,
        transformers_version=message.transformers_version,
    )


def encode_renderer_info(info: RendererInfo) -> pb.RendererInfo:
    return pb.RendererInfo(
        stop_token_ids=info.stop_token_ids,
        is_prefix_stable=info.is_prefix_stable,
        multimodal=info.multimodal,
        mm_token_type_id_map=[
            pb.TokenTypeEntry(token_id=token_id, type_id=type_id)
            for token_id, type_id in info.mm_token_type_id_map.items()
        ],
    )


def decode_renderer_info(message: pb.RendererInfo) -> RendererInfo:
    return RendererInfo(
        stop_token_ids=tuple(message.stop_token_ids),
        is_prefix_stable=message.is_prefix_stable,
        multimodal=message.multimodal,
        mm_token_type_id_map={entry.token_id: entry.type_id for entry in message.mm_token_type_id_map},
    )
