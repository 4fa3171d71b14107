"""The terminal table, drawn with rich.

Readable at 80 columns: every column but the tensor name takes the width of
its content and long names are elided in the middle, never so that two names
look alike (:func:`~._human.elide_names`); output that is not a terminal keeps
names whole unless a width is asked for.  Names, paths and metadata are shown
with control characters escaped (:func:`~._escape.printable`), never as markup.
No colour when NO_COLOR is set or the output is not a terminal (rich's own detection).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO, cast

from . import Format, RenderOptions, write_with
from ._escape import printable

if TYPE_CHECKING:
    from rich.console import Console, JustifyMethod

_BAR = 6
_MIN_NAME = 12


def console_for(out: TextIO, options: RenderOptions) -> Console:
    from rich.console import Console

    kwargs: dict[str, Any] = {"file": out, "highlight": False, "emoji": False, "markup": False}
    if options.width is not None:
        kwargs["width"] = options.width
    if options.color is not None:
        kwargs["no_color"] = not options.color
        kwargs["force_terminal"] = options.color
    return Console(**kwargs)


@contextmanager
def _console(out: TextIO, options: RenderOptions) -> Iterator[tuple[Console, bool]]:
    """A console whose output reaches ``out`` with trailing blanks removed, and whether to elide names."""
    buf = io.StringIO()
    if options.width is None or options.color is None:  # detect on the real stream
        probe = console_for(out, options)
        options = RenderOptions(width=probe.width, color=probe.is_terminal and not probe.no_color,
                                elide=options.elide and (options.width is not None or probe.is_terminal))
    yield console_for(buf, options), options.elide
    out.write("\n".join(line.rstrip(" ") for line in buf.getvalue().split("\n")))


def _layout(cols: list[tuple[str, str]], rows: list[list[str]], width: int) -> tuple[list[int], int] | None:
    """Column widths and gap when the names fit well enough in ``width``, else None."""
    widths = [max([len(h)] + [len(c[j]) for c in rows]) for j, (h, _) in enumerate(cols)]
    longest = widths[1]
    for gap in (2, 1):
        room = width - sum(w for j, w in enumerate(widths) if j != 1) - gap * (len(cols) - 1)
        if room >= min(longest, 24):
            widths[1] = min(longest, room)
            return widths, gap
    return None


def render_norms(report: Any, out: TextIO, options: RenderOptions) -> None:
    with _console(out, options) as (con, elide):
        _norms(con, report, elide)


def _norms(con: Console, report: Any, elide: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    from ..norms import general_p
    from ._human import (
        bar,
        nonfinite,
        norm_label,
        num,
        percent,
        shape,
        shard_columns,
        summary,
    )

    p = report.norm_type
    lp = general_p(p)
    any_bad = any(r.nonfinite for r in report.tensors)
    cols: list[tuple[str, str]] = [("#", "right"), ("tensor", "left"), ("shape", "right"), ("dtype", "left"),
                                   ("L2", "right"), ("L1", "right"), ("L∞", "right")]
    if lp:
        cols.append((norm_label(p), "right"))
    cols.append(("share", "left"))
    share_col = len(cols) - 1
    extra = shard_columns(report)
    cols += [(h, "right") for h, _ in extra]
    if any_bad:
        cols.append(("NaN/inf", "right"))

    def cells(r: Any, i: int, bar_w: int) -> list[str]:
        c = [str(i), shown[i - 1], shape(r.shape), r.dtype, num(r.l2), num(r.l1), num(r.linf)]
        if lp:
            c.append(num(r.norm))
        c.append(f"{bar(r.share, bar_w)} {percent(r.share):>6}" if bar_w else percent(r.share))
        c += [f(r) for _, f in extra]
        if any_bad:
            c.append(nonfinite(r))
        return c

    shown = [printable(r.name) for r in report.tensors]
    # Prefer the share bar; give it up, then tighten the gaps, before eliding names.
    for bar_w in (_BAR, 0):
        rows = [cells(r, i, bar_w) for i, r in enumerate(report.tensors, 1)]
        fit = _layout(cols, rows, con.width)
        if fit:
            break
    if not bar_w:
        cols[share_col] = ("share", "right")
    styles = ["red" if r.nonfinite else ("dim" if r.all_zero else None) for r in report.tensors]
    if rows:
        _print_table(con, cols, rows, styles, fit or _squeezed(cols, rows, con.width), elide)
    else:
        con.print(Text("no floating-point tensors selected", style="dim"))
    if report.omitted:
        con.print(Text(f"… {report.omitted:,} more rows not shown (--top)", style="dim"))
    con.print()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in summary(report):
        style = None
        if label == "clipped" and value == "yes":
            style = "yellow"
        if label == "non-finite" or (label in ("clip coef", "norm after clip") and not math.isfinite(report.clip.coef)):
            style = "bold red"
        grid.add_row(Text(label), Text(printable(value), style=style or ""))
    con.print(grid)
    if report.total.nonfinite:
        bad = [printable(r.name) for r in report.tensors if r.nonfinite]
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        con.print(Text(f"\nWARNING: NaN/Inf gradients in {names}", style="bold red"))


def _simple_table(con: Console, cols: list[tuple[str, str]], rows: list[list[str]], styles: list[str | None],
                  elide: bool, droppable: tuple[int, ...] = ()) -> None:
    """A table whose column 1 holds names, elided in the middle to fit the console (if ``elide``).

    Columns in ``droppable`` are left out, in that order, while the names would not fit.
    """
    keep = list(range(len(cols)))
    for j in (None, *droppable):
        if j is not None:
            keep.remove(j)
        kc = [cols[k] for k in keep]
        kr = [[r[k] for k in keep] for r in rows]
        fit = _layout(kc, kr, con.width)
        if fit:
            break
    _print_table(con, kc, kr, styles, fit or _squeezed(kc, kr, con.width), elide)


def _squeezed(cols: list[tuple[str, str]], rows: list[list[str]], width: int) -> tuple[list[int], int]:
    """Widths when nothing fits well: one-space gaps, names get what is left (at least a few)."""
    widths = [max([len(h)] + [len(c[j]) for c in rows]) for j, (h, _) in enumerate(cols)]
    widths[1] = max(_MIN_NAME, width - sum(w for j, w in enumerate(widths) if j != 1) - (len(cols) - 1))
    return widths, 1


def _print_table(con: Console, cols: list[tuple[str, str]], rows: list[list[str]], styles: list[str | None],
                 layout: tuple[list[int], int], elide: bool) -> None:
    """The table, names (column 1) elided to their width, or whole and the table as wide as they need;
    cells are never markup."""
    from rich.table import Table
    from rich.text import Text

    from ._human import elide_names

    widths, gap = layout
    if elide:
        for c, name in zip(rows, elide_names([c[1] for c in rows], widths[1]), strict=True):
            c[1] = name
    else:
        widths = [widths[0], max([len(cols[1][0]), *(len(c[1]) for c in rows)]), *widths[2:]]
    table = Table(box=None, pad_edge=False, header_style="bold underline", padding=(0, 0, 0, gap))
    for j, (h, just) in enumerate(cols):
        table.add_column(h, justify=cast("JustifyMethod", just), no_wrap=True, width=widths[j], overflow="crop")
    for c, style in zip(rows, styles, strict=True):
        table.add_row(*map(Text, c), style=style)
    need = sum(widths) + gap * (len(widths) - 1)
    width = con.width
    con.width = max(width, need)  # rich draws no table wider than its console
    try:
        con.print(table)
    finally:
        con.width = width


def _grid(con: Console, lines: list[tuple[str, str]], red: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in lines:
        grid.add_row(Text(printable(label)), Text(printable(value), style="bold red" if label in red else ""))
    con.print(grid)


def render_diff(report: Any, out: TextIO, options: RenderOptions) -> None:
    with _console(out, options) as (con, elide):
        _diff(con, report, elide)


def _diff(con: Console, report: Any, elide: bool) -> None:
    from rich.text import Text

    from ._human import diff_summary, dtypes, num, shape

    tol = report.tolerances.any
    cols = [("#", "right"), ("tensor", "left"), ("shape", "right"), ("dtype", "left"), ("L2 A", "right"),
            ("L2 B", "right"), ("L2 A−B", "right"), ("rel", "right"), ("cosine", "right"), ("max|A−B|", "right")]
    if tol:
        cols.append(("", "left"))
    rows, styles = [], []
    for i, r in enumerate(report.tensors, 1):
        c = [str(i), printable(r.name), shape(r.shape), dtypes(r.dtype_a, r.dtype_b), num(r.l2_a), num(r.l2_b),
             num(r.l2_diff), num(r.rel), num(r.cosine, 6), num(r.linf_diff)]
        if tol:
            c.append("ok" if r.ok else "FAIL")
        rows.append(c)
        styles.append("red" if r.ok is False else None)
    if rows:
        _simple_table(con, cols, rows, styles, elide, droppable=(3, 2, 9))  # dtype, shape, max|A−B|
    else:
        con.print(Text("no tensor is in both sets with the same shape", style="dim"))
    con.print()
    red = set() if report.ok else {"verdict"}
    differ = {"only in A", "only in B", "shape differs", "not compared"}
    _grid(con, diff_summary(report), red | (differ if tol and not report.tolerances.allow_missing else set()))


def render_info(report: Any, out: TextIO, options: RenderOptions) -> None:
    with _console(out, options) as (con, elide):
        _info(con, report, elide)


def _info(con: Console, report: Any, elide: bool) -> None:
    from rich.text import Text

    from ._human import shape, size

    many = len(report.sources) > 1
    chunked = any(t.chunks != 1 for t in report.tensors)  # a distributed checkpoint's tensors in pieces
    cols = [("#", "right"), ("tensor", "left"), ("shape", "right"), ("dtype", "left"), ("numel", "right"),
            ("bytes", "right")]
    if chunked:
        cols.append(("chunks", "right"))
    if many:
        cols.append(("source", "left"))
    rows = []
    for i, t in enumerate(report.tensors, 1):
        c = [str(i), printable(t.name), shape(t.shape), printable(t.dtype), f"{t.numel:,}", size(t.bytes)]
        if chunked:
            c.append(f"{t.chunks:,}")
        if many:
            c.append(printable(os.path.basename(t.source)))
        rows.append(c)
    if rows:
        _simple_table(con, cols, rows, [None] * len(rows), elide, droppable=(len(cols) - 1,) if many else ())
    else:
        con.print(Text("no tensors", style="dim"))
    con.print()
    d = report.to_dict()["total"]
    lines = [("files", str(len(report.sources))), ("tensors", f"{d['tensors']:,}"), ("elements", f"{d['numel']:,}"),
             ("bytes", f"{d['bytes']:,} ({size(d['bytes'])})")]
    for dt, v in d["by_dtype"].items():
        lines.append((dt, f"{v['tensors']:,} tensors, {v['numel']:,} elements, {size(v['bytes'])}"))
    metas = {src: ", ".join(f"{k}={v}" for k, v in meta.items()) for src, meta in report.metadata.items()}
    if len(set(metas.values())) == 1 and len(metas) == len(report.sources):
        lines.append(("metadata", next(iter(metas.values()))))
    else:
        lines += [(f"metadata {os.path.basename(src)}", text) for src, text in metas.items()]
    _grid(con, lines)


class TableFormat(Format):
    name = "table"
    suffixes = (".txt",)
    kinds = ("norms", "diff", "info", "trend")
    help = "a table for the terminal"

    def render(self, report: Any, options: RenderOptions) -> str:
        from ._trend import render_trend

        return write_with({"norms": render_norms, "diff": render_diff, "info": render_info, "trend": render_trend},
                          report, options)


FORMAT = TableFormat()
