"""Output a terminal, a CI runner or a parser can trust: hostile names, invalid UTF-8, one-line errors,
no numpy warnings, and names elided so that distinct names stay distinct."""

from __future__ import annotations

import csv
import io
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import run, run_process, strict_json, write_raw_safetensors

# Anything a terminal could act on, or that could split or reorder a line.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")

HOSTILE = [
    "osc.title\x1b]0;pwned\x07",
    "osc.link\x1b]8;;http://x\x1b\\",
    "forged\n::error file=x::forged",
    "cr\r::warning::x",
    "bidi.\u202eevil\u2066",
    "sep\u2028line\u2029para",
    "c1.\x9b31m.del\x7f",
    "tab\there",
    "pipe|in|name",
    "=HYPERLINK(\"http://x\")",
    "[bold]markup[/bold]",
]


def safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file whose header says exactly these names (any string, even lone surrogates)."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    data = b""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64"}
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return write_raw_safetensors(path, header, data)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    tensors = {name: np.array([0.0, np.nan], np.float32) for name in HOSTILE}  # every one a nonfinite finding
    tensors["step\x1b]0;t\x07\n::error::x"] = np.array([1], np.int64)  # skipped, with a warning on stderr
    return safetensors(tmp_path / "hostile.safetensors", tensors, {"note\x1b]0;t\x07": "v\x1b[2J\nx\u202e"})


def _assert_safe(text: str) -> None:
    assert not RAW_CONTROL.search(text), repr(RAW_CONTROL.search(text))
    for line in text.split("\n"):
        assert not line.lstrip().startswith("::"), line


# --- 1. hostile names in every format ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["norms"], ["norms", "-f", "markdown"], ["info"], ["check"], ["norms", "--width", "60"]],
    ids=["table", "markdown", "info", "check-text", "table-width"],
)
def test_human_formats_escape_control_characters(hostile: Path, args: list[str]) -> None:
    r = run(args[0], hostile, *args[1:])
    assert r.exit_code in (0, 1), r.output
    _assert_safe(r.stdout)
    _assert_safe(r.stderr)
    if args[0] != "info":
        assert "Warning: skipped step\\x1b]0;t\\x07\\n::error::x" in r.stderr
    if "--width" not in args:  # names in full: their visible escapes are there
        assert "osc.title\\x1b]0;pwned\\x07" in r.stdout
        assert "forged\\n::error file=x::forged" in r.stdout
        assert "bidi.\\u202eevil\\u2066" in r.stdout
        assert "c1.\\x9b31m.del\\x7f" in r.stdout


def test_info_metadata_is_escaped(hostile: Path) -> None:
    r = run("info", hostile)
    assert r.exit_code == 0
    assert "note\\x1b]0;t\\x07=v\\x1b[2J\\nx\\u202e" in r.stdout


def test_table_does_not_read_names_as_markup(hostile: Path) -> None:
    r = run("norms", hostile)
    assert "[bold]markup[/bold]" in r.stdout


def test_diff_escapes_names(hostile: Path, tmp_path: Path) -> None:
    other = safetensors(tmp_path / "b.safetensors", {"only\x1b[31mB": np.ones(2, np.float32),
                                                     **{n: np.ones(2, np.float32) for n in HOSTILE[:3]}})
    for fmt, shown in (("table", "only\\x1b[31mB"), ("markdown", "only\\\\x1b[31mB")):  # Markdown escapes "\\"
        r = run("diff", hostile, other, "-f", fmt)
        assert r.exit_code == 0, r.output
        _assert_safe(r.stdout)
        assert shown in r.stdout


def test_markdown_rows_keep_their_columns(hostile: Path) -> None:
    r = run("norms", hostile, "-f", "markdown")
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(HOSTILE)
    # Unescaped pipes delimit the cells: every row has as many as the header.
    assert {len(re.findall(r"(?<!\\)\|", row)) for row in rows} == {len(re.findall(r"\|", rows[0]))}
    assert "`pipe\\|in\\|name`" in r.stdout


def test_markdown_code_spans_hold_backticks_and_backslashes(tmp_path: Path) -> None:
    path = safetensors(tmp_path / "b.safetensors", {"a`b\\c": np.ones(2, np.float32), "`x": np.ones(1, np.float32)})
    r = run("norms", path, "-f", "markdown")
    assert "``a`b\\c``" in r.stdout and "`` `x ``" in r.stdout


def test_github_commands_cannot_be_forged(hostile: Path) -> None:
    r = run("check", hostile, "-f", "github")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    commands = [line for line in lines if line.lstrip().startswith("::")]
    assert len(commands) == len(HOSTILE) and all(c.startswith("::error title=") for c in commands)
    assert not RAW_CONTROL.search(r.stdout)
    # In the property, ':' and ',' are encoded, so the title cannot end early or add a property.
    forged = next(c for c in commands if "forged" in c)
    title = forged[len("::error title="):forged.index("::", 2)]
    assert ":" not in title and "," not in title and "%3A%3Aerror file=x%3A%3Aforged" in title


def test_github_percent_is_encoded(tmp_path: Path) -> None:
    path = safetensors(tmp_path / "p.safetensors", {"a%0Ab": np.array([np.nan], np.float32)})
    r = run("check", path, "-f", "github")
    assert "a%250Ab" in r.stdout and "a%0Ab" not in r.stdout.replace("a%250Ab", "")


def test_junit_parses_and_shows_escapes(hostile: Path) -> None:
    r = run("check", hostile, "-f", "junit")
    assert r.exit_code == 1
    root = ET.fromstring(r.stdout_bytes)
    failure = root.find(".//failure")
    assert failure is not None and failure.text is not None
    assert "osc.title\\x1b]0;pwned\\x07" in failure.text
    assert not RAW_CONTROL.search(failure.text)


def test_csv_has_one_line_per_row_and_no_formulas(hostile: Path) -> None:
    for cmd in ("norms", "info"):
        r = run(cmd, hostile, "-f", "csv")
        assert r.exit_code == 0
        assert not RAW_CONTROL.search(r.stdout)
        lines = r.stdout.splitlines()
        assert len(lines) == 1 + len(HOSTILE) + (cmd == "info")  # a naive line reader sees one row per tensor
        rows = list(csv.DictReader(io.StringIO(r.stdout)))
        names = {row["name"] for row in rows}
        assert "forged\\n::error file=x::forged" in names
        assert "'=HYPERLINK(\"http://x\")" in names  # a spreadsheet shows it as text, never runs it
        assert all(not row[c].startswith(("=", "+", "-", "@")) for row in rows for c in ("name", "source"))


def test_csv_formula_guard_leaves_numbers_alone(tmp_path: Path) -> None:
    a = safetensors(tmp_path / "a.safetensors", {"+w": np.array([1.0, 2.0], np.float32)})
    b = safetensors(tmp_path / "b.safetensors", {"+w": np.array([-1.0, -2.0], np.float32)})
    r = run("diff", a, b, "-f", "csv")
    row = next(csv.DictReader(io.StringIO(r.stdout)))
    assert row["name"] == "'+w" and row["cosine"] == "-1.0"


# --- 2. invalid UTF-8 ------------------------------------------------------------------


def _strict_json(stdout: bytes) -> dict:
    text = stdout.decode("utf-8", errors="strict")
    assert not re.search(r"(?<!\\)(\\\\)*\\u[dD][89a-fA-F]", text), "a surrogate escape: strict parsers reject it"
    return strict_json(text)


def test_lone_surrogates_in_metadata_give_valid_json(tmp_path: Path) -> None:
    metadata = {"k\udc81": "v\udc82", "b\ud800": "c"}
    path = safetensors(tmp_path / "s.safetensors", {"w": np.ones(2, np.float32)}, metadata)
    r = run_process("info", str(path), "-f", "json")
    assert r.returncode == 0 and r.stderr == b""
    doc = _strict_json(r.stdout)
    assert doc["metadata"][str(path)] == {"k\\x81": "v\\x82", "b\\ud800": "c"}
    r = run_process("info", str(path))
    assert r.returncode == 0
    assert "k\\x81=v\\x82, b\\ud800=c" in r.stdout.decode("utf-8", errors="strict")


def test_a_tensor_name_that_is_not_unicode_is_one_clean_error_line(tmp_path: Path) -> None:
    # Refused by the loader (as safetensors itself does): the error line must still be valid and one line.
    path = safetensors(tmp_path / "s.safetensors", {"w\udc80": np.ones(2, np.float32)})
    r = run_process("norms", str(path), "-f", "json")
    assert r.returncode == 2 and r.stdout == b""
    err = r.stderr.decode("utf-8", errors="strict")
    assert err.count("\n") == 1 and "not valid Unicode" in err and "w\\udc80" in err


def test_a_path_that_is_not_utf8_gives_valid_output(tmp_path: Path) -> None:
    path = os.fsencode(tmp_path) + b"/g\xff.safetensors"
    safetensors(Path(os.fsdecode(path)), {"w": np.array([3.0, 4.0], np.float32)})
    for cmd in ("norms", "check", "info"):
        r = run_process(cmd, path, "-f", "json")
        assert r.returncode == 0 and r.stderr == b"", r.stderr
        doc = _strict_json(r.stdout)
        sources = doc["report"]["sources"] if cmd == "check" else doc["sources"]
        assert sources == [os.fsdecode(tmp_path) + "/g\\xff.safetensors"]
    for fmt in ("table", "csv", "markdown"):
        r = run_process("norms", path, "-f", fmt)
        assert r.returncode == 0 and r.stderr == b""
        r.stdout.decode("utf-8", errors="strict")
    r = run_process("check", path, "-f", "junit")
    assert r.returncode == 0
    ET.fromstring(r.stdout)
    other = safetensors(tmp_path / "h.safetensors", {"v": np.ones(2, np.float32)})
    r = run_process("info", path, str(other))  # two files: the table has a source column
    assert r.returncode == 0 and "g\\xff.safetensors" in r.stdout.decode("utf-8", errors="strict")


def test_json_keeps_other_unicode_and_escapes_terminal_controls(tmp_path: Path) -> None:
    path = safetensors(tmp_path / "u.safetensors", {"ü.∞\u202e\x9b": np.ones(1, np.float32)})
    r = run_process("norms", str(path), "-f", "json")
    text = r.stdout.decode("utf-8")
    assert not RAW_CONTROL.search(text) and "ü.∞" in text
    assert _strict_json(r.stdout)["tensors"][0]["name"] == "ü.∞\u202e\x9b"  # JSON escapes are lossless


# --- 3. one Error: line ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing\ndir/x.safetensors", "bad\x1b]0;t\x07\n.safetensors", "bad\u2028.npy"])
def test_error_is_one_line_whatever_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if "missing" not in name:
        path.write_bytes(b"garbage that is no header at all")
    for fmt in ("table", "json"):
        r = run("norms", path, "-f", fmt)
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1 and r.stderr.endswith("\n")
        assert not RAW_CONTROL.search(r.stderr)
        assert "\\n" in r.stderr or "\\u2028" in r.stderr


# --- 4. numpy warnings --------------------------------------------------------------------


def _snan(path: Path) -> Path:
    return safetensors(path, {
        "s32": np.full(1000, 0x7F800001, np.uint32).view(np.float32),
        "s32neg": np.full(200_000, 0xFF800001, np.uint32).view(np.float32),
        "s64": np.full(100, 0x7FF0000000000001, np.uint64).view(np.float64),
        "s16": np.full(100, 0x7C01, np.uint16).view(np.float16),
        "big": np.full(1000, 1e300, np.float64),
        "tiny": np.full(1000, 5e-324, np.float64),
    })


@pytest.mark.parametrize("args", [["norms"], ["norms", "-p", "3"], ["norms", "-p", "0.5"], ["norms", "-p", "inf"],
                                  ["check", "--allow-nonfinite"], ["diff"]])
def test_signalling_nans_leave_stderr_empty(tmp_path: Path, args: list[str]) -> None:
    path = _snan(tmp_path / "snan.safetensors")
    paths = [str(path)] * (2 if args[0] == "diff" else 1)
    r = run_process(args[0], *paths, *args[1:], "-f", "json", *(["-qq"] if args[0] != "diff" else []))
    assert r.returncode in (0, 1) and r.stderr == b"", r.stderr.decode()


def test_reducer_raises_no_warning_on_signalling_nan() -> None:
    import warnings

    import ml_dtypes

    from gradinspect.norms import Reducer, stats_of

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype, uint, bits in [(np.float32, np.uint32, 0x7F800001), (ml_dtypes.bfloat16, np.uint16, 0x7F81),
                                  (np.float16, np.uint16, 0x7C01), (np.float64, np.uint64, 0x7FF0000000000001)]:
            x = np.full(64, bits, uint).view(dtype)
            assert stats_of(x).nan == 64 and stats_of(x, 3).nan == 64
            segments = Reducer(3).reduce_segments(np.concatenate([x[:4], np.ones(4, dtype)]), [4, 4])
            assert [s.nan for s in segments] == [4, 0]
            if np.dtype(dtype).itemsize > 2:  # byte-swapped, as a big-endian .npy holds it
                assert stats_of(x.astype(x.dtype.newbyteorder(">"))).nan == 64


# --- 5. no object reprs in messages ------------------------------------------------------


def _npy(path: Path, header: str) -> Path:
    h = header.encode("latin1")
    h += b" " * (-(len(h) + 11) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + b"\0" * 16)
    return path


@pytest.mark.parametrize("header,fragment", [
    ("{'descr': foo(), 'fortran_order': False, 'shape': (2,), }", "not a Python literal"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': [1, 2] + [3]}", "not a Python literal"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,", "not a Python literal"),
    ("{'descr': '<f4', 'shape': (2,)}", "no 'fortran_order'"),
    ("['<f4', False, (2,)]", "not a dict"),
    ("{'descr': 5, 'fortran_order': False, 'shape': (2,), }", "descr 5 is not a dtype"),
])
def test_npy_header_errors_name_the_problem(tmp_path: Path, header: str, fragment: str) -> None:
    r = run("norms", _npy(tmp_path / "h.npy", header))
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert fragment in r.stderr and "corrupt .npy header" in r.stderr
    assert " object at 0x" not in r.stderr and "<ast." not in r.stderr


# --- 6. name elision ------------------------------------------------------------------------

GPT2 = [f"transformer.h.{i}.{part}.{kind}" for i in range(12)
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for kind in ("weight", "bias")]


def _ambiguous(shown: str, names: list[str], me: str) -> list[str]:
    """Names other than ``me`` that the elided ``shown`` could stand for."""
    if "…" not in shown:
        return []
    head, tail = shown.split("…", 1)
    return [n for n in names if n != me and n.startswith(head) and n.endswith(tail) and len(n) > len(head) + len(tail)]


@pytest.mark.parametrize("width", range(22, 40))
def test_elided_names_stay_distinct(width: int) -> None:
    from gradinspect.formats._human import elide_names, middle_elide

    names = [*GPT2, "transformer.wte.weight", "lm_head.weight"]
    shown = elide_names(names, width)
    assert all(len(s) <= width for s in shown)
    assert len(set(shown)) == len(names)
    # From 23 columns on, one cut can always tell a GPT-2 name apart; at 22, not for every name.
    ambiguous = sum(1 for s, n in zip(shown, names, strict=True) if _ambiguous(s, names, n))
    assert ambiguous <= (4 * 12 if width == 22 else 0)
    # Names that need no help are elided as before (the golden tables depend on it).
    for s, n in zip(shown, names, strict=True):
        if not _ambiguous(middle_elide(n, width), names, n):
            assert s == middle_elide(n, width)


@pytest.mark.parametrize("width", [8, 12, 16, 20])
def test_narrow_elision_shows_more_distinct_names(width: int) -> None:
    from gradinspect.formats._human import elide_names, middle_elide

    names = GPT2
    shown = elide_names(names, width)
    assert all(len(s) <= width for s in shown)
    assert len(set(shown)) > len({middle_elide(n, width) for n in names})


def _stands_for(shown: str, names: list[str]) -> list[str]:
    """The names a cell could be: itself, or every name the elided pattern fits."""
    return [n for n in names if n == shown or _ambiguous(shown, [n], "")]


def test_gpt2_names_at_80_columns(tmp_path: Path) -> None:
    from gradinspect.formats._human import middle_elide

    a, b = "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"
    assert middle_elide(a, 29) == middle_elide(b, 29)  # what the table showed before
    names = GPT2[:24]
    path = safetensors(tmp_path / "g.safetensors", {n: np.full((4, 4), 0.5, np.float32) for n in names})
    r = run("norms", path, "--width", "70")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and max(map(len, lines)) <= 70
    shown = [line.split()[1] for line in lines[1:25]]
    assert any("…" in s for s in shown)
    assert all(len(_stands_for(s, names)) == 1 for s in shown)
    assert sorted(n for s in shown for n in _stands_for(s, names)) == sorted(names)


def test_piped_output_never_elides(tmp_path: Path) -> None:
    long = "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight.main_grad.fp32"
    path = safetensors(tmp_path / "l.safetensors", {long: np.ones(4, np.float32), "b": np.ones(2, np.float32)})
    for cmd in ("norms", "info"):
        r = run(cmd, path)  # CliRunner's stdout is not a terminal; COLUMNS=80
        assert r.exit_code == 0 and long in r.stdout and "…" not in r.stdout
    r = run("diff", path, path)
    assert r.exit_code == 0 and long in r.stdout and "…" not in r.stdout
    for cmd in ("norms", "info"):
        r = run(cmd, path, "--width", "50")
        assert r.exit_code == 0 and long not in r.stdout and "…" in r.stdout
        assert max(map(len, r.stdout.splitlines())) <= 50
    r = run("diff", path, path, "--width", "70")
    assert "…" in r.stdout and max(map(len, r.stdout.splitlines())) <= 70


def test_width_in_a_terminal(tmp_path: Path) -> None:
    from test_cli import _in_a_terminal

    long = "model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight.main_grad.fp32"
    path = safetensors(tmp_path / "l.safetensors", {long: np.ones(4, np.float32)})
    out = _in_a_terminal(["norms", str(path)], {"NO_COLOR": "1", "COLUMNS": "60"})
    lines = out.replace("\r\n", "\n").splitlines()
    assert "…" in out and max(map(len, lines)) <= 60
    out = _in_a_terminal(["norms", str(path), "--width", "200"], {"NO_COLOR": "1", "COLUMNS": "60"})
    assert long in out


def test_width_must_be_positive() -> None:
    r = run("norms", "x.safetensors", "--width", "0")
    assert r.exit_code == 2 and "Invalid value for '--width'" in r.stderr


def test_json_non_finite_numbers_become_strings_and_text_is_untouched() -> None:
    """One pass of the encoder, then bare NaN/Infinity quoted: the same text as rewriting the document first,
    also for names that spell NaN, Infinity, quotes and backslashes."""
    import json
    import math
    import random

    from gradinspect.formats.json import dumps

    def strict(value: Any) -> Any:  # the oracle: every non-finite float rewritten first
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strict(v) for v in value]
        return value

    names = ["NaN", "-Infinity", 'a", NaN', 'x\\"NaN', 'Infinity"', "\\", "é NaN", "tab\tNaN", 'q"', ""]
    values = [1.0, math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 3]
    rnd = random.Random(20261130)
    for _ in range(2000):
        doc = {"schema": "x", "steps": [], "tensors": [
            {"name": rnd.choice(names) + rnd.choice(names), "v": rnd.choice(values),
             "l": [rnd.choice(values) for _ in range(3)]} for _ in range(rnd.randint(0, 5))]}
        text = dumps(doc)
        assert text == json.dumps(strict(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        strict_json(text)
