"""Processed images the VLM renderers keep, bounded in bytes per process (--image-cache-mb).

renderers' VLM renderers keep `renderer._image_cache`, a dict from an image's
content hash to `(processor output, token count)`, so an image seen again (the
rollouts of one prompt) skips the image processor. They bound it by count only
(`image_cache_max`), which bounds nothing in bytes: the pixel_values of one
2048x2048 image are 96 MiB, of one 4096x4096 image 384 MiB, however few bytes
its PNG had. So the server swaps that dict, once per renderer when the registry
builds it, for an `ImageCache`: still a dict, which the renderer's own code
still reads, fills and evicts from by count (`get`, `len`, `pop(next(iter(...)))`,
`[key] = value` in every VLM renderer of renderers 0.1.12), but whose entries
are charged to one `ImageCacheBudget` per process. An insert that would go over
the budget first evicts the oldest entries of any cache in the process, and an
entry larger than the whole budget is not kept at all. Nothing of renderers is
re-implemented: what an entry holds, when it is looked up and what a render
returns stay the renderer's.

One budget per process, shared by every model's cache: the registry is loaded
once in the supervisor, before any render, and forked into every child, so each
process's caches start empty and grow on their own. A model's renderers for
different chat_template_kwargs share the model's one cache (the same processor
gives the same output for an image whatever the template kwargs); models keep
separate caches, as their processors may differ.

Not thread-safe: renders in one process take turns under rendering's lock, and
only renders touch the caches.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import ConfigError

MiB = 1024 * 1024
DEFAULT_IMAGE_CACHE_MB = 256  # --image-cache-mb; README "Sizing" counts it once per render process

# Dict attributes renderers 0.1.12 keep that requests never fill: the service takes no audio.
_UNFILLED_CACHES = frozenset({"_audio_cache"})


class ImageCacheBudget:
    """One process's bytes of processed images, across all its ImageCaches, oldest first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.used = 0  # bytes of the entries kept now
        # (the cache's id, its key) -> (the cache, the entry's bytes), in insertion order.
        self._entries: OrderedDict[tuple[int, str], tuple[ImageCache, int]] = OrderedDict()

    def new_cache(self) -> ImageCache:
        return ImageCache(self)

    def _admit(self, cache: ImageCache, key: str, size: int) -> bool:
        """Make room for an entry of `size` bytes and charge it; False if it cannot fit at all."""
        if self.max_bytes == 0 or size > self.max_bytes:
            return False
        while self.used + size > self.max_bytes:
            (_, oldest), (owner, oldest_size) = self._entries.popitem(last=False)
            dict.__delitem__(owner, oldest)
            self.used -= oldest_size
        self._entries[(id(cache), key)] = (cache, size)
        self.used += size
        return True

    def _release(self, cache: ImageCache, key: str) -> None:
        _, size = self._entries.pop((id(cache), key))
        self.used -= size


class ImageCache(dict):
    """A renderer's `_image_cache` whose entries count against the process's ImageCacheBudget.

    Reads are a dict's. Writes go through the budget: an entry over the whole
    budget is dropped (the renderer has already used it; it is processed again
    next time), others evict the process's oldest entries until they fit.
    """

    def __init__(self, budget: ImageCacheBudget) -> None:
        super().__init__()
        self.budget = budget

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            del self[key]
        if self.budget._admit(self, key, processed_bytes(value)):
            super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.budget._release(self, key)

    _missing = object()

    def pop(self, key: str, default: Any = _missing) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default is ImageCache._missing:
            raise KeyError(key)
        return default

    def popitem(self) -> tuple[str, Any]:
        key = next(reversed(self))  # dict.popitem's order: last in, first out
        return key, self.pop(key)

    def clear(self) -> None:
        for key in list(self):
            del self[key]

    def _not_charged(self, *_: Any, **__: Any) -> Any:
        raise TypeError("ImageCache is filled by item assignment only, so that each entry is charged")

    update = setdefault = __ior__ = _not_charged


def processed_bytes(value: Any) -> int:
    """The bytes of the arrays in a cache entry: (processor output, count); views count their base once."""
    seen: set[int] = set()

    def walk(item: Any) -> int:
        if isinstance(item, np.ndarray):
            while isinstance(item.base, np.ndarray):
                item = item.base
            if id(item) in seen:
                return 0
            seen.add(id(item))
            return item.nbytes
        if isinstance(item, Mapping):  # BatchFeature is a UserDict
            return sum(walk(part) for part in item.values())
        if isinstance(item, (list, tuple)):
            return sum(walk(part) for part in item)
        nbytes = getattr(item, "nbytes", None)  # a torch tensor (return_tensors="pt")
        return nbytes if isinstance(nbytes, int) else 0

    return walk(value)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 1 * MiB


def return_large_frees_to_the_os() -> bool:
    """Have glibc map every allocation of 1 MiB or more on its own, so freeing it unmaps it.

    By default glibc raises its mmap threshold, up to 32 MiB, each time such a
    block is freed; from then on arrays below it (a 1024x1024 image's 24 MiB
    pixel_values, PIL's 16 MiB blocks, the image processor's intermediates) come
    from the heap, where freed memory mostly stays in the process. Measured on
    a mix of image sizes, the render process's RSS then ran up to ~140 MiB over
    the bytes the cache held, and fell back to them with a fixed threshold
    (render times unchanged within noise). Called once in the supervisor before
    the fork: children inherit the setting. False where mallopt is missing (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def install(renderer: Any, cache: ImageCache, where: str) -> None:
    """Make `cache` the renderer's image cache; ConfigError if the renderer caches in a way not bounded here.

    A renderers upgrade that renamed or added a cache would otherwise leave the
    server with a cache bounded by count only, the hundreds of MiB per image it
    was before: refusing to start (the registry tests load every default model)
    is caught before deployment, an out-of-memory kill under load is not.
    """
    attributes = getattr(renderer, "__dict__", {})
    caches = {name for name, value in attributes.items() if "cache" in name and isinstance(value, dict)}
    unknown = sorted(caches - {"_image_cache"} - _UNFILLED_CACHES)
    kept = attributes.get("_image_cache")
    if unknown or (kept is not None and (not isinstance(kept, dict) or kept)):
        raise ConfigError(
            f"{where}: renderer {type(renderer).__name__} keeps {', '.join(unknown) or '_image_cache'} in a way "
            "render_server/image_cache.py does not bound (--image-cache-mb); did renderers change its caches?"
        )
    if kept is not None:  # renderers that do not cache processed images (Nemotron 3.5) have none
        renderer._image_cache = cache
