"""One render: decoded request arguments in, renderers' results out.

This is the only place the server calls a renderer: build_training_sample,
and the Renderer protocol's render, render_ids, parse_response,
bridge_to_next_turn and what a renderer declares. Renderers are not thread-safe (they share tokenizers and keep image caches),
so renders in one process take turns under a lock; the server scales across
cores with worker processes instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pydantic
import renderers

from render_wire.errors import (
    InvalidArgumentError,
    RenderError,
    ResourceExhaustedError,
    UnimplementedError,
    error_type_name,
    invalid,
    validation_error_detail,
)
from render_wire.requests import BridgeArgs, Conversation, ParseArgs, RenderArgs, RenderArguments
from render_wire.types import RendererInfo

from .limits import Limits, check_ids, check_tokens
from .media import decode_images
from .metrics import RENDER_CPU
from .registry import LoadedModel, renderer_info

_render_lock = threading.Lock()


def render_sample(
    model: LoadedModel,
    arguments: RenderArguments,
    limits: Limits,
    stop_if_cancelled: Callable[[], None] = lambda: None,
) -> Any:
    """renderers.build_training_sample for a decoded request; a RenderError if it fails.

    `stop_if_cancelled` raises the status to answer with once the caller has
    left or the call's deadline has passed: then the work is skipped.
    """
    role_to_mask = _role_to_mask(arguments)
    with _renderer_for(model, arguments, limits, stop_if_cancelled) as renderer:
        sample = renderers.build_training_sample(
            renderer,
            arguments.messages,
            role_to_mask=role_to_mask,
            tools=arguments.tools,
            content_sft_roles=arguments.content_sft_roles,
            ensure_final_stop=arguments.ensure_final_stop,
            message_loss_mask=arguments.message_loss_mask,
        )
    check_tokens(len(sample.token_ids), limits)
    return sample


def render_tokens(
    model: LoadedModel, arguments: RenderArgs, limits: Limits, stop_if_cancelled: Callable[[], None]
) -> Any:
    """Renderer.render (or render_ids) for a decoded Render request: RenderedTokens either way."""
    conversation = arguments.conversation
    extra = _process_multimodal(arguments.process_multimodal)
    images = arguments.process_multimodal is not False
    with _renderer_for(model, conversation, limits, stop_if_cancelled, images=images) as renderer:
        if arguments.ids_only:
            ids = renderer.render_ids(
                conversation.messages,
                tools=conversation.tools,
                add_generation_prompt=arguments.add_generation_prompt,
                **extra,
            )
            rendered = renderers.RenderedTokens(token_ids=ids)
        else:
            rendered = renderer.render(
                conversation.messages,
                tools=conversation.tools,
                add_generation_prompt=arguments.add_generation_prompt,
                **extra,
            )
    check_tokens(len(rendered.token_ids), limits)
    return rendered


def bridge_to_next_turn(
    model: LoadedModel, arguments: BridgeArgs, limits: Limits, stop_if_cancelled: Callable[[], None]
) -> Any:
    """Renderer.bridge_to_next_turn for a decoded BridgeToNextTurn request: RenderedTokens or None."""
    conversation = arguments.conversation
    previous = arguments.previous_multi_modal_data
    if previous is not None and not model.accepts_images:
        raise invalid("previous_multi_modal_data", f"model {model.info.id!r} does not take images")
    # The previous turn is one sample: at most --max-tokens.
    check_ids(
        "previous_prompt_ids + previous_completion_ids",
        len(arguments.previous_prompt_ids) + len(arguments.previous_completion_ids),
        limits,
    )
    process = _process_multimodal(arguments.process_multimodal)
    images = arguments.process_multimodal is not False
    with _renderer_for(model, conversation, limits, stop_if_cancelled, field="new_messages", images=images) as renderer:
        extra: dict[str, Any] = {"previous_multi_modal_data": previous} if model.accepts_images else {}
        extra.update(process)
        bridged = renderer.bridge_to_next_turn(
            arguments.previous_prompt_ids,
            arguments.previous_completion_ids,
            conversation.messages,
            tools=conversation.tools,
            **extra,
        )
    if bridged is not None:
        check_tokens(len(bridged.token_ids), limits)
    return bridged


def parse_response(model: LoadedModel, arguments: ParseArgs, stop_if_cancelled: Callable[[], None]) -> Any:
    """Renderer.parse_response for a decoded ParseResponse request (its id lists checked already)."""
    with _renderer_lock(model, arguments.chat_template_kwargs, stop_if_cancelled, field="token_ids") as renderer:
        return renderer.parse_response(arguments.token_ids, tools=arguments.tools, prompt_ids=arguments.prompt_ids)


def describe_renderer(model: LoadedModel, chat_template_kwargs: dict[str, Any] | None) -> RendererInfo:
    """What the renderer for these chat-template kwargs declares."""
    with _renderer_lock(model, chat_template_kwargs, lambda: None, field="chat_template_kwargs") as renderer:
        return renderer_info(renderer)


@contextlib.contextmanager
def _renderer_for(
    model: LoadedModel,
    conversation: Conversation | RenderArguments,
    limits: Limits,
    stop_if_cancelled: Callable[[], None],
    field: str = "messages",
    images: bool = True,
) -> Iterator[Any]:
    """The renderer for a conversation, ready to render it: roles checked, images decoded
    (unless not `images`: process_multimodal=False, where they carry no data), lock held."""
    _check_roles(model, conversation.messages, field)
    stop_if_cancelled()  # before the images are decoded, the other costly part
    if model.accepts_images and images:
        # Text renderers ignore images in-process, undecoded; so do we.
        decode_images(conversation.media, limits)
    with _renderer_lock(model, conversation.chat_template_kwargs, stop_if_cancelled, field) as renderer:
        yield renderer


@contextlib.contextmanager
def _renderer_lock(
    model: LoadedModel,
    chat_template_kwargs: dict[str, Any] | None,
    stop_if_cancelled: Callable[[], None],
    field: str,
) -> Iterator[Any]:
    """The model's renderer for `chat_template_kwargs`, under the render lock; what it raises
    inside the block becomes a RenderError on `field`, and the CPU it takes is counted."""
    with _render_lock:
        # Waiting for the lock (HTTP renders share it) can outlast a caller: then skip the work.
        stop_if_cancelled()
        started = time.thread_time()
        try:
            renderer = model.renderer_for(chat_template_kwargs)
        except Exception as exc:  # renderers refused the kwargs (pydantic's ValidationError is a ValueError)
            raise renderer_error(exc, "chat_template_kwargs") from exc
        try:
            yield renderer
        except RenderError:
            raise
        except Exception as exc:  # the renderer rejected the request
            raise renderer_error(exc, field) from exc
        finally:
            RENDER_CPU.labels(model.info.id).inc(time.thread_time() - started)


def renderer_error(exc: Exception, field: str) -> RenderError:
    """The status for an exception a renderer raised on the request's `field`.

    The server's models are loaded and fixed, so whatever a renderer raises on
    a request is the request's doing: INVALID_ARGUMENT, with "field: " and the
    renderer's own message on one line (prefixed with the exception type unless
    it is a ValueError), and the type in trailing metadata; the message itself,
    unchanged, in the error detail. NotImplementedError is UNIMPLEMENTED.
    """
    name = type(exc).__name__
    error_type = error_type_name(type(exc))  # with its module unless a builtin: clients rebuild the class
    if isinstance(exc, MemoryError):
        return ResourceExhaustedError(f"{field}: out of memory rendering this sample", error_type=error_type)
    if isinstance(exc, pydantic.ValidationError):  # a renderer config refused a value: name its key
        details = "; ".join(
            f"{'.'.join((field, *map(str, error['loc'])))}: {error['msg']} (got {error.get('input')!r})"
            for error in exc.errors(include_url=False)
        )
        return InvalidArgumentError(details, error_type=error_type, error_detail=validation_error_detail(exc))
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not isinstance(exc, (ValueError, NotImplementedError)):
        message = f"{name}: {message}" if message else name
    details = f"{field}: {message or name}"
    # The renderer's own words, unchanged: the client's error says them, as in-process.
    own = {"message": str(exc)}
    if isinstance(exc, NotImplementedError):
        return UnimplementedError(details, error_type=error_type, error_detail=own)
    return InvalidArgumentError(details, error_type=error_type, error_detail=own)


def _process_multimodal(value: bool | None) -> dict[str, bool]:
    """The process_multimodal keyword to pass: none unless the caller passed it. The renderer
    decides what it means, and refuses it (TypeError) where it has no such argument, as in-process."""
    return {} if value is None else {"process_multimodal": value}


def _check_roles(model: LoadedModel, messages: list[dict[str, Any]], field: str) -> None:
    # Some renderers skip a message with a role they do not know without a word;
    # the server refuses it instead, so that nothing sent is silently dropped.
    roles = model.config.roles
    for index, message in enumerate(messages):
        if message["role"] not in roles:
            raise invalid(
                f"{field}[{index}].role",
                f"{message['role']!r} is not a role model {model.info.id!r} accepts ({', '.join(roles)})",
            )


def _role_to_mask(arguments: RenderArguments) -> Any:
    """The role_to_mask predicate the client evaluated, as a lookup per message."""
    if arguments.trainable is None:
        return None
    # build_training_sample calls role_to_mask with the very dicts it was given.
    trainable_by_message = {
        id(message): flag for message, flag in zip(arguments.messages, arguments.trainable, strict=True)
    }
    return lambda message: trainable_by_message[id(message)]
