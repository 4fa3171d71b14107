"""``trend``'s terminal table: the summary, a chart of the global norm per step, the spikes and their culprits.

The chart is drawn with rich's own Text (block characters, no plotting
dependency): a column per step (or per bucket of consecutive steps when
there are more steps than columns), log scale, the clip threshold as a
dashed line, spikes marked ``^`` and non-finite steps ``!`` under the axis,
so it reads the same without colour (NO_COLOR, pipes) as with it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TextIO

from . import RenderOptions
from ._escape import printable

if TYPE_CHECKING:
    from rich.console import Console

_HEIGHT = 8  # chart rows
_BLOCKS = " ▁▂▃▄▅▆▇█"
_CULPRITS = 3  # shown per spike


def render_trend(report: Any, out: TextIO, options: RenderOptions) -> None:
    from .table import _console

    with _console(out, options) as (con, _elide):
        _trend(con, report)


def _trend(con: Console, report: Any) -> None:
    from rich.text import Text

    from .table import _grid

    if not report.steps:
        con.print(Text("no steps", style="dim"))
        return
    _grid(con, summary(report), red={"first NaN/Inf"} if report.first_nonfinite else set())
    con.print()
    for line in chart(report, con.width):
        con.print(line, overflow="crop", no_wrap=True)
    if report.spikes:
        con.print()
        _spikes(con, report)
    if report.rules:
        con.print()
        for f in report.findings:
            con.print(Text(f"FAIL  {printable(f.message)}", style="bold red"))
        from .github import verdict_trend

        con.print(Text(verdict_trend(report), style="bold red" if report.findings else "green"))


def _steps_text(steps: list[int], most: int = 8) -> str:
    shown = ", ".join(map(str, steps[:most]))
    return shown + (f" and {len(steps) - most} more" if len(steps) > most else "")


def summary(report: Any) -> list[tuple[str, str]]:
    """(label, value) lines: steps, spikes, first non-finite, clipping, suggested max_norm, dead, missing."""
    from ..report import norm_label
    from ._human import num

    steps = report.steps
    label = norm_label(report.norm_type)
    finite = [s for s in steps if s.finite]
    lines = [("steps", f"{len(steps):,} ({steps[0].step}–{steps[-1].step})" if len(steps) > 1
              else f"1 ({steps[0].step})")]
    if finite:
        top = max(finite, key=lambda s: s.total.norm)
        lines.append((f"global {label}", f"{num(min(s.total.norm for s in finite))} to {num(top.total.norm)} "
                      f"(max at step {top.step})"))
    spikes = [s.step for s in report.spikes]
    lines.append(("spikes", f"{len(spikes)}: step{'s' if len(spikes) > 1 else ''} {_steps_text(spikes)}" if spikes else
                  f"none (> {report.spike_factor:g}× the median of up to {report.window} steps before)"))
    fn = report.first_nonfinite
    if fn is None:
        lines.append(("first NaN/Inf", "none"))
    else:
        names = [f"{printable(t.name)} ({_counts(t.nan, t.inf)})" for t in fn.tensors]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        lines.append(("first NaN/Inf", f"step {fn.step}: " + ", ".join(names[:3]) + more))
    c = report.clip_summary
    if finite:
        plural = "s" if len(finite) != 1 else ""
        lines.append(("clipped", f"{c.fraction_clipped:.1%} of {len(finite)} finite step{plural} at max_norm "
                      f"{num(report.max_norm, 6)}"))
        lines.append((f"{label} percentiles", f"p50 {num(c.p50)}, p90 {num(c.p90)}, p99 {num(c.p99)}, "
                      f"max {num(c.max)}"))
        lines.append(("suggested", f"max_norm {num(c.max_norm_for_target, 6)} clips at most {c.target:.0%} "
                      "of the steps"))
    else:
        lines.append(("clipped", "no finite step"))
    if report.dead:
        lines.append(("dead", ", ".join(printable(n) for n in report.dead[:3])
                      + (f" and {len(report.dead) - 3} more" if len(report.dead) > 3 else "")))
    if report.missing:
        lines.append(("missing", f"{len(report.missing)} {_rows(report)} absent from some steps "
                      "(--format json lists them)"))
    return lines


def _rows(report: Any) -> str:
    return "groups" if report.group_by is not None else "tensors"


def _counts(nan: int, inf: int) -> str:
    parts = ([f"{nan:,} NaN"] if nan else []) + ([f"{inf:,} Inf"] if inf else [])
    return ", ".join(parts)


def _spikes(con: Console, report: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    from ._human import num

    cols = [("step", "right"), ("norm", "right"), ("baseline", "right"), ("ratio", "right")]
    rows = [[str(s.step), num(s.norm), num(s.baseline), "inf" if math.isinf(s.ratio) else f"{s.ratio:.1f}×"]
            for s in report.spikes]
    widths = [max([len(h)] + [len(r[j]) for r in rows]) for j, (h, _) in enumerate(cols)]
    room = max(12, con.width - sum(widths) - 2 * len(widths))
    table = Table(box=None, pad_edge=False, header_style="bold underline", padding=(0, 0, 0, 2))
    for j, (h, just) in enumerate(cols):
        table.add_column(h, justify=just, no_wrap=True, width=widths[j])  # type: ignore[arg-type]
    head = "top culprits (part of the increase)"
    table.add_column(head if len(head) <= room else "top culprits", no_wrap=True, width=room, overflow="crop")
    for s, r in zip(report.spikes, rows, strict=True):
        table.add_row(*map(Text, r), Text(_culprits(s.culprits, room)))
    width = con.width
    con.width = max(width, sum(widths) + 2 * len(widths) + room)  # numbers are never cut: wider than asked
    try:
        con.print(table)
    finally:
        con.width = width


def _culprits(culprits: Any, room: int) -> str:
    """The top culprits that fit in ``room`` characters, whole; ``…`` when some are left out."""
    text = ""
    for i, c in enumerate(culprits[:_CULPRITS]):
        item = f"{printable(c.name)} {c.part:.1%}"
        cand = item if not text else f"{text}, {item}"
        rest = len(culprits) - i - 1
        if len(cand) + (3 if rest else 0) > room:
            if not text:  # one name longer than the room: elided in the middle
                from ._human import middle_elide

                part = f" {c.part:.1%}"
                return middle_elide(printable(c.name), max(1, room - len(part))) + part
            return text + ", …"
        text = cand
    return text + (", …" if len(culprits) > _CULPRITS else "")


def chart(report: Any, width: int) -> list[Any]:
    """The global norm per step as lines of rich Text: log scale, threshold dashed, spikes ``^``, NaN/Inf ``!``."""
    from rich.text import Text

    from ..report import norm_label
    from ._human import num

    steps = report.steps
    norms = [s.total.norm for s in steps]
    spikes = {s.step for s in report.spikes}
    positive = [x for x, s in zip(norms, steps, strict=True) if s.finite and x > 0]
    thr = report.max_norm
    # The threshold is on the chart unless it is more than 10x away from every norm (then the
    # norms would be squeezed into a few rows): the legend says where it is.
    near = not positive or min(positive) / 10 <= thr <= max(positive) * 10
    lo = min([*positive, thr] if near else positive)
    hi = max([*positive, thr] if near else positive)
    if hi <= lo:
        lo, hi = lo / 10, hi * 10
    llo, lhi = math.log10(lo), math.log10(hi)
    labels = {0: num(hi), _HEIGHT - 1: num(lo)}
    trow = -1
    if near:
        trow = _HEIGHT - 1 - min(_HEIGHT - 1, int((math.log10(thr) - llo) / (lhi - llo) * _HEIGHT))
        labels.setdefault(trow, num(thr))
    lw = max(len(v) for v in labels.values())
    tlabel = f" max_norm {num(thr, 6)}" if near else ""
    room = max(8, width - lw - 2 - max(len(tlabel), len("  step")))
    n = len(steps)
    per = max(1, math.ceil(n / room))  # steps per column
    buckets = [range(i, min(n, i + per)) for i in range(0, n, per)]
    cols = []  # (height in eighths or None, mark)
    for b in buckets:
        vals = [norms[j] for j in b if steps[j].finite]
        bad = any(not steps[j].finite for j in b)
        spike = any(steps[j].step in spikes for j in b)
        v = max(vals) if vals else 0.0
        h = 0 if v <= 0 else max(1, round((math.log10(v) - llo) / (lhi - llo) * _HEIGHT * 8))
        cols.append((min(h, _HEIGHT * 8), "!" if bad else "^" if spike else " ", spike, bad))
    wide = max(1, min(3, room // len(cols)))  # a few steps: each as wide as 3 columns
    cols = [c for c in cols for _ in range(wide)]
    lines = []
    for r in range(_HEIGHT):
        floor = (_HEIGHT - 1 - r) * 8  # eighths below this row
        line = Text(labels.get(r, "").rjust(lw) + (" ┤" if r in labels else " │"), style="dim")
        for h, _mark, spike, _bad in cols:
            fill = max(0, min(8, h - floor))
            if fill:
                line.append(_BLOCKS[fill], style="bold red" if spike else "cyan")
            elif r == trow:
                line.append("╌", style="yellow")
            else:
                line.append(" ")
        if r == trow:
            line.append(tlabel, style="yellow")
        lines.append(line)
    lines.append(Text(" " * lw + " └" + "─" * len(cols), style="dim"))
    marks = Text(" " * (lw + 2))
    for _h, mark, spike, bad in cols:
        marks.append(mark, style="bold red" if bad or spike else "")
    lines.append(marks)
    first, last = str(steps[0].step), str(steps[-1].step)
    axis = " " * (lw + 2) + first
    gap = len(cols) - len(first) - len(last)
    if n > 1:
        axis += " " * gap + last if gap >= 1 else f"–{last}"
    legend = f"global {norm_label(report.norm_type)}, log scale; ^ spike, ! NaN/Inf"
    if not near:
        legend += f"; max_norm {num(thr, 6)} is {'below' if thr < lo else 'above'}"
    lines.append(Text(axis + "  step", style="dim"))
    lines.append(Text(" " * (lw + 2) + legend, style="dim"))
    if per > 1:
        lines.append(Text(" " * (lw + 2) + f"{per} steps per column (their largest norm)", style="dim"))
    return lines
