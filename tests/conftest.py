"""Shared helpers: an exact oracle independent of gradinspect, and file writers."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner, Result

from gradinspect.cli import cli


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty statistics cache of its own (``trend`` caches by default), never ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("GRADINSPECT_CACHE_DIR", str(path))
    return path


FLOAT_DTYPES = [
    np.dtype(np.float64),
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
]


# --- exact decoding, from the bits, without numpy casts ----------------------

_LAYOUT = {  # name: (bits, exponent bits, mantissa bits, IEEE-style inf/nan?)
    "float64": (64, 11, 52, True),
    "float32": (32, 8, 23, True),
    "float16": (16, 5, 10, True),
    "bfloat16": (16, 8, 7, True),
    "float8_e5m2": (8, 5, 2, True),
    "float8_e4m3fn": (8, 4, 3, False),  # no inf; only S.1111.111 is NaN
}


def decode(arr: np.ndarray) -> list[Fraction | float]:
    """The exact value of every element, decoded from its bit pattern:
    a Fraction, or float nan/inf for non-finite ones."""
    bits, eb, mb, ieee = _LAYOUT[arr.dtype.name]
    uint = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[bits]
    bias = (1 << (eb - 1)) - 1
    out: list[Fraction | float] = []
    for u in arr.reshape(-1).view(uint).tolist():
        sign = -1 if u >> (bits - 1) else 1
        e = (u >> mb) & ((1 << eb) - 1)
        m = u & ((1 << mb) - 1)
        if ieee and e == (1 << eb) - 1:
            out.append(math.nan if m else sign * math.inf)
            continue
        if not ieee and e == (1 << eb) - 1 and m == (1 << mb) - 1:
            out.append(math.nan)
            continue
        if e == 0:
            v = Fraction(m, 1 << mb) * Fraction(2) ** (1 - bias)
        else:
            v = (1 + Fraction(m, 1 << mb)) * Fraction(2) ** (e - bias)
        out.append(sign * v)
    return out


class Exact:
    """Exact L1, Σx², L∞ and Σ|x|^p of a list of exact values."""

    def __init__(self, values: list[Fraction | float]) -> None:
        self.values = values
        self.nan = sum(1 for v in values if isinstance(v, float) and math.isnan(v))
        self.inf = sum(1 for v in values if isinstance(v, float) and math.isinf(v))
        finite = [v for v in values if isinstance(v, Fraction)]
        self.s1 = sum((abs(v) for v in finite), Fraction(0))
        self.s2 = sum((v * v for v in finite), Fraction(0))
        self.linf = max((abs(v) for v in finite), default=Fraction(0))

    @property
    def nonfinite(self) -> bool:
        return bool(self.nan or self.inf)

    def lp(self, p: float) -> Decimal:
        """(Σ|x|^p)^(1/p) with 60 significant digits."""
        with localcontext() as ctx:
            ctx.prec = 60
            dp = Decimal(p)
            total = sum((_dec(abs(v)) ** dp for v in self.values if v != 0), Decimal(0))
            return total ** (1 / dp) if total else Decimal(0)


def exact_sums(arr: np.ndarray) -> tuple[Fraction, Fraction]:
    """Exact Σ|x| and Σx² of a large finite array with at most 24 mantissa bits (float32, bfloat16,
    float16, float8), in integer arithmetic: vectorised, so usable where ``Exact(decode(x))`` is too slow."""
    x = arr.reshape(-1).astype(np.float32).astype(np.float64)  # exact widening
    assert np.all(np.isfinite(x)) and x.size < 1 << 29, "exact_sums: finite values, < 2^29 of them"
    mant, exp = np.frexp(np.abs(x))
    m = (mant * (1 << 24)).astype(np.int64)  # |x| = m · 2^(exp-24), m < 2^24 exactly
    low = int(exp.min(initial=0))
    group = exp - low  # a small range: float exponents
    sq = m * m  # < 2^48: summed as two 24-bit halves, each sum < 2^53 so exact in float64 bincount
    parts = [np.bincount(group, weights=w) for w in (m, sq >> 24, sq & ((1 << 24) - 1))]
    s1, s2 = Fraction(0), Fraction(0)
    for k, (a, hi, lo) in enumerate(zip(*(part.tolist() for part in parts), strict=True), start=low):
        s1 += Fraction(int(a)) * Fraction(2) ** (k - 24)
        s2 += Fraction((int(hi) << 24) + int(lo)) * Fraction(2) ** (2 * (k - 24))
    return s1, s2


def readme_blocks() -> list[list[str]]:
    """The lines of every fenced code block of README.md, in order."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").split("\n"):
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def lines_match(expected: list[str], actual: list[str]) -> bool:
    """``actual`` is ``expected``, where a line ``...`` stands for any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(lines_match(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and lines_match(expected[1:], actual[1:])


def check_diff_row(row: dict[str, Any], a: np.ndarray, b: np.ndarray) -> None:
    """A ``diff`` JSON row of tensors ``a`` and ``b`` against an oracle: each side's L2 norm exact
    (:func:`exact_sums`, float32) or numpy's within 1e-12, the difference's L∞ exact (the values are close,
    so their differences are), its L2 and the cosine within 1e-12."""
    x, y = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
    if a.dtype == np.float32:
        (_, sa), (_, sb) = exact_sums(a), exact_sums(b)
        assert rel_sqrt(row["l2_a"], sa) <= 1e-12 and rel_sqrt(row["l2_b"], sb) <= 1e-12, row["name"]
    else:
        assert row["l2_a"] == pytest.approx(float(np.linalg.norm(x)), rel=1e-12), row["name"]
        assert row["l2_b"] == pytest.approx(float(np.linalg.norm(y)), rel=1e-12), row["name"]
    d = x - y
    assert row["linf_diff"] == float(np.abs(d).max()), row["name"]
    assert row["l2_diff"] == pytest.approx(float(np.linalg.norm(d)), rel=1e-12), row["name"]
    cos = float(x @ y) / float(np.linalg.norm(x)) / float(np.linalg.norm(y))
    assert row["cosine"] == pytest.approx(cos, rel=1e-12), row["name"]


def _dec(f: Fraction) -> Decimal:
    return Decimal(f.numerator) / Decimal(f.denominator)


def rel_sqrt(ours: float, exact_square: Fraction) -> float:
    """Relative error of ``ours`` as the square root of ``exact_square``."""
    return rel(ours, _sqrt_fraction(exact_square))


def _sqrt_fraction(f: Fraction) -> Fraction:
    with localcontext() as ctx:
        ctx.prec = 60
        d = (Decimal(f.numerator) / Decimal(f.denominator)).sqrt()
    return Fraction(d)


_FLOAT_MAX = Fraction(np.finfo(np.float64).max)


def rel(ours: float, exact: Fraction | Decimal) -> float:
    """Relative error of ``ours``; 0 for inf where the exact value is past the float64 range."""
    ex = Fraction(exact)
    if ex == 0:
        return abs(ours)
    if math.isinf(ours):
        return 0.0 if abs(ex) > _FLOAT_MAX else math.inf
    return float(abs(Fraction(ours) - ex) / abs(ex))


# --- the CLI ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def run(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    """The CLI in-process (click's CliRunner), 80 columns, no colour; ``cwd`` is entered for the call."""
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "80", "NO_COLOR": "1", **(env or {})})
    finally:
        os.chdir(old)


def run_process(
    *args: str | bytes | os.PathLike[str], cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in a subprocess, 80 columns, no colour: argv may hold bytes that are not UTF-8, the output is
    bytes; a hang is a failure (TimeoutExpired), not a hung test run."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gradinspect", *args], cwd=cwd, env=full_env, capture_output=True,
                          timeout=timeout, check=False)


def strict_json(text: str) -> dict:
    """Parse JSON, failing on the non-standard NaN/Infinity tokens Python's json would accept."""

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


# --- files ---------------------------------------------------------------------


def write_raw_safetensors(path: Path, header: dict, data: bytes, *, header_len: int | None = None) -> Path:
    """A safetensors file from a header dict and raw bytes (for corrupt inputs)."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The JAX tests run last: importing jax starts its threads and installs an at-fork hook that warns
    (an error here) in every later test that forks worker processes (ProcessExecutor)."""
    items.sort(key=lambda item: item.path.name == "test_jax.py")  # stable: every other test keeps its order
