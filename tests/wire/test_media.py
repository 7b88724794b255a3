"""Media sources the client accepts, and references the server refuses."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from render_wire.errors import InvalidArgumentError
from render_wire.media import check_not_a_reference, media_bytes


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (5, 3)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bytes_pass_through_unchanged() -> None:
    data = png_bytes()
    assert media_bytes(data, "f") is data
    assert media_bytes(bytearray(data), "f") == data
    assert media_bytes(memoryview(data), "f") == data


def test_data_uris_are_decoded_like_renderers_does() -> None:
    data = png_bytes()
    assert media_bytes("data:image/png;base64," + base64.b64encode(data).decode(), "f") == data
    with pytest.raises(InvalidArgumentError, match="f: data: URI payload is not valid base64"):
        media_bytes("data:image/png;base64,abc", "f")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "1"])
def test_pil_images_arrive_with_the_pixels_renderers_would_use(mode: str) -> None:
    image = Image.new(mode, (7, 4), 1)
    if mode == "RGB":
        image.putpixel((0, 0), (10, 200, 30))
    sent = Image.open(io.BytesIO(media_bytes(image, "f")))
    expected = image if image.mode == "RGB" else image.convert("RGB")
    assert sent.convert("RGB").tobytes() == expected.tobytes()


@pytest.mark.parametrize("source", ["https://example.com/a.png", "file:///etc/passwd", "/etc/passwd", "cat.png"])
def test_urls_and_paths_are_refused(source: str) -> None:
    with pytest.raises(InvalidArgumentError, match="f: URLs and file paths are not sent"):
        media_bytes(source, "f")


def test_other_objects_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="f: unsupported media source int"):
        media_bytes(3, "f")


@pytest.mark.parametrize(
    "data",
    [
        b"http://example.com/x.png",
        b"https://x",
        b"file:///etc/passwd",
        b"/etc/passwd",
        b"./a.png",
        b"../a.png",
        b"~/a.png",
        b"data:image/png;base64,AAAA",
        b"s3://bucket/key",
        b"C:\\images\\a.png",
        b"  /padded",
    ],
)
def test_the_server_refuses_references_sent_as_bytes(data: bytes) -> None:
    with pytest.raises(InvalidArgumentError, match="looks like a URL or file path"):
        check_not_a_reference(data, "f")


def test_the_server_accepts_real_image_files() -> None:
    check_not_a_reference(png_bytes(), "f")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="GIF")  # starts with ASCII "GIF89a"
    check_not_a_reference(buffer.getvalue(), "f")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PPM")  # an ASCII header, then binary pixels
    check_not_a_reference(buffer.getvalue(), "f")
