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

import functools
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TypeVar

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

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
    rest, found = split_fields(message, (number,))
    return rest, [payload for _, payload in found]


def split_fields(message: memoryview, numbers: Container[int]) -> tuple[bytes, list[tuple[int, memoryview]]]:
    """split_field for several length-delimited fields in one pass: the rest, and each occurrence
    of any of them, in order, as (its number, its payload)."""
    rest: list[memoryview] = []
    found: list[tuple[int, memoryview]] = []
    position, end = 0, len(message)
    while position < end:
        start = position
        tag, position = _read_varint(message, position)
        field_number, wire_type = tag >> 3, tag & 7
        if field_number == 0:
            raise WireFormatError("field number 0")
        wanted = field_number in numbers
        if wanted and wire_type != _LENGTH_DELIMITED:
            raise WireFormatError(f"field {field_number} is not length-delimited")
        if wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(message, position)
            if position + length > end:
                raise WireFormatError("a field runs past the end of its message")
            if wanted:
                found.append((field_number, message[position : position + length]))
            position += length
        elif wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
        else:
            raise WireFormatError(f"unsupported wire type {wire_type}")
        if position > end:
            raise WireFormatError("a field runs past the end of its message")
        if not wanted:
            rest.append(message[start:position])
    return b"".join(rest), found


class TooManyValues(ValueError):
    """A message holds more values than a limit allows.

    `field` is the dotted path of the field where it went past (from the message walked),
    `limit` the full name of the field whose own limit it is (None: the values in all),
    `values` how many were counted: all of the field's when `exact`, else up to the first past.
    """

    def __init__(self, field: str, values: int, *, limit: str | None, exact: bool) -> None:
        super().__init__(f"{field}: {values} values")
        self.field, self.values, self.limit, self.exact = field, values, limit, exact


@dataclass
class Census:
    """What `count_values` allows: `most` values in all (sub-messages, strings, numbers), and, by
    full field name, how many a field may hold in one message (counted apart from the rest)."""

    most: int
    limits: Mapping[str, int] = dataclass_field(default_factory=dict)
    opaque: Collection[str] = ()  # message fields counted but not walked into (full names)
    check: Callable[[], None] | None = None  # runs every few thousand values; raises to stop
    counted: int = 0
    # Values of the limited fields, in the whole message: a field that occurs again (a message
    # field is merged by upb) adds to its count.
    per_field: dict[str, int] = dataclass_field(default_factory=dict)


def count_values(message: memoryview, descriptor: Descriptor, census: Census) -> None:
    """Count what `message`, a `descriptor` message, holds, down to its scalars, without parsing it.

    upb spends ~150 bytes on an empty sub-message that takes 2 on the wire, and 4 on an
    id that takes 1: counting first lets a limit refuse a request before that memory is
    spent. A packed field's values are its varints (counted in C, no copy); everything
    else is one value an occurrence. Raises TooManyValues past a limit, WireFormatError
    for malformed bytes. Costs ~0.5 us a field walked: legit requests have few.
    """
    position, end = 0, len(message)
    fields = _fields_of(descriptor)
    per_field = census.per_field
    while position < end:
        tag = message[position]
        if tag < 0x80:  # one byte: fields 1-15, the common case, without the call
            position += 1
        else:
            tag, position = _read_varint(message, position)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireFormatError("field number 0")
        field = fields.get(number)
        limit = None if field is None else census.limits.get(field.full_name)
        values = 1
        if wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(message, position)
            if position + length > end:
                raise WireFormatError("a field runs past the end of its message")
            if field is not None:
                payload = message[position : position + length]
                if field.message_type is not None and field.full_name not in census.opaque:
                    try:
                        count_values(payload, field.message_type, census)
                    except TooManyValues as exc:
                        exc.field = f"{field.name}.{exc.field}"
                        raise
                elif field.packed:
                    values = count_varints(payload) if field.varints else length // field.packed
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
        if limit is not None:  # its own limit; the sub-messages' contents count in all
            assert field is not None
            count = per_field[field.full_name] = per_field.get(field.full_name, 0) + values
            if count > limit:
                exact = wire_type == _LENGTH_DELIMITED and bool(field.packed)  # a packed payload, counted whole
                raise TooManyValues(field.name, count, limit=field.full_name, exact=exact)
            continue
        census.counted += values
        if census.counted > census.most:
            raise TooManyValues(field.name if field else f"field {number}", census.counted, limit=None, exact=False)
        if census.check is not None and census.counted % 4096 < values:
            census.check()


@dataclass(frozen=True)
class _Field:
    name: str
    full_name: str
    message_type: Descriptor | None  # a message field's: its payload is walked too
    packed: int  # a repeated scalar field: its packed payload holds values of this many bytes (0: varints)
    varints: bool


_FIXED_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: 8,
    FieldDescriptor.TYPE_FIXED64: 8,
    FieldDescriptor.TYPE_SFIXED64: 8,
    FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED32: 4,
    FieldDescriptor.TYPE_SFIXED32: 4,
}
_NOT_PACKED = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}


@functools.cache
def _fields_of(descriptor: Descriptor) -> dict[int, _Field]:
    fields = {}
    for field in descriptor.fields:
        message = field.type == FieldDescriptor.TYPE_MESSAGE
        repeated_scalar = field.is_repeated and field.type not in _NOT_PACKED
        fields[field.number] = _Field(
            name=field.name,
            full_name=field.full_name,
            message_type=field.message_type if message else None,
            packed=(_FIXED_TYPES.get(field.type, 1) if repeated_scalar else 0),
            varints=repeated_scalar and field.type not in _FIXED_TYPES,
        )
    return fields


# Packed varints are counted this many bytes at a time: the count needs no copy of the payload.
_COUNT_CHUNK = 1 << 20


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
