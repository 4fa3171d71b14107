"""HTML: the trend plot as one self-contained interactive page (no matplotlib, no network).

The page is built by :mod:`._html`, imported only when a page is written.
"""

from __future__ import annotations

from typing import Any

from . import Format, RenderOptions


class Html(Format):
    name = "html"
    suffixes = (".html", ".htm")
    kinds = ("trend",)
    machine = True
    help = "trend plot as one self-contained interactive HTML page (no network needed to view it)"

    def render(self, report: Any, options: RenderOptions) -> str:
        from ._html import page  # numpy and the page's code only when a page is written

        return page(report, options)


FORMAT = Html()
