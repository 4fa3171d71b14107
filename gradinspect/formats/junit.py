"""JUnit XML for CI dashboards: one testcase per rule, failing with its findings."""

from __future__ import annotations

import re
from typing import Any, TextIO

from . import Format, RenderOptions, write_with
from ._escape import printable

# Compiled on first use, not when the CLI imports every format (its character class takes ~4 ms to compile).
_NOT_XML = "[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"


def _x(text: str) -> str:
    """``text`` with control characters and lone surrogates shown as escapes, and what else XML 1.0
    cannot hold (U+FFFE, U+FFFF) replaced."""
    return re.sub(_NOT_XML, "\ufffd", printable(text))


def render_check(report: Any, out: TextIO, options: RenderOptions) -> None:
    _suites(report, ", ".join(report.report.sources), "check", out)


def render_trend(report: Any, out: TextIO, options: RenderOptions) -> None:
    _suites(report, ", ".join(src for st in report.steps for src in st.sources), "trend", out)


def _suites(report: Any, sources: str, command: str, out: TextIO) -> None:
    """One testcase per rule of ``report`` (``rules``, ``findings`` with ``rule`` and ``message``)."""
    import xml.etree.ElementTree as ET  # only when JUnit is written: the CLI imports every format for --help

    by_rule: dict[str, list[Any]] = {r: [] for r in report.rules}
    for f in report.findings:
        by_rule.setdefault(f.rule, []).append(f)
    failures = sum(1 for fs in by_rule.values() if fs)
    suites = ET.Element("testsuites", name=f"gradinspect {command}", tests=str(len(by_rule)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name=f"gradinspect.{command}", tests=str(len(by_rule)),
                          failures=str(failures), errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="sources", value=_x(sources))
    for rule, findings in by_rule.items():
        case = ET.SubElement(suite, "testcase", classname=f"gradinspect.{command}", name=rule)
        if findings:
            fail = ET.SubElement(case, "failure", message=_x(findings[0].message) if len(findings) == 1
                                 else f"{len(findings)} findings", type=rule)
            fail.text = "\n".join(_x(f.message) for f in findings)
    ET.indent(suites)
    out.write('<?xml version="1.0" encoding="utf-8"?>\n')
    out.write(ET.tostring(suites, encoding="unicode"))
    out.write("\n")


class JunitFormat(Format):
    name = "junit"
    suffixes = ('.xml',)
    kinds = ('check', 'trend')
    machine = True
    help = "JUnit XML, one testcase per rule, for CI dashboards"

    def render(self, report: Any, options: RenderOptions) -> str:
        return write_with({"check": render_check, "trend": render_trend}, report, options)


FORMAT = JunitFormat()
