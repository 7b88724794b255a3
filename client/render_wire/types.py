"""The client's value types: requests for render_many, and results mirroring renderers'.

They hold the same values, in the same Python types, as the dataclasses
`renderers.build_training_sample` returns in-process, so trainer code reads them
the same way. Tensors are numpy arrays decoded straight from the response bytes
without a copy, so they are read-only: call `.copy()` to write to one.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeAlias

import numpy as np

from .compact import CompactTensor
from .errors import ModelNotFoundError
from .jsonvalue import JSONValue

# A chat message as callers pass it: a `renderers.Message`, or any mapping with its keys
# (the values are checked when it is encoded).
Message: TypeAlias = Mapping[str, object]
# A tensor of a media item: an array, or, where the caller keeps them, its compact form.
Tensor: TypeAlias = np.ndarray | CompactTensor


@dataclass
class PlaceholderRange:
    """Where one media item's placeholder tokens sit in `token_ids`."""

    offset: int
    length: int


class HeldItem(dict[str, "Tensor"]):
    """An mm_items entry whose tensors did not travel: the client holds them (MultiModalItem.held).

    Empty; the client puts the tensors it holds for the item's hash in its place
    before a result is handed out (render_client/images.py). As an item of a
    BridgeToNextTurn request's previous_multi_modal_data, the server's stand-in
    for the item the client kept.
    """


@dataclass
class MultiModalData:
    """The media a VLM renderer emitted, keyed by modality ("image", "video")."""

    mm_hashes: dict[str, list[str]] = field(default_factory=dict)
    mm_placeholders: dict[str, list[PlaceholderRange]] = field(default_factory=dict)
    mm_items: dict[str, list[dict[str, Tensor]]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.mm_hashes or self.mm_placeholders or self.mm_items)


@dataclass(frozen=True)
class RenderedTrainingSample:
    """One training sample: `renderers.RenderedTrainingSample` field for field.

    `multi_modal_data` and `mm_token_type_ids` are None for text-only renderers
    and text-only samples; `mm_token_type_ids` has one entry per token
    (0 text, 1 image, 2 video) when media was rendered.
    """

    token_ids: list[int]
    loss_mask: list[bool]
    multi_modal_data: MultiModalData | None = None
    mm_token_type_ids: list[int] | None = None


@dataclass
class RenderedTokens:
    """What `Renderer.render` returns: `renderers.RenderedTokens` field for field.

    The client returns renderers' own class when renderers is importable
    (so its methods, such as `tokens_per_message`, work), this one otherwise.
    """

    token_ids: list[int] = field(default_factory=list)
    message_indices: list[int] = field(default_factory=list)
    sampled_mask: list[bool] = field(default_factory=list)
    is_content: list[bool] = field(default_factory=list)
    message_roles: list[str] = field(default_factory=list)
    message_tool_names: list[str | None] = field(default_factory=list)
    multi_modal_data: MultiModalData | None = None


class ToolCallParseStatus(StrEnum):
    """`renderers.ToolCallParseStatus`: how one tool-call attempt parsed."""

    OK = "ok"
    INVALID_JSON = "invalid_json"
    UNCLOSED_BLOCK = "unclosed_block"
    MISSING_NAME = "missing_name"
    MALFORMED_STRUCTURE = "malformed_structure"
    UNKNOWN_TOOL = "unknown_tool"


@dataclass
class ParsedToolCall:
    """`renderers.ParsedToolCall`: one tool-call attempt of a completion."""

    raw: str
    name: str | None = None
    arguments: dict[str, JSONValue] | str | None = None
    token_span: tuple[int, int] | None = None
    status: ToolCallParseStatus = ToolCallParseStatus.OK
    id: str | None = None


@dataclass
class ParsedResponse:
    """What `Renderer.parse_response` returns: `renderers.ParsedResponse` field for field."""

    content: str
    reasoning_content: str | None = None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    reasoning_complete: bool | None = True


# ---------------------------------------------------------------------------
# renderers' results or the mirrors above: what the wire reads and writes
# ---------------------------------------------------------------------------
# The server encodes renderers' own results; the client decodes into renderers'
# classes where renderers is importable (result_types), else into the mirrors.
# Both have the same fields, which is all these protocols ask for (read-only).


class PlaceholderRangeLike(Protocol):
    """A `renderers.PlaceholderRange` or a `PlaceholderRange`."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...


class MultiModalDataLike(Protocol):
    """A `renderers.MultiModalData` or a `MultiModalData`. Encoding checks each item's values
    (numeric numpy arrays or CompactTensors)."""

    @property
    def mm_hashes(self) -> Mapping[str, Sequence[str]]: ...
    @property
    def mm_placeholders(self) -> Mapping[str, Sequence[PlaceholderRangeLike]]: ...
    @property
    def mm_items(self) -> Mapping[str, Sequence[Mapping[str, object]]]: ...


class RenderedTrainingSampleLike(Protocol):
    """A `renderers.RenderedTrainingSample` or a `RenderedTrainingSample`."""

    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def loss_mask(self) -> Sequence[bool]: ...
    @property
    def multi_modal_data(self) -> MultiModalDataLike | None: ...
    @property
    def mm_token_type_ids(self) -> Sequence[int] | None: ...


class RenderedTokensLike(Protocol):
    """A `renderers.RenderedTokens` or a `RenderedTokens`."""

    @property
    def token_ids(self) -> Sequence[int]: ...
    @property
    def message_indices(self) -> Sequence[int]: ...
    @property
    def sampled_mask(self) -> Sequence[bool]: ...
    @property
    def is_content(self) -> Sequence[bool]: ...
    @property
    def message_roles(self) -> Sequence[str]: ...
    @property
    def message_tool_names(self) -> Sequence[str | None]: ...
    @property
    def multi_modal_data(self) -> MultiModalDataLike | None: ...


class ParsedToolCallLike(Protocol):
    """A `renderers.ParsedToolCall` or a `ParsedToolCall`."""

    @property
    def raw(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def arguments(self) -> Mapping[str, object] | str | None: ...
    @property
    def token_span(self) -> tuple[int, int] | None: ...
    @property
    def status(self) -> str: ...  # a ToolCallParseStatus: a StrEnum
    @property
    def id(self) -> str | None: ...


class ParsedResponseLike(Protocol):
    """A `renderers.ParsedResponse` or a `ParsedResponse`."""

    @property
    def content(self) -> str: ...
    @property
    def reasoning_content(self) -> str | None: ...
    @property
    def tool_calls(self) -> Sequence[ParsedToolCallLike]: ...
    @property
    def reasoning_complete(self) -> bool | None: ...


@dataclass(frozen=True)
class ResultTypes:
    """The classes protocol results are built with: renderers' own, or the mirrors above.

    Each is called with its fields as keyword arguments (ToolCallParseStatus with a status's value).
    """

    RenderedTokens: Callable[..., RenderedTokensLike]
    MultiModalData: Callable[..., MultiModalDataLike]
    PlaceholderRange: Callable[..., PlaceholderRangeLike]
    ParsedResponse: Callable[..., ParsedResponseLike]
    ParsedToolCall: Callable[..., ParsedToolCallLike]
    ToolCallParseStatus: Callable[[str], str]


@functools.cache
def result_types() -> ResultTypes:
    """renderers' classes where renderers is importable (isinstance checks and their methods
    work on results), else this module's mirrors: the client itself needs only grpcio,
    protobuf and numpy. Imported on first use (renderers takes about a second to import)."""
    try:
        import renderers as source
    except ImportError:
        source = sys.modules[__name__]
    return ResultTypes(
        RenderedTokens=source.RenderedTokens,
        MultiModalData=source.MultiModalData,
        PlaceholderRange=source.PlaceholderRange,
        ParsedResponse=source.ParsedResponse,
        ParsedToolCall=source.ParsedToolCall,
        ToolCallParseStatus=source.ToolCallParseStatus,
    )


@dataclass(frozen=True)
class RendererInfo:
    """What a server-side renderer declares (DescribeRenderer; ListModels for the default one):
    what a RemoteRenderer needs to stand in for it, besides its methods."""

    stop_token_ids: tuple[int, ...]
    is_prefix_stable: bool
    multimodal: bool
    mm_token_type_id_map: dict[int, int]
    # The renderer's class, e.g. "renderers.qwen3_vl.Qwen3VLRenderer"; empty from an older server.
    renderer_class: str = ""
    # renderer.config as model_dump(mode="json") gives it, and the fields set in it explicitly.
    config: dict[str, JSONValue] = field(default_factory=dict)
    config_fields_set: tuple[str, ...] = ()
    # Its other public data attributes and properties with JSON values (supports_tools, ...).
    attributes: dict[str, JSONValue] = field(default_factory=dict)
    # Its public attributes whose values cannot travel (a tokenizer, ...).
    unserved_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """One model a server has loaded (from ListModels)."""

    id: str
    renderer: str
    accepts_images: bool
    tokenizer_fingerprint: str
    roles: tuple[str, ...]
    renderer_config: dict[str, JSONValue]
    renderer_info: RendererInfo | None = None  # None from a server without the Renderer protocol
    # The Hugging Face model whose files these are (and their revision, None: the default
    # branch); "" when the registry does not say.
    hub_model: str = ""
    hub_revision: str | None = None


@dataclass(frozen=True)
class ServerModels:
    """What ListModels answers: the models and the library versions behind them."""

    models: tuple[ModelInfo, ...]
    renderers_version: str
    transformers_version: str
    held_images: bool = False  # it honours held_mm_hashes and held items (an older server does not)

    def get(self, model_id: str) -> ModelInfo:
        for model in self.models:
            if model.id == model_id:
                return model
        raise KeyError(model_id)

    def info(self, model_id: str) -> ModelInfo:
        """`get`, or ModelNotFoundError naming the models there are."""
        try:
            return self.get(model_id)
        except KeyError:
            available = ", ".join(info.id for info in self.models)
            raise ModelNotFoundError(f"model: no model {model_id!r} (this server has {available})") from None

    def may_carry_images(self, model_id: str) -> bool:
        """False only for a model the server says takes no images (its requests' images are not
        rendered, so a client learns nothing from them)."""
        try:
            return self.get(model_id).accepts_images
        except KeyError:
            return True


@dataclass(frozen=True)
class SampleRequest:
    """The arguments of one build_training_sample call, for `render_many`.

    Make one with `RemoteRenderer.request(messages, ...)`.
    """

    model: str
    messages: Sequence[Message]
    role_to_mask: Callable[[Message], bool] | None = None
    tools: Sequence[Mapping[str, object]] | None = None
    content_sft_roles: Iterable[str] | None = None
    ensure_final_stop: bool = False
    message_loss_mask: Sequence[bool | int] | None = None
    chat_template_kwargs: Mapping[str, object] | None = None


@dataclass(frozen=True)
class TokensRequest:
    """The arguments of one Renderer.render (or render_ids) call, for `render_many_tokens`.

    Make one with `RemoteRenderer.render_request(messages, ...)`.
    """

    model: str
    messages: Sequence[Message]
    tools: Sequence[Mapping[str, object]] | None = None
    add_generation_prompt: bool = False
    chat_template_kwargs: Mapping[str, object] | None = None
    ids_only: bool = False
    process_multimodal: bool | None = None  # None: not passed (the renderer's default, True)
