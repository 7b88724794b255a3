"""Pixel tensors in an exact compact form: 8-bit codes and per-group tables of values.

An image processor of the Qwen2-VL kind resizes in 8 bits, then rescales and
normalises each channel, so every float32 value of `pixel_values` is a
function of one 8-bit pixel and its channel; and a still image is written
`temporal_patch_size` times over in every patch row. A 2-D tensor of shape
(rows, groups * repeats * span) is therefore stored as

    codes    uint8, shape (rows, groups, span), C order
    tables   for each group g, the values its codes stand for (the tensor's dtype)
    element  [i, (g * repeats + r) * span + j] = tables[g][codes[i, g, j]], for every r < repeats

which is 1 / (itemsize * repeats) of the raw bytes: 1/8 for float32 with two
temporal copies. `compact` gives that form only after decoding it and
comparing the bytes with the tensor's (bit patterns, so -0.0 and NaNs count
too); a tensor the form cannot hold exactly (a processor configured
differently, a float resize) gets None and travels raw. Never an approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# (groups, repeats) tried in turn: RGB with two temporal copies (Qwen2-VL, Qwen3-VL, ...),
# RGB without copies, and one table for everything.
LAYOUTS: tuple[tuple[int, int], ...] = ((3, 2), (3, 1), (1, 1))
MAX_TABLE = 256  # values an 8-bit code can stand for
# Decoders refuse more of these: a form past them is no pixel tensor. Repeats are the temporal
# copies (2 in every Qwen-VL processor); bounded, a form's codes decode to at most
# itemsize x MAX_REPEATS times their bytes, so a small message cannot ask for gigabytes.
MAX_GROUPS = 256
MAX_REPEATS = 16
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # bit patterns of float16/32/64


@dataclass(frozen=True)
class CompactTensor:
    """A tensor as 8-bit codes and per-group value tables (see the module's docstring).

    `materialize()` gives back the tensor, dtype, shape and bytes; trainers that
    expand pixels on their own device can do the same there (one gather per group).
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    repeats: int
    codes: np.ndarray  # uint8, (rows, groups, span)
    tables: tuple[np.ndarray, ...]  # one per group, of `dtype`

    @property
    def groups(self) -> int:
        return len(self.tables)

    @property
    def nbytes(self) -> int:
        """Bytes of the compact form (codes and tables)."""
        return self.codes.nbytes + sum(table.nbytes for table in self.tables)

    def materialize(self, check: Callable[[], None] | None = None) -> np.ndarray:
        """The tensor, as a new writable array; `check` runs before each group (it raises to stop)."""
        rows, groups, span = self.codes.shape
        out = np.empty((rows, groups, self.repeats, span), dtype=self.dtype)
        # Gathering into a contiguous buffer without numpy's bounds check (done here once per
        # group instead) and copying it out costs ~30 % less than gathering into the strided copies.
        values = np.empty((rows, span), dtype=self.dtype)
        for group, table in enumerate(self.tables):
            if check is not None:
                check()
            if self.codes.size and int(self.codes[:, group].max()) >= len(table):
                raise ValueError(f"a code of group {group} is past its table of {len(table)}")
            np.take(table, self.codes[:, group], out=values, mode="clip")
            # Every copy in one assignment: time in proportion to the bytes written, whatever `repeats`.
            out[:, group] = values[:, np.newaxis]
        return out.reshape(self.shape)


def compact(array: np.ndarray, layouts: Iterable[tuple[int, int]] = LAYOUTS) -> CompactTensor | None:
    """`array` in compact form if one of `layouts` holds it exactly, else None."""
    if array.ndim != 2 or array.dtype.kind != "f" or array.dtype.itemsize not in _UNSIGNED or array.size == 0:
        return None
    rows, width = array.shape
    bits = np.ascontiguousarray(array).view(_UNSIGNED[array.dtype.itemsize])
    for groups, repeats in layouts:
        if width % (groups * repeats) or groups > MAX_GROUPS or repeats > MAX_REPEATS:
            continue
        span = width // (groups * repeats)
        blocks = bits.reshape(rows, groups, repeats, span)
        first = blocks[:, :, 0]
        if any(not np.array_equal(first, blocks[:, :, repeat]) for repeat in range(1, repeats)):
            continue
        coded = [_code(np.ascontiguousarray(first[:, group])) for group in range(groups)]
        if any(result is None for result in coded):
            continue
        # The proof that a client rebuilds the tensor bit for bit: every copy equals the first
        # (above), and each group's table looked up by its codes equals the first copy (_code).
        codes = np.empty((rows, groups, span), dtype=np.uint8)
        tables = []
        for group, result in enumerate(coded):
            assert result is not None
            codes[:, group], table = result
            tables.append(table.view(array.dtype))
        return CompactTensor(array.dtype, array.shape, repeats, codes, tuple(tables))
    return None


def _code(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 codes, table of bit patterns) with table[codes] == bits exactly, or None past
    256 distinct values."""
    return _code_evenly_spaced(bits) or _code_by_sorting(bits)


def _code_evenly_spaced(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The fast way, for values evenly spaced (an affine map of 8-bit pixels): a code is the
    value's steps from the smallest, the step read off a sample; checked against every value."""
    values = bits.view(_float_of(bits))
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        return None
    sample = np.unique(values.ravel()[:: max(1, values.size // 65536)])
    # The smallest gap between sampled values is the step, unless the sample missed a value
    # next to another; then the check below fails and sorting takes over.
    step = float(np.min(np.diff(sample.astype(np.float64)))) if len(sample) > 1 else 1.0
    if step <= 0 or (float(high) - float(low)) / step >= MAX_TABLE:
        return None
    # In the values' own precision: 256 steps of a float32 are far from a rounding error of 0.5.
    steps = np.rint((values - low) * values.dtype.type(1.0 / step))
    codes = steps.astype(np.uint8)
    table = np.zeros(int(codes.max()) + 1, dtype=bits.dtype)
    table[codes.ravel()] = bits.ravel()
    if not np.array_equal(table[codes], bits):  # two values on one code: not evenly spaced
        return None
    return codes, table


def _code_by_sorting(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The general way: the distinct values, sorted, and each value's index among them."""
    table, inverse = np.unique(bits, return_inverse=True)
    if len(table) > MAX_TABLE:
        return None
    return inverse.reshape(bits.shape).astype(np.uint8), table


def _float_of(bits: np.ndarray) -> type[np.floating]:
    floats: dict[type[np.generic], type[np.floating]] = {
        np.uint16: np.float16,
        np.uint32: np.float32,
        np.uint64: np.float64,
    }
    return floats[bits.dtype.type]


def materialize_all(data: T, check: Callable[[], None] | None = None) -> T:
    """`data` (a sample, RenderedTokens, MultiModalData or None) with every CompactTensor of its
    mm_items replaced, in place, by its tensor: read-only, like the arrays decoded raw.

    `check` runs as the work goes (it raises to stop it: a deadline passed)."""
    media = getattr(data, "multi_modal_data", data)
    for items in getattr(media, "mm_items", {}).values():
        for item in items:
            for name, value in item.items():
                if isinstance(value, CompactTensor):
                    array = value.materialize(check)
                    array.flags.writeable = False
                    item[name] = array
    return data
