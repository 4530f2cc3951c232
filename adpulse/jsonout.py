"""JSON for the tools' reports: a figure that could not be measured (NaN, inf) is ``null``.

JSON has no NaN, and a report that writes one is unreadable by strict parsers (``jq``, a
browser's ``JSON.parse``); numpy scalars become plain numbers on the way.
"""

from __future__ import annotations

import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth, replaced by None."""
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # a numpy scalar (no import:
        obj = obj.item()  # the CLI's start stays fast)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj
