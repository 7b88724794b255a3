"""JSON text that keeps what renderers prints: exact types, order, unicode."""

from __future__ import annotations

import enum
import json
import sys
import threading

import pytest

from render_wire import jsonvalue
from render_wire.errors import InvalidArgumentError
from render_wire.jsonvalue import dump_json, load_json


@pytest.mark.parametrize(
    "value",
    [
        {"int": 1, "float": 1.0, "big": 12345678901234567890123, "tiny": 5e-324, "neg_zero": -0.0},
        {"z": 1, "a": 2, "m": [3, {"y": None, "b": True}]},
        {"unicode": '日本語 ✓ \u0000 \n "quoted"', "emoji": "🚀"},
        [1, "two", 3.5, False, None],
        "just a string",
    ],
)
def test_values_round_trip_with_their_types_and_order(value: object) -> None:
    back = load_json(dump_json(value, "x"), "x")
    assert back == value
    assert json.dumps(back) == json.dumps(value)  # same types (1 vs 1.0) and key order


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ((1, 2), "tuple is not a JSON value"),
        ({1: "a"}, "JSON object keys must be str"),
        ({"a": {1, 2}}, "x.a: set is not a JSON value"),
        ({"a": [b"bytes"]}, "x.a[0]: bytes is not a JSON value"),
        (enum.IntEnum("E", "A").A, "E is not a JSON value"),
    ],
)
def test_values_json_would_change_are_refused(value: object, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        dump_json(value, "x")


def test_deep_nesting_is_refused_not_crashed() -> None:
    value: object = 1
    for _ in range(5000):
        value = [value]
    with pytest.raises(InvalidArgumentError, match="nested too deeply"):
        dump_json(value, "x")
    with pytest.raises(InvalidArgumentError, match="x: JSON nested too deeply"):
        load_json("[" * 100000 + "]" * 100000, "x")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "x: not valid JSON"),
        ('{"a": 1, "a": 2}', "x: not valid JSON: duplicate key 'a'"),
        ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
        ("", "x: not valid JSON"),
    ],
)
def test_invalid_json_is_refused_naming_the_field(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        load_json(text, "x")


def test_a_value_dumped_again_is_dumped_as_it_is_now() -> None:
    # The same tools go with every call of a rollout, and their text is remembered; a tool
    # spec changed in place, even to a value equal in Python (1 == 1.0 == True), is new text.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": 1}}}]
    first = dump_json(tools, "tools")
    assert dump_json(tools, "tools") == first
    for changed in (1.0, True, "1", [1], -0.0, 0.0):
        tools[0]["function"]["parameters"]["x"] = changed
        assert dump_json(tools, "tools") == json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
    tools[0]["function"]["parameters"] = {"b": 1, "a": 2}
    assert dump_json(tools, "tools").endswith('{"b":1,"a":2}}}]')
    tools[0]["function"]["parameters"] = {"a": 2, "b": 1}  # key order is part of the text
    assert dump_json(tools, "tools").endswith('{"a":2,"b":1}}}]')


class _Text(str):
    pass


def test_a_value_like_one_dumped_before_is_still_refused() -> None:
    assert dump_json([[1, 2], {"1": "a"}], "x") == '[[1,2],{"1":"a"}]'
    for value in ([(1, 2), {"1": "a"}], [[1, 2], {1: "a"}], [[1, 2], {"1": _Text("a")}]):
        with pytest.raises(InvalidArgumentError):
            dump_json(value, "x")


def test_remembered_texts_are_bounded() -> None:
    for number in range(1000):
        assert dump_json({"n": number}, "x") == f'{{"n":{number}}}'
    assert len(jsonvalue._dumped) <= jsonvalue._DUMPED_MAX_ENTRIES
    big = {"text": "x" * (jsonvalue._DUMPED_MAX_BYTES + 1)}
    dump_json(big, "x")
    assert all(len(key) <= jsonvalue._DUMPED_MAX_BYTES for key in jsonvalue._dumped)


def test_remembered_texts_stay_bounded_under_threads() -> None:
    # Threads evicting at once find the oldest gone and evict again: the bound holds (but for the
    # entries of threads inserting at that very moment).
    threads, each = 16, 3000
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [
            threading.Thread(target=lambda t=t: [dump_json({"t": t, "n": n}, "x") for n in range(each)])
            for t in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(jsonvalue._dumped) <= jsonvalue._DUMPED_MAX_ENTRIES + threads
