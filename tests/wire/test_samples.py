"""render_wire.samples and tensors: answers cross the wire exactly (token ids, masks, arrays)."""

from __future__ import annotations

import numpy as np

from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_response, encode_response, encode_sample
from render_wire.types import MultiModalData, PlaceholderRange, RenderedTrainingSample


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
