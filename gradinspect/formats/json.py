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


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(strict(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _render(report: Any, out: TextIO, options: RenderOptions) -> None:
    out.write(dumps(report.to_dict()))


render_norms = render_check = render_diff = render_info = _render
