"""Plain text for ``check``: one line per finding, then a one-line verdict."""

from __future__ import annotations

from typing import Any, TextIO

from . import Format, RenderOptions, write_with
from ._escape import printable


def render_check(report: Any, out: TextIO, options: RenderOptions) -> None:
    from ._human import norm_label, num

    for f in report.findings:
        out.write(f"FAIL  {printable(f.message)}\n")
    r = report.report
    t = r.total
    what = f"{t.tensors:,} tensors, global {norm_label(r.norm_type)} {num(t.norm, 6)}"
    rules = ", ".join(report.rules) or "no rules"
    if report.ok:
        out.write(f"OK    {what}; rules hold: {rules}\n")
    else:
        n = len(report.findings)
        out.write(f"FAIL  {n} finding{'s' if n != 1 else ''} ({', '.join(report.failed_rules())}); {what}\n")


class TextFormat(Format):
    name = "text"
    suffixes = ('.txt',)
    kinds = ('check',)
    machine = False
    help = "one line per finding and a verdict"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"check": render_check}, report, options)


FORMAT = TextFormat()
