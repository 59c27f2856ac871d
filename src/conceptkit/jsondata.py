"""JSON that every reader accepts: NaN and infinities become null (Python's json writes bare NaN)."""

from __future__ import annotations

import math
from typing import Any


def finite_json(data: Any) -> Any:
    """The same data with NaN and infinities as None, in dicts, lists and tuples at any depth."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data
