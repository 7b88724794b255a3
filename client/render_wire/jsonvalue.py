"""JSON text for the values renderers prints as JSON, kept exact both ways.

Tool specs, tool-call arguments and chat-template kwargs cross the wire as JSON
text (see proto/render/v1/render.proto). Python's json module already keeps
what matters on both ends (ints stay ints, big ints exact, floats round-trip
through repr, key order and unicode kept), so this module only refuses what it
would otherwise change silently: non-JSON Python values on the way out
(tuples, int dict keys, sets, ...) and duplicate keys on the way in.
"""

from __future__ import annotations

import contextlib
import json
import marshal
from typing import TypeAlias, cast

from .errors import invalid

# A value json.loads gives (with its default hooks): what load_json returns.
JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"


def dump_json(value: object, field: str) -> str:
    """`value` as JSON text; InvalidArgumentError naming `field` if it is not plain JSON.

    A client sends the same tools with every call of a rollout: the text of a value
    already dumped is looked up by the value's marshal bytes, which name every
    node's exact type and value (1, 1.0 and True, a list and a tuple, "1" and 1 as
    keys all differ), so only an identical value finds it: 3 us instead of 19 for
    a corpus request's tools.
    """
    key = _key(value)
    if key is not None:
        text = _dumped.get(key)
        if text is not None:
            return text
    try:
        if not _is_plain_json(value):
            _check_plain_json(value, field)  # raises, naming where
    except RecursionError:
        raise invalid(field, "nested too deeply to send as JSON") from None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # Remembered only if the value did not change meanwhile (another thread), so a key never
    # names another value's text.
    if key is not None and len(key) <= _DUMPED_MAX_BYTES and len(text) <= _DUMPED_MAX_BYTES and _key(value) == key:
        _remember(key, text)
    return text


# marshal's version 2 has no back-references, so its bytes depend on the value alone
# (not on which objects it shares); its floats are the 8 bytes of the double.
_MARSHAL_VERSION = 2
_DUMPED_MAX_ENTRIES = 256
_DUMPED_MAX_BYTES = 16 << 10  # of a key and of its text: at most ~256 x 48 KiB held (text is str)
_dumped: dict[bytes, str] = {}


def _key(value: object) -> bytes | None:
    """`value`'s marshal bytes; None for what marshal refuses (not plain JSON: a subclass, a set, an
    object, a value nested too deeply...), which the checked path then names."""
    try:
        return marshal.dumps(value, _MARSHAL_VERSION)  # type: ignore[arg-type]  # it raises if not
    except Exception:  # whatever an object's own buffer hooks raise, too
        return None


def _remember(key: bytes, text: str) -> None:
    # No lock (a lock held across a fork would deadlock the child): a dict's item operations are
    # atomic; threads racing to evict may find the oldest gone, and evict again.
    while len(_dumped) >= _DUMPED_MAX_ENTRIES:
        with contextlib.suppress(RuntimeError):  # changed size while its first key was read
            _dumped.pop(next(iter(_dumped), None), None)  # type: ignore[arg-type]  # None: not a key
    _dumped[key] = text


def load_json(text: str, field: str) -> JSONValue:
    """The value of JSON `text`; InvalidArgumentError naming `field` if it is not valid JSON."""
    try:
        value: JSONValue = json.loads(text, object_pairs_hook=object_without_duplicates)
        return value
    except DuplicateKey as exc:
        raise invalid(field, f"not valid JSON: duplicate key {exc.args[0]!r}") from None
    except RecursionError:
        raise invalid(field, "JSON nested too deeply") from None
    except ValueError as exc:
        raise invalid(field, f"not valid JSON ({exc})") from None


class DuplicateKey(Exception):
    """A JSON object repeats a key (its args: the key)."""


def object_without_duplicates(pairs: list[tuple[str, JSONValue]]) -> dict[str, JSONValue]:
    """json.loads' object_pairs_hook: the object, or DuplicateKey for a key it repeats."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


_SCALARS = (str, int, float, bool, type(None))


def _is_plain_json(value: object) -> bool:
    """_check_plain_json's test, without the names it builds for its errors (2x faster: a request's
    tools are checked on every call). RecursionError on a cycle, as json.dumps would."""
    kind = type(value)
    if kind is dict:
        for key, item in cast("dict[object, object]", value).items():
            if type(key) is not str or (type(item) not in _SCALARS and not _is_plain_json(item)):
                return False
        return True
    if kind is list:
        for item in cast("list[object]", value):
            if type(item) not in _SCALARS and not _is_plain_json(item):
                return False
        return True
    return kind in _SCALARS


def _check_plain_json(value: object, field: str) -> None:
    # Exact types: json.dumps would turn a tuple into a list and an int key into
    # a string without a word, and the renderer in-process would have seen the
    # original. Subclasses (IntEnum, numpy scalars...) are refused for the same reason.
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is dict:
        for key, item in cast("dict[object, object]", value).items():
            if type(key) is not str:
                raise invalid(field, f"JSON object keys must be str, got {type(key).__name__} key {key!r}")
            _check_plain_json(item, f"{field}.{key}")
        return
    if kind is list:
        for index, item in enumerate(cast("list[object]", value)):
            _check_plain_json(item, f"{field}[{index}]")
        return
    raise invalid(field, f"{kind.__name__} is not a JSON value (use dict, list, str, int, float, bool or None)")
