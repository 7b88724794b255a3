"""Server-side image decoding: the renderer's own decode, with errors naming the field."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from render_client.errors import InvalidArgumentError
from render_server.limits import Limits
from render_server.media import decode_image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "JPEG"), ("P", "GIF"), ("RGB", "WEBP")]
)
def test_decoding_matches_what_renderers_does(mode: str, fmt: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 13, 3), dtype=np.uint8)).convert(mode)
    data = encoded(image, fmt)
    expected = Image.open(io.BytesIO(data)).convert("RGB")  # renderers' own _load_pil_image
    decoded = decode_image(data, "f", Limits())
    assert decoded.mode == "RGB" and decoded.size == expected.size and decoded.tobytes() == expected.tobytes()


def test_non_images_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"^f: not an image file PIL can decode$"):
        decode_image(b"\x00\x01 definitely not an image", "f", Limits())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt: str) -> None:
    data = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), fmt)
    with pytest.raises(InvalidArgumentError, match=r"^f: (corrupt image|not an image file)"):
        decode_image(data[: len(data) // 2], "f", Limits())


def test_pixels_are_counted_from_the_header_before_decoding() -> None:
    data = encoded(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(
        InvalidArgumentError, match=r"^f: 300x200 pixels exceed the limit of 50000 pixels \(--max-image-pixels\)$"
    ):
        decode_image(data, "f", Limits(max_image_pixels=50_000))
    assert decode_image(data, "f", Limits(max_image_pixels=60_000)).size == (300, 200)
