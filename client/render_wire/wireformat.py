"""Protobuf wire bytes assembled from pieces, so pixel tensors are copied once.

upb serialises a message into a buffer of its own and copies it out; with a
tensor's bytes that is `tobytes`, the copy into the message, and the
serialisation itself (37 ms for a 24 MiB pixel_values here, against 3.5 ms
for one copy). samples.encode_sample therefore writes the messages on the way
to Tensor.data by hand: small parts are serialised by upb, each array is
added as a byte view of its own memory, and `join` copies everything once.
The bytes are exactly what upb writes for the same message
(tests/wire/test_wireformat.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TypeVar

import numpy as np

IntT = TypeVar("IntT", bound=int)  # int or bool

# Serialised fields from upb, or a uint8 view of an array's memory.
Piece = bytes | np.ndarray

_LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """`value` (non-negative) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def byte_view(array: np.ndarray) -> np.ndarray:
    """`array`'s bytes in C order as a flat uint8 array: a view unless it must be made contiguous."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class WireMessage:
    """A message's wire bytes as a list of pieces, with their total size."""

    __slots__ = ("pieces", "size")

    def __init__(self, serialized: bytes = b"") -> None:
        self.pieces: list[Piece] = [serialized] if serialized else []
        self.size = len(serialized)

    def append_bytes_field(self, number: int, payload: Piece) -> None:
        """Add a bytes field, sharing `payload`'s memory until `join`."""
        self._append(_tag(number) + varint(len(payload)))
        self._append(payload)

    def append_message_field(self, number: int, message: WireMessage) -> None:
        """Add an embedded message field."""
        self._append(_tag(number) + varint(message.size))
        self.pieces.extend(message.pieces)
        self.size += message.size

    def extend(self, fields: WireMessage) -> None:
        """Add another piece list's fields (concatenated messages are one message)."""
        self.pieces.extend(fields.pieces)
        self.size += fields.size

    def join(self) -> bytes:
        """The message's bytes: the one copy of every piece."""
        # An array is a buffer; numpy's stubs say so (__buffer__) only for Python 3.12 and later.
        return b"".join(self.pieces)  # type: ignore[arg-type]

    def _append(self, piece: Piece) -> None:
        self.pieces.append(piece)
        self.size += len(piece)


def _tag(number: int) -> bytes:
    return varint(number << 3 | _LENGTH_DELIMITED)


# ---------------------------------------------------------------------------
# Reading: a message's fields as views of the received bytes
# ---------------------------------------------------------------------------


class WireFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def split_field(message: memoryview, number: int) -> tuple[bytes, list[memoryview]]:
    """`message` without field `number`, and each occurrence of that field's payload.

    The payloads are views of `message`: a tensor's data is not copied. The
    rest is small and is handed to upb to parse.
    """
    rest: list[memoryview] = []
    payloads: list[memoryview] = []
    position, end = 0, len(message)
    while position < end:
        start = position
        tag, position = _read_varint(message, position)
        field_number, wire_type = tag >> 3, tag & 7
        if field_number == 0:
            raise WireFormatError("field number 0")
        if field_number == number and wire_type != _LENGTH_DELIMITED:
            raise WireFormatError(f"field {number} is not length-delimited")
        if wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(message, position)
            if position + length > end:
                raise WireFormatError("a field runs past the end of its message")
            if field_number == number:
                payloads.append(message[position : position + length])
            position += length
        elif wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")
        if position > end:
            raise WireFormatError("a field runs past the end of its message")
        if field_number != number:
            rest.append(message[start:position])
    return b"".join(rest), payloads


@dataclass
class FieldCount:
    """What `count_fields` found of one field: how many values, and the payloads it carried."""

    values: int = 0
    payloads: list[memoryview] = dataclass_field(default_factory=list)  # views of the message


class TooManyValues(ValueError):
    """A field holds more values than its limit allows; `values` is how many were counted
    (all of them when `exact`, else the walk stopped at the first past the limit)."""

    def __init__(self, number: int, values: int, exact: bool) -> None:
        super().__init__(f"field {number}: {values} values")
        self.number, self.values, self.exact = number, values, exact


# Packed varints are counted this many bytes at a time: the count needs no copy of the payload.
_COUNT_CHUNK = 1 << 20


def count_fields(
    message: memoryview,
    limits: Mapping[int, int],
    *,
    packed: Collection[int] = (),
    max_fields: int | None = None,
    check: Callable[[], None] | None = None,
) -> dict[int, FieldCount]:
    """Count the values of the fields numbered in `limits` without parsing `message`, so that
    a limit refuses a request before upb spends its memory (~150 bytes a sub-message, 4 an id).

    A length-delimited occurrence is one value (a string, a sub-message), or as many as
    its varints for a field in `packed` (a packed repeated int field); any other occurrence
    is one value. TooManyValues as soon as a field is past its limit; WireFormatError
    past `max_fields` fields in all (default: the limits' sum and 64), or for malformed
    bytes. `check` runs every few thousand fields (it raises to stop: a deadline).
    """
    counts = {number: FieldCount() for number in limits}
    most_fields = sum(limits.values()) + 64 if max_fields is None else max_fields
    position, end, fields = 0, len(message), 0
    while position < end:
        tag = message[position]
        if tag < 0x80:  # one byte: fields 1-15, the common case, without the call
            position += 1
        else:
            tag, position = _read_varint(message, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireFormatError("field number 0")
        fields += 1
        if fields > most_fields:
            raise WireFormatError(f"more than {most_fields} fields")
        if check is not None and not fields % 4096:
            check()
        count = counts.get(number)
        if wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(message, position)
            if position + length > end:
                raise WireFormatError("a field runs past the end of its message")
            if count is not None:
                payload = message[position : position + length]
                count.payloads.append(payload)
                if number in packed:
                    count.values += count_varints(payload)
                    if count.values > limits[number]:
                        raise TooManyValues(number, count.values, exact=True)
                    position += length
                    continue
            position += length
        elif wire_type == 0:
            if position < end and message[position] < 0x80:
                position += 1
            else:
                _, position = _read_varint(message, position)
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")
        if position > end:
            raise WireFormatError("a field runs past the end of its message")
        if count is not None:
            count.values += 1
            if count.values > limits[number]:
                raise TooManyValues(number, count.values, exact=False)
    return counts


def count_varints(payload: memoryview) -> int:
    """How many varints a packed field's payload holds: its bytes without the continuation bit.

    Counted a chunk at a time, so that the comparison's temporary stays small (~1 ms per MiB).
    """
    data = np.frombuffer(payload, dtype=np.uint8)
    count = 0
    for start in range(0, len(data), _COUNT_CHUNK):
        count += int(np.count_nonzero(data[start : start + _COUNT_CHUNK] < 0x80))
    return count


def merged(payloads: list[memoryview]) -> memoryview:
    """One payload for a message field that occurred several times (protobuf merges them)."""
    return payloads[0] if len(payloads) == 1 else memoryview(b"".join(payloads))


_FIXED_SIZES = {1: 8, 5: 4}


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while position < len(data) and shift < 64:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                break
            return value, position
        shift += 7
    raise WireFormatError("truncated or overlong varint")


def as_list(values: Sequence[IntT]) -> list[IntT]:
    """A repeated int or bool field as a list of Python ints or bools.

    numpy reads upb's container in C: 1.7x (ids) to 3.5x (bools) faster than
    list() for a sample's thousands of tokens. An empty field is an empty list.
    """
    items: list[IntT] = np.array(values).tolist() if values else []
    return items
