"""CSV: one row per tensor (or group), full-precision numbers; totals are in the JSON."""

from __future__ import annotations

import csv
from typing import Any, TextIO

from . import RenderOptions

NORMS_COLUMNS = ("name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite", "nan", "inf", "members")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else value


def render_norms(report: Any, out: TextIO, options: RenderOptions) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(NORMS_COLUMNS)
    for row in report.tensors:
        d = row.to_dict()
        w.writerow([_cell(d[c]) for c in NORMS_COLUMNS])
