"""CSV: one row per tensor (or group), full-precision numbers; totals are in the JSON."""

from __future__ import annotations

import csv
from typing import Any, TextIO

from . import RenderOptions

NORMS_COLUMNS = ("name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite", "nan", "inf", "members",
                 "pieces", "replica_max_diff")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else value


DIFF_COLUMNS = ("name", "shape", "dtype_a", "dtype_b", "numel", "l2_a", "l2_b", "l2_diff", "rel", "cosine", "linf_diff", "ok")
INFO_COLUMNS = ("name", "source", "dtype", "shape", "numel", "bytes")


def _rows(rows: Any, columns: tuple[str, ...], out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        d = row.to_dict()
        w.writerow([_cell(d[c]) for c in columns])


def render_norms(report: Any, out: TextIO, options: RenderOptions) -> None:
    _rows(report.tensors, NORMS_COLUMNS, out)


def render_diff(report: Any, out: TextIO, options: RenderOptions) -> None:
    """Compared tensors only; the sets that differ are in the JSON."""
    _rows(report.tensors, DIFF_COLUMNS, out)


def render_info(report: Any, out: TextIO, options: RenderOptions) -> None:
    _rows(report.tensors, INFO_COLUMNS, out)
