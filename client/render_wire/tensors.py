"""MultiModalData and its tensors, both directions: numpy arrays <-> Tensor messages.

A tensor travels as its raw bytes, or (pixel tensors, where it holds exactly)
in compact.py's form. Encoding joins each array's memory into the message as
its bytes field (one copy); decoding gives large aligned arrays as read-only
views of the response's bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import TypeVar, overload

import numpy as np

from .compact import MAX_GROUPS, MAX_REPEATS, CompactTensor, compact
from .errors import RenderError, invalid
from .pb import render_pb2 as pb
from .types import (
    HeldItem,
    MultiModalData,
    MultiModalDataLike,
    PlaceholderRange,
    Tensor,
)
from .wireformat import WireMessage, byte_view, merged, split_field


def encode_multi_modal_data(
    data: MultiModalDataLike, *, compact_tensors: bool = False, held: Collection[str] = (), all_held: bool = False
) -> WireMessage:
    """A MultiModalData message; with `compact_tensors`, each tensor that compact.py's form
    holds exactly travels in it (a CompactTensor value always does). Items whose hash is in
    `held` (every item, with `all_held`), and HeldItems, travel without their tensors, marked held."""
    message = WireMessage(
        pb.MultiModalData(
            mm_hashes=[pb.ModalityHashes(modality=m, hashes=hashes) for m, hashes in data.mm_hashes.items()],
            mm_placeholders=[
                pb.ModalityPlaceholders(
                    modality=m, ranges=[pb.PlaceholderRange(offset=r.offset, length=r.length) for r in ranges]
                )
                for m, ranges in data.mm_placeholders.items()
            ],
        ).SerializeToString()
    )
    for modality, items in data.mm_items.items():
        entry = WireMessage(pb.ModalityItems(modality=modality).SerializeToString())
        hashes = data.mm_hashes.get(modality, ()) if held else ()
        for index, item in enumerate(items):
            if all_held or isinstance(item, HeldItem) or (index < len(hashes) and hashes[index] in held):
                entry.append_message_field(pb.ModalityItems.ITEMS_FIELD_NUMBER, _HELD_ITEM)
                continue
            encoded_item = WireMessage()
            for name, value in item.items():
                named = WireMessage(pb.NamedTensor(name=name).SerializeToString())
                named.append_message_field(pb.NamedTensor.TENSOR_FIELD_NUMBER, _encode_tensor(value, compact_tensors))
                encoded_item.append_message_field(pb.MultiModalItem.FIELDS_FIELD_NUMBER, named)
            entry.append_message_field(pb.ModalityItems.ITEMS_FIELD_NUMBER, encoded_item)
        message.append_message_field(pb.MultiModalData.MM_ITEMS_FIELD_NUMBER, entry)
    return message


_HELD_ITEM = WireMessage(pb.MultiModalItem(held=True).SerializeToString())


def _encode_tensor(value: object, compact_tensors: bool) -> WireMessage:
    if isinstance(value, CompactTensor):
        return _encode_compact(value)
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise TypeError(f"mm_items values must be numeric numpy arrays, got {type(value).__name__}")
    if compact_tensors and value.nbytes >= _COMPACT_FROM_BYTES:
        compacted = compact(value)  # None unless it decodes back to these very bytes
        if compacted is not None:
            return _encode_compact(compacted)
    tensor = WireMessage(pb.Tensor(dtype=value.dtype.str, shape=value.shape).SerializeToString())
    data = byte_view(value)  # C order whatever the array's layout
    if len(data):  # proto3 leaves an empty bytes field out
        tensor.append_bytes_field(pb.Tensor.DATA_FIELD_NUMBER, data)
    return tensor


# Below this, the tables cost more than the codes save.
_COMPACT_FROM_BYTES = 64 * 1024


def _encode_compact(value: CompactTensor) -> WireMessage:
    tensor = WireMessage(pb.Tensor(dtype=value.dtype.str, shape=value.shape).SerializeToString())
    form = WireMessage(
        pb.CompactTensor(
            tables=b"".join(table.tobytes() for table in value.tables),
            table_sizes=[len(table) for table in value.tables],
            repeats=value.repeats,
        ).SerializeToString()
    )
    form.append_bytes_field(pb.CompactTensor.CODES_FIELD_NUMBER, byte_view(value.codes))
    tensor.append_message_field(pb.Tensor.COMPACT_FIELD_NUMBER, form)
    return tensor


DataT = TypeVar("DataT")


class TensorBudget:
    """The bytes a request's tensors may decode to, spent as each is decoded, before it is allocated.

    A tensor's size is read off its dtype and shape (times `repeats` for a compact one): a
    few bytes of message can ask for terabytes. Past the budget: InvalidArgumentError naming
    the tensor, the limit and `flag`, the setting that gives it.
    """

    def __init__(self, most: int, flag: str, field: str) -> None:
        self.most, self.flag, self.field = most, flag, field
        self.spent = 0

    def spend(self, nbytes: int, where: str) -> None:
        self.spent += nbytes
        if self.spent > self.most:
            raise invalid(
                f"{self.field}.{where}",
                f"tensors of {self.spent} bytes exceed the limit of {self.most} bytes ({self.flag})",
            )


@overload
def decode_multi_modal_data(data: memoryview, *, budget: TensorBudget | None = None) -> MultiModalData: ...


@overload
def decode_multi_modal_data(
    data: memoryview,
    data_class: Callable[..., DataT],
    range_class: Callable[..., object],
    *,
    budget: TensorBudget | None = None,
) -> DataT: ...


def decode_multi_modal_data(
    data: memoryview,
    data_class: Callable[..., object] = MultiModalData,
    range_class: Callable[..., object] = PlaceholderRange,
    *,
    budget: TensorBudget | None = None,
) -> object:
    """A MultiModalData message as `data_class` (this package's, or renderers' own) of `range_class`es,
    called with the fields as keyword arguments; with `budget`, its tensors' sizes are spent from it."""
    rest, entries = split_field(data, pb.MultiModalData.MM_ITEMS_FIELD_NUMBER)
    message = pb.MultiModalData.FromString(rest)
    mm_items: dict[str, list[dict[str, Tensor]]] = {}
    for entry in entries:
        entry_rest, items = split_field(entry, pb.ModalityItems.ITEMS_FIELD_NUMBER)
        modality = pb.ModalityItems.FromString(entry_rest).modality
        mm_items[modality] = [
            _decode_item(item, budget, f"mm_items[{modality!r}][{index}]") for index, item in enumerate(items)
        ]
    return data_class(
        mm_hashes={entry.modality: list(entry.hashes) for entry in message.mm_hashes},
        mm_placeholders={
            entry.modality: [range_class(offset=r.offset, length=r.length) for r in entry.ranges]
            for entry in message.mm_placeholders
        },
        mm_items=mm_items,
    )


def _decode_item(data: memoryview, budget: TensorBudget | None, where: str) -> dict[str, Tensor]:
    rest, fields = split_field(data, pb.MultiModalItem.FIELDS_FIELD_NUMBER)
    if rest and pb.MultiModalItem.FromString(rest).held:
        if fields:
            raise RenderError("malformed media item: held, and with tensors")
        return HeldItem()
    item: dict[str, Tensor] = {}
    for field in fields:
        rest, tensors = split_field(field, pb.NamedTensor.TENSOR_FIELD_NUMBER)
        name = pb.NamedTensor.FromString(rest).name
        item[name] = _decode_tensor(merged(tensors) if tensors else memoryview(b""), budget, f"{where}[{name!r}]")
    return item


def _decode_tensor(data: memoryview, budget: TensorBudget | None = None, where: str = "tensor") -> Tensor:
    """A Tensor message as an array, or as a CompactTensor when it came in that form
    (compact.materialize_all turns those into arrays, unless the caller keeps them)."""
    rest, payloads = split_field(data, pb.Tensor.DATA_FIELD_NUMBER)
    rest, forms = split_field(memoryview(rest), pb.Tensor.COMPACT_FIELD_NUMBER)
    tensor = pb.Tensor.FromString(rest)
    try:
        dtype = np.dtype(tensor.dtype)
        if dtype.hasobject:
            raise TypeError("object arrays are not accepted")
        shape = tuple(tensor.shape)
        if any(size < 0 for size in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        if budget is not None:
            budget.spend(math.prod(shape) * dtype.itemsize, where)
        if forms:
            return _decode_compact(merged(forms), dtype, shape)
        # A view of the response's bytes (the last occurrence wins): no copy, read-only.
        array = np.frombuffer(payloads[-1] if payloads else b"", dtype=dtype).reshape(shape)
    except RenderError:  # past the budget
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise RenderError(f"malformed tensor (dtype {tensor.dtype!r}): {exc}") from None
    if array.nbytes < _SHARE_FROM_BYTES or not array.flags.aligned:
        # A small view would keep a whole response alive; an unaligned one slows
        # numpy and is refused by some consumers. Those are copied, read-only alike.
        array = array.copy()
        array.flags.writeable = False
    return array


_SHARE_FROM_BYTES = 1 << 20


def _decode_compact(data: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> CompactTensor:
    rest, codes = split_field(data, pb.CompactTensor.CODES_FIELD_NUMBER)
    form = pb.CompactTensor.FromString(rest)
    sizes = list(form.table_sizes)
    groups = len(sizes)
    if groups > MAX_GROUPS or form.repeats > MAX_REPEATS:
        raise ValueError(
            f"{groups} groups of {form.repeats} copies: the compact form has at most {MAX_GROUPS} of {MAX_REPEATS}"
        )
    if len(shape) != 2 or not groups or form.repeats < 1 or shape[1] % (groups * form.repeats):
        raise ValueError(f"shape {shape} does not split into {groups} groups of {form.repeats} copies")
    span = shape[1] // (groups * form.repeats)
    code_array = np.frombuffer(codes[-1] if codes else b"", dtype=np.uint8).reshape(shape[0], groups, span)
    values = np.frombuffer(form.tables, dtype=dtype)
    if len(values) != sum(sizes):
        raise ValueError(f"{len(values)} table values for table sizes {sizes}")
    tables = tuple(np.split(values, np.cumsum(sizes)[:-1]))
    for group, table in enumerate(tables):
        if code_array.size and int(code_array[:, group].max()) >= len(table):
            raise ValueError(f"a code of group {group} is past its table of {len(table)}")
    return CompactTensor(dtype, shape, form.repeats, code_array, tables)
