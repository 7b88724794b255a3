"""The exact compact form of pixel tensors: codes and tables that rebuild the processor's bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from render_wire.compact import CompactTensor, compact, materialize_all
from render_wire.errors import RenderError
from render_wire.samples import decode_response, encode_response, encode_sample
from render_wire.types import MultiModalData, PlaceholderRange, RenderedTrainingSample
from tests.reference import qwen3_vl_processor


def pixel_values(image: Image.Image) -> np.ndarray:
    """What the default qwen3-vl model's processor makes of `image`."""
    return qwen3_vl_processor().image_processor(images=[image], return_tensors="np")["pixel_values"]


IMAGES = {
    "noise": lambda: Image.effect_noise((320, 256), 60).convert("RGB"),
    "flat": lambda: Image.new("RGB", (200, 120), (10, 200, 30)),
    "gradient": lambda: Image.linear_gradient("L").convert("RGB").resize((300, 180)),
    "palette": lambda: Image.effect_noise((96, 96), 90).convert("P").convert("RGB"),
}


def same_bits(left: np.ndarray, right: np.ndarray) -> bool:
    return left.dtype == right.dtype and left.shape == right.shape and left.tobytes() == right.tobytes()


@pytest.mark.parametrize("name", list(IMAGES))
def test_processor_outputs_are_held_exactly_in_an_eighth_of_their_bytes(name: str) -> None:
    raw = pixel_values(IMAGES[name]())
    form = compact(raw)
    assert form is not None
    assert (form.groups, form.repeats) == (3, 2)  # RGB, temporal_patch_size 2
    assert same_bits(form.materialize(), raw)
    tables = sum(table.nbytes for table in form.tables)
    assert form.codes.nbytes * 8 == raw.nbytes and form.nbytes == raw.nbytes // 8 + tables
    assert tables <= 3 * 256 * 4


def test_anything_the_form_cannot_hold_exactly_gets_none() -> None:
    raw = pixel_values(IMAGES["noise"]()).copy()
    # One value a float resize would make: in one temporal copy only, and off every table.
    raw[5, 7] = np.nextafter(raw[5, 7], np.float32(2))
    assert compact(raw) is None
    assert compact(np.random.default_rng(0).random((64, 1536), dtype=np.float32)) is None  # > 256 values
    assert compact(np.arange(12, dtype=np.int64).reshape(2, 6)) is None  # not floats
    assert compact(np.zeros((2, 3, 4), dtype=np.float32)) is None  # not 2-D


def test_bit_patterns_count_not_float_equality() -> None:
    # -0.0 == 0.0 and NaN != NaN as floats; the form keeps every bit pattern as it was.
    values = np.array([0.0, -0.0, np.nan, 1.5], dtype=np.float32)
    raw = np.tile(values, (8, 24)).reshape(8, 96)
    form = compact(raw)
    assert form is not None and same_bits(form.materialize(), raw)


def sample_with(pixels: np.ndarray) -> RenderedTrainingSample:
    grid = np.array([[1, 16, 16]], dtype=np.int64)
    media = MultiModalData(
        mm_hashes={"image": ["h"]},
        mm_placeholders={"image": [PlaceholderRange(offset=1, length=4)]},
        mm_items={"image": [{"pixel_values": pixels, "image_grid_thw": grid}]},
    )
    return RenderedTrainingSample([1, 2, 3, 4, 5, 6], [False] * 6, media, [0, 1, 1, 1, 1, 0])


def test_samples_travel_compact_and_decode_to_the_same_arrays() -> None:
    raw = pixel_values(IMAGES["gradient"]())
    sample = sample_with(raw)
    compact_bytes = encode_response(encode_sample(sample, compact_tensors=True))
    raw_bytes = encode_response(encode_sample(sample))
    tables = sum(table.nbytes for table in compact(raw).tables)
    rest = len(raw_bytes) - raw.nbytes  # the sample's other fields, and framing
    assert len(compact_bytes) <= raw.nbytes / 8 + tables + rest + 32
    decoded = decode_response(compact_bytes)
    kept = decoded.multi_modal_data.mm_items["image"][0]["pixel_values"]
    assert isinstance(kept, CompactTensor) and same_bits(kept.materialize(), raw)
    materialize_all(decoded)
    item = decoded.multi_modal_data.mm_items["image"][0]
    assert same_bits(item["pixel_values"], raw) and not item["pixel_values"].flags.writeable
    assert same_bits(item["image_grid_thw"], sample.multi_modal_data.mm_items["image"][0]["image_grid_thw"])
    assert decode_response(raw_bytes).multi_modal_data.mm_items["image"][0]["pixel_values"].tobytes() == raw.tobytes()


def test_a_tensor_the_form_cannot_hold_is_sent_raw() -> None:
    noise = np.random.default_rng(1).random((64, 1536), dtype=np.float32)
    encoded = encode_response(encode_sample(sample_with(noise), compact_tensors=True))
    assert encoded == encode_response(encode_sample(sample_with(noise)))  # byte for byte the raw answer
    decoded = decode_response(encoded).multi_modal_data.mm_items["image"][0]["pixel_values"]
    assert isinstance(decoded, np.ndarray) and same_bits(decoded, noise)


def test_a_compact_tensor_whose_codes_run_past_its_table_is_refused() -> None:
    raw = pixel_values(IMAGES["flat"]())  # one value per channel: tables of one
    form = compact(raw)
    assert form is not None and all(len(table) == 1 for table in form.tables)
    codes = form.codes.copy()
    codes[0, 0, 0] = 1
    broken = CompactTensor(form.dtype, form.shape, form.repeats, codes, form.tables)
    sample = sample_with(raw)
    sample.multi_modal_data.mm_items["image"][0]["pixel_values"] = broken
    data = encode_response(encode_sample(sample))
    with pytest.raises(RenderError, match="malformed tensor in response"):
        decode_response(data)


def test_materialize_refuses_a_code_past_its_table() -> None:
    """materialize() gathers without numpy's own bounds check, so it checks the codes itself."""
    codes = np.zeros((2, 3, 4), dtype=np.uint8)
    codes[1, 2, 3] = 2  # group 2's table has two values: codes 0 and 1
    tables = tuple(np.array([0.5, -1.0], dtype=np.float32) for _ in range(3))
    tensor = CompactTensor(np.dtype(np.float32), (2, 24), 2, codes, tables)
    with pytest.raises(ValueError, match="group 2"):
        tensor.materialize()
    codes[1, 2, 3] = 1
    # Group 2, position 3, in both copies: columns (2 * 2 + r) * 4 + 3 for r in 0, 1.
    expected = np.where(np.isin(np.arange(24), [19, 23]), -1.0, 0.5).astype(np.float32)
    assert same_bits(tensor.materialize()[1], expected)
