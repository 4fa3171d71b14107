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

import html
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from . import RenderOptions
from ._plot import PlotData, check_heatmap, heat_title, plot_data

W = 980  # the page's panels: width, left margin (row names), right margin
LEFT = 190
RIGHT = 20
NORM_H = 250
COEF_H = 150
TOP = 14
BOTTOM = 24
NONFINITE = "#d62728"
SPIKE = "#ff7f0e"
LINE = "#1f77b4"
MOST_DOTS = 150  # a dot on every step up to this many steps


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _f(x: float) -> str:
    return f"{x:.1f}"


def _num(x: float, digits: int = 6) -> float | str | None:
    """A float for the embedded JSON: short, and non-finite ones as strings."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(f"{x:.{digits}g}")


def safe_json(value: Any) -> str:
    """JSON that can stand inside ``<script>``: ASCII, and no ``<``, ``>``, ``&`` (so no ``</script>``, ``<!--``)."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _X:
    """Step position -> x pixel (cell centres, the same columns as the heatmap's)."""

    def __init__(self, n: int) -> None:
        self.n = max(n, 1)
        self.width = W - LEFT - RIGHT

    def __call__(self, i: float) -> float:
        return LEFT + (i + 0.5) * self.width / self.n

    def cell(self) -> float:
        return self.width / self.n


def _step_ticks(data: PlotData, most: int = 14) -> list[int]:
    n = len(data.steps)
    if n == 0:
        return []
    every = 1
    for e in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        every = e
        if n / e <= most:
            break
    else:
        every = math.ceil(n / most)
    return list(range(0, n, every))


def _x_axis(data: PlotData, x: _X, y: float, labels: bool) -> list[str]:
    out = [f'<line class="axis" x1="{LEFT}" y1="{_f(y)}" x2="{W - RIGHT}" y2="{_f(y)}"/>']
    for i in _step_ticks(data):
        out.append(f'<line class="tick" x1="{_f(x(i))}" y1="{_f(y)}" x2="{_f(x(i))}" y2="{_f(y + 4)}"/>')
        if labels:
            out.append(f'<text class="xl" x="{_f(x(i))}" y="{_f(y + 16)}">{data.steps[i]}</text>')
    return out


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = [10.0 ** k for k in range(a, b + 1)]
    if b - a <= 2:
        ticks = sorted({m * 10.0 ** k for k in range(a, b + 1) for m in (1, 2, 5)})
    return [t for t in ticks if lo <= t <= hi]


def _bands(data: PlotData, x: _X, top: float, bottom: float) -> list[str]:
    return [f'<rect class="bad" x="{_f(x(i) - x.cell() / 2)}" y="{_f(top)}" width="{_f(x.cell())}" '
            f'height="{_f(bottom - top)}"/>' for i in data.nonfinite]


def _line(x: _X, y: Callable[[float], float], values: list[float | None]) -> list[str]:
    """A polyline through the steps' values, broken where a value is None (a NaN/Inf step)."""
    path, pen = [], "M"
    for i, v in enumerate(values):
        if v is None:
            pen = "M"
            continue
        path.append(f"{pen}{_f(x(i))},{_f(y(v))}")
        pen = "L"
    return [f'<path class="line" d="{" ".join(path)}"/>'] if path else []


def _norm_svg(data: PlotData, x: _X) -> str:
    h, top, bottom = NORM_H, TOP, NORM_H - BOTTOM
    ok = data.finite & (data.norm > 0)
    vals = [float(v) for v in data.norm[ok]] + [data.max_norm]
    lo, hi = min(vals), max(vals)
    lo, hi = lo / 1.6, hi * 1.6
    span = math.log10(hi) - math.log10(lo)

    def y(v: float) -> float:
        return bottom - (math.log10(v) - math.log10(lo)) / span * (bottom - top)

    out = [f'<svg id="panel-norm" class="panel" viewBox="0 0 {W} {h}" width="{W}" height="{h}" '
           f'role="img" aria-label="global {data.norm_label} norm per step">']
    out += _bands(data, x, top, bottom)
    for t in _log_ticks(lo, hi):
        out.append(f'<line class="grid" x1="{LEFT}" y1="{_f(y(t))}" x2="{W - RIGHT}" y2="{_f(y(t))}"/>')
        out.append(f'<text class="yl" x="{LEFT - 6}" y="{_f(y(t) + 4)}">{t:g}</text>')
    out.append(f'<line class="clip" x1="{LEFT}" y1="{_f(y(data.max_norm))}" x2="{W - RIGHT}" '
               f'y2="{_f(y(data.max_norm))}"/>')
    out.append(f'<text class="cliplabel" x="{W - RIGHT - 4}" y="{_f(y(data.max_norm) - 4)}">'
               f'max_norm {data.max_norm:g}</text>')
    out += _line(x, y, [float(v) if ok[i] else None for i, v in enumerate(data.norm)])
    for i in np.flatnonzero(ok).tolist() if len(data.steps) <= MOST_DOTS else ():
        out.append(f'<circle class="pt" cx="{_f(x(i))}" cy="{_f(y(float(data.norm[i])))}" r="2.6"/>')
    for i in data.spikes:
        if ok[i]:
            cx, cy = x(i), y(float(data.norm[i]))
            out.append(f'<path class="spike" d="M{_f(cx)},{_f(cy - 7)} L{_f(cx + 6)},{_f(cy + 4)} '
                       f'L{_f(cx - 6)},{_f(cy + 4)} Z"/>')
    for i in data.nonfinite:
        out.append(f'<text class="badlabel" x="{_f(x(i))}" y="{top + 12}">✖ NaN/Inf</text>')
    out += _x_axis(data, x, bottom, labels=False)
    out.append(f'<text class="ylabel" x="14" y="{_f((top + bottom) / 2)}" '
               f'transform="rotate(-90 14 {_f((top + bottom) / 2)})">{data.norm_label} norm (log)</text>')
    out.append("</svg>")
    return "\n".join(out)


def _coef_svg(data: PlotData, x: _X) -> str:
    h, top, bottom = COEF_H, TOP, COEF_H - BOTTOM - 8

    def y(v: float) -> float:
        return bottom - v / 1.08 * (bottom - top)

    out = [f'<svg id="panel-coef" class="panel" viewBox="0 0 {W} {h}" width="{W}" height="{h}" '
           f'role="img" aria-label="clip coefficient per step">']
    out += _bands(data, x, top, bottom)
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        cls = "clip" if t == 1.0 else "grid"
        out.append(f'<line class="{cls}" x1="{LEFT}" y1="{_f(y(t))}" x2="{W - RIGHT}" y2="{_f(y(t))}"/>')
        out.append(f'<text class="yl" x="{LEFT - 6}" y="{_f(y(t) + 4)}">{t:g}</text>')
    coefs = [float(c) for c in data.coef]
    out += _line(x, y, [c if data.finite[i] and math.isfinite(c) else None for i, c in enumerate(coefs)])
    out += _x_axis(data, x, bottom, labels=True)
    out.append(f'<text class="xlabel" x="{_f(LEFT + x.width / 2)}" y="{h - 2}">step</text>')
    out.append(f'<text class="ylabel" x="14" y="{_f((top + bottom) / 2)}" '
               f'transform="rotate(-90 14 {_f((top + bottom) / 2)})">coefficient</text>')
    out.append("</svg>")
    return "\n".join(out)


def _summary(report: Any, data: PlotData) -> str:
    n = len(data.steps)
    items = [f"{n} step{'s' if n != 1 else ''}" + (f" ({data.steps[0]}–{data.steps[-1]})" if n else "")]
    items.append(f"{len(data.spikes)} spike{'s' if len(data.spikes) != 1 else ''}")
    fn = report.first_nonfinite
    items.append("no NaN/Inf" if fn is None else f"first NaN/Inf at step {fn.step}: " + ", ".join(
        f"{printable_name(t.name)} ({t.nan} NaN, {t.inf} Inf)" for t in fn.tensors[:5]))
    cs = report.clip_summary
    if math.isfinite(cs.fraction_clipped):
        items.append(f"{cs.fraction_clipped:.0%} of finite steps clipped at max_norm {data.max_norm:g}; "
                     f"p50 {cs.p50:.4g}, p90 {cs.p90:.4g}, max {cs.max:.4g}; "
                     f"max_norm for ≤ {cs.target:g} clipped: {cs.max_norm_for_target:.4g}")
    return "<ul class=\"summary\">" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"


def printable_name(name: str) -> str:
    from ._escape import printable

    return printable(name)


def _spikes_table(report: Any) -> str:
    if not report.spikes:
        return ""
    rows = []
    for s in report.spikes:
        culprits = ", ".join(f"{printable_name(c.name)} {c.part:.0%}" for c in s.culprits[:3])
        ratio = "∞" if math.isinf(s.ratio) else f"{s.ratio:.1f}×"
        rows.append(f"<tr><td>{s.step}</td><td>{s.norm:.4g}</td><td>{s.baseline:.4g}</td><td>{_e(ratio)}</td>"
                    f"<td>{_e(culprits)}</td></tr>")
    return ("<h2>Spikes</h2><table class=\"spikes\"><thead><tr><th>step</th><th>norm</th><th>baseline</th>"
            "<th>ratio</th><th>top culprits (share of the increase)</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _data(report: Any, data: PlotData, heatmap: str) -> dict[str, Any]:
    spikes = {s.step: s.ratio for s in report.spikes}

    def rows(series: Any) -> list[list[Any]]:
        return [[None if v is None else _num(v) for v in r] for r in series]

    return {
        "steps": list(data.steps),
        "norm": [_num(float(v), 10) for v in data.norm],
        "coef": [_num(float(v), 10) for v in data.coef],
        "finite": [bool(v) for v in data.finite],
        "clipped": [bool(v) for v in data.clipped],
        "spike": [None if st not in spikes else _num(spikes[st], 4) for st in data.steps],
        "rows": list(data.rows),
        "heat": {"norm": rows(report.series_norm), "share": rows(report.series_share)},
        "titles": {"norm": heat_title(data, "norm"), "share": heat_title(data, "share")},
        "label": data.norm_label,
        "mode": heatmap,
        "geometry": {"width": W, "left": LEFT, "right": RIGHT},
    }


def page(report: Any, options: RenderOptions) -> str:
    """The whole page."""
    check_heatmap(options.heatmap)
    data = plot_data(report)
    x = _X(len(data.steps))
    title = "gradinspect trend"
    if data.steps:
        title += f": steps {data.steps[0]}–{data.steps[-1]}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style></head>",
        '<body data-ready="false">',
        f"<h1>{_e(title)}</h1>",
        _summary(report, data),
        f'<h2>Global {_e(data.norm_label)} norm per step, clip threshold and spikes '
        f'<span class="key"><span class="k-line"></span>norm <span class="k-spike">▲</span>spike '
        f'<span class="k-bad"></span>NaN/Inf step <span class="k-clip"></span>max_norm</span></h2>',
        _norm_svg(data, x),
        '<h2><span id="heat-title">' + _e(heat_title(data, options.heatmap)) + "</span> (rows in model order)"
        ' <span class="toggle" role="group" aria-label="heatmap">'
        f'<button type="button" data-mode="norm" aria-pressed="{str(options.heatmap == "norm").lower()}">'
        'log10 norm</button>'
        f'<button type="button" data-mode="share" aria-pressed="{str(options.heatmap == "share").lower()}">'
        "share</button></span></h2>",
        '<div id="heat-wrap"><noscript>The heatmap needs JavaScript.</noscript>'
        '<canvas id="heat" width="0" height="0"></canvas>'
        '<div id="heat-key"><span id="heat-lo"></span><span class="ramp"></span><span id="heat-hi"></span>'
        ' <span id="key-absent"><span class="k-absent"></span>absent</span>'
        ' <span id="key-bad"><span class="k-bad"></span>NaN/Inf</span>'
        ' <span id="key-zero"><span class="k-zero"></span>all zero</span></div></div>',
        f"<h2>Clip coefficient at max_norm {data.max_norm:g}</h2>",
        _coef_svg(data, x),
        _spikes_table(report),
        '<div id="tip" role="tooltip" hidden></div>',
        f'<script type="application/json" id="trend-data">{safe_json(_data(report, data, options.heatmap))}'
        "</script>",
        f"<script>{_JS}</script>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)



_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 24px;color:#222;background:#fff}
h1{font-size:19px;margin:0 0 6px}h2{font-size:15px;margin:18px 0 4px;font-weight:600}
.summary{margin:0 0 6px;padding-left:18px;color:#333}
.panel{display:block}
.panel text{font-size:11px;fill:#333}.panel .yl{text-anchor:end}.panel .xl{text-anchor:middle}
.panel .xlabel{text-anchor:middle;font-size:12px}.panel .ylabel{text-anchor:middle;font-size:12px}
.axis{stroke:#444;stroke-width:1}.tick{stroke:#444}.grid{stroke:#e3e3e3;stroke-width:1}
.clip{stroke:#555;stroke-dasharray:5 4;stroke-width:1}.panel .cliplabel{text-anchor:end;fill:#555}
.line{fill:none;stroke:#1f77b4;stroke-width:1.6}.pt{fill:#1f77b4}
.spike{fill:#ff7f0e;stroke:#222;stroke-width:0.7}.bad{fill:#d62728;opacity:0.16}
.panel .badlabel{fill:#d62728;text-anchor:middle;font-weight:600}
.cursor{stroke:#000;stroke-width:1;opacity:0.35;pointer-events:none}
.key{font-weight:400;font-size:12px;color:#444;margin-left:10px}
.key span{display:inline-block;vertical-align:middle}
.k-line{width:18px;height:2px;background:#1f77b4;margin:0 4px 0 8px}.k-spike{color:#ff7f0e;margin:0 3px 0 8px}
.k-bad,.k-absent,.k-zero{width:12px;height:12px;margin:0 4px 0 10px}
.k-bad{background:#d62728}.k-absent{background:#d9d9d9}.k-zero{background:#000}
.k-clip{width:18px;border-top:1px dashed #555;margin:0 4px 0 10px}
.toggle{margin-left:12px}.toggle button{font:inherit;font-size:12px;padding:1px 10px;border:1px solid #888;
background:#f4f4f4;cursor:pointer}.toggle button[aria-pressed=true]{background:#1f77b4;color:#fff;border-color:#1f77b4}
#heat-wrap{position:relative}#heat{display:block}
#heat-key{font-size:12px;color:#444;margin:4px 0 0 190px}#heat-key span{display:inline-block;vertical-align:middle}
.ramp{width:160px;height:10px;margin:0 6px;
background:linear-gradient(90deg,#440154,#472d7b,#3b528b,#2c728e,#21918c,#28ae80,#5ec962,#addc30,#fde725)}
#tip{position:fixed;pointer-events:none;background:rgba(255,255,255,.96);border:1px solid #999;border-radius:3px;
padding:4px 7px;font-size:12px;white-space:pre;box-shadow:0 1px 4px rgba(0,0,0,.2);z-index:10}
table.spikes{border-collapse:collapse;font-size:13px}
.spikes td,.spikes th{border-bottom:1px solid #ddd;padding:2px 10px;text-align:left}
.spikes td:nth-child(-n+4){text-align:right;font-variant-numeric:tabular-nums}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("trend-data").textContent);
  var G = D.geometry, n = D.steps.length, R = D.rows.length;
  var VIRIDIS = [[68,1,84],[71,45,123],[59,82,139],[44,114,142],[33,145,140],[40,174,128],[94,201,98],
                 [173,220,48],[253,231,37]];
  function color(t) {
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    var k = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - k, a = VIRIDIS[k], b = VIRIDIS[k + 1];
    return "rgb(" + [0, 1, 2].map(function (j) { return Math.round(a[j] + (b[j] - a[j]) * f); }).join(",") + ")";
  }
  function num(v) { return typeof v === "number" ? v : (v === null ? null : Number(v)); }
  function fmt(v, d) {
    if (v === null || v === undefined) return "absent";
    if (typeof v === "string") return v;
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential((d || 4) - 1);
    return String(Number(v.toPrecision(d || 4)));
  }
  var mode = D.mode;
  if (location.hash === "#norm" || location.hash === "#share") mode = location.hash.slice(1);
  var cellH = Math.max(3, Math.min(18, Math.floor(560 / Math.max(R, 1))));
  var canvas = document.getElementById("heat"), ctx = canvas.getContext("2d");
  var plotW = G.width - G.left - G.right, cellW = plotW / Math.max(n, 1);
  var range = {};
  function cellValue(m, r, i) {
    var v = D.heat[m][r][i];
    if (v === null) return {kind: "absent"};
    v = num(v);
    if (!isFinite(v)) return {kind: "bad"};
    if (m === "norm") { if (v === 0) return {kind: "zero"}; return {kind: "v", v: Math.log10(v)}; }
    return {kind: "v", v: v};
  }
  ["norm", "share"].forEach(function (m) {
    var lo = Infinity, hi = -Infinity;
    for (var r = 0; r < R; r++) for (var i = 0; i < n; i++) {
      var c = cellValue(m, r, i);
      if (c.kind === "v") { lo = Math.min(lo, c.v); hi = Math.max(hi, c.v); }
    }
    if (m === "share") lo = 0;
    if (!isFinite(lo)) { lo = 0; hi = 1; }
    if (hi <= lo) hi = lo + 1;
    range[m] = [lo, hi];
  });
  function draw() {
    var dpr = window.devicePixelRatio || 1, H = R * cellH;
    canvas.style.width = G.width + "px"; canvas.style.height = H + "px";
    canvas.width = Math.round(G.width * dpr); canvas.height = Math.round(H * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, G.width, H);
    var lo = range[mode][0], hi = range[mode][1], seen = {};
    for (var r = 0; r < R; r++) for (var i = 0; i < n; i++) {
      var c = cellValue(mode, r, i);
      seen[c.kind] = true;
      ctx.fillStyle = c.kind === "absent" ? "#d9d9d9" : c.kind === "bad" ? "#d62728" :
                      c.kind === "zero" ? "#000" : color((c.v - lo) / (hi - lo));
      ctx.fillRect(G.left + i * cellW, r * cellH, Math.ceil(cellW), cellH);
    }
    ctx.fillStyle = "#333"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
    var every = Math.max(1, Math.ceil(11 / cellH)), size = Math.min(12, Math.max(8, cellH - 2));
    ctx.font = size + "px system-ui, sans-serif";
    for (var r2 = 0; r2 < R; r2 += every) {
      var name = D.rows[r2];
      if (name.length > 30) name = name.slice(0, 14) + "\u2026" + name.slice(name.length - 15);
      ctx.fillText(name, G.left - 6, r2 * cellH + cellH / 2);
    }
    ["absent", "bad", "zero"].forEach(function (k) {
      document.getElementById("key-" + k).style.display = seen[k] ? "" : "none";
    });
    document.getElementById("heat-title").textContent = D.titles[mode];
    document.getElementById("heat-lo").textContent = fmt(lo, 3);
    document.getElementById("heat-hi").textContent = fmt(hi, 3);
    Array.prototype.forEach.call(document.querySelectorAll(".toggle button"), function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-mode") === mode));
    });
    canvas.setAttribute("data-mode", mode);
  }
  Array.prototype.forEach.call(document.querySelectorAll(".toggle button"), function (b) {
    b.addEventListener("click", function () {
      mode = b.getAttribute("data-mode"); draw();
      try { history.replaceState(null, "", "#" + mode); } catch (e) { /* a page without history */ }
    });
  });
  var tip = document.getElementById("tip");
  function stepText(i) {
    var lines = ["step " + D.steps[i], "global " + D.label + " norm: " + fmt(D.norm[i], 5),
                 "clip coefficient: " + fmt(D.coef[i], 4) + (D.clipped[i] ? " (clipped)" : "")];
    if (!D.finite[i]) lines.push("NaN/Inf in this step");
    if (D.spike[i] !== null) lines.push("spike: " + fmt(D.spike[i], 3) + "\u00d7 the baseline");
    return lines;
  }
  function show(ev, lines) {
    tip.textContent = lines.join("\n"); tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14, w = tip.offsetWidth, h = tip.offsetHeight;
    if (x + w > window.innerWidth - 4) x = ev.clientX - w - 10;
    if (y + h > window.innerHeight - 4) y = ev.clientY - h - 10;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function hide() { tip.hidden = true; setCursor(-1); }
  var cursors = [];
  Array.prototype.forEach.call(document.querySelectorAll("svg.panel"), function (svg) {
    var vb = svg.viewBox.baseVal, line = document.createElementNS("http://www.w3.org/2000/svg", "line");
    line.setAttribute("class", "cursor"); line.setAttribute("y1", 0); line.setAttribute("y2", vb.height);
    line.setAttribute("visibility", "hidden"); svg.appendChild(line); cursors.push(line);
    svg.addEventListener("mousemove", function (ev) {
      var box = svg.getBoundingClientRect(), px = (ev.clientX - box.left) * vb.width / box.width;
      var i = Math.floor((px - G.left) / cellW);
      if (i < 0 || i >= n) { hide(); return; }
      setCursor(i); show(ev, stepText(i));
    });
    svg.addEventListener("mouseleave", hide);
  });
  function setCursor(i) {
    cursors.forEach(function (c) {
      if (i < 0) { c.setAttribute("visibility", "hidden"); return; }
      var x = G.left + (i + 0.5) * cellW;
      c.setAttribute("x1", x); c.setAttribute("x2", x); c.setAttribute("visibility", "visible");
    });
  }
  canvas.addEventListener("mousemove", function (ev) {
    var box = canvas.getBoundingClientRect(), px = (ev.clientX - box.left) * G.width / box.width;
    var i = Math.floor((px - G.left) / cellW);
    var r = Math.floor((ev.clientY - box.top) * (R * cellH) / box.height / cellH);
    if (i < 0 || i >= n || r < 0 || r >= R) { hide(); return; }
    setCursor(i);
    var nv = D.heat.norm[r][i], sv = D.heat.share[r][i];
    show(ev, [D.rows[r], "step " + D.steps[i],
              D.label + " norm: " + fmt(nv === null ? null : num(nv), 5),
              "share: " + (sv === null ? "absent" : typeof sv === "string" ? sv : fmt(100 * sv, 4) + "%")]);
  });
  canvas.addEventListener("mouseleave", hide);
  draw();
  document.body.setAttribute("data-ready", "true");
})();
"""
