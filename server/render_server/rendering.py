"""One render: decoded request arguments in, renderers' training sample out.

This is the only place the server calls renderers.build_training_sample.
Renderers are not thread-safe (they share tokenizers and keep image caches),
so renders in one process take turns under a lock; the server scales across
cores with worker processes instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import renderers

from render_client.convert import RenderArguments
from render_client.errors import (
    CallCancelledError,
    InvalidArgumentError,
    RenderError,
    ResourceExhaustedError,
    UnimplementedError,
    invalid,
)

from .limits import Limits, check_tokens
from .media import decode_images
from .metrics import RENDER_CPU
from .registry import LoadedModel

_render_lock = threading.Lock()


def render_sample(
    model: LoadedModel,
    arguments: RenderArguments,
    limits: Limits,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> Any:
    """renderers.build_training_sample for a decoded request; a RenderError if it fails."""
    _check_roles(model, arguments)
    _skip_if_cancelled(is_cancelled)  # before the images are decoded, the other costly part
    if model.accepts_images:
        # Text renderers ignore images in-process, undecoded; so do we.
        decode_images(arguments.media, limits)
    role_to_mask = _role_to_mask(arguments)
    with _render_lock:
        # Waiting for the lock (HTTP renders share it) can outlast a caller: then skip the work.
        _skip_if_cancelled(is_cancelled)
        started = time.thread_time()
        try:
            renderer = model.renderer_for(arguments.chat_template_kwargs)
            sample = renderers.build_training_sample(
                renderer,
                arguments.messages,
                role_to_mask=role_to_mask,
                tools=arguments.tools,
                content_sft_roles=arguments.content_sft_roles,
                ensure_final_stop=arguments.ensure_final_stop,
                message_loss_mask=arguments.message_loss_mask,
            )
        except Exception as exc:  # the renderer rejected the conversation
            raise renderer_error(exc) from exc
        finally:
            RENDER_CPU.labels(model.info.id).inc(time.thread_time() - started)
    check_tokens(len(sample.token_ids), limits)
    return sample


def _skip_if_cancelled(is_cancelled: Callable[[], bool]) -> None:
    if is_cancelled():
        raise CallCancelledError("the call was cancelled or its deadline passed before rendering")


def renderer_error(exc: Exception) -> RenderError:
    """The status for an exception a renderer raised on a request.

    The server's models are loaded and fixed, so whatever a renderer raises on
    a request is the request's doing: INVALID_ARGUMENT, with the renderer's own
    message (prefixed with the exception type unless it is a ValueError), and
    the type in trailing metadata. NotImplementedError is UNIMPLEMENTED.
    """
    error_type = type(exc).__name__
    message = str(exc)
    if isinstance(exc, NotImplementedError):
        return UnimplementedError(message or error_type, error_type=error_type)
    if isinstance(exc, MemoryError):
        return ResourceExhaustedError("out of memory rendering this sample", error_type=error_type)
    if isinstance(exc, ValueError):
        return InvalidArgumentError(message or error_type, error_type=error_type)
    return InvalidArgumentError(f"{error_type}: {message}" if message else error_type, error_type=error_type)


def _check_roles(model: LoadedModel, arguments: RenderArguments) -> None:
    # Some renderers skip a message with a role they do not know without a word;
    # the server refuses it instead, so that nothing sent is silently dropped.
    roles = model.config.roles
    for index, message in enumerate(arguments.messages):
        if message["role"] not in roles:
            raise invalid(
                f"messages[{index}].role",
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
