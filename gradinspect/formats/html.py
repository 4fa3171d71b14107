"""HTML: the trend plot as one self-contained interactive page (no matplotlib, no network).

The global norm and clip coefficient panels are SVG written here (they show
without JavaScript); the heatmap is drawn by the page's own script on a
canvas from the data embedded as JSON, with hover tooltips on every panel and
a toggle between the log10-norm and share heatmaps.  Nothing is loaded from
anywhere: no CDN, no font, no image.

Names are input: every one is shown through :func:`~._escape.printable` and
HTML-escaped in the markup; the script only ever sets ``textContent``.  The
JSON is made safe inside ``<script>``: every ``<``, ``>`` and ``&`` is a
``\\u`` escape, so neither ``</script>`` nor ``<!--`` can appear in it.
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
