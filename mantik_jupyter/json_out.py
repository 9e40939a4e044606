"""Strict JSON for the REST API and ``mantik ... --json``.

A diverged training run logs ``loss = nan``; Python's ``json`` would write a bare ``NaN``,
which no JSON parser (the sidebar's ``JSON.parse``, ``jq``) accepts. Non-finite floats are
written as MLflow's own REST API writes them: the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"``.
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(data: Any, **kwargs: Any) -> str:
    kwargs.setdefault("default", str)
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError:  # only then walk the data: answers are mostly finite
        return json.dumps(_finite(data), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
