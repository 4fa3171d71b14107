"""SVG: the trend plot of the png format as a vector image (matplotlib, ``gradinspect[plot]``)."""

from __future__ import annotations

from typing import Any

from . import Format, RenderOptions


class Svg(Format):
    name = "svg"
    suffixes = (".svg",)
    kinds = ("trend",)
    machine = True
    help = "trend plot as an SVG image (needs matplotlib: pip install 'gradinspect[plot]')"

    def render(self, report: Any, options: RenderOptions) -> str:
        from ._figure import render_figure

        return render_figure(report, "svg", options.heatmap).decode("utf-8")


FORMAT = Svg()
