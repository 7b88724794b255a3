"""The exact compact form of pixel tensors: codes and tables that rebuild the processor's bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from render_wire.compact import CompactTensor, compact, materialize_all
from render_wire.errors import RenderError
from render_wire.pb import render_pb2 as pb
from render_wire.samples import decode_response, encode_response, encode_sample
from render_wire.tensors import decode_multi_modal_data
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
    with pytest.raises(RenderError, match="malformed tensor"):
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


def test_materializing_takes_time_in_proportion_to_the_bytes_whatever_the_repeats() -> None:
    """No loop per copy: zero rows of 2**24 copies (a 94-byte request once kept a core busy 15 s) are nothing."""
    tables = tuple(np.array([0.5], dtype=np.float32) for _ in range(3))
    empty = CompactTensor(np.dtype(np.float32), (0, 3 * 2**24), 2**24, np.zeros((0, 3, 1), np.uint8), tables)
    calls = []
    assert empty.materialize(check=lambda: calls.append(1)).shape == (0, 3 * 2**24)
    assert len(calls) == 3  # once a group: a deadline is noticed between them

    def stop() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        empty.materialize(check=stop)


@pytest.mark.parametrize(
    ("table_sizes", "repeats", "problem"),
    [([1] * 3, 17, "3 groups of 17 copies"), ([1] * 257, 1, "257 groups of 1 copies"), ([1] * 3, 0, "0 copies")],
)
def test_a_compact_form_past_its_bounds_is_refused_when_decoded(
    table_sizes: list[int], repeats: int, problem: str
) -> None:
    groups = len(table_sizes)
    tensor = pb.Tensor(
        dtype="<f4",
        shape=[1, groups * max(repeats, 1)],
        compact=pb.CompactTensor(
            codes=bytes(groups), tables=b"\0\0\0\0" * groups, table_sizes=table_sizes, repeats=repeats
        ),
    )
    data = pb.MultiModalData(
        mm_items=[
            pb.ModalityItems(
                modality="image", items=[pb.MultiModalItem(fields=[pb.NamedTensor(name="x", tensor=tensor)])]
            )
        ]
    ).SerializeToString()
    with pytest.raises(RenderError, match=f"malformed tensor.*{problem}"):
        decode_multi_modal_data(memoryview(data))


def test_compact_never_makes_a_form_its_decoders_refuse() -> None:
    raw = np.repeat(np.array([[0.5], [0.25]], dtype=np.float32), 17, axis=1)  # 17 equal copies of a value a row
    assert compact(raw, layouts=((1, 17),)) is None  # it would hold them exactly: past MAX_REPEATS
    form = compact(raw, layouts=((1, 17), (1, 1)))
    assert form is not None and form.repeats == 1
