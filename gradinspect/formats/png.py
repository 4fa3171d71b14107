"""PNG: the trend plot (global norm, heatmap, clip coefficient), drawn with matplotlib (``gradinspect[plot]``)."""

from __future__ import annotations

from typing import Any

from . import Format, RenderOptions


class Png(Format):
    name = "png"
    suffixes = (".png",)
    kinds = ("trend",)
    binary = True
    machine = True
    help = "trend plot as a PNG image (needs matplotlib: pip install 'gradinspect[plot]')"

    def render(self, report: Any, options: RenderOptions) -> bytes:
        from ._figure import render_figure

        return render_figure(report, "png", options.heatmap)


FORMAT = Png()
