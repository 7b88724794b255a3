"""The client's value types: requests for render_many, and results mirroring renderers'.

They hold the same values, in the same Python types, as the dataclasses
`renderers.build_training_sample` returns in-process, so trainer code reads them
the same way. Tensors are numpy arrays decoded straight from the response bytes
without a copy, so they are read-only: call `.copy()` to write to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class ModelInfo:
    """One model a server has loaded (from ListModels)."""

    id: str
    renderer: str
    accepts_images: bool
    tokenizer_fingerprint: str
    roles: tuple[str, ...]
    renderer_config: dict[str, Any]


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
class RemoteRenderer:
    """A server model standing in for a local `renderers.Renderer`.

    From `RenderClient.renderer(...)` or `AsyncRenderClient.renderer(...)`; pass
    it to `build_training_sample` (render_client or render_client.aio to match).
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
