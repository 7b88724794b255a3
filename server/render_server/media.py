"""Decoding request images before they reach the renderer.

renderers would decode image bytes itself (`Image.open(BytesIO(data)).convert("RGB")`);
doing the same here first gives a corrupt image an error that names its field
instead of a failure somewhere inside the renderer. The renderer takes the
decoded RGB image as it is, so the pixels, and the sample, are the same.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from render_client.convert import MediaRef
from render_client.errors import invalid


def decode_images(media: list[MediaRef]) -> None:
    """Replace each image part's bytes with the decoded RGB image, in place."""
    for ref in media:
        if ref.kind == "image":
            ref.part["image"] = decode_image(ref.part["image"], f"{ref.field}.data")


def decode_image(data: bytes, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns (rather than fails) on merely large images; the limit is its error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise invalid(field, "not an image file PIL can decode") from None
    except Image.DecompressionBombError as exc:
        raise invalid(field, f"image too large to decode ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated and corrupt files fail while loading pixels, with these.
        raise invalid(field, f"corrupt image ({exc})") from None
