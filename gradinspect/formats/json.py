"""Strict RFC 8259 JSON: non-finite numbers become the strings "NaN", "Infinity", "-Infinity"."""

from __future__ import annotations

import json
import math
from typing import Any, TextIO

from . import RenderOptions


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its JSON string spelling."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


#: Larger documents are written on one line: Python's JSON encoder is ~10x
#: faster without indentation (``jq .`` pretty-prints them).
PRETTY_MAX_ROWS = 1000


def dumps(doc: dict[str, Any]) -> str:
    rows = len(doc.get("tensors", ())) + len(doc.get("report", {}).get("tensors", ()))
    indent = 2 if rows <= PRETTY_MAX_ROWS else None
    try:  # the common case: every number finite, no rewriting needed
        text = json.dumps(doc, indent=indent, allow_nan=False, ensure_ascii=False)
    except ValueError:
        text = json.dumps(strict(doc), indent=indent, allow_nan=False, ensure_ascii=False)
    return text + "\n"


def _render(report: Any, out: TextIO, options: RenderOptions) -> None:
    out.write(dumps(report.to_dict()))


render_norms = render_check = render_diff = render_info = _render
