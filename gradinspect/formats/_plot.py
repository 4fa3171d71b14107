"""What the plot formats (png, svg, html) draw, taken from a :class:`~gradinspect.trend.TrendReport`.

Three panels over the steps of a run (issue 9 §4): the global norm (log
scale) with the clip threshold, the spikes and the non-finite steps marked; a
heatmap of the rows (tensors or groups, in model order: first appearance) by
step, log10 of the norm or, with ``RenderOptions.heatmap == "share"``, the
share of the squared norm; and the clip coefficient.  Names are input: they
are shown through :func:`~._escape.printable` (and escaped again for each medium).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GradInspectError
from ._escape import printable

__all__ = ["HEATMAPS", "PlotData", "plot_data", "need_matplotlib", "shorten", "log10_norms", "heat_title",
           "heat_values", "check_heatmap", "norm_label"]

#: The values the heatmap can show (``RenderOptions.heatmap``).
HEATMAPS = ("norm", "share")

PLOT_EXTRA = "pip install 'gradinspect[plot]'"


@dataclass(frozen=True)
class PlotData:
    """The numbers of the three panels, by step position (dumps in step order)."""

    steps: tuple[int, ...]
    norm: np.ndarray  # the --norm-type global norm per step (inf/NaN for non-finite steps)
    finite: np.ndarray  # bool per step: finite norm, no NaN/Inf value
    coef: np.ndarray  # clip coefficient per step
    clipped: np.ndarray  # bool per step
    spikes: tuple[int, ...]  # step positions
    max_norm: float
    norm_label: str  # "L2", "L1", "L∞", "L3"
    rows: tuple[str, ...]  # printable row names, model order
    heat_norm: np.ndarray  # [row][step] norm, NaN where absent
    heat_share: np.ndarray  # [row][step] share, NaN where absent
    present: np.ndarray  # [row][step] bool
    row_kind: str  # "tensor" or "group"

    @property
    def nonfinite(self) -> tuple[int, ...]:
        return tuple(np.flatnonzero(~self.finite).tolist())


def _array(rows: Any, n: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, n))
    return np.array([[math.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


def _present(rows: Any, n: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, n), dtype=bool)
    return np.array([[v is not None for v in r] for r in rows], dtype=bool)


def norm_label(p: float) -> str:
    """``L2``, ``L1``, ``L∞``, ``L3``, ``L2.5``."""
    if math.isinf(p):
        return "L∞"
    return f"L{int(p)}" if float(p).is_integer() else f"L{p:g}"


def plot_data(report: Any) -> PlotData:
    """The panels' numbers for a ``TrendReport`` (``kind == "trend"``)."""
    steps = tuple(s.step for s in report.steps)
    n = len(steps)
    position = {s: i for i, s in enumerate(steps)}
    return PlotData(
        steps=steps,
        norm=np.array([s.total.norm for s in report.steps], dtype=np.float64),
        finite=np.array([s.finite for s in report.steps], dtype=bool),
        coef=np.array([s.clip_coef for s in report.steps], dtype=np.float64),
        clipped=np.array([s.clipped for s in report.steps], dtype=bool),
        spikes=tuple(position[sp.step] for sp in report.spikes if sp.step in position),
        max_norm=float(report.max_norm),
        norm_label=norm_label(report.norm_type),
        rows=tuple(printable(r) for r in report.tensors),
        heat_norm=_array(report.series_norm, n),
        heat_share=_array(report.series_share, n),
        present=_present(report.series_norm, n),
        row_kind="tensor" if report.group_by is None else "group",
    )


def log10_norms(values: np.ndarray) -> np.ndarray:
    """log10 of norms: NaN stays NaN (absent), 0 is -inf, +inf stays +inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out: np.ndarray = np.log10(values)
    return out


def shorten(name: str, most: int = 40) -> str:
    """``name`` in at most ``most`` characters, cut in the middle."""
    if len(name) <= most:
        return name
    head = (most - 1) // 2
    return name[:head] + "…" + name[len(name) - (most - 1 - head):]


def heat_title(data: PlotData, heatmap: str) -> str:
    what = f"log10 {data.norm_label} norm" if heatmap == "norm" else "share of the squared L2 norm"
    return f"{what} per {data.row_kind}"


def heat_values(data: PlotData, heatmap: str) -> tuple[np.ndarray, float, float]:
    """The heatmap's matrix and its colour range (vmin, vmax).

    NaN where the row is absent; ``+inf`` where its value is NaN/Inf (shown as
    non-finite); ``-inf`` where its norm is 0 (log10 of 0, norm heatmap only).
    """
    if heatmap == "norm":
        values = log10_norms(data.heat_norm)
    else:
        values = data.heat_share.copy()
    values[data.present & np.isnan(values)] = math.inf
    values[~data.present] = math.nan
    finite = values[np.isfinite(values)]
    if heatmap == "share":
        lo, hi = 0.0, float(finite.max()) if finite.size else 1.0
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return values, lo, hi


def check_heatmap(heatmap: str) -> None:
    if heatmap not in HEATMAPS:
        raise ValueError(f"heatmap must be one of {', '.join(HEATMAPS)}, not {heatmap!r}")


def need_matplotlib(fmt: str) -> Any:
    """``matplotlib``, or the one-line error that says what to install (exit 2).

    Nothing global is changed (no backend is chosen): the figures are drawn
    on :class:`matplotlib.figure.Figure` with the Agg canvas, not with pyplot."""
    try:
        import matplotlib
    except ImportError:
        raise GradInspectError(f"the {fmt} output needs matplotlib: {PLOT_EXTRA}") from None
    return matplotlib
