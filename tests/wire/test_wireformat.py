"""Hand-assembled wire bytes are exactly the bytes upb writes for the same message."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
import renderers

from render_wire.errors import InvalidArgumentError, RenderError
from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_response, decode_results, encode_response, encode_result, encode_sample
from render_wire.types import MultiModalData, PlaceholderRange, RenderedTrainingSample
from render_wire.wireformat import Census, TooManyValues, WireFormatError, WireMessage, count_values, varint
from tests.reference import reference_renderer, sample_differences
from tests.support import corpus


def upb_sample(sample: Any) -> pb.RenderedTrainingSample:
    """The message built field by field through upb, the conventional way."""
    message = pb.RenderedTrainingSample(token_ids=sample.token_ids, loss_mask=sample.loss_mask)
    if sample.mm_token_type_ids is not None:
        message.mm_token_type_ids.SetInParent()
        message.mm_token_type_ids.ids.extend(sample.mm_token_type_ids)
    data = sample.multi_modal_data
    if data is not None:
        message.multi_modal_data.SetInParent()
        for modality, hashes in data.mm_hashes.items():
            message.multi_modal_data.mm_hashes.add(modality=modality, hashes=hashes)
        for modality, ranges in data.mm_placeholders.items():
            entry = message.multi_modal_data.mm_placeholders.add(modality=modality)
            for r in ranges:
                entry.ranges.add(offset=r.offset, length=r.length)
        for modality, items in data.mm_items.items():
            entry = message.multi_modal_data.mm_items.add(modality=modality)
            for item in items:
                fields = entry.items.add().fields
                for name, value in item.items():
                    fields.add(
                        name=name, tensor=pb.Tensor(dtype=value.dtype.str, shape=value.shape, data=value.tobytes())
                    )
    return message


def samples() -> list[RenderedTrainingSample]:
    rng = np.random.default_rng(0)
    return [
        RenderedTrainingSample(token_ids=[], loss_mask=[]),
        RenderedTrainingSample(token_ids=[0, 1, 2**31, 2**32 - 1], loss_mask=[True, False, True, True]),
        RenderedTrainingSample(
            token_ids=[5], loss_mask=[False], multi_modal_data=MultiModalData(), mm_token_type_ids=[]
        ),
        RenderedTrainingSample(
            token_ids=list(range(300)),
            loss_mask=[i % 3 == 0 for i in range(300)],
            multi_modal_data=MultiModalData(
                mm_hashes={"image": ["a" * 64, ""], "video": ["é"]},
                mm_placeholders={"image": [PlaceholderRange(0, 0), PlaceholderRange(2**40, 300)], "video": []},
                mm_items={
                    "image": [
                        {
                            "pixel_values": rng.standard_normal((1000, 1536), dtype=np.float32),  # > 2**21 bytes
                            "image_grid_thw": np.array([[1, 20, 50]], dtype=np.int64),
                        },
                        {},
                        {"": np.array(2.5), "empty": np.zeros((0, 7), np.float32)},
                    ],
                    "video": [{"transposed": np.arange(12, dtype=">i2").reshape(3, 4).T, "flag": np.array([True])}],
                },
            ),
            mm_token_type_ids=[0] * 150 + [1] * 150,
        ),
        # Loss masks written byte by byte (bools, 0/1 ints) and ones left to upb.
        RenderedTrainingSample(
            token_ids=[1, 2, 3], loss_mask=[0, 1, 1], mm_token_type_ids=[0, 127, 128, 255, 256, 2**32 - 1]
        ),
        RenderedTrainingSample(token_ids=[9, 9], loss_mask=[np.True_, np.False_], mm_token_type_ids=[2, 1]),
        RenderedTrainingSample(token_ids=[4, 4], loss_mask=[2, 0], mm_token_type_ids=(0, 1)),
        RenderedTrainingSample(token_ids=[4], loss_mask=(True,), mm_token_type_ids=[]),
        RenderedTrainingSample(token_ids=[4, 5], loss_mask=[True, True], mm_token_type_ids=[128, 255]),
    ]


@pytest.mark.parametrize("index", range(len(samples())))
def test_samples_and_responses_match_upb(index: int) -> None:
    sample = samples()[index]
    expected = upb_sample(sample)
    encoded = encode_sample(sample)
    assert encoded.join() == expected.SerializeToString()
    assert encoded.size == expected.ByteSize()
    assert encode_response(encoded) == pb.RenderTrainingSampleResponse(sample=expected).SerializeToString()


def test_stream_results_match_upb() -> None:
    sample = samples()[3]
    error = InvalidArgumentError("messages[0].role: unknown role 'x'", error_type="ValueError")
    response = WireMessage()
    for index, outcome in ((0, encode_sample(sample)), (1, error), (2**40, encode_sample(samples()[0]))):
        response.extend(encode_result(index, outcome))
    expected = pb.RenderTrainingSamplesResponse(
        results=[
            pb.RenderTrainingSampleResult(index=0, sample=upb_sample(sample)),
            pb.RenderTrainingSampleResult(
                index=1, error=pb.Error(code=3, message="messages[0].role: unknown role 'x'", error_type="ValueError")
            ),
            pb.RenderTrainingSampleResult(index=2**40, sample=upb_sample(samples()[0])),
        ]
    )
    assert response.join() == expected.SerializeToString()


def test_an_error_without_a_type_matches_upb() -> None:
    expected = pb.RenderTrainingSampleResult(index=7, error=pb.Error(code=13, message="internal"))
    response = pb.RenderTrainingSamplesResponse(results=[expected])
    assert encode_result(7, RenderError("internal")).join() == response.SerializeToString()


def test_rendered_images_from_the_corpus_match_upb() -> None:
    renderer = reference_renderer("qwen3-vl")
    conversations = [c for c in corpus() if "images" in c["tags"]][:10]
    assert conversations
    for conversation in conversations:
        sample = renderers.build_training_sample(renderer, conversation["messages"], tools=conversation.get("tools"))
        assert sample.multi_modal_data is not None and sample.multi_modal_data.mm_items
        assert encode_sample(sample).join() == upb_sample(sample).SerializeToString()


def test_arrays_are_shared_until_the_join() -> None:
    pixels = np.ones((64, 64), np.float32)
    encoded = encode_sample(
        RenderedTrainingSample(
            token_ids=[1], loss_mask=[True], multi_modal_data=MultiModalData(mm_items={"image": [{"x": pixels}]})
        )
    )
    assert any(isinstance(p, np.ndarray) and np.shares_memory(p, pixels) for p in encoded.pieces)


@pytest.mark.parametrize("value", [1, 127, 128, 300, 2**31, 2**63 - 1, 2**64 - 1])
def test_varint_matches_upb(value: int) -> None:
    assert b"\x08" + varint(value) == pb.RenderTrainingSampleResult(index=value).SerializeToString()


def test_decoding_reads_what_upb_wrote_including_repeated_occurrences() -> None:
    sample = samples()[3]
    upb_bytes = pb.RenderTrainingSampleResponse(sample=upb_sample(sample)).SerializeToString()
    assert not sample_differences(decode_response(upb_bytes), sample)
    # Protobuf merges a message field that occurs twice: the second response's
    # tokens and media are appended to the first's.
    twice = decode_response(upb_bytes + upb_bytes)
    assert twice.token_ids == sample.token_ids * 2
    assert [len(items) for items in twice.multi_modal_data.mm_items.values()] == [3, 1]


def test_large_aligned_arrays_are_views_of_the_received_bytes_and_the_rest_copies() -> None:
    expected = samples()[3].multi_modal_data.mm_items["image"][0]
    received_bytes = encode_response(encode_sample(samples()[3]))
    shared = []
    for shift in range(4):  # the data's offset in memory decides whether a view is aligned
        received = received_bytes if shift == 0 else _shifted(received_bytes, shift)
        item = decode_response(received).multi_modal_data.mm_items["image"][0]
        pixels, grid = item["pixel_values"], item["image_grid_thw"]
        buffer = np.frombuffer(received, np.uint8)
        start = buffer.ctypes.data + bytes(received).index(expected["pixel_values"].tobytes())
        assert np.shares_memory(pixels, buffer) == (start % pixels.dtype.alignment == 0)
        shared.append(np.shares_memory(pixels, buffer))
        assert not np.shares_memory(grid, buffer)  # small: copied, so it does not pin the response
        for array, value in ((pixels, expected["pixel_values"]), (grid, expected["image_grid_thw"])):
            assert array.flags.aligned and not array.flags.writeable
            assert np.array_equal(array, value)
    assert sorted(set(shared)) == [False, True]


def _shifted(data: bytes, shift: int) -> memoryview:
    """`data` starting `shift` bytes into a fresh buffer."""
    return memoryview(bytes(shift) + data)[shift:]


def test_stream_results_decode_in_order_with_their_errors() -> None:
    response = WireMessage()
    for index, outcome in ((4, encode_sample(samples()[1])), (5, InvalidArgumentError("bad", error_type="KeyError"))):
        response.extend(encode_result(index, outcome))
    (first_index, first), (second_index, second) = decode_results(response.join())
    assert (first_index, first) == (4, samples()[1])
    assert second_index == 5 and isinstance(second, InvalidArgumentError)
    assert (second.details, second.error_type) == ("bad", "KeyError")


@pytest.mark.parametrize("cut", [1, 2, 10, 100, 5000])
def test_truncated_responses_are_a_render_error(cut: int) -> None:
    received = encode_response(encode_sample(samples()[3]))
    with pytest.raises(RenderError, match="malformed response"):
        decode_response(received[:-cut])


@pytest.mark.parametrize("cut", [1, 2, 10])
def test_truncated_nested_messages_are_a_render_error(cut: int) -> None:
    inner = encode_sample(samples()[3]).join()[:-cut]
    with pytest.raises(RenderError, match="malformed response"):
        decode_response(b"\x0a" + varint(len(inner)) + inner)
    result = encode_result(0, encode_sample(samples()[3])).join()[:-cut]
    with pytest.raises(RenderError, match="malformed response"):
        decode_results(result)


@pytest.mark.parametrize("data", [b"\x08\x01", b"\x02\x00", b"\x0a\x02\x00\x00", b"\x12\x01"])
def test_fields_that_are_not_what_the_contract_says_are_a_render_error(data: bytes) -> None:
    # sample as a varint; field number 0; a sample holding field number 0; an unterminated field 2
    with pytest.raises(RenderError, match="malformed response"):
        decode_response(data)


# -- counting values before upb parses them (count_values) ---------------------------------

PARSE = pb.ParseResponseRequest.DESCRIPTOR
IDS = {"render.v1.ParseResponseRequest.token_ids": 100, "render.v1.TokenIds.ids": 1000}


def census(most: int = 1000, **options: Any) -> Census:
    return Census(most=most, limits=options.pop("limits", IDS), **options)


def test_counting_finds_what_upb_finds_packed_unpacked_and_nested() -> None:
    request = pb.ParseResponseRequest(model="m", token_ids=[0, 127, 128, 16383, 16384, 2**32 - 1], tools_json="[]")
    request.prompt_ids.ids.extend(range(300))
    packed = request.SerializeToString()
    # The same ids written one varint field each (proto2's way; upb reads both).
    unpacked = b"".join(varint(2 << 3) + varint(i) for i in request.token_ids)
    for data, ids in ((packed, 6), (unpacked + packed, 12)):
        assert len(pb.ParseResponseRequest.FromString(data).token_ids) == ids
        counted = census()
        count_values(memoryview(data), PARSE, counted)
        assert counted.per_field == {"render.v1.ParseResponseRequest.token_ids": ids, "render.v1.TokenIds.ids": 300}
        assert counted.counted == 3  # model, tools_json, prompt_ids: the ids count apart


def test_a_limited_field_is_refused_at_its_limit_and_everything_else_at_the_total() -> None:
    packed = pb.ParseResponseRequest(token_ids=range(101)).SerializeToString()
    with pytest.raises(TooManyValues) as caught:
        count_values(memoryview(packed), PARSE, census())
    assert (caught.value.field, caught.value.values, caught.value.exact) == ("token_ids", 101, True)
    assert caught.value.limit == "render.v1.ParseResponseRequest.token_ids"
    # prompt_ids is a message field: upb merges its occurrences, so their ids add up.
    twice = pb.ParseResponseRequest(prompt_ids=pb.TokenIds(ids=range(600))).SerializeToString() * 2
    with pytest.raises(TooManyValues) as caught:
        count_values(memoryview(twice), PARSE, census())
    assert (caught.value.field, caught.value.values) == ("prompt_ids.ids", 1200)
    render = pb.RenderRequest(messages=[pb.Message(parts=pb.ContentParts(parts=[pb.ContentPart()] * 50))])
    with pytest.raises(TooManyValues) as caught:  # walked no further than the first past the total
        count_values(memoryview(render.SerializeToString()), pb.RenderRequest.DESCRIPTOR, census(most=40))
    assert (caught.value.field, caught.value.values, caught.value.limit) == ("messages.parts.parts", 41, None)


def test_opaque_fields_are_counted_but_not_walked_and_malformed_bytes_are_refused() -> None:
    batch = pb.RendersRequest(requests=[pb.RenderRequest(messages=[pb.Message()] * 100)] * 3).SerializeToString()
    counted = census(opaque={"render.v1.RendersRequest.requests"})
    count_values(memoryview(batch), pb.RendersRequest.DESCRIPTOR, counted)
    assert counted.counted == 3
    for data in (b"\x12\x05ab", b"\x08", b"\x00", b"\x0b"):  # past the end, truncated, field 0, a group
        with pytest.raises(WireFormatError):
            count_values(memoryview(data), PARSE, census())


def test_sixty_million_ids_are_counted_in_place() -> None:
    data = pb.BridgeToNextTurnRequest(model="m").SerializeToString() + varint(2 << 3 | 2) + varint(60_000_000)
    payload = data + b"\x01" * 60_000_000
    limits = {"render.v1.BridgeToNextTurnRequest.previous_prompt_ids": 262144}
    tracemalloc.start()  # numpy reports its arrays to it
    try:
        with pytest.raises(TooManyValues) as caught:
            count_values(memoryview(payload), pb.BridgeToNextTurnRequest.DESCRIPTOR, census(limits=limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.values == 60_000_000 and caught.value.exact
    assert peak < 4 * 1024 * 1024, peak  # a 1 MiB chunk's comparison at a time, never the 60 MB
