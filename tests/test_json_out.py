"""Strict JSON for REST answers and ``--json`` output."""

from __future__ import annotations

import json
import math

from mantik_jupyter import json_out


def test_non_finite_floats_are_spelled_as_mlflow_spells_them() -> None:
    data = {"metrics": {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 0.5}, "l": [math.nan]}
    text = json_out.dumps(data)
    assert json.loads(text) == {
        "metrics": {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 0.5},
        "l": ["NaN"],
    }


def test_finite_data_is_plain_json() -> None:
    assert json_out.dumps({"a": (1, 2.5)}, indent=None) == '{"a": [1, 2.5]}'
    assert json_out.dumps({"when": object}).startswith('{"when": "<class')
