"""render_wire.samples and tensors: answers cross the wire exactly (token ids, masks, arrays)."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
import renderers
from hypothesis import given, settings
from hypothesis import strategies as st

from render_wire.errors import InvalidArgumentError, RenderError, UnimplementedError
from render_wire.pb import render_pb2 as pb
from render_wire.samples import (
    decode_parsed_response,
    decode_response,
    encode_parsed_response,
    encode_response,
    encode_sample,
)
from render_wire.tensors import TensorBudget, decode_multi_modal_data, encode_multi_modal_data
from render_wire.types import HeldItem, MultiModalData, PlaceholderRange, RenderedTrainingSample


def test_samples_cross_the_wire_exactly() -> None:
    pixels = np.arange(24, dtype=np.float32).reshape(4, 6)
    grid = np.array([[1, 2, 2]], dtype=np.int64)
    sample = RenderedTrainingSample(
        token_ids=[1, 2, 151655, 151655, 2**31],
        loss_mask=[False, True, False, False, True],
        multi_modal_data=MultiModalData(
            mm_hashes={"image": ["abc"]},
            mm_placeholders={"image": [PlaceholderRange(offset=2, length=2)]},
            mm_items={"image": [{"pixel_values": pixels, "image_grid_thw": grid}]},
        ),
        mm_token_type_ids=[0, 0, 1, 1, 0],
    )
    decoded = decode_response(encode_response(encode_sample(sample)))
    assert decoded.token_ids == sample.token_ids and decoded.loss_mask == sample.loss_mask
    assert decoded.mm_token_type_ids == sample.mm_token_type_ids
    assert decoded.multi_modal_data.mm_hashes == {"image": ["abc"]}
    assert decoded.multi_modal_data.mm_placeholders == {"image": [PlaceholderRange(2, 2)]}
    item = decoded.multi_modal_data.mm_items["image"][0]
    assert list(item) == ["pixel_values", "image_grid_thw"]
    for name, array in (("pixel_values", pixels), ("image_grid_thw", grid)):
        assert item[name].dtype == array.dtype and item[name].shape == array.shape
        assert item[name].tobytes() == array.tobytes()
    assert not item["pixel_values"].flags.writeable  # a view on the response bytes, not a copy


def test_absent_media_fields_stay_none_and_empty_ones_stay_empty() -> None:
    for sample in (
        RenderedTrainingSample(token_ids=[1], loss_mask=[True]),
        RenderedTrainingSample(token_ids=[], loss_mask=[], multi_modal_data=MultiModalData(), mm_token_type_ids=[]),
    ):
        decoded = decode_response(encode_response(encode_sample(sample)))
        assert decoded == sample


def test_non_contiguous_arrays_are_sent_in_c_order() -> None:
    array = np.arange(12, dtype=np.int16).reshape(3, 4).T
    sample = RenderedTrainingSample(
        token_ids=[1], loss_mask=[True], multi_modal_data=MultiModalData(mm_items={"image": [{"x": array}]})
    )
    decoded = decode_response(encode_response(encode_sample(sample)))
    decoded = decoded.multi_modal_data.mm_items["image"][0]["x"]
    assert np.array_equal(decoded, array) and decoded.dtype == np.int16


def test_renders_results_are_numbered_as_samples_results_so_one_codec_serves_both() -> None:
    # encode_result / decode_results write and read both streams' responses (see encode_result).
    def numbers(message: type) -> dict[str, int]:
        return {field.name: field.number for field in message.DESCRIPTOR.fields}

    assert numbers(pb.RenderResult) == {"index": 1, "tokens": 2, "error": 3}
    assert numbers(pb.RenderTrainingSampleResult) == {"index": 1, "sample": 2, "error": 3}
    assert numbers(pb.RendersResponse) == numbers(pb.RenderTrainingSamplesResponse) == {"results": 1}


def media(hashes: list[str]) -> MultiModalData:
    return MultiModalData(
        mm_hashes={"image": hashes},
        mm_placeholders={"image": [PlaceholderRange(offset=i, length=1) for i in range(len(hashes))]},
        mm_items={
            "image": [
                {"pixel_values": np.full((2, 3), i, dtype=np.float32), "image_grid_thw": np.array([[1, 1, 1]])}
                for i in range(len(hashes))
            ]
        },
    )


def test_items_whose_hash_the_request_holds_travel_without_their_tensors() -> None:
    sample = RenderedTrainingSample(token_ids=[1, 2], loss_mask=[True, True], multi_modal_data=media(["a", "b"]))
    full = encode_response(encode_sample(sample))
    held = encode_response(encode_sample(sample, held={"b", "zzz"}))
    assert len(held) < len(full)
    decoded = decode_response(held)
    first, second = decoded.multi_modal_data.mm_items["image"]
    assert type(first) is dict and np.array_equal(first["pixel_values"], np.zeros((2, 3)))
    assert isinstance(second, HeldItem) and not second  # the client puts what it holds here
    assert decoded.multi_modal_data.mm_hashes == {"image": ["a", "b"]}  # everything else travels
    message = pb.RenderTrainingSampleResponse.FromString(held).sample.multi_modal_data.mm_items[0]
    assert [(item.held, len(item.fields)) for item in message.items] == [(False, 2), (True, 0)]


def test_held_items_in_a_request_stay_held_and_every_item_can_be_held() -> None:
    data = media(["a", "b"])
    data.mm_items["image"][0] = HeldItem()
    decoded = decode_multi_modal_data(memoryview(encode_multi_modal_data(data).join()))
    assert [isinstance(item, HeldItem) for item in decoded.mm_items["image"]] == [True, False]
    everything = decode_multi_modal_data(memoryview(encode_multi_modal_data(media(["a", "b"]), all_held=True).join()))
    assert all(isinstance(item, HeldItem) for item in everything.mm_items["image"])


def test_an_item_both_held_and_with_tensors_is_refused() -> None:
    item = pb.MultiModalItem(held=True, fields=[pb.NamedTensor(name="x", tensor=pb.Tensor(dtype="<f4"))])
    message = pb.MultiModalData(mm_items=[pb.ModalityItems(modality="image", items=[item])])
    with pytest.raises(RenderError, match="held, and with tensors"):
        decode_multi_modal_data(memoryview(message.SerializeToString()))


# -- tensors decoded within a budget ---------------------------------------------------------


def media_with(*tensors: pb.Tensor) -> memoryview:
    """A MultiModalData message of one image item per tensor, each holding it as pixel_values."""
    items = [pb.MultiModalItem(fields=[pb.NamedTensor(name="pixel_values", tensor=tensor)]) for tensor in tensors]
    return memoryview(pb.MultiModalData(mm_items=[pb.ModalityItems(modality="image", items=items)]).SerializeToString())


def test_tensors_past_the_budget_are_refused_from_their_shapes_before_they_are_allocated() -> None:
    raw = pb.Tensor(dtype="<f8", shape=[64, 64], data=bytes(8 * 64 * 64))  # 32 KiB
    # 12 KiB of codes standing for 2**32 - 1 copies each: 192 TiB once decoded.
    bomb = pb.Tensor(
        dtype="<f4",
        shape=[4096, 3 * (2**32 - 1)],
        compact=pb.CompactTensor(codes=bytes(3 * 4096), tables=bytes(12), table_sizes=[1, 1, 1], repeats=2**32 - 1),
    )
    for second, spent in ((bomb, 32768 + 4096 * 3 * (2**32 - 1) * 4), (raw, 2 * 32768)):
        budget = TensorBudget(40_000, "--max-tensor-mb", "previous_multi_modal_data")
        tracemalloc.start()  # numpy reports its arrays to it
        try:
            with pytest.raises(InvalidArgumentError) as caught:
                decode_multi_modal_data(media_with(raw, second), budget=budget)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert caught.value.details == (
            "previous_multi_modal_data.mm_items['image'][1]['pixel_values']: "
            f"tensors of {spent} bytes exceed the limit of 40000 bytes (--max-tensor-mb)"
        )
        assert peak < 1024 * 1024, peak
    assert decode_multi_modal_data(media_with(raw), budget=TensorBudget(32768, "", "")).mm_items  # at the limit


@pytest.mark.parametrize(
    ("shape", "problem"), [([-1], "negative dimension"), ([3, -4], "negative dimension"), ([2**40], "cannot reshape")]
)
def test_raw_tensors_whose_shapes_do_not_hold_their_bytes_are_refused(shape: list[int], problem: str) -> None:
    with pytest.raises(RenderError, match=f"malformed tensor.*{problem}"):
        decode_multi_modal_data(media_with(pb.Tensor(dtype="<f4", shape=shape, data=bytes(12))))


# -- parse_response's values, whatever the model wrote ---------------------------------------

# What a parser may hand back where a str is expected: what json.loads makes of a model's JSON.
_any_text = st.text(max_size=8)  # lone surrogates included: a "\\ud800" escape decodes to one
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _any_text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_any_text, children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(_json_values, _json_values, _any_text | _json_values, _any_text, st.none() | _any_text)
def test_parsed_responses_come_back_as_the_parser_returned_them(
    name: Any, call_id: Any, arguments: Any, raw: str, reasoning: str | None
) -> None:
    parsed = renderers.ParsedResponse(
        content=raw,
        reasoning_content=reasoning,
        tool_calls=[renderers.ParsedToolCall(raw=raw, name=name, arguments=arguments, token_span=(1, 5), id=call_id)],
        reasoning_complete=None,
    )
    message = pb.ParseResponseResponse.FromString(encode_parsed_response(parsed).SerializeToString())
    back = decode_parsed_response(message)
    assert json_types(back) == json_types(parsed)


def json_types(value: Any) -> Any:
    """`value` with every scalar paired with its type, NaN as a string: equal only if the same."""
    if dataclasses.is_dataclass(value):
        return {field.name: json_types(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return [(key, json_types(item)) for key, item in value.items()]
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [json_types(item) for item in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, repr(value))


def test_a_value_json_cannot_hold_is_unimplemented_not_a_changed_value() -> None:
    for name in ((1, 2), {1: "a"}, b"f"):
        parsed = renderers.ParsedResponse(content="", tool_calls=[renderers.ParsedToolCall(raw="", name=name)])
        with pytest.raises(UnimplementedError, match=r"^tool_calls\[0\]\.name: the renderer returned a "):
            encode_parsed_response(parsed)
