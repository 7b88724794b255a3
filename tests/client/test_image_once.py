"""Each image's tensors sent and held once per client, against a live server (render_client/images.py).

Bytes are counted as they travel from the server to the client (tests.support.counting_relay);
results are compared with in-process rendering (tests/reference.py), arrays bit for bit.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
import renderers

from render_client import CompactTensor, RenderClient, build_training_sample
from render_client.aio import AsyncRenderClient
from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_response
from render_wire.types import HeldItem
from tests.client.clients import noise_image
from tests.reference import reference_renderer
from tests.support import ServerProcess, counting_relay

GROUP = 16


def prompt(image: bytes, text: str = "Describe.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}]


@contextmanager
def counted_client(server: ServerProcess, **options: Any) -> Iterator[tuple[RenderClient, list[int]]]:
    """A client whose one connection goes through a relay counting the bytes the server sends."""
    with counting_relay(server.target) as (address, counted), RenderClient(address, timeout=120, **options) as client:
        client.list_models()  # the connection's set-up, out of the counts
        yield client, counted


def same_arrays(got: Any, want: Any) -> bool:
    got_items, want_items = got.multi_modal_data.mm_items, want.multi_modal_data.mm_items
    return list(got_items) == list(want_items) and all(
        list(a) == list(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        for modality in want_items
        for a, b in zip(got_items[modality], want_items[modality], strict=True)
    )


def distinct_bytes(results: list[Any]) -> int:
    """Bytes of the distinct buffers the results' arrays use."""
    buffers: dict[int, int] = {}
    for result in results:
        for items in result.multi_modal_data.mm_items.values():
            for item in items:
                for array in item.values():
                    base = array
                    while isinstance(base, np.ndarray) and base.base is not None:
                        base = base.base
                    buffers[id(base)] = array.nbytes
    return sum(buffers.values())


def one_render_bytes(server: ServerProcess, messages: list[dict[str, Any]]) -> int:
    with counted_client(server, image_memory_mb=0) as (client, counted):
        before = counted[0]
        client.renderer("qwen3-vl").render(messages, add_generation_prompt=True)
        return counted[0] - before


def test_a_group_rendering_one_image_receives_its_tensors_once(server: ServerProcess) -> None:
    messages = prompt(noise_image(1024, 11))
    want = reference_renderer("qwen3-vl").render(messages, add_generation_prompt=True)
    one = one_render_bytes(server, messages)
    results: list[Any] = [None] * GROUP
    with counted_client(server) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        before = counted[0]

        def rollout(slot: int) -> None:
            results[slot] = renderer.render(messages, add_generation_prompt=True)

        threads = [threading.Thread(target=rollout, args=(slot,)) for slot in range(GROUP)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        received = counted[0] - before
    assert all(result.token_ids == want.token_ids and same_arrays(result, want) for result in results)
    assert received <= 1.2 * one, f"a group of {GROUP} received {received / one:.2f}x the bytes of one render"
    pixels = {id(result.multi_modal_data.mm_items["image"][0]["pixel_values"]) for result in results}
    assert len(pixels) == 1 and distinct_bytes(results) == distinct_bytes(results[:1])  # one copy
    item = results[0].multi_modal_data.mm_items["image"][0]
    assert not item["pixel_values"].flags.writeable
    assert results[0].multi_modal_data.mm_items["image"][0] is not results[1].multi_modal_data.mm_items["image"][0]


def test_a_rollout_re_rendered_every_turn_receives_its_image_once(server: ServerProcess) -> None:
    local = reference_renderer("qwen3-vl")
    conversation = prompt(noise_image(768, 12))
    sizes = []
    with counted_client(server) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        for turn in range(6):
            before = counted[0]
            got = renderer.render(conversation, add_generation_prompt=True)
            sizes.append(counted[0] - before)
            want = local.render(conversation, add_generation_prompt=True)
            assert got.token_ids == want.token_ids and same_arrays(got, want), turn
            conversation = [
                *conversation,
                {"role": "assistant", "content": f"Part {turn}."},
                {"role": "user", "content": "Go on."},
            ]
    assert sum(sizes) <= 1.5 * sizes[0], sizes
    assert max(sizes[1:]) < 0.05 * sizes[0], sizes


def test_without_image_memory_every_answer_carries_the_tensors(server: ServerProcess) -> None:
    messages = prompt(noise_image(512, 13))
    with counted_client(server, image_memory_mb=0) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        sizes = []
        for _ in range(3):
            before = counted[0]
            renderer.render(messages)
            sizes.append(counted[0] - before)
    assert min(sizes) > 0.9 * max(sizes)


def test_the_client_holds_no_more_than_its_memory_least_recently_used_dropped(server: ServerProcess) -> None:
    first, second = prompt(noise_image(1024, 14)), prompt(noise_image(1024, 15))  # 24 MiB of pixels each
    with counted_client(server, image_memory_mb=30) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        sizes = []
        for messages in (first, first, second, first):
            before = counted[0]
            renderer.render(messages)
            sizes.append(counted[0] - before)
        store = client._in_this_process.images
        assert store.used <= 30 * 2**20 and len(store) == 1
    full, held, _, again = sizes
    assert held < 0.05 * full and again > 0.9 * full  # the second image took the first one's place


def test_kept_compact_tensors_are_held_and_shared_too(server: ServerProcess) -> None:
    messages = prompt(noise_image(512, 16))
    want = reference_renderer("qwen3-vl").render(messages)
    with counted_client(server, compact_tensors=True) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        first = renderer.render(messages)
        before = counted[0]
        second = renderer.render(messages)
        assert counted[0] - before < 0.05 * before
    kept = [result.multi_modal_data.mm_items["image"][0]["pixel_values"] for result in (first, second)]
    assert all(isinstance(value, CompactTensor) for value in kept) and kept[0] is kept[1]
    assert np.array_equal(kept[1].materialize(), want.multi_modal_data.mm_items["image"][0]["pixel_values"])


def test_the_server_leaves_out_only_the_tensors_of_hashes_it_computed_and_was_told(server: ServerProcess) -> None:
    image, other = noise_image(256, 17), noise_image(256, 18)
    local = reference_renderer("qwen3-vl")
    own_hash = local.render(prompt(image)).multi_modal_data.mm_hashes["image"][0]
    other_hash = local.render(prompt(other)).multi_modal_data.mm_hashes["image"][0]

    def held_flags(claims: list[str]) -> list[bool]:
        request = pb.RenderTrainingSampleRequest(
            model="qwen3-vl",
            messages=[pb.Message(role="user", parts=pb.ContentParts(parts=[pb.ContentPart(image=pb.MediaPart(data=image))]))],
            held_mm_hashes=claims,
        )  # fmt: skip
        with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            answer = channel.unary_unary("/render.v1.RenderService/RenderTrainingSample")(
                request.SerializeToString(), timeout=60
            )
        sample = decode_response(answer)
        assert sample.multi_modal_data is not None
        assert sample.multi_modal_data.mm_hashes["image"] == [own_hash]
        return [isinstance(item, HeldItem) for item in sample.multi_modal_data.mm_items["image"]]

    assert held_flags([]) == [False]
    assert held_flags([other_hash, "0" * 32]) == [False]  # another image's hash: its own tensors come
    assert held_flags([own_hash]) == [True]


def test_a_bridges_previous_images_stay_with_the_client(server: ServerProcess) -> None:
    local = reference_renderer("qwen3-vl")
    messages = [*prompt(noise_image(512, 19)), {"role": "assistant", "content": "Noise."}]
    following = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": noise_image(256, 20)}],
        }
    ]
    prompt_ids = local.render_ids(messages[:1], add_generation_prompt=True)
    completion = local.render_ids(messages)[len(prompt_ids) :]
    with counted_client(server) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        previous = renderer.render(messages[:1], add_generation_prompt=True).multi_modal_data
        before = counted[0]
        got = renderer.bridge_to_next_turn(prompt_ids, completion, following, previous_multi_modal_data=previous)
        received = counted[0] - before
    want = local.bridge_to_next_turn(
        prompt_ids,
        completion,
        following,
        previous_multi_modal_data=local.render(messages[:1], add_generation_prompt=True).multi_modal_data,
    )
    assert got is not None and want is not None and got.token_ids == want.token_ids and same_arrays(got, want)
    assert got.multi_modal_data.mm_items["image"][0] is previous.mm_items["image"][0]  # the caller's own, as in-process
    new_pixels = got.multi_modal_data.mm_items["image"][1]["pixel_values"].nbytes
    assert received < new_pixels  # the previous image did not come back (the new one came compact)


def test_a_stream_of_one_image_receives_it_once(server: ServerProcess) -> None:
    messages = [*prompt(noise_image(512, 21)), {"role": "assistant", "content": "Noise."}]
    want = renderers.build_training_sample(reference_renderer("qwen3-vl"), messages)
    with counted_client(server) as (client, counted):
        renderer = client.renderer("qwen3-vl")
        first = build_training_sample(renderer, messages)
        before = counted[0]
        rest = list(client.render_many([renderer.request(messages)] * 12, concurrency=4))
        assert counted[0] - before < 0.2 * before
        tokens = list(client.render_many_tokens([renderer.render_request(messages)] * 3))
    for sample in (first, *rest):
        assert sample.token_ids == want.token_ids and sample.loss_mask == want.loss_mask and same_arrays(sample, want)
    assert all(same_arrays(result, want) for result in tokens)


def test_the_asyncio_client_holds_images_too(server: ServerProcess) -> None:
    messages = prompt(noise_image(512, 22))
    want = renderers.build_training_sample(reference_renderer("qwen3-vl"), messages)
    one = one_render_bytes(server, messages)

    async def run(address: str) -> list[Any]:
        async with AsyncRenderClient(address, timeout=120) as client:
            await client.list_models()
            request = client.renderer("qwen3-vl").request(messages)
            return list(await asyncio.gather(*(client.render(request) for _ in range(8))))

    with counting_relay(server.target) as (address, counted):
        results = asyncio.run(run(address))
    assert counted[0] < 1.3 * one
    assert all(sample.token_ids == want.token_ids and same_arrays(sample, want) for sample in results)
    assert len({id(sample.multi_modal_data.mm_items["image"][0]["pixel_values"]) for sample in results}) == 1


@pytest.mark.parametrize("memory", [-1.0, float("nan")])
def test_a_silly_image_memory_is_refused(memory: float) -> None:
    with pytest.raises(ValueError, match="image_memory_mb"):
        AsyncRenderClient("127.0.0.1:1", image_memory_mb=memory)
