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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .aio import AsyncRenderClient
    from .client import RenderClient


@dataclass
class PlaceholderRange:
    """Where one media item's placeholder tokens sit in `token_ids`."""

    offset: int
    length: int


@dataclass
class MultiModalData:
    """The media a VLM renderer emitted, keyed by modality ("image", "video")."""

    mm_hashes: dict[str, list[str]] = field(default_factory=dict)
    mm_placeholders: dict[str, list[PlaceholderRange]] = field(default_factory=dict)
    mm_items: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

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
    arguments: dict[str, Any] | str | None = None
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


@dataclass(frozen=True)
class ResultTypes:
    """The classes protocol results are built with: renderers' own, or the mirrors above."""

    RenderedTokens: Any
    MultiModalData: Any
    PlaceholderRange: Any
    ParsedResponse: Any
    ParsedToolCall: Any
    ToolCallParseStatus: Any


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
    """What a server-side renderer declares (DescribeRenderer; ListModels for the default one)."""

    stop_token_ids: tuple[int, ...]
    is_prefix_stable: bool
    multimodal: bool
    mm_token_type_id_map: dict[int, int]


@dataclass(frozen=True)
class ModelInfo:
    """One model a server has loaded (from ListModels)."""

    id: str
    renderer: str
    accepts_images: bool
    tokenizer_fingerprint: str
    roles: tuple[str, ...]
    renderer_config: dict[str, Any]
    renderer_info: RendererInfo | None = None  # None from a server without the Renderer protocol


@dataclass(frozen=True)
class ServerModels:
    """What ListModels answers: the models and the library versions behind them."""

    models: tuple[ModelInfo, ...]
    renderers_version: str
    transformers_version: str

    def get(self, model_id: str) -> ModelInfo:
        for model in self.models:
            if model.id == model_id:
                return model
        raise KeyError(model_id)


@dataclass(frozen=True)
class SampleRequest:
    """The arguments of one build_training_sample call, for `render_many`.

    Make one with `RemoteRenderer.request(messages, ...)`.
    """

    model: str
    messages: Sequence[Mapping[str, Any]]
    role_to_mask: Callable[[Mapping[str, Any]], bool] | None = None
    tools: Sequence[Any] | None = None
    content_sft_roles: Iterable[str] | None = None
    ensure_final_stop: bool = False
    message_loss_mask: Sequence[bool | int] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class TokensRequest:
    """The arguments of one Renderer.render (or render_ids) call, for `render_many_tokens`.

    Make one with `RemoteRenderer.render_request(messages, ...)`.
    """

    model: str
    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Any] | None = None
    add_generation_prompt: bool = False
    chat_template_kwargs: Mapping[str, Any] | None = None
    ids_only: bool = False


@dataclass(frozen=True)
class RemoteRenderer:
    """A server model standing in for a local `renderers.Renderer`.

    From `RenderClient.renderer(...)`: it implements renderers' Renderer
    protocol (render, render_ids, parse_response, bridge_to_next_turn,
    get_stop_token_ids, is_prefix_stable) by asking the server, so renderers'
    own helpers (`renderers.build_training_sample`, `build_trajectory_step`)
    run on it unchanged; models that take images get a RemoteMultimodalRenderer.
    Pass it to this package's `build_training_sample` to build the sample on
    the server instead, in one call. `AsyncRenderClient.renderer(...)` gives
    one for `render_client.aio.build_training_sample` only (the protocol is
    synchronous). It can be pickled, and used after a fork.
    """

    client: RenderClient | AsyncRenderClient
    model: str
    chat_template_kwargs: dict[str, Any] | None = None

    def request(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        role_to_mask: Callable[[Mapping[str, Any]], bool] | None = None,
        tools: Sequence[Any] | None = None,
        content_sft_roles: Iterable[str] | None = None,
        ensure_final_stop: bool = False,
        message_loss_mask: Sequence[bool | int] | None = None,
    ) -> SampleRequest:
        """A build_training_sample call on this model, e.g. for `render_many`."""
        return SampleRequest(
            self.model,
            messages,
            role_to_mask=role_to_mask,
            tools=tools,
            content_sft_roles=content_sft_roles,
            ensure_final_stop=ensure_final_stop,
            message_loss_mask=message_loss_mask,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def render_request(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = False,
        ids_only: bool = False,
    ) -> TokensRequest:
        """A render (with ids_only: render_ids) call on this model, for `render_many_tokens`."""
        return TokensRequest(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            ids_only=ids_only,
        )

    # -- renderers' Renderer protocol ---------------------------------------------

    @property
    def is_prefix_stable(self) -> bool:
        return self._info().is_prefix_stable

    def get_stop_token_ids(self) -> list[int]:
        return list(self._info().stop_token_ids)

    def render(
        self, messages: list[Any], *, tools: list[Any] | None = None, add_generation_prompt: bool = False
    ) -> Any:
        """renderers.RenderedTokens, as the server's renderer renders `messages`."""
        return self._client().render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def render_ids(
        self, messages: list[Any], *, tools: list[Any] | None = None, add_generation_prompt: bool = False
    ) -> list[int]:
        return (
            self._client()
            .render_tokens(
                self.model,
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                chat_template_kwargs=self.chat_template_kwargs,
                ids_only=True,
            )
            .token_ids
        )

    def parse_response(
        self, token_ids: list[int], *, tools: list[Any] | None = None, prompt_ids: list[int] | None = None
    ) -> Any:
        """renderers.ParsedResponse for a completion's tokens."""
        return self._client().parse_response(
            self.model, token_ids, tools=tools, prompt_ids=prompt_ids, chat_template_kwargs=self.chat_template_kwargs
        )

    def bridge_to_next_turn(
        self,
        previous_prompt_ids: list[int],
        previous_completion_ids: list[int],
        new_messages: list[Any],
        *,
        tools: list[Any] | None = None,
    ) -> Any:
        """renderers.RenderedTokens extending the previous turn, or None: render the conversation anew."""
        return self._client().bridge_to_next_turn(
            self.model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def _client(self) -> RenderClient:
        if not hasattr(self.client, "render_tokens"):
            raise TypeError(
                "renderers' Renderer protocol is synchronous: use a renderer from RenderClient.renderer(...); "
                "this one is for render_client.aio.build_training_sample"
            )
        return self.client  # type: ignore[return-value]

    def _info(self) -> RendererInfo:
        return self._client().renderer_info(self.model, self.chat_template_kwargs)


@dataclass(frozen=True)
class RemoteMultimodalRenderer(RemoteRenderer):
    """A RemoteRenderer for a model that takes images: a `renderers.MultimodalRenderer`."""

    @property
    def mm_token_type_id_map(self) -> dict[int, int]:
        return dict(self._info().mm_token_type_id_map)

    def bridge_to_next_turn(
        self,
        previous_prompt_ids: list[int],
        previous_completion_ids: list[int],
        new_messages: list[Any],
        *,
        tools: list[Any] | None = None,
        previous_multi_modal_data: Any = None,
    ) -> Any:
        """MultimodalRenderer.bridge_to_next_turn: the previous turn's media carried forward."""
        return self._client().bridge_to_next_turn(
            self.model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            previous_multi_modal_data=previous_multi_modal_data,
            chat_template_kwargs=self.chat_template_kwargs,
        )
