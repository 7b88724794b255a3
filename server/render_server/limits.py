"""What one request may ask of the server, and the checks that enforce it.

Every limit has a flag (cli.py) and a default below. A request over a limit is
refused with INVALID_ARGUMENT and a one-line message naming the field, the
limit and its value, before the work the limit guards is done: image pixels
are counted from the file's header, before the image is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from render_wire.errors import invalid
from render_wire.requests import Conversation, RenderArguments

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-request and per-worker limits; see the README for each flag."""

    max_request_bytes: int = 64 * MiB  # --max-request-mb: one gRPC message (answered RESOURCE_EXHAUSTED by gRPC)
    max_messages: int = 4096  # --max-messages: messages per request
    max_images: int = 64  # --max-images: image parts per request
    max_image_bytes: int = 32 * MiB  # --max-image-mb: encoded bytes per image
    max_image_pixels: int = 8192 * 8192  # --max-image-pixels: width x height per image
    # --image-formats: the Pillow formats decoded (JPEG includes its MPO kind); what users send
    # VLMs, and no container whose reader decodes embedded images (ICO, ICNS) unless asked for.
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
    max_tokens: int = 262_144  # --max-tokens: rendered tokens per sample
    # --max-text-bytes-per-token: a request's text (all but its media bytes) may be at most
    # max_tokens times this, so that text which cannot fit is refused before it is tokenized.
    max_text_bytes_per_token: int = 16
    max_concurrent_rpcs: int = 256  # --max-concurrent-rpcs: calls per worker at once (a stream is one)


def check_request(arguments: RenderArguments | Conversation, request_bytes: int, limits: Limits) -> None:
    """Refuse a decoded request, `request_bytes` long on the wire, that asks for more than the limits allow."""
    if len(arguments.messages) > limits.max_messages:
        raise invalid(
            "messages", f"{len(arguments.messages)} messages exceed the limit of {limits.max_messages} (--max-messages)"
        )
    images = [ref for ref in arguments.media if ref.kind == "image"]
    if len(images) > limits.max_images:
        raise invalid(
            images[limits.max_images].field,
            f"{len(images)} images exceed the limit of {limits.max_images} per request (--max-images)",
        )
    for ref in images:
        size = len(ref.part["image"])
        if size > limits.max_image_bytes:
            raise invalid(
                f"{ref.field}.data", f"{size} bytes exceed the limit of {limits.max_image_bytes} bytes (--max-image-mb)"
            )
    # Tokenizing is linear in the text (~1 MB/s) and --max-tokens is only known
    # to be exceeded afterwards; text this long cannot fit in any realistic
    # tokenization (the corpus has at most ~6 bytes per token), so refuse it unread.
    text_bytes = request_bytes - sum(len(ref.part[ref.kind]) for ref in arguments.media)
    max_text_bytes = limits.max_tokens * limits.max_text_bytes_per_token
    if text_bytes > max_text_bytes:
        raise invalid(
            "messages",
            f"{text_bytes} bytes of text exceed the limit of {max_text_bytes} bytes "
            f"(--max-tokens {limits.max_tokens} x --max-text-bytes-per-token {limits.max_text_bytes_per_token})",
        )


def check_pixels(width: int, height: int, field: str, limits: Limits) -> None:
    if width * height > limits.max_image_pixels:
        raise invalid(
            field, f"{width}x{height} pixels exceed the limit of {limits.max_image_pixels} pixels (--max-image-pixels)"
        )


def check_tokens(count: int, limits: Limits) -> None:
    if count > limits.max_tokens:
        raise invalid(
            "messages", f"the sample has {count} tokens, over the limit of {limits.max_tokens} (--max-tokens)"
        )
