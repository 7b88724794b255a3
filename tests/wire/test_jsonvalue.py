"""JSON text that keeps what renderers prints: exact types, order, unicode."""

from __future__ import annotations

import enum
import json

import pytest

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
