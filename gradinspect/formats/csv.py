"""CSV: one row per tensor (or group), full-precision numbers; totals are in the JSON.

Text cells (names, paths) are made safe for the readers CSV meets: control
characters are shown as escapes (``\\n``, ``\\x1b``; :func:`~._escape.printable`), so
every row is one line even for a reader that splits on newlines; and a cell
starting with ``=``, ``+``, ``-`` or ``@`` gets a leading ``'`` so a spreadsheet
shows it as text instead of running it as a formula.  Numbers are never changed.
The JSON keeps names as they are (see there for text that is not UTF-8).
"""

from __future__ import annotations

import csv
from typing import Any, TextIO

from . import Format, RenderOptions, write_with
from ._escape import printable

NORMS_COLUMNS = ("name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite", "nan", "inf", "members",
                 "pieces", "replica_max_diff")


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return "x".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _text(value)
    return "" if value is None else value


_FORMULA = ("=", "+", "-", "@")


def _text(value: str) -> str:
    value = printable(value)
    return "'" + value if value.startswith(_FORMULA) else value


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


class CsvFormat(Format):
    name = "csv"
    suffixes = ('.csv',)
    kinds = ('norms', 'diff', 'info')
    machine = True
    help = "one row per tensor"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"norms": render_norms, "diff": render_diff, "info": render_info}, report, options)


FORMAT = CsvFormat()
