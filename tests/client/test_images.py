"""render_client.images: what the client holds, what a call claims, and how an answer's held items are filled.

The store alone, without a server: its bound in bytes, least recently used
first; what it learns from answers; calls carrying an image not yet known
waiting for the one that carries it first; and held items filled with the very
arrays held. tests/client/test_image_once.py runs it against a server.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from render_client.images import Claim, ImageStore, MissingHeldItem, StreamImages, digest
from render_wire.compact import CompactTensor, compact
from render_wire.pb import render_pb2 as pb
from render_wire.types import HeldItem, MultiModalData, PlaceholderRange, RenderedTrainingSample

MODEL = "qwen3-vl"


def item(value: float, size: int = 16) -> dict[str, np.ndarray]:
    pixels = np.full(size // 4, value, dtype=np.float32)
    pixels.flags.writeable = False
    return {"pixel_values": pixels, "image_grid_thw": np.array([[1, 1, 1]])}


def answer(hashes: list[str], items: list[dict[str, object]]) -> MultiModalData:
    return MultiModalData(
        mm_hashes={"image": list(hashes)},
        mm_placeholders={"image": [PlaceholderRange(offset=i, length=1) for i in range(len(hashes))]},
        mm_items={"image": list(items)},
    )


def claimed(store: ImageStore, images: list[bytes]) -> Claim:
    claim = store.claim(MODEL, images)
    assert isinstance(claim, Claim), claim
    return claim


def answered(store: ImageStore, images: list[bytes], hashes: list[str], items: list[dict[str, object]]) -> Claim:
    """A call carrying `images`, answered with `items` (hashes `hashes`), kept and released."""
    claim = claimed(store, images)
    data = answer(hashes, items)
    store.fill(claim, data)
    store.keep(claim, data)
    store.release(claim)
    return claim


def test_an_image_answered_once_is_claimed_and_its_arrays_handed_back() -> None:
    store = ImageStore(1 << 20, threading.Event)
    first = item(1.0)
    answered(store, [b"jpeg-a"], ["hash-a"], [first])
    claim = claimed(store, [b"jpeg-a"])
    assert list(claim.held) == ["hash-a"]
    data = answer(["hash-a"], [HeldItem()])
    store.fill(claim, data)
    filled = data.mm_items["image"][0]
    assert filled is not first and filled == first  # a dict of its own, as in-process
    assert filled["pixel_values"] is first["pixel_values"]  # the very array: one copy
    assert claimed(store, [b"jpeg-b"]).held == {}  # another image is not claimed
    assert claimed(store, []).held == {}
    assert claimed(store, [b"jpeg-a"]).model == MODEL
    other = store.claim("another-model", [b"jpeg-a"])  # models hold their own images
    assert isinstance(other, Claim) and other.held == {} and other.owned == [("another-model", digest(b"jpeg-a"))]


def test_the_store_is_bounded_in_bytes_least_recently_used_first() -> None:
    store = ImageStore(100, threading.Event)  # each item: 40 bytes of pixels + 24 of grid
    for name in "abc":
        answered(store, [f"jpeg-{name}".encode()], [f"hash-{name}"], [item(1.0, size=40)])
        assert store.used <= 100
    assert len(store) == 1 and list(claimed(store, [b"jpeg-c"]).held) == ["hash-c"]
    assert claimed(store, [b"jpeg-a"]).held == {}
    answered(store, [b"jpeg-big"], ["hash-big"], [item(1.0, size=400)])  # larger than the whole store
    assert list(claimed(store, [b"jpeg-c"]).held) == ["hash-c"] and claimed(store, [b"jpeg-big"]).held == {}


def test_a_claimed_item_is_handed_back_even_if_dropped_meanwhile() -> None:
    store = ImageStore(100, threading.Event)
    answered(store, [b"jpeg-a"], ["hash-a"], [item(1.0, size=40)])
    claim = claimed(store, [b"jpeg-a"])
    answered(store, [b"jpeg-b"], ["hash-b"], [item(2.0, size=40)])  # drops a
    assert claimed(store, [b"jpeg-a"]).held == {}
    data = answer(["hash-a"], [HeldItem()])
    store.fill(claim, data)
    assert data.mm_items["image"][0]["pixel_values"][0] == 1.0


def test_an_answer_holding_what_the_call_did_not_claim_and_the_client_does_not_hold_is_refused() -> None:
    store = ImageStore(1 << 20, threading.Event)
    with pytest.raises(MissingHeldItem):
        store.fill(claimed(store, [b"jpeg-a"]), answer(["hash-a"], [HeldItem()]))


def test_an_answer_whose_items_do_not_match_the_requests_images_teaches_nothing() -> None:
    store = ImageStore(1 << 20, threading.Event)
    answered(store, [b"jpeg-a", b"jpeg-b"], ["hash-a"], [item(1.0)])  # two images, one item
    assert claimed(store, [b"jpeg-a"]).held == {} and claimed(store, [b"jpeg-b"]).held == {}
    # Nor does a later call wait for it: it could never learn its hash.
    first = claimed(store, [b"jpeg-a"])
    assert isinstance(store.claim(MODEL, [b"jpeg-a"]), Claim)
    store.release(first)


def test_a_call_waits_for_the_call_carrying_its_image_first_then_claims_it() -> None:
    store = ImageStore(1 << 20, threading.Event)
    first = claimed(store, [b"jpeg-a"])
    waiting = store.claim(MODEL, [b"jpeg-a"])
    assert isinstance(waiting, list) and len(waiting) == 1 and not waiting[0].is_set()
    assert isinstance(store.claim(MODEL, [b"jpeg-a"], wait=False), Claim)  # streams do not wait
    data = answer(["hash-a"], [item(1.0)])
    store.fill(first, data)
    store.keep(first, data)
    store.release(first)
    assert waiting[0].is_set()
    assert list(claimed(store, [b"jpeg-a"]).held) == ["hash-a"]


def test_a_failed_call_lets_the_calls_waiting_for_it_go_on() -> None:
    store = ImageStore(1 << 20, threading.Event)
    first = claimed(store, [b"jpeg-a"])
    waiting = store.claim(MODEL, [b"jpeg-a"])
    assert isinstance(waiting, list)
    store.release(first)  # failed: nothing learned
    assert waiting[0].is_set() and isinstance(store.claim(MODEL, [b"jpeg-a"]), Claim)


def test_a_store_of_no_bytes_claims_nothing_and_keeps_nothing() -> None:
    store = ImageStore(0, threading.Event)
    answered(store, [b"jpeg-a"], ["hash-a"], [item(1.0)])
    assert len(store) == 0 and claimed(store, [b"jpeg-a"]) == Claim(MODEL, [], {})


def test_a_bridges_previous_items_come_back_as_the_callers_own() -> None:
    store = ImageStore(1 << 20, threading.Event)
    previous = answer(["hash-a"], [item(1.0)])
    claim = claimed(store, [b"jpeg-b"])
    bridged = answer(["hash-a", "hash-b"], [HeldItem(), item(2.0)])
    store.fill(claim, bridged, previous)
    assert bridged.mm_items["image"][0] is previous.mm_items["image"][0]  # as in-process: the same dict
    store.keep(claim, bridged, previous)
    store.release(claim)
    assert list(claimed(store, [b"jpeg-b"]).held) == ["hash-b"]  # the new image was learned
    assert claimed(store, [b"jpeg-a"]).held == {}  # the caller's own was not taken for a new one


def test_a_view_of_a_larger_answer_is_copied_before_it_is_kept() -> None:
    answer_bytes = bytes(1 << 20)
    view = np.frombuffer(answer_bytes, dtype=np.float32, count=16)
    store = ImageStore(1 << 30, threading.Event)
    kept = {"pixel_values": view}
    answered(store, [b"jpeg-a"], ["hash-a"], [kept])
    assert kept["pixel_values"] is not view and np.array_equal(kept["pixel_values"], view)
    assert not kept["pixel_values"].flags.writeable and store.used == 64
    codes = compact(np.repeat(np.arange(256, dtype=np.float32), 6).reshape(64, 24))
    assert isinstance(codes, CompactTensor)
    whole = {"pixel_values": codes}
    answered(store, [b"jpeg-b"], ["hash-b"], [whole])
    assert whole["pixel_values"] is codes  # owns its memory: kept as it is


def test_streams_claim_in_order_without_changing_the_callers_requests() -> None:
    store = ImageStore(1 << 20, threading.Event)
    answered(store, [b"jpeg-a"], ["hash-a"], [item(1.0)])
    image = pb.ContentPart(image=pb.MediaPart(data=b"jpeg-a"))
    request = pb.RenderTrainingSampleRequest(
        model=MODEL, messages=[pb.Message(role="user", parts=pb.ContentParts(parts=[image]))]
    )
    stream = StreamImages(store, pb.RenderTrainingSampleRequest, lambda item: item, lambda model: True)
    sent = stream.request(request)
    assert list(sent.held_mm_hashes) == ["hash-a"] and not request.held_mm_hashes
    text_only = stream.request(pb.RenderTrainingSampleRequest(model=MODEL))
    assert not text_only.held_mm_hashes
    sample = RenderedTrainingSample([1], [True], answer(["hash-a"], [HeldItem()]))
    finished: list[object] = []
    assert stream.result(sample, finished.append) is sample and finished == [sample]
    assert isinstance(sample.multi_modal_data, MultiModalData)
    assert sample.multi_modal_data.mm_items["image"][0]["pixel_values"][0] == 1.0
    stream.close()


def test_images_are_known_by_their_bytes() -> None:
    assert digest(b"jpeg-a") == digest(memoryview(b"xjpeg-a")[1:]) != digest(b"jpeg-b")
