"""Decoding request images before they reach the renderer.

renderers would decode image bytes itself (`Image.open(BytesIO(data)).convert("RGB")`);
doing the same here first gives a corrupt image an error that names its field
instead of a failure somewhere inside the renderer, and lets the pixel limit be
checked from the file's header before anything is decoded. The renderer takes
the decoded RGB image as it is, so the pixels, and the sample, are the same.

Two layers keep a small file from asking for a large decode. Only the formats
of --image-formats are opened: containers whose reader decodes an embedded
image as it opens or loads (ICO, ICNS, ...) are out unless asked for. And
Pillow's own pixel check, which its readers apply to every frame and embedded
image before decoding it, is on with the --max-image-pixels limit, so it holds
inside any container that is let in.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from PIL import Image, ImageFile

from render_wire.errors import RenderError, ResourceExhaustedError, invalid
from render_wire.requests import MediaRef

from .limits import Limits, check_pixels

# Every reader registered, in the order Image.open tries them (preinit's common ones first).
Image.preinit()
Image.init()


def image_formats(text: str) -> tuple[str, ...]:
    """--image-formats: comma-separated Pillow format names (or extensions: jpg, tif), each one Pillow opens."""
    formats: list[str] = []
    extensions = Image.registered_extensions()
    for word in filter(None, (word.strip() for word in text.split(","))):
        name = word.upper() if word.upper() in Image.OPEN else extensions.get(f".{word.lower()}")
        if name not in Image.OPEN:
            raise ValueError(f"{word!r} is not an image format Pillow can open ({', '.join(sorted(Image.OPEN))})")
        if name not in formats:
            formats.append(name)
    if not formats:
        raise ValueError("name at least one image format, e.g. PNG,JPEG")
    return tuple(formats)


def decode_images(media: list[MediaRef], limits: Limits) -> None:
    """Replace each image part's bytes with the decoded RGB image, in place."""
    for ref in media:
        if ref.kind == "image":
            ref.part["image"] = decode_image(ref.part["image"], f"{ref.field}.data", limits)


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    try:
        with _pillow_pixel_limit(limits.max_image_pixels), _open(data, field, limits) as image:
            # Only the header is read (and any image an opener decodes was within the limit).
            check_pixels(*image.size, field, limits)
            return image.convert("RGB")
    except RenderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A frame or embedded image over the limit, refused by Pillow before it was decoded.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" of {pixels[1]} pixels" if pixels else ""
        raise invalid(
            field,
            f"an embedded image{size} exceeds the limit of {limits.max_image_pixels} pixels (--max-image-pixels)",
        ) from None
    except MemoryError:
        raise ResourceExhaustedError(f"{field}: not enough memory to decode the image") from None
    except Exception as exc:  # whatever a reader raises on crafted bytes is the request's fault
        # Truncated and corrupt files fail with OSError, SyntaxError, ValueError, EOFError;
        # crafted headers with anything (NotImplementedError, AttributeError, struct.error, ...).
        raise invalid(field, f"corrupt image ({_one_line(exc)})") from None


@contextmanager
def _pillow_pixel_limit(pixels: int) -> Iterator[None]:
    """Pillow's own check, which its readers apply to each frame and embedded image, at `pixels`.

    Pillow warns over its limit and raises only over twice it: the warning raises
    here too. Both settings are process-wide, so they are put back after: a
    process decodes one image at a time (renders take turns on its one render
    thread), and nothing else in it is held to the request limit.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open(data: bytes, field: str, limits: Limits) -> ImageFile.ImageFile:
    """Image.open(data, formats=allowed), without its pixel check of the outer size.

    That check would refuse an image over the limit with Pillow's words, naming
    neither the field nor the flag; decode_image checks the size itself. The
    readers' own checks of embedded images stay. Formats are tried in Pillow's
    order, as Image.open(data) tries them in-process, so a file opens the same way.
    """
    allowed = set(limits.image_formats)
    prefix = data[:16]
    fp = io.BytesIO(data)
    for name in Image.ID:
        if name in allowed and _accepts(Image.OPEN[name][1], prefix):
            fp.seek(0)
            try:
                return Image.OPEN[name][0](fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # Image.open's rule: not this format; anything else is this file's error
    # Named only from a magic number: readers without one would claim anything.
    refused = [
        name
        for name in Image.ID
        if name not in allowed and Image.OPEN[name][1] and _accepts(Image.OPEN[name][1], prefix)
    ]
    if refused:
        raise invalid(
            field, f"{refused[0]} images are not accepted (--image-formats: {', '.join(limits.image_formats)})"
        )
    raise invalid(field, "not an image file PIL can decode")


def _accepts(accept: Callable[[bytes], bool | str] | None, prefix: bytes) -> bool:
    """Whether a reader's magic-number check takes the file (Image.open's reading of its answer)."""
    try:
        result = accept is None or accept(prefix)
    except Exception:  # a check that fails takes nothing
        return False
    return bool(result) and not isinstance(result, str)


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else f"{text[:197]}..."
