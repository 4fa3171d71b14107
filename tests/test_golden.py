"""Golden tables at fixed widths.  Regenerate with GRADINSPECT_UPDATE_GOLDEN=1 after reviewing the change."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from gradinspect import formats
from gradinspect.api import compute_norms

GOLDEN = Path(__file__).parent / "golden"


def _grads() -> dict[str, np.ndarray]:
    g = {}
    for i in range(3):
        g[f"model.layers.{i}.self_attn.q_proj.weight"] = np.full((64, 64), 0.01 * (i + 1), np.float32)
        g[f"model.layers.{i}.mlp.down_proj.weight"] = np.full((64, 172), 0.002 * (3 - i), np.float32)
    g["model.embed_tokens.weight"] = np.full((1000, 64), 1e-4, np.float32)
    g["model.norm.weight"] = np.zeros(64, np.float32)
    g["lm_head.bias"] = np.array([1e-7, -3e-7], np.float32)
    return g


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GRADINSPECT_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
        pytest.fail(f"golden file rewritten: {path}; review the diff and rerun without GRADINSPECT_UPDATE_GOLDEN")
    assert path.exists(), f"missing golden file {path}; run with GRADINSPECT_UPDATE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8")


def _render(fmt: str, report: object, width: int) -> str:
    buf = io.StringIO()
    formats.render(fmt, "norms", report, buf, formats.RenderOptions(width=width, color=False))
    return buf.getvalue()


@pytest.mark.parametrize("width", [80, 120])
def test_table(width: int) -> None:
    text = _render("table", compute_norms(_grads(), max_norm=1.0), width)
    assert max(len(line) for line in text.splitlines()) <= width
    _check(f"norms_{width}.txt", text)


def test_table_nan_lp_groups() -> None:
    g = _grads()
    g["model.layers.1.mlp.down_proj.weight"][0, :3] = [np.nan, np.inf, np.nan]
    report = compute_norms(g, norm_type=3, group_by=3, top=4)
    text = _render("table", report, 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    _check("norms_nan_p3_groups_80.txt", text)


def test_markdown() -> None:
    _check("norms.md", _render("markdown", compute_norms(_grads(), top=5), 80))


@pytest.mark.parametrize(
    "name,width,expected",
    [
        ("model.layers.12.self_attn.q_proj.weight", 30, "model.layers.12….q_proj.weight"),
        ("model.decoder.layers.0.some_extra_long_name", 26, "mod…0.some_extra_long_name"),
        ("short", 10, "short"),
        ("abcdefghij", 5, "ab…ij"),
    ],
)
def test_middle_elision_keeps_digits(name: str, width: int, expected: str) -> None:
    from gradinspect.formats._human import middle_elide

    out = middle_elide(name, width)
    assert out == expected and len(out) <= width
