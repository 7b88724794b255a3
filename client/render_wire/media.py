"""Media sources: what a caller may hand over, and what the server accepts.

The client turns every image or video it is given into the encoded file's
bytes before sending: raw bytes as they are, data: URIs decoded, PIL images
encoded losslessly. The server accepts bytes only and refuses bytes that are
really a URL or a path, so that nothing it renders can make it fetch a URL or
open a file.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import sys
from typing import TYPE_CHECKING

from .errors import invalid

if TYPE_CHECKING:
    from PIL import Image  # pillow is needed only to pass PIL images

# Text that names media instead of containing it: a URI scheme, an absolute or
# relative path, or a home-relative path.
_REFERENCE = re.compile(rb"^\s*(?:[A-Za-z][A-Za-z0-9+.\-]*:|[/\\~]|\.{1,2}[/\\])")
# Encoded media starts with binary magic; a reference is short printable text.
_PRINTABLE = re.compile(rb"^[\x20-\x7e\t]*$")
_REFERENCE_MAX_BYTES = 8192


def media_bytes(source: object, field: str) -> bytes:
    """The encoded bytes of an image or video `source` a caller passed.

    Accepts bytes-like objects, `data:` URIs with base64 payloads, and PIL
    images (encoded as PNG, which is lossless: the renderer sees the same pixels).
    URLs and file paths are refused: read the file yourself and pass its bytes.
    """
    if isinstance(source, bytes):
        return source
    if isinstance(source, (bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str):
        if source.startswith("data:"):
            return _decode_data_uri(source, field)
        raise invalid(field, "URLs and file paths are not sent; pass the file's bytes, a data: URI or a PIL image")
    pil_image = sys.modules.get("PIL.Image")
    if pil_image is not None and isinstance(source, pil_image.Image):
        return _encode_pil(source)
    raise invalid(field, f"unsupported media source {type(source).__name__}; pass bytes, a data: URI or a PIL image")


def check_not_a_reference(data: bytes, field: str) -> None:
    """Refuse media bytes that are really a URL, a data: URI or a file path."""
    if len(data) <= _REFERENCE_MAX_BYTES and _PRINTABLE.match(data) and _REFERENCE.match(data):
        raise invalid(
            field,
            "looks like a URL or file path; images are accepted as the encoded file's bytes only",
        )


def _decode_data_uri(uri: str, field: str) -> bytes:
    # Decoded exactly as renderers' own loader does (payload after the first
    # comma, lenient base64), so the server receives the bytes it would have used.
    _, _, payload = uri.partition(",")
    try:
        return base64.b64decode(payload)
    except binascii.Error as exc:
        raise invalid(field, f"data: URI payload is not valid base64 ({exc})") from None


def _encode_pil(image: Image.Image) -> bytes:
    # renderers converts every image to RGB before processing; doing it here
    # first makes the PNG round trip exact for every mode PIL has.
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
