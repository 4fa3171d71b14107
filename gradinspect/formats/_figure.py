"""The matplotlib figure of the png and svg formats (the optional extra ``gradinspect[plot]``).

Drawn on a :class:`matplotlib.figure.Figure` (no pyplot, no global backend),
and saved so that the same report gives the same bytes: PNG without its
``Software`` text chunk, SVG with a fixed ``svg.hashsalt`` and no date.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from ._plot import PlotData, check_heatmap, heat_title, heat_values, need_matplotlib, plot_data, shorten

__all__ = ["render_figure"]

NONFINITE = "#d62728"  # red: NaN/Inf steps and cells
SPIKE = "#ff7f0e"  # orange
ABSENT = "#d9d9d9"  # light gray
ZERO = "#000000"
LINE = "#1f77b4"
MOST_LABELS = 60  # at most this many row names on the heatmap's axis
MOST_DOTS = 150  # a dot on every step up to this many steps


def _text(s: str) -> str:
    """A name for matplotlib: ``$`` would start mathtext."""
    return s.replace("$", r"\$")


def render_figure(report: Any, fmt: str, heatmap: str = "norm") -> bytes:
    """``report`` (a TrendReport) as a ``png`` or ``svg`` document, the same bytes for the same report."""
    check_heatmap(heatmap)
    mpl = need_matplotlib(fmt)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    data = plot_data(report)
    with mpl.rc_context({"svg.hashsalt": "gradinspect", "svg.fonttype": "path", "font.size": 9,
                         "axes.titlesize": 10, "axes.titlelocation": "left"}):
        fig = _figure(data, heatmap)
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        if fmt == "png":
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
        else:
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
            return _stable_ids(buf.getvalue())
    return buf.getvalue()


_ID = re.compile(rb'id="([a-z][0-9a-f]{10})"')


def _stable_ids(svg: bytes) -> bytes:
    """Matplotlib's hashed SVG ids renamed in order of definition (``clip1``, ...).

    A clip rectangle's id hashes its bounds as ``str`` of floats, whose last
    digits depend on what was drawn before in the process (the text extents
    the layout measured): the ids alone would differ from render to render.
    """
    names = {old: f"{old[:1].decode()}id{k}".encode() for k, old in enumerate(dict.fromkeys(_ID.findall(svg)))}
    if not names:
        return svg
    return re.sub(rb'(id="|#)([a-z][0-9a-f]{10})(?=[")])', lambda m: m.group(1) + names.get(m.group(2), m.group(2)),
                  svg)


def _figure(data: PlotData, heatmap: str) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    n, rows = len(data.steps), len(data.rows)
    heat_h = min(max(0.16 * rows + 0.9, 2.2), 9.0)
    fig = Figure(figsize=(10.0, 2.9 + heat_h + 1.9), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(2.9, heat_h, 1.9), width_ratios=(60, 1))
    ax_norm = fig.add_subplot(grid[0, 0])
    ax_heat = fig.add_subplot(grid[1, 0], sharex=ax_norm)
    ax_coef = fig.add_subplot(grid[2, 0], sharex=ax_norm)
    ax_bar = fig.add_subplot(grid[1, 1])
    fig.suptitle(_title(data), x=0.01, ha="left", fontsize=11)

    _norm_panel(ax_norm, data)
    _heat_panel(ax_heat, ax_bar, fig, data, heatmap)
    _coef_panel(ax_coef, data)

    steps = data.steps

    def step_at(x: float, _pos: int) -> str:
        i = round(x)
        return str(steps[i]) if abs(x - i) < 1e-9 and 0 <= i < n else ""

    ax_coef.xaxis.set_major_locator(MaxNLocator(nbins=14, integer=True, steps=[1, 2, 5, 10]))
    ax_coef.xaxis.set_major_formatter(FuncFormatter(step_at))
    ax_coef.set_xlabel("step")
    ax_coef.set_xlim(-0.5, max(n, 1) - 0.5)
    for ax in (ax_norm, ax_heat):
        ax.tick_params(labelbottom=False)
    return fig


def _title(data: PlotData) -> str:
    n = len(data.steps)
    if not n:
        return "gradinspect trend: no steps"
    parts = [f"gradinspect trend: {n} step{'s' if n != 1 else ''} ({data.steps[0]}–{data.steps[-1]})",
             f"{len(data.spikes)} spike{'s' if len(data.spikes) != 1 else ''}"]
    bad = data.nonfinite
    parts.append(f"first NaN/Inf at step {data.steps[bad[0]]}" if bad else "no NaN/Inf")
    return ", ".join(parts)


def _mark_nonfinite(ax: Any, data: PlotData) -> None:
    for k, i in enumerate(data.nonfinite):
        ax.axvspan(i - 0.5, i + 0.5, color=NONFINITE, alpha=0.15, lw=0, label="NaN/Inf step" if k == 0 else None)


def _norm_panel(ax: Any, data: PlotData) -> None:
    x = np.arange(len(data.steps))
    y = np.where(data.finite & (data.norm > 0), data.norm, np.nan)
    positive = bool(np.any(np.isfinite(y)))
    dots = "o" if len(x) <= MOST_DOTS else None
    ax.plot(x, y, color=LINE, lw=1.4 if dots else 0.9, marker=dots, ms=2.5, label=f"global {data.norm_label} norm")
    ax.axhline(data.max_norm, color="#555555", ls="--", lw=1, label=f"max_norm {data.max_norm:g}")
    if data.spikes:
        sp = np.array(data.spikes)
        ax.scatter(sp, data.norm[sp], marker="^", s=50, color=SPIKE, edgecolor="black", lw=0.6, zorder=5,
                   label="spike")
    _mark_nonfinite(ax, data)
    if data.nonfinite:
        bad = np.array(data.nonfinite)
        ax.scatter(bad, np.full(len(bad), 0.96), transform=ax.get_xaxis_transform(), marker="X", s=45,
                   color=NONFINITE, zorder=5)
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel(f"{data.norm_label} norm")
    ax.set_title(f"global {data.norm_label} norm per step, clip threshold and spikes")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)


def _heat_panel(ax: Any, bar_ax: Any, fig: Any, data: PlotData, heatmap: str) -> None:
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    n, rows = len(data.steps), len(data.rows)
    values, lo, hi = heat_values(data, heatmap)
    cmap = colormaps["viridis"].with_extremes(bad=ABSENT, over=NONFINITE, under=ZERO)
    filled = np.where(values == math.inf, hi + 1.0, np.where(values == -math.inf, lo - 1.0, values))
    shown = np.ma.array(filled, mask=np.isnan(values))
    if rows and n:
        im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi,
                       extent=(-0.5, n - 0.5, rows - 0.5, -0.5))
        fig.colorbar(im, cax=bar_ax)
    else:
        bar_ax.set_axis_off()
    if rows <= MOST_LABELS:
        ticks = list(range(rows))
    else:
        ticks = np.linspace(0, rows - 1, 30).round().astype(int).tolist()
    size = 8 if rows <= 24 else 7 if rows <= 40 else 6
    ax.set_yticks(ticks, [_text(shorten(data.rows[i])) for i in ticks], fontsize=size)
    ax.set_title(f"{heat_title(data, heatmap)} (rows in model order)")
    keys = []
    if np.any(np.isnan(values)):
        keys.append(Patch(color=ABSENT, label="absent"))
    if np.any(values == math.inf):
        keys.append(Patch(color=NONFINITE, label="NaN/Inf"))
    if np.any(values == -math.inf):
        keys.append(Patch(color=ZERO, label="all zero"))
    if keys:
        ax.legend(handles=keys, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncols=len(keys),
                  frameon=False, borderaxespad=0.1, handlelength=1.0)


def _coef_panel(ax: Any, data: PlotData) -> None:
    x = np.arange(len(data.steps))
    coef = np.where(data.finite, data.coef, np.nan)
    dots = "o" if len(x) <= MOST_DOTS else None
    ax.plot(x, coef, color=LINE, lw=1.2 if dots else 0.9, marker=dots, ms=2.5)
    ax.axhline(1.0, color="#555555", ls="--", lw=0.8)
    _mark_nonfinite(ax, data)
    finite = int(np.count_nonzero(data.finite))
    clipped = int(np.count_nonzero(data.clipped & data.finite))
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("coefficient")
    ax.set_title(f"clip coefficient at max_norm {data.max_norm:g}: {clipped} of {finite} finite steps clipped")
    ax.grid(True, alpha=0.3)
