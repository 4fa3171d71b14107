"""Output formats behind one registry.

Each format is a module with one ``render_<kind>(report, out, options)``
function per kind of report it can write (``norms``, ``check``, ``diff``, ``info``).  The CLI builds
``--format`` from :func:`names`; adding a format is adding a module and a line
to ``_FORMATS``.  Modules are imported only when used, so ``--help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["FormatSpec", "RenderOptions", "names", "get", "render"]


@dataclass(frozen=True)
class FormatSpec:
    name: str
    module: str
    kinds: tuple[str, ...]
    machine: bool  # True: stdout carries the document and nothing else
    help: str


@dataclass(frozen=True)
class RenderOptions:
    """How a human-facing format may look: ``width`` and ``color`` None = detect.

    ``elide``: names too long for ``width`` are elided in the middle; False
    keeps every name whole (the table may be wider than ``width``), as for
    output that is not a terminal.  With ``width`` None, a stream that is not a
    terminal is never elided.
    """

    width: int | None = None
    color: bool | None = None
    elide: bool = True


_FORMATS = {
    f.name: f
    for f in (
        FormatSpec("table", "table", ("norms", "diff", "info"), False, "a table for the terminal"),
        FormatSpec("text", "text", ("check",), False, "one line per finding and a verdict"),
        FormatSpec("json", "json", ("norms", "check", "diff", "info"), True, "strict JSON with a schema version, for scripts"),
        FormatSpec("csv", "csv", ("norms", "diff", "info"), True, "one row per tensor"),
        FormatSpec("markdown", "markdown", ("norms", "diff"), False, "GitHub-flavoured Markdown, e.g. for $GITHUB_STEP_SUMMARY"),
        FormatSpec("github", "github", ("check",), True, "GitHub Actions ::error workflow commands, shown as annotations"),
        FormatSpec("junit", "junit", ("check",), True, "JUnit XML, one testcase per rule, for CI dashboards"),
    )
}


def names(kind: str) -> list[str]:
    """The formats that can write reports of ``kind``, default first."""
    return [f.name for f in _FORMATS.values() if kind in f.kinds]


def get(name: str) -> FormatSpec:
    return _FORMATS[name]


def render(name: str, kind: str, report: Any, out: TextIO, options: RenderOptions = RenderOptions()) -> None:
    """Write ``report`` (of ``kind``) to ``out`` in format ``name``."""
    spec = _FORMATS[name]
    if kind not in spec.kinds:
        raise ValueError(f"format {name!r} cannot write {kind} reports")
    module = importlib.import_module(f"{__name__}.{spec.module}")
    getattr(module, f"render_{kind}")(report, out, options)
