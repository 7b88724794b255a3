"""Server-side image decoding: the renderer's own decode, with errors naming the field."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from render_server.limits import Limits
from render_server.media import decode_image, image_formats
from render_wire.errors import InvalidArgumentError, ResourceExhaustedError


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


def test_a_camera_jpeg_with_an_mp_extension_decodes_as_renderers_does() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (9, 13, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="MPO", save_all=True, append_images=[image.rotate(90)])
    expected = Image.open(io.BytesIO(buffer.getvalue()))
    assert expected.format == "MPO"  # what JPEG's reader makes of it: no format of its own to allow
    assert decode_image(buffer.getvalue(), "f", Limits()).tobytes() == expected.convert("RGB").tobytes()


def test_formats_outside_the_allow_list_are_refused_by_name() -> None:
    data = encoded(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(
        InvalidArgumentError, match=r"^f: TIFF images are not accepted \(--image-formats: PNG, JPEG, WEBP, GIF, BMP\)$"
    ):
        decode_image(data, "f", Limits())
    assert decode_image(data, "f", Limits(image_formats=("TIFF",))).size == (8, 8)
    with pytest.raises(InvalidArgumentError, match=r"^f: PNG images are not accepted \(--image-formats: TIFF\)$"):
        decode_image(encoded(Image.new("RGB", (8, 8)), "PNG"), "f", Limits(image_formats=("TIFF",)))


def test_image_formats_flag_values() -> None:
    assert image_formats(",".join(Limits().image_formats)) == Limits().image_formats
    assert image_formats(" png, JPG,tif ,Png,ico") == ("PNG", "JPEG", "TIFF", "ICO")
    with pytest.raises(ValueError, match=r"^'foo' is not an image format Pillow can open \(AVIF, .*PNG"):
        image_formats("png,foo")
    with pytest.raises(ValueError, match="at least one"):
        image_formats(" , ")


# ---------------------------------------------------------------------------
# Bombs: small files that ask for a large decode. Each must be refused at the
# cost of reading a header: milliseconds, and no memory to speak of.
# ---------------------------------------------------------------------------


def png_1bit(width: int, height: int) -> bytes:
    """A black 1-bit PNG, written by hand: 16000x16000 is 31 KB, and building it needs no 256 MB image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row * min(1000, height - y)) for y in range(0, height, 1000))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat + compressor.flush()) + chunk(b"IEND", b"")
    )


def ico(frame: bytes) -> bytes:
    """An ICO whose directory says 16x16, with `frame` (a PNG) as its one image."""
    return struct.pack("<3H", 0, 1, 1) + struct.pack("<4B2H2I", 16, 16, 0, 0, 1, 32, len(frame), 22) + frame


def icns(frame: bytes) -> bytes:
    """An ICNS whose one entry, ic08 (256x256), is `frame` (a PNG)."""
    entry = b"ic08" + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


@cache
def bomb(container: str) -> bytes:
    """An ICO or ICNS of 31 KB wrapping a 16000x16000 PNG: 256 MB to decode."""
    return {"ICO": ico, "ICNS": icns}[container](png_1bit(16000, 16000))


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel-format flags (0x4000) Pillow does not know: it raises NotImplementedError."""
    header = bytearray(120)
    struct.pack_into("<3I", header, 0, 0x1007, 4, 4)  # flags, height, width
    struct.pack_into("<2I", header, 68, 32, 0x4000)  # pixel format: size, flags
    return b"DDS " + struct.pack("<I", 124) + bytes(header)


def spider_stack_image() -> bytes:
    """A SPIDER header for an image inside a stack, with no stack: Pillow raises AttributeError."""
    header = [0.0] * 27  # SPIDER numbers its header words from 1
    header[2 - 1] = 4  # rows
    header[5 - 1] = 1  # iform: a 2D image
    header[12 - 1] = 4  # columns
    header[13 - 1], header[22 - 1], header[23 - 1] = 7, 112, 16  # header records, bytes (= 7 x 16), record bytes
    header[27 - 1] = 1  # image number 1, yet stack flag (word 24) 0
    return struct.pack(">27f", *header) + bytes(64)


@dataclass
class Cost:
    seconds: float = 0.0
    python_bytes: int = 0  # tracemalloc's peak: Python's own allocations
    rss_bytes: int | None = None  # peak resident memory over what the process had: Pillow's pixels too


def _status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Start VmHWM (peak RSS) again from the current RSS; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def measured() -> Iterator[Cost]:
    cost = Cost()
    tracemalloc.start()
    peak_resettable = reset_peak_rss()
    rss = _status_kib("self", "VmRSS")
    started = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - started
        cost.python_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if peak_resettable:
            cost.rss_bytes = (_status_kib("self", "VmHWM") - rss) * 1024


def assert_cheap(cost: Cost) -> None:
    # Decoding the bomb took ~0.5 s and 256 MB; reading a header takes a millisecond.
    assert cost.seconds < 0.2, cost
    assert cost.python_bytes < 4 * 2**20, cost
    assert cost.rss_bytes is None or cost.rss_bytes < 8 * 2**20, cost


@pytest.mark.parametrize("container", ["ICO", "ICNS"])
def test_container_bombs_are_refused_unread_as_formats_not_allowed(container: str) -> None:
    data = bomb(container)
    with measured() as cost, pytest.raises(InvalidArgumentError) as caught:
        decode_image(data, "messages[0].content[1].image.data", Limits())
    assert caught.value.details == (
        f"messages[0].content[1].image.data: {container} images are not accepted "
        "(--image-formats: PNG, JPEG, WEBP, GIF, BMP)"
    )
    assert_cheap(cost)


@pytest.mark.parametrize("container", ["ICO", "ICNS"])
def test_container_bombs_allowed_are_refused_before_their_embedded_image_is_decoded(container: str) -> None:
    data = bomb(container)
    limits = Limits(image_formats=("PNG", "JPEG", container))
    with measured() as cost, pytest.raises(InvalidArgumentError) as caught:
        decode_image(data, "messages[0].content[1].image.data", limits)
    assert caught.value.details == (
        "messages[0].content[1].image.data: an embedded image of 256000000 pixels exceeds the limit of "
        "67108864 pixels (--max-image-pixels)"
    )
    assert_cheap(cost)


@pytest.mark.filterwarnings("ignore:Image was not the expected size")  # the ICO's directory says 16x16
def test_embedded_images_between_the_limit_and_twice_it_are_refused_too() -> None:
    # Pillow only warns up to twice its limit; the warning counts as a refusal.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    frame = encoded(Image.new("RGB", (300, 300), (9, 8, 7)), "PNG")
    limits = Limits(max_image_pixels=60_000, image_formats=("ICO",))
    with pytest.raises(
        InvalidArgumentError,
        match=r"^f: an embedded image of 90000 pixels exceeds the limit of 60000 pixels \(--max-image-pixels\)$",
    ):
        decode_image(ico(frame), "f", limits)
    # Pillow's own limit is back as it was: nothing else in the process is held to the request limit.
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
    expected = Image.open(io.BytesIO(ico(frame))).convert("RGB")  # allowed and within the limit: as in-process
    decoded = decode_image(ico(frame), "f", Limits(max_image_pixels=90_000, image_formats=("ICO",)))
    assert decoded.size == (300, 300) and decoded.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("crafted", "fmt", "refused", "failure"),
    [
        (dds_with_unknown_pixel_format, "DDS", "DDS images are not accepted", "Unknown pixel format flags 16384"),
        # SPIDER has no magic number: outside the list it is nothing Pillow can name.
        (spider_stack_image, "SPIDER", "not an image file PIL can decode", "'SpiderImageFile' object has no attribute"),
    ],
    ids=["DDS", "SPIDER"],
)
def test_any_decoder_exception_is_invalid_argument_naming_the_field(
    crafted: Callable[[], bytes], fmt: str, refused: str, failure: str
) -> None:
    data = crafted()
    with pytest.raises(InvalidArgumentError) as caught:
        decode_image(data, "messages[2].content[0].image.data", Limits())
    assert caught.value.details.startswith(f"messages[2].content[0].image.data: {refused}")
    with pytest.raises(InvalidArgumentError) as caught:  # allowed: the reader itself fails on the header
        decode_image(data, "messages[2].content[0].image.data", Limits(image_formats=("PNG", fmt)))
    assert caught.value.details.startswith(f"messages[2].content[0].image.data: corrupt image ({failure}")
    assert "\n" not in caught.value.details


def test_decoder_messages_are_one_line_and_out_of_memory_is_resource_exhausted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encoded(Image.new("RGB", (8, 8)), "PNG")

    def fails(error: BaseException) -> None:
        def convert(*args: object, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(Image.Image, "convert", convert)

    fails(struct.error("unpack requires\na buffer\r\nof 4 bytes"))
    with pytest.raises(InvalidArgumentError, match=r"^f: corrupt image \(unpack requires a buffer of 4 bytes\)$"):
        decode_image(data, "f", Limits())
    fails(IndexError())
    with pytest.raises(InvalidArgumentError, match=r"^f: corrupt image \(IndexError\)$"):
        decode_image(data, "f", Limits())
    fails(MemoryError())
    with pytest.raises(ResourceExhaustedError, match=r"^f: not enough memory to decode the image$"):
        decode_image(data, "f", Limits())
