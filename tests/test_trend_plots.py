"""The trend plots (issue 9 §4): png and svg (matplotlib, the `plot` extra), and the self-contained html page."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from gradinspect import compute_norms, formats
from gradinspect.errors import GradInspectError
from gradinspect.formats._escape import printable
from gradinspect.formats._html import safe_json
from gradinspect.formats._plot import heat_values, plot_data
from gradinspect.trend import StepResult, TrendReport, analyze

ROOT = Path(__file__).resolve().parent.parent

EVIL = "</script><script>alert(1)</script><!--"
DOLLAR = "$\\frac{a}{b}$ & \"q\" 'x'"
BIDI = "w\u202e\x1b[31m\ud800"


def _step(step: int, mapping: dict[str, np.ndarray]) -> StepResult:
    report = compute_norms({k: np.asarray(v, dtype=np.float64) for k, v in mapping.items()}, sort="none")
    return StepResult.from_reports(step, report, sources=(f"step_{step}",))


@pytest.fixture(scope="module")
def report() -> TrendReport:
    """12 steps (numbers 100, 110, ...) of hostile names: a spike at the 8th carried by EVIL, NaN at the 10th,
    a tensor missing from the first three steps, one all zero."""
    rng = np.random.default_rng(9)
    steps = []
    for i in range(12):
        m = {EVIL: rng.standard_normal(20) * 0.1, DOLLAR: rng.standard_normal(30) * 0.1,
             BIDI: rng.standard_normal(5) * 0.01, "zero": np.zeros(4)}
        if i >= 3:
            m["late"] = rng.standard_normal(6) * 0.1
        if i == 7:
            m[EVIL] = m[EVIL] * 50
        if i == 9:
            m[DOLLAR][0] = np.nan
        steps.append(_step(100 + 10 * i, m))
    return analyze(steps, max_norm=1.0)


def test_the_report_has_what_the_plots_mark(report: TrendReport) -> None:
    data = plot_data(report)
    assert data.steps == tuple(range(100, 220, 10))
    assert data.spikes == (7,) and data.nonfinite == (9,)
    assert data.rows == tuple(printable(n) for n in (EVIL, DOLLAR, BIDI, "zero", "late"))
    values, lo, hi = heat_values(data, "norm")
    assert np.isnan(values[4, :3]).all() and np.isfinite(values[4, 3:]).all()  # absent
    assert values[1, 9] == np.inf and (values[3] == -np.inf).all()  # NaN cell, all-zero row
    assert lo == np.nanmin(np.where(np.isfinite(values), values, np.nan)) and hi > lo
    share, lo, hi = heat_values(data, "share")
    assert lo == 0.0 and hi == pytest.approx(float(np.nanmax(np.where(np.isfinite(share), share, np.nan))))


def test_the_formats_register_for_trend_reports_only() -> None:
    assert formats.for_suffix("trend", "run.png") == "png"
    assert formats.for_suffix("trend", "out/run.SVG") == "svg"
    assert formats.for_suffix("trend", "run.html") == "html"
    for kind in ("norms", "check", "diff", "info"):
        assert not {"png", "svg", "html"} & set(formats.names(kind))
        assert formats.for_suffix(kind, "run.png") is None
    assert formats.get("png").binary and not formats.get("svg").binary and not formats.get("html").binary


def test_an_unknown_heatmap_is_refused(report: TrendReport) -> None:
    with pytest.raises(ValueError, match="heatmap must be one of norm, share, not 'sq'"):
        formats.get("html").render(report, formats.RenderOptions(heatmap="sq"))


# --- png and svg: matplotlib ------------------------------------------------------------


def test_png_is_deterministic_and_carries_no_metadata(report: TrendReport) -> None:
    pytest.importorskip("matplotlib", reason="the png format needs matplotlib (gradinspect[plot])")
    png = formats.get("png")
    a = png.render(report, formats.RenderOptions())
    b = png.render(report, formats.RenderOptions())
    assert isinstance(a, bytes) and a == b
    chunks = _png_chunks(a)
    assert not {"tEXt", "iTXt", "zTXt", "tIME"} & {c for c, _ in chunks}
    width, height = struct.unpack(">II", dict(chunks)["IHDR"][:8])
    assert width == 1000 and 700 <= height <= 1500
    pixels = _png_pixels(a)
    assert _has_colour(pixels, (0xD6, 0x27, 0x28))  # the NaN cell and step bands: red
    share = png.render(report, formats.RenderOptions(heatmap="share"))
    assert share != a and share == png.render(report, formats.RenderOptions(heatmap="share"))


def test_renders_do_not_depend_on_what_was_drawn_before(report: TrendReport) -> None:
    pytest.importorskip("matplotlib", reason="the plot formats need matplotlib (gradinspect[plot])")
    png, svg, options = formats.get("png"), formats.get("svg"), formats.RenderOptions()
    first_svg, first_png = svg.render(report, options), png.render(report, options)
    sample = sample_run()
    png.render(sample, formats.RenderOptions(heatmap="share"))
    svg.render(sample, options)
    assert png.render(report, options) == first_png and svg.render(report, options) == first_svg


def test_svg_is_deterministic_valid_and_dated_nowhere(report: TrendReport) -> None:
    pytest.importorskip("matplotlib", reason="the svg format needs matplotlib (gradinspect[plot])")
    import xml.etree.ElementTree as ET

    svg = formats.get("svg")
    a = svg.render(report, formats.RenderOptions())
    assert isinstance(a, str) and a == svg.render(report, formats.RenderOptions())
    root = ET.fromstring(a.encode("utf-8"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "<dc:date>" not in a and "Matplotlib v" not in a
    assert "<script" not in a  # names are drawn as paths, never as markup


def test_png_of_the_sample_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the png format needs matplotlib (gradinspect[plot])")
    run = sample_run()
    data = formats.get("png").render(run, formats.RenderOptions())
    assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert _has_colour(_png_pixels(data), (0xD6, 0x27, 0x28))  # step 31's Inf


def test_without_matplotlib_one_error_says_what_to_install() -> None:
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from gradinspect import formats, compute_norms\n"
            "from gradinspect.errors import GradInspectError\n"
            "from gradinspect.trend import StepResult, analyze\n"
            "r = analyze([StepResult.from_reports(0, compute_norms({'w': [3.0, 4.0]}, sort='none'))])\n"
            "for name in ('png', 'svg'):\n"
            "    try:\n"
            "        formats.get(name).render(r, formats.RenderOptions())\n"
            "    except GradInspectError as e:\n"
            "        print(e)\n"
            "print(formats.get('html').render(r, formats.RenderOptions())[:15])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["the png output needs matplotlib: pip install 'gradinspect[plot]'",
                                       "the svg output needs matplotlib: pip install 'gradinspect[plot]'",
                                       "<!DOCTYPE html>"]
    assert issubclass(GradInspectError, Exception)  # the CLI maps it to one Error: line and exit 2


# --- html ---------------------------------------------------------------------------------


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="trend-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_html_escapes_every_name(report: TrendReport) -> None:
    page = formats.get("html").render(report, formats.RenderOptions())
    assert isinstance(page, str)
    assert page.count("<script") == 2 and page.count("</script>") == 2 and "<!--" not in page
    assert "alert(1)</script>" not in page and "\x1b" not in page and "\u202e" not in page
    page.encode("utf-8")  # no lone surrogate
    data = _data(page)
    assert data["rows"] == [printable(n) for n in (EVIL, DOLLAR, BIDI, "zero", "late")]
    assert data["steps"] == list(range(100, 220, 10)) and data["spike"][7] is not None and not data["finite"][9]
    assert data["heat"]["norm"][4][:3] == [None] * 3 and data["heat"]["norm"][1][9] == "NaN"
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page  # the spikes table names the culprit, escaped


def test_html_needs_no_network(report: TrendReport) -> None:
    page = formats.get("html").render(report, formats.RenderOptions())
    assert not re.search(r"\b(src|href)\s*=", page, re.I)
    assert not re.search(r"@import|url\(|fetch\(|XMLHttpRequest", page)
    assert set(re.findall(r"https?://[^\s\"')]+", page)) <= {"http://www.w3.org/2000/svg"}  # a namespace name


def test_safe_json_cannot_close_its_script() -> None:
    text = safe_json({"a": "</script><!-- & >", "b": "\u2028\ud800"})
    assert "<" not in text and ">" not in text and "&" not in text and text.isascii()
    assert json.loads(text) == {"a": "</script><!-- & >", "b": "\u2028\ud800"}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")
def test_html_renders_in_headless_chromium(report: TrendReport, tmp_path: Path) -> None:
    page = tmp_path / "run.html"
    page.write_text(formats.get("html").render(report, formats.RenderOptions()), encoding="utf-8")
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    pixels = _png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (900, 1200)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 50  # not blank
    assert _has_colour(pixels, (0xD6, 0x27, 0x28))  # the NaN cell the script drew, the NaN step band
    assert _has_colour(pixels, (0x1F, 0x77, 0xB4))  # the norm line
    got = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    dom = got.stdout.decode("utf-8")
    assert 'data-ready="true"' in dom  # the script ran to the end
    assert b":CONSOLE" not in got.stderr  # no error, no message
    assert 'data-mode="norm"' in dom and dom.count('class="cursor"') == 2
    assert "alert(1)</script>" not in dom
    # the address picks the heatmap; the script redraws it and keeps the toggle in step
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri() + "#share").stdout.decode("utf-8")
    assert 'data-mode="share"' in dom and 'id="heat-title">share of the squared L2 norm per tensor<' in dom
    assert re.search(r'data-mode="share" aria-pressed="true"', dom)
    assert re.search(r'data-mode="norm" aria-pressed="false"', dom)


PROBE = """<script>
(function () {
  var out = document.createElement("pre"); out.id = "probe"; document.body.appendChild(out);
  function move(el, fx, fy) {
    var b = el.getBoundingClientRect();
    el.dispatchEvent(new MouseEvent("mousemove", {clientX: b.left + fx, clientY: b.top + fy, bubbles: true}));
    return document.getElementById("tip").textContent;
  }
  var canvas = document.getElementById("heat"), svg = document.getElementById("panel-norm");
  var D = JSON.parse(document.getElementById("trend-data").textContent), g = D.geometry;
  var cellW = (g.width - g.left - g.right) / D.steps.length;
  var cellH = canvas.getBoundingClientRect().height / D.rows.length;
  var lines = [move(canvas, g.left + 7.5 * cellW, 0.5 * cellH), move(svg, g.left + 9.5 * cellW, 50)];
  document.querySelector('.toggle button[data-mode="share"]').click();
  lines.push(canvas.getAttribute("data-mode") + " " + document.getElementById("heat-title").textContent);
  out.textContent = lines.join("\\n---\\n");
})();
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")
def test_html_tooltips_and_toggle_in_chromium(report: TrendReport, tmp_path: Path) -> None:
    """A probe script added to the page hovers a heatmap cell and a NaN step and clicks the share toggle."""
    page = tmp_path / "probe.html"
    text = formats.get("html").render(report, formats.RenderOptions())
    page.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    got = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--window-size=1200,900", "--dump-dom",
                    page.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', got.stdout.decode("utf-8"), re.S)
    assert m is not None, got.stderr[-2000:]
    import html as html_module

    cell, step, toggled = html_module.unescape(m.group(1)).split("\n---\n")
    evil = report.series_norm[0][7]
    assert cell.split("\n")[:3] == [printable(EVIL), "step 170", f"L2 norm: {float(f'{evil:.5g}'):g}"]
    assert cell.split("\n")[3].startswith("share: ") and cell.endswith("%")
    assert step.split("\n")[0] == "step 190" and "NaN/Inf in this step" in step
    assert toggled == "share share of the squared L2 norm per tensor"
    assert b":CONSOLE" not in got.stderr


def _edge_runs() -> dict[str, TrendReport]:
    return {
        "no steps": analyze([]),
        "one step": analyze([_step(5, {"a": np.array([1.0, 2.0])})]),
        "every step NaN": analyze([_step(i, {"a": np.array([np.nan, 1.0])}) for i in range(3)]),
        "all zero": analyze([_step(i, {"a": np.zeros(2), "b": np.zeros(1)}) for i in range(4)]),
        "tiny norms": analyze([_step(i, {"a": np.array([1e-30 * (i + 1)])}) for i in range(4)]),
    }


@pytest.mark.parametrize("fmt", ["png", "svg", "html"])
@pytest.mark.parametrize("heatmap", ["norm", "share"])
def test_edge_runs_render(fmt: str, heatmap: str) -> None:
    if fmt != "html":
        pytest.importorskip("matplotlib", reason="the png and svg formats need matplotlib (gradinspect[plot])")
    for name, run in _edge_runs().items():
        doc = formats.get(fmt).render(run, formats.RenderOptions(heatmap=heatmap))
        assert len(doc) > 1000, name


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")
def test_html_of_edge_runs_has_no_script_error(tmp_path: Path) -> None:
    for k, (name, run) in enumerate(_edge_runs().items()):
        page = tmp_path / f"edge{k}.html"
        page.write_text(formats.get("html").render(run, formats.RenderOptions()), encoding="utf-8")
        got = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
        assert 'data-ready="true"' in got.stdout.decode("utf-8") and b":CONSOLE" not in got.stderr, name


# --- helpers: a small PNG reader (8-bit RGB/RGBA, as matplotlib and chromium write them) ------


def _png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8].decode("ascii"), data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _png_pixels(data: bytes) -> np.ndarray:
    """The [y][x][channel] pixels; the filters undone along anti-diagonals (a pixel needs its left,
    upper and upper-left neighbours), each diagonal at once."""
    chunks = _png_chunks(data)
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", dict(chunks)["IHDR"])
    assert depth == 8 and ctype in (2, 6) and interlace == 0
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(c for t, c in chunks if t == "IDAT")), dtype=np.uint8)
    raw = raw.reshape(height, 1 + width * bpp)
    kinds = raw[:, 0].astype(np.int64)
    assert kinds.max() <= 4
    line = raw[:, 1:].reshape(height, width, bpp).astype(np.int64)
    out = np.zeros((height + 1, width + 1, bpp), dtype=np.int64)  # a zero row above and column left
    for d in range(height + width - 1):
        ys = np.arange(max(0, d - width + 1), min(height, d + 1))
        xs = d - ys
        a, b, c = out[ys + 1, xs], out[ys, xs + 1], out[ys, xs]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        k = kinds[ys][:, None]
        p = np.select([k == 1, k == 2, k == 3, k == 4], [a, b, (a + b) // 2, paeth], 0)
        out[ys + 1, xs + 1] = (line[ys, xs] + p) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], most: int = 4) -> bool:
    """True when some pixel is within ``most`` of ``rgb`` in every channel."""
    return bool(np.any(np.all(np.abs(pixels[..., :3].astype(int) - rgb) <= most, axis=-1)))


def sample_run() -> TrendReport:
    """The TrendReport of sample_data/run, as the plots of the README are made."""
    from gradinspect import inspect

    steps = []
    for path in sorted((ROOT / "sample_data" / "run").glob("step_*.safetensors")):
        step = int(re.findall(r"\d+", path.name)[-1])
        steps.append(StepResult.from_reports(step, inspect(str(path), sort="none")))
    return analyze(steps)


def test_trend_writes_the_html_page_with_the_share_heatmap(tmp_path: Path) -> None:
    """--output picks the format from the suffix; --heatmap share reaches the page."""
    from conftest import run

    out = tmp_path / "run.html"
    r = run("trend", str(ROOT / "sample_data/run/step_*.safetensors"), "--output", out, "--heatmap", "share", "-qq")
    assert r.exit_code == 0 and r.stdout == "", r.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "head.weight" in page
    plain = tmp_path / "plain.html"
    assert run("trend", str(ROOT / "sample_data/run/step_*.safetensors"), "--output", plain, "-qq").exit_code == 0
    assert page != plain.read_text()  # the initial heatmap mode differs
