"""JUnit XML for CI dashboards: one testcase per rule, failing with its findings."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, TextIO

from . import RenderOptions


def render_check(report: Any, out: TextIO, options: RenderOptions) -> None:
    by_rule: dict[str, list[Any]] = {r: [] for r in report.rules}
    for f in report.findings:
        by_rule.setdefault(f.rule, []).append(f)
    failures = sum(1 for fs in by_rule.values() if fs)
    sources = ", ".join(report.report.sources)
    suites = ET.Element("testsuites", name="gradinspect check", tests=str(len(by_rule)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name="gradinspect.check", tests=str(len(by_rule)),
                          failures=str(failures), errors="0", skipped="0")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="sources", value=sources)
    for rule, findings in by_rule.items():
        case = ET.SubElement(suite, "testcase", classname="gradinspect.check", name=rule)
        if findings:
            fail = ET.SubElement(case, "failure", message=findings[0].message if len(findings) == 1
                                 else f"{len(findings)} findings", type=rule)
            fail.text = "\n".join(f.message for f in findings)
    ET.indent(suites)
    out.write('<?xml version="1.0" encoding="utf-8"?>\n')
    out.write(ET.tostring(suites, encoding="unicode"))
    out.write("\n")
