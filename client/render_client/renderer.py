"""RemoteRenderer: renderers' renderer for a server model, its methods run on the server.

`RenderClient.renderer(model)` gives the twin of the renderer the server built
for the model: the protocol methods (render, render_ids, parse_response,
bridge_to_next_turn, get_stop_token_ids, is_prefix_stable,
mm_token_type_id_map) ask the server; `config` is renderers' own config object
and every other public attribute (supports_tools, supports_process_multimodal,
effective_thinking_retention, ...) has the server renderer's value, as it declares
them (DescribeRenderer). Where renderers is importable its class is a subclass of
the renderer class it stands for (`isinstance(r, renderers.Qwen3VLRenderer)`),
so code that picks by class (renderers.client's feature encoders) takes it for
that renderer; every other member of that class (those needing the tokenizer,
which stays on the server) raises AttributeError saying it is not served here.

AsyncRemoteRenderer (`AsyncRenderClient.renderer(model)`) has the same methods,
awaitable, for asyncio rollout servers.

A RemoteRenderer is immutable and its client is thread-safe: one may be used
from many threads at once, with no lock. It pickles (with its client) and works
after a fork.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from render_wire.types import Message, MultiModalDataLike, RendererInfo, SampleRequest, TokensRequest

if TYPE_CHECKING:
    from .aio import AsyncRenderClient
    from .client import RenderClient

# Tool specs (renderers.ToolSpec): JSON objects.
ToolSpecs = Sequence[Mapping[str, object]]


@dataclass(frozen=True, eq=False)
class _ModelCalls:
    """What both renderers share: the model they name and the requests for render_many."""

    model: str
    chat_template_kwargs: dict[str, object] | None

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


@dataclass(frozen=True, repr=False, eq=False)  # equal and hashed by identity, as renderers' renderers
class RemoteRenderer(_ModelCalls):
    """The server's renderer for a model, standing in for a local `renderers.Renderer`.

    From `RenderClient.renderer(...)` (or, with the switch on, renderers'
    own `create_renderer`): see the module docstring. Pass it to renderers'
    helpers (`renderers.build_training_sample`, `build_trajectory_step`,
    `renderers.client.generate`), or to this package's `build_training_sample`
    to build the sample on the server in one call.

    The protocol methods return renderers' own classes where renderers is importable
    (render_wire.types' mirrors otherwise), typed Any as RenderClient's methods are.
    """

    client: RenderClient
    # What the server's renderer declares; asked of the client when not given.
    info: RendererInfo | None = None

    def __init__(
        self,
        client: RenderClient,
        model: str,
        chat_template_kwargs: Mapping[str, object] | None = None,
        info: RendererInfo | None = None,
    ) -> None:
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "chat_template_kwargs", dict(chat_template_kwargs) if chat_template_kwargs else None)
        object.__setattr__(self, "info", info)

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
        return self.client.render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def render_ids(
        self, messages: Sequence[Message], *, tools: ToolSpecs | None = None, add_generation_prompt: bool = False
    ) -> list[int]:
        rendered = self.client.render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            ids_only=True,
        )
        ids: list[int] = rendered.token_ids
        return ids

    def parse_response(
        self, token_ids: Sequence[int], *, tools: ToolSpecs | None = None, prompt_ids: Sequence[int] | None = None
    ) -> Any:
        """renderers.ParsedResponse for a completion's tokens."""
        return self.client.parse_response(
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
        return self.client.bridge_to_next_turn(
            self.model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    # -- what the renderer declares -------------------------------------------------

    @functools.cached_property
    def config(self) -> Any:
        """The renderers config the server's renderer was built with (chat-template kwargs
        applied): renderers' own config object where renderers is importable, else its JSON
        as a dict."""
        return config_from_info(self._info())

    def __getattr__(self, name: str) -> Any:
        # Only for names not found on the class: the renderer's declared attributes
        # (supports_tools, effective_thinking_retention, ...), or a clear refusal.
        if name.startswith("__") or name in ("client", "model", "chat_template_kwargs", "info"):
            raise AttributeError(name)
        stands_for = getattr(type(self), "stands_for", None)
        known = stands_for is not None and hasattr(stands_for, name)
        if not name.startswith("_"):  # declared attributes are public: only those ask the server
            info = self._info()
            if name in info.attributes:
                return copy.deepcopy(info.attributes[name])
            known = known or name in info.unserved_attributes
        if known:
            raise AttributeError(
                f"{type(self).__name__}.{name} is not served remotely: this renderer runs on the render"
                f" server (model {self.model!r}); here it has renderers' protocol methods and the public"
                " attributes the server declares, nothing that needs the renderer's tokenizer"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        kwargs = f", chat_template_kwargs={self.chat_template_kwargs!r}" if self.chat_template_kwargs else ""
        return f"<remote {type(self).__name__} for model {self.model!r}{kwargs}>"

    def __reduce__(self) -> tuple[object, ...]:
        # The class may be made at run time (stand_in_class): rebuilt by name, not by pickle.
        config = self.__dict__.get("config")
        return (_rebuild, (self.client, self.model, self.chat_template_kwargs, self.info, config))

    def _info(self) -> RendererInfo:
        if self.info is not None:
            return self.info
        return self.client.renderer_info(self.model, self.chat_template_kwargs)


@dataclass(frozen=True, repr=False, eq=False, init=False)  # RemoteRenderer's __init__
class RemoteMultimodalRenderer(RemoteRenderer):
    """A RemoteRenderer for a model that takes images: a `renderers.MultimodalRenderer`."""

    @property
    def mm_token_type_id_map(self) -> dict[int, int]:
        return dict(self._info().mm_token_type_id_map)

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
        add_generation_prompt: bool = False,
        process_multimodal: bool | None = None,
    ) -> Any:
        """renderers.RenderedTokens; `process_multimodal` (renderers with supports_process_multimodal)
        False renders a placeholder per image and sends no image data."""
        return self.client.render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            process_multimodal=process_multimodal,
        )

    def bridge_to_next_turn(
        self,
        previous_prompt_ids: Sequence[int],
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
        previous_multi_modal_data: MultiModalDataLike | None = None,
        process_multimodal: bool | None = None,
    ) -> Any:
        """MultimodalRenderer.bridge_to_next_turn: the previous turn's media carried forward."""
        return self.client.bridge_to_next_turn(
            self.model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            previous_multi_modal_data=previous_multi_modal_data,
            chat_template_kwargs=self.chat_template_kwargs,
            process_multimodal=process_multimodal,
        )


def remote_renderer(
    client: RenderClient,
    model: str,
    chat_template_kwargs: Mapping[str, object] | None,
    info: RendererInfo,
) -> RemoteRenderer:
    """The RemoteRenderer for what `info` declares: of the class standing in for its renderer class."""
    base = RemoteMultimodalRenderer if info.multimodal else RemoteRenderer
    real = renderer_class(info.renderer_class)
    cls = stand_in_class(base, real) if real is not None else base
    return cls(client, model, chat_template_kwargs, info)


def _rebuild(
    client: RenderClient,
    model: str,
    chat_template_kwargs: dict[str, object] | None,
    info: RendererInfo | None,
    config: Any,
) -> RemoteRenderer:
    if info is None:
        return RemoteRenderer(client, model, chat_template_kwargs)
    renderer = remote_renderer(client, model, chat_template_kwargs, info)
    if config is not None:
        renderer.__dict__["config"] = config
    return renderer


def renderer_class(name: str) -> type | None:
    """The renderers class `name` ("renderers.qwen3_vl.Qwen3VLRenderer") names, or None.

    Only renderers' own modules are imported, and only where renderers is installed:
    a server's answer never makes the client import anything else.
    """
    module_name, _, qualname = name.rpartition(".")
    if not module_name.startswith("renderers.") or "." in qualname:
        return None
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except ImportError:
        return None
    found = getattr(module, qualname, None)
    return found if isinstance(found, type) else None


def stand_in_class(base: type[RemoteRenderer], real: type) -> type[RemoteRenderer]:
    """`base`, made a subclass of renderer class `real` (with its name) whose members are
    all shadowed: the protocol by `base`'s, the rest by AttributeError (or the value the
    server declares for it), so that none runs on the remote object by accident. One class
    per pair, whichever thread asks first."""
    with _making_classes:
        made = _stand_in_classes.get((base, real))
        if made is None:
            made = _stand_in_classes[(base, real)] = _stand_in_class(base, real)
        return made


_making_classes = threading.Lock()
_stand_in_classes: dict[tuple[type, type], type[RemoteRenderer]] = {}


def _stand_in_class(base: type[RemoteRenderer], real: type) -> type[RemoteRenderer]:
    namespace: dict[str, object] = {
        "__module__": __name__,
        "__qualname__": real.__qualname__,
        "__doc__": f"{real.__name__} on a render server: {base.__name__} standing in for {real.__module__}.{real.__qualname__}.",
        "stands_for": real,
        # Frozen like `base` (whose dataclass check lets a subclass's instances take new attributes).
        "__setattr__": _refuse_assignment,
        "__delattr__": _refuse_assignment,
    }
    own = set(dir(base))
    for klass in real.__mro__[:-1]:  # not object
        for name in vars(klass):
            if name not in own and name not in namespace and not (name.startswith("__") and name.endswith("__")):
                namespace[name] = _Shadowed(name)
    return type(real.__name__, (base, real), namespace)


def _refuse_assignment(self: object, name: str, *value: object) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to {name!r}: a remote renderer is immutable")


class _Shadowed:
    """A member of the renderer class stood in for: AttributeError on the remote object, so
    that its __getattr__ answers (the declared value, or why it is not served)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:  # on the class: the real class's member, for introspection
            return getattr(getattr(owner, "stands_for", None), self.name)
        raise AttributeError(self.name)


def config_from_info(info: RendererInfo) -> Any:
    """renderers' config object for `info.config` (with the fields set it declares), or the
    JSON dict where renderers is not importable or does not know the config."""
    try:
        import pydantic
        import renderers
    except ImportError:
        return copy.deepcopy(info.config)
    try:
        config = pydantic.TypeAdapter(renderers.RendererConfig).validate_python(info.config)
    except pydantic.ValidationError:
        return copy.deepcopy(info.config)  # a config of a renderers version this one does not know
    object.__setattr__(config, "__pydantic_fields_set__", set(info.config_fields_set))
    return config


# ---------------------------------------------------------------------------
# asyncio
# ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False, eq=False)
class AsyncRemoteRenderer(_ModelCalls):
    """The server's renderer for a model, for asyncio code: RemoteRenderer's methods, awaitable.

    From `AsyncRenderClient.renderer(...)`, which asks the server nothing: what the
    renderer declares (config, attributes, stop tokens) comes from `await describe()`.
    Pass it to `render_client.aio.build_training_sample` to build samples.
    """

    client: AsyncRenderClient

    def __init__(
        self, client: AsyncRenderClient, model: str, chat_template_kwargs: Mapping[str, object] | None = None
    ) -> None:
        object.__setattr__(self, "client", client)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "chat_template_kwargs", dict(chat_template_kwargs) if chat_template_kwargs else None)

    async def describe(self) -> RendererInfo:
        """What the server's renderer declares: stop tokens, prefix stability, class, config,
        attributes (asked once per client)."""
        return await self.client.renderer_info(self.model, self.chat_template_kwargs)

    async def get_stop_token_ids(self) -> list[int]:
        return list((await self.describe()).stop_token_ids)

    async def render(
        self,
        messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
        add_generation_prompt: bool = False,
        process_multimodal: bool | None = None,
    ) -> Any:
        """renderers.RenderedTokens, as the server's renderer renders `messages`
        (`process_multimodal` as RemoteMultimodalRenderer.render's)."""
        return await self.client.render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            process_multimodal=process_multimodal,
        )

    async def render_ids(
        self, messages: Sequence[Message], *, tools: ToolSpecs | None = None, add_generation_prompt: bool = False
    ) -> list[int]:
        rendered = await self.client.render_tokens(
            self.model,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            ids_only=True,
        )
        ids: list[int] = rendered.token_ids
        return ids

    async def parse_response(
        self, token_ids: Sequence[int], *, tools: ToolSpecs | None = None, prompt_ids: Sequence[int] | None = None
    ) -> Any:
        """renderers.ParsedResponse for a completion's tokens."""
        return await self.client.parse_response(
            self.model, token_ids, tools=tools, prompt_ids=prompt_ids, chat_template_kwargs=self.chat_template_kwargs
        )

    async def bridge_to_next_turn(
        self,
        previous_prompt_ids: Sequence[int],
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[Message],
        *,
        tools: ToolSpecs | None = None,
        previous_multi_modal_data: MultiModalDataLike | None = None,
        process_multimodal: bool | None = None,
    ) -> Any:
        """renderers.RenderedTokens extending the previous turn, or None (previous_multi_modal_data:
        models that take images only)."""
        return await self.client.bridge_to_next_turn(
            self.model,
            previous_prompt_ids,
            previous_completion_ids,
            new_messages,
            tools=tools,
            previous_multi_modal_data=previous_multi_modal_data,
            chat_template_kwargs=self.chat_template_kwargs,
            process_multimodal=process_multimodal,
        )

    def __repr__(self) -> str:
        kwargs = f", chat_template_kwargs={self.chat_template_kwargs!r}" if self.chat_template_kwargs else ""
        return f"<async remote renderer for model {self.model!r}{kwargs}>"
