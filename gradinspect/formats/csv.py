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


def columns(fields: tuple[str, ...]) -> tuple[str, ...]:
    """A report row type's CSV columns: its JSON fields (``FIELDS`` in report.py), but for the ones
    the JSON alone has, with ``pieces`` before ``replica_max_diff`` (the column order of the first CSV)."""
    cols = [c for c in fields if c not in _JSON_ONLY]
    if "pieces" in cols and "replica_max_diff" in cols:
        cols.remove("pieces")
        cols.insert(cols.index("replica_max_diff"), "pieces")
    return tuple(cols)


_JSON_ONLY = frozenset({"duplicate_of"})


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




def _rows(rows: Any, columns: tuple[str, ...], out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        d = row.to_dict()
        w.writerow([_cell(d[c]) for c in columns])


def render_norms(report: Any, out: TextIO, options: RenderOptions) -> None:
    from ..report import TensorNorms

    _rows(report.tensors, columns(TensorNorms.FIELDS), out)


def render_diff(report: Any, out: TextIO, options: RenderOptions) -> None:
    """Compared tensors only; the sets that differ are in the JSON."""
    from ..report import DiffRow

    _rows(report.tensors, columns(DiffRow.FIELDS), out)


def render_info(report: Any, out: TextIO, options: RenderOptions) -> None:
    from ..report import InfoTensor

    _rows(report.tensors, columns(InfoTensor.FIELDS), out)


def render_trend(report: Any, out: TextIO, options: RenderOptions) -> None:
    """Long format: one row per (step, tensor or group present in it), numbers spelled as in the JSON."""
    from ..trend import TREND_CSV_COLUMNS

    w = csv.writer(out, lineterminator="\n")
    w.writerow(TREND_CSV_COLUMNS)
    for step, name, *rest in report.csv_rows(spelled=True):
        w.writerow([step, _text(name), *rest])


class CsvFormat(Format):
    name = "csv"
    suffixes = ('.csv',)
    kinds = ('norms', 'diff', 'info', 'trend')
    machine = True
    help = "one row per tensor"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"norms": render_norms, "diff": render_diff, "info": render_info, "trend": render_trend},
                          report, options)


FORMAT = CsvFormat()
