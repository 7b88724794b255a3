"""Decoding request images before they reach the renderer.

renderers would decode image bytes itself (`Image.open(BytesIO(data)).convert("RGB")`);
doing the same here first gives a corrupt image an error that names its field
instead of a failure somewhere inside the renderer, and lets the pixel limit be
checked from the file's header before anything is decoded. The renderer takes
the decoded RGB image as it is, so the pixels, and the sample, are the same.
"""

from __future__ import annotations

import io

from PIL import Image

from render_client.convert import MediaRef
from render_client.errors import RenderError, invalid

from .limits import Limits, check_pixels

# The server counts pixels itself, from the header, against --max-image-pixels
# before decoding; PIL's own process-wide ceiling would refuse first, with a
# message that names neither the field nor the limit.
Image.MAX_IMAGE_PIXELS = None


def decode_images(media: list[MediaRef], limits: Limits) -> None:
    """Replace each image part's bytes with the decoded RGB image, in place."""
    for ref in media:
        if ref.kind == "image":
            ref.part["image"] = decode_image(ref.part["image"], f"{ref.field}.data", limits)


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            # open() reads only the header: a decompression bomb is refused undecoded.
            check_pixels(*image.size, field, limits)
            return image.convert("RGB")
    except RenderError:
        raise
    except Image.UnidentifiedImageError:
        raise invalid(field, "not an image file PIL can decode") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated and corrupt files fail while loading pixels, with these.
        raise invalid(field, f"corrupt image ({exc})") from None
