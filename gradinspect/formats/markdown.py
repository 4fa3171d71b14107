"""GitHub-flavoured Markdown: a table of tensors and a summary list."""

from __future__ import annotations

import re
from typing import Any, TextIO

from . import Format, RenderOptions, write_with
from ._escape import printable


def _esc(text: str) -> str:
    """Text from the input, shown as it is: control characters as escapes, Markdown syntax escaped."""
    return printable(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _code(text: str) -> str:
    """``text`` as a code span in a table cell: backslashes are literal there, only ``|`` is escaped,
    and the fence is longer than any run of backticks inside."""
    text = printable(text).replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(head: list[str], numeric: set[str], rows: list[list[str]], out: TextIO) -> None:
    out.write("| " + " | ".join(head) + " |\n")
    out.write("|" + "|".join("---:" if h in numeric else "---" for h in head) + "|\n")
    for cells in rows:
        out.write("| " + " | ".join(cells) + " |\n")


def render_diff(report: Any, out: TextIO, options: RenderOptions) -> None:
    from ._human import diff_summary, dtypes, num, shape

    tol = report.tolerances.any
    head = ["#", "tensor", "shape", "dtype", "L2 A", "L2 B", "L2 A−B", "rel", "cosine", "max abs diff",
            *(["ok"] if tol else [])]
    rows = []
    for i, r in enumerate(report.tensors, 1):
        cells = [str(i), _code(r.name), shape(r.shape), dtypes(r.dtype_a, r.dtype_b), num(r.l2_a, 4), num(r.l2_b, 4),
                 num(r.l2_diff, 4), num(r.rel, 4), num(r.cosine, 6), num(r.linf_diff, 4)]
        if tol:
            cells.append("✅" if r.ok else "❌")
        rows.append(cells)
    _table(head, {"#", "L2 A", "L2 B", "L2 A−B", "rel", "cosine", "max abs diff"}, rows, out)
    out.write("\n")
    for label, value in diff_summary(report):
        out.write(f"- **{label}**: {_esc(value)}\n")


def render_norms(report: Any, out: TextIO, options: RenderOptions) -> None:
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

    lp = general_p(report.norm_type)
    extra = shard_columns(report)
    head = (["#", "tensor", "shape", "dtype", "L2", "L1", "L∞"] + ([norm_label(report.norm_type)] if lp else [])
            + ["share"] + [h for h, _ in extra] + ["NaN/inf"])
    rows = []
    for i, r in enumerate(report.tensors, 1):
        cells = [str(i), _code(r.name), shape(r.shape), r.dtype, num(r.l2, 4), num(r.l1, 4), num(r.linf, 4)]
        if lp:
            cells.append(num(r.norm, 4))
        cells += [f"{bar(r.share, 5).rstrip()} {percent(r.share)}".strip(), *(f(r) for _, f in extra),
                  ("⚠️ " + nonfinite(r)) if r.nonfinite else ""]
        rows.append(cells)
    _table(head, {"#", "L2", "L1", "L∞", "share", norm_label(report.norm_type)}, rows, out)
    if report.omitted:
        out.write(f"\n… and {report.omitted:,} more rows (--top).\n")
    out.write("\n")
    for label, value in summary(report):
        out.write(f"- **{label}**: {_esc(value)}\n")
    for w in report.warnings():
        out.write(f"\n> ⚠️ **Warning:** {_esc(w)}\n")


class MarkdownFormat(Format):
    name = "markdown"
    suffixes = ('.md',)
    kinds = ('norms', 'diff')
    machine = False
    help = "GitHub-flavoured Markdown, e.g. for $GITHUB_STEP_SUMMARY"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"norms": render_norms, "diff": render_diff}, report, options)


FORMAT = MarkdownFormat()
