"""Output a terminal, a CI runner or a parser can trust: hostile names, invalid UTF-8, one-line errors,
no numpy warnings, and names elided so that distinct names stay distinct."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from conftest import write_raw_safetensors
from gradinspect.cli import cli

ROOT = Path(__file__).resolve().parent.parent

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


def run(*args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "80", "NO_COLOR": "1", **(env or {})})


def run_bytes(*args: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in a subprocess: argv may hold bytes that are not UTF-8, stdout is checked as bytes."""
    full_env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gradinspect", *args], cwd=ROOT, env=full_env, capture_output=True)


def safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file whose header says exactly these names (any string, even lone surrogates)."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    data = b""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16"}
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return write_raw_safetensors(path, header, data)


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    tensors = {name: np.array([0.0, np.nan], np.float32) for name in HOSTILE}  # every one a nonfinite finding
    return safetensors(tmp_path / "hostile.safetensors", tensors, {"note\x1b]0;t\x07": "v\x1b[2J\nx\u202e"})


def _assert_safe(text: str) -> None:
    assert not RAW_CONTROL.search(text), repr(RAW_CONTROL.search(text))
    for line in text.split("\n"):
        assert not line.lstrip().startswith("::"), line


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
    r = run_bytes(args[0], *paths, *args[1:], "-f", "json", *(["-q"] if args[0] != "diff" else []))
    assert r.returncode in (0, 1) and r.stderr == b"", r.stderr.decode()


def test_reducer_raises_no_warning_on_signalling_nan() -> None:
    import ml_dtypes
    import warnings

    from gradinspect.norms import Reducer, stats_of

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype, uint, bits in [(np.float32, np.uint32, 0x7F800001), (ml_dtypes.bfloat16, np.uint16, 0x7F81),
                                  (np.float16, np.uint16, 0x7C01), (np.float64, np.uint64, 0x7FF0000000000001)]:
            x = np.full(64, bits, uint).view(dtype)
            assert stats_of(x).nan == 64 and stats_of(x, 3).nan == 64
            assert [s.nan for s in Reducer(3).reduce_segments(np.concatenate([x[:4], np.ones(4, dtype)]), [4, 4])] == [4, 0]
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
