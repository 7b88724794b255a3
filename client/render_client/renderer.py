"""RemoteRenderer: a renderers.Renderer (RemoteMultimodalRenderer: a MultimodalRenderer) whose
methods run on a render-server, for code written against renderers' protocol."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncRenderClient
    from .client import RenderClient

from render_wire.types import Message, MultiModalDataLike, RendererInfo, SampleRequest, TokensRequest

# Tool specs (renderers.ToolSpec): JSON objects.
ToolSpecs = Sequence[Mapping[str, object]]


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

    The protocol methods return renderers' own classes where renderers is importable
    (render_wire.types' mirrors otherwise), typed Any as RenderClient's methods are, so
    that their methods (RenderedTokens.tokens_per_message, ...) can be called.
    """

    client: RenderClient | AsyncRenderClient
    model: str
    chat_template_kwargs: dict[str, object] | None = None

    def request(
        self,
        messages: Sequence[Message],
        *,
        role_to_mask: Callable[[Message], bool] | None = None,
        tools: ToolSpecs | None = None,
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
        messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
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
        self, messages: Sequence[Message], *, tools: ToolSpecs | None = None, add_generation_prompt: bool = False
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
        self, messages: Sequence[Message], *, tools: ToolSpecs | None = None, add_generation_prompt: bool = False
    ) -> list[int]:
        ids: list[int] = (
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
        return ids

    def parse_response(
        self, token_ids: Sequence[int], *, tools: ToolSpecs | None = None, prompt_ids: Sequence[int] | None = None
    ) -> Any:
        """renderers.ParsedResponse for a completion's tokens."""
        return self._client().parse_response(
            self.model, token_ids, tools=tools, prompt_ids=prompt_ids, chat_template_kwargs=self.chat_template_kwargs
        )

    def bridge_to_next_turn(
        self,
        previous_prompt_ids: Sequence[int],
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
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
        previous_prompt_ids: Sequence[int],
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
        previous_multi_modal_data: MultiModalDataLike | None = None,
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
