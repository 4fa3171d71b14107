"""GitHub Actions workflow commands: each finding an ``::error`` annotation.

Escaping follows the runner's rules: in the message ``%``, CR and LF are
percent-encoded; in property values ``:`` and ``,`` are too.  Control
characters from tensor names are first shown as visible escapes
(:func:`~gradinspect.formats._escape.printable`), so no output line can start a
workflow command of its own.
"""

from __future__ import annotations

import io
from typing import Any, TextIO

from . import Format, RenderOptions, write_with
from ._escape import printable
from .text import render_check as _verdict


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_check(report: Any, out: TextIO, options: RenderOptions) -> None:
    for f in report.findings:
        title = f"gradinspect {f.rule}" + (f" {f.tensor}" if f.tensor else "")
        out.write(f"::error title={escape_property(printable(title))}::{escape_data(printable(f.message))}\n")
    # The verdict as a plain log line: the findings are the annotations.
    buf = io.StringIO()
    _verdict(report, buf, options)
    out.write(buf.getvalue().splitlines()[-1] + "\n")


def verdict_trend(report: Any) -> str:
    """``trend``'s one-line verdict on its CI rules."""
    n = len(report.steps)
    what = f"{n:,} step{'s' if n != 1 else ''}, {len(report.spikes)} spike{'s' if len(report.spikes) != 1 else ''}"
    if report.ok:
        return f"OK    {what}; rules hold: {', '.join(report.rules) or 'no rules'}"
    n = len(report.findings)
    failed = ", ".join(dict.fromkeys(f.rule for f in report.findings))
    return f"FAIL  {n} finding{'s' if n != 1 else ''} ({failed}); {what}"


def render_trend(report: Any, out: TextIO, options: RenderOptions) -> None:
    for f in report.findings:
        title = f"gradinspect trend {f.rule}" + (f" step {f.step}" if f.step is not None else "")
        out.write(f"::error title={escape_property(printable(title))}::{escape_data(printable(f.message))}\n")
    out.write(verdict_trend(report) + "\n")


class GithubFormat(Format):
    name = "github"
    suffixes = ()
    kinds = ('check', 'trend')
    machine = True
    help = "GitHub Actions ::error workflow commands, shown as annotations"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"check": render_check, "trend": render_trend}, report, options)


FORMAT = GithubFormat()
