"""Each image once per client: the processed tensors of images the client holds do not travel again.

A GRPO group renders one prompt's image G times, a VLM rollout re-renders its
images every turn, an SFT epoch repeats its images: each time, the answer would
carry the same pixel tensors (24 MiB for a 1024x1024 image, 3 MiB compact), and
the client would hold one more copy. So the client keeps the tensors of the
images it was answered, in an `ImageStore` bounded in bytes (least recently used
dropped first), keyed by model and the image's mm_hash, the content hash the
server's renderer computed and sent beside them. A request that carries an image
the client has seen lists that image's mm_hash in `held_mm_hashes`; the server
leaves the tensors out of the answer's items whose hash it computed from the
request's own image and finds listed (MultiModalItem.held), and the client puts
the arrays it holds in their place: the very arrays, read-only, one copy however
many results share them (each result gets its own item dict, as in-process).

The server never uses a hash it did not compute (it only leaves tensors out), so
the worst a wrong claim does is cost the bytes it meant to save. Which hash an
image has, the client learns from answers: the images of a request, in order,
are the answer's new items, in order (what every renderers VLM renderer
emits); where that does not hold for an answer, it learns nothing from it.
Images are known by a digest of their encoded bytes (blake2b). Calls carrying
an image the client has not yet had answered, while another call carrying it is
on its way, wait for that call's answer first (a group's G rollouts start
together): then they claim it, rather than each receiving its tensors.

The claimed items stay with the call until it is answered (a Claim holds them),
so they cannot be dropped meanwhile; an answer that names an item the client
does not hold (a server that took a hash it should not have) is sent again
without claims: `MissingHeldItem`.

bridge_to_next_turn's previous_multi_modal_data is the caller's: its items go
to the server as held items (renderers' VLM renderers only count and carry
them), and come back as the caller's own item dicts, as in-process.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from render_wire.compact import CompactTensor
from render_wire.errors import RenderError
from render_wire.requests import message_images
from render_wire.types import HeldItem, MultiModalDataLike

MiB = 1 << 20
DEFAULT_IMAGE_MEMORY_MB = 256
IMAGE = "image"
# Digests whose hash the client remembers, and digests it could not learn a hash for: bounded in count.
_MAX_HINTS = 65536
# An array that keeps alive more than this much more than its own bytes (a view of a whole
# answer) is copied before it is kept: the store's bytes are what it holds.
_PINNED_SLACK = 64 * 1024


class MissingHeldItem(Exception):
    """An answer left out tensors of an item the call did not claim and the client does not hold."""


class Waiter(Protocol):
    """What a call waits on while another call carrying the same image is on its way."""

    def set(self) -> None: ...


def digest(image: bytes | memoryview) -> bytes:
    """What the client knows an encoded image by."""
    return hashlib.blake2b(image, digest_size=16).digest()


@dataclass
class Claim:
    """What one call claims to hold, and the images it is the first to carry."""

    model: str
    digests: list[bytes]  # the request's images, in order
    held: dict[str, dict[str, Any]]  # mm_hash -> the item claimed (kept here until the answer)
    owned: list[tuple[str, bytes]] = field(default_factory=list)  # keys this call carries first

    @property
    def hashes(self) -> list[str]:
        return list(self.held)


class ImageStore:
    """Processed images a client holds, bounded in bytes. Thread-safe."""

    def __init__(self, max_bytes: int, new_waiter: Callable[[], Waiter]) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._new_waiter = new_waiter
        self._lock = threading.Lock()
        # (model, mm_hash) -> (item, its bytes), least recently used first.
        self._items: OrderedDict[tuple[str, str], tuple[dict[str, Any], int]] = OrderedDict()
        # (model, digest) -> mm_hash, learned from answers; and digests no answer could be matched to.
        self._hashes: OrderedDict[tuple[str, bytes], str] = OrderedDict()
        self._unmatched: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._in_flight: dict[tuple[str, bytes], Waiter] = {}

    def __len__(self) -> int:
        return len(self._items)

    def claim(self, model: str, images: Sequence[bytes | memoryview], *, wait: bool = True) -> Claim | list[Waiter]:
        """What a call carrying `images` claims to hold; or (with `wait`) the calls it should wait
        for first (each carrying one of its images not yet known), after which it asks again."""
        digests = [digest(image) for image in images] if self.max_bytes else []
        if not digests:  # a text call: nothing to claim, no lock (64 threads share it)
            return Claim(model, digests, {})
        with self._lock:
            waits = []
            for image in digests:
                key = (model, image)
                waiter = self._in_flight.get(key)
                if waiter is not None and key not in self._hashes:
                    waits.append(waiter)
            if waits and wait:
                return waits
            claim = Claim(model, digests, {})
            for image in digests:
                key = (model, image)
                mm_hash = self._hashes.get(key)
                if mm_hash is not None:
                    self._hashes.move_to_end(key)
                    kept = self._items.get((model, mm_hash))
                    if kept is not None:
                        self._items.move_to_end((model, mm_hash))
                        claim.held[mm_hash] = kept[0]
                elif key not in self._unmatched and key not in self._in_flight:
                    self._in_flight[key] = self._new_waiter()
                    claim.owned.append(key)
            return claim

    def release(self, claim: Claim) -> None:
        """The call is over: calls waiting for its images go on."""
        if not claim.owned:
            return
        with self._lock:
            waiters = [self._in_flight.pop(key) for key in claim.owned if key in self._in_flight]
            claim.owned.clear()
        for waiter in waiters:
            waiter.set()

    def fill(self, claim: Claim, data: MultiModalDataLike | None, previous: MultiModalDataLike | None = None) -> None:
        """Put the tensors the client holds in place of each held item of an answer's `data`.

        An item of `previous` (a bridge's previous_multi_modal_data) comes back as
        the caller's own item; the others as a new dict of the arrays held.
        MissingHeldItem if an item is held that the client does not hold.
        """
        if data is None:
            return
        for modality, items in data.mm_items.items():
            hashes = data.mm_hashes.get(modality, ())
            carried = previous.mm_items.get(modality, ()) if previous is not None else ()
            carried_hashes = previous.mm_hashes.get(modality, ()) if previous is not None else ()
            for index, item in enumerate(items):
                if not isinstance(item, HeldItem):
                    continue
                mm_hash = hashes[index] if index < len(hashes) else None
                if index < len(carried) and (index >= len(carried_hashes) or carried_hashes[index] == mm_hash):
                    items[index] = carried[index]  # type: ignore[index]  # renderers' lists, or the mirrors'
                    continue
                kept = claim.held.get(mm_hash) if mm_hash is not None else None
                if kept is None and mm_hash is not None:
                    with self._lock:
                        found = self._items.get((claim.model, mm_hash))
                    kept = found[0] if found is not None else None
                if kept is None:
                    raise MissingHeldItem(
                        f"the answer left out the tensors of {modality} {index}, which this client does not hold"
                    )
                items[index] = dict(kept)  # type: ignore[index]

    def keep(self, claim: Claim, data: MultiModalDataLike | None, previous: MultiModalDataLike | None = None) -> None:
        """Learn from an answer (its `data` filled and in its final form): the hash of each image the
        request carried, and the tensors of each item not yet held."""
        if data is None and not claim.digests:  # a text answer to a text call: nothing to learn
            return
        carried = len(previous.mm_items.get(IMAGE, ())) if previous is not None else 0
        with self._lock:
            if data is not None:
                for modality, items in data.mm_items.items():
                    first = carried if modality == IMAGE else 0
                    for mm_hash, item in zip(data.mm_hashes.get(modality, ())[first:], items[first:], strict=False):
                        self._keep_item(claim.model, mm_hash, item)
            new_hashes = list(data.mm_hashes.get(IMAGE, ()))[carried:] if data is not None else []
            new_items = len(data.mm_items.get(IMAGE, ())) - carried if data is not None else 0
            for number, image in enumerate(claim.digests):
                key = (claim.model, image)
                if len(new_hashes) == len(claim.digests) == new_items:
                    self._hashes[key] = new_hashes[number]
                    self._hashes.move_to_end(key)
                    self._unmatched.pop(key, None)
                elif key not in self._hashes:
                    self._unmatched[key] = None
            _bound(self._hashes)
            _bound(self._unmatched)

    def _keep_item(self, model: str, mm_hash: str, item: Mapping[str, Any]) -> None:
        key = (model, mm_hash)
        if key in self._items:
            self._items.move_to_end(key)
            return
        size = 0
        for name, value in item.items():
            unpinned = _unpinned(value)
            if unpinned is not value:
                item[name] = unpinned  # type: ignore[index]  # the answer shares the copy: one copy
            size += _nbytes(unpinned)
        if size > self.max_bytes:
            return
        while self.used + size > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.used -= dropped
        self._items[key] = (dict(item), size)
        self.used += size


def _bound(entries: OrderedDict[Any, Any]) -> None:
    while len(entries) > _MAX_HINTS:
        entries.popitem(last=False)


def _nbytes(value: object) -> int:
    if isinstance(value, (np.ndarray, CompactTensor)):
        return int(value.nbytes)
    return 0


def _unpinned(value: Any) -> Any:
    """`value`, or a read-only copy if it is a view that keeps a much larger buffer alive."""
    if isinstance(value, CompactTensor):
        codes = _unpinned(value.codes)
        if codes is value.codes:
            return value
        return CompactTensor(value.dtype, value.shape, value.repeats, codes, value.tables)
    if not isinstance(value, np.ndarray):
        return value
    base: object = value
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    size = len(base) if isinstance(base, (bytes, bytearray)) else 0
    if size <= value.nbytes + _PINNED_SLACK:
        return value
    copy = value.copy()
    copy.flags.writeable = False
    return copy


class StreamImages:
    """Each image once for a stream (render_many, render_many_tokens): its requests, encoded here,
    claim the images the client holds, and its results, which come back in the same order, get the
    held items filled in and their new items kept. Calls do not wait here for one another's images."""

    def __init__(
        self,
        store: ImageStore,
        request_class: type[Any],
        encode: Callable[[Any], Any],
        may_carry_images: Callable[[str], bool],
    ) -> None:
        self._store = store
        self._request_class = request_class
        self._encode = encode
        self._may_carry_images = may_carry_images
        self._pending: deque[Claim | None] = deque()  # one per request taken, in order

    def request(self, item: Any) -> Any:
        """What to send for one of the caller's items: its request, with its claims."""
        request = item
        if not isinstance(item, self._request_class):
            try:
                request = self._encode(item)
            except RenderError:
                self._pending.append(None)
                return item  # the stream encodes it again, and answers its error in its place
        images = message_images(request.messages) if self._may_carry_images(request.model) else []
        claim = self._store.claim(request.model, images, wait=False)
        assert isinstance(claim, Claim)
        if claim.held:
            if request is item:  # the caller's message: not changed
                request = type(item)()
                request.CopyFrom(item)
            request.held_mm_hashes.extend(claim.held)
        self._pending.append(claim)
        return request

    def result(self, result: Any, finish: Callable[[Any], Any]) -> Any:
        """One result, in order: held items filled in, `finish`ed (tensors materialised), new items kept."""
        claim = self._pending.popleft()
        if claim is None:
            return result
        try:
            if isinstance(result, RenderError):
                return result
            media = result.multi_modal_data
            try:
                self._store.fill(claim, media)
            except MissingHeldItem as exc:
                return RenderError(f"malformed response: {exc}")
            finish(result)
            self._store.keep(claim, media)
            return result
        finally:
            self._store.release(claim)

    def close(self) -> None:
        """The stream ended: the claims of requests never answered are released."""
        while self._pending:
            claim = self._pending.popleft()
            if claim is not None:
                self._store.release(claim)
