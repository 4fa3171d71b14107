"""Oracle tests: every statistic against exact rational arithmetic, on every dtype."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from conftest import FLOAT_DTYPES, Exact, decode, exact_sums, rel, rel_sqrt
from gradinspect.norms import CHUNK, Reducer, Stats, combine, parse_norm_type, stats_of

TOL = 1e-12


def check_against_oracle(x: np.ndarray, p: float = 2.0) -> Stats:
    s = stats_of(x, p)
    ex = Exact(decode(x))
    assert s.numel == x.size
    assert (s.nan, s.inf) == (ex.nan, ex.inf)
    if ex.nan:
        assert math.isnan(s.l2) and math.isnan(s.l1) and math.isnan(s.linf) and math.isnan(s.norm)
    elif ex.inf:
        assert s.l2 == s.l1 == s.linf == s.norm == math.inf
    else:
        assert rel(s.l1, ex.s1) <= TOL
        assert rel_sqrt(s.l2, ex.s2) <= TOL
        assert Fraction(s.linf) == ex.linf  # the max is exact
        if p not in (1.0, 2.0, math.inf):
            assert rel(s.norm, ex.lp(p)) <= TOL
    return s


def _sample(dtype: np.dtype, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    finfo = ml_dtypes.finfo(dtype) if dtype.name not in ("float64", "float32", "float16") else np.finfo(dtype)
    x = rng.standard_normal(n) * scale
    x = np.clip(x, -float(finfo.max), float(finfo.max))
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf, 3.0, 0.5])
def test_random_values_every_dtype(dtype: np.dtype, p: float, rng: np.random.Generator) -> None:
    check_against_oracle(_sample(dtype, rng, 3000), p)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d.itemsize <= 2], ids=lambda d: d.name)
def test_every_bit_pattern_of_small_dtypes(dtype: np.dtype) -> None:
    """All 2^8 / 2^16 codes, finite ones only: subnormals, max, min, ±0."""
    uint = np.uint8 if dtype.itemsize == 1 else np.uint16
    codes = np.arange(1 << (8 * dtype.itemsize), dtype=np.uint64).astype(uint).view(dtype)
    with np.errstate(invalid="ignore"):
        finite = codes[np.isfinite(codes.astype(np.float64))]
    check_against_oracle(finite)
    check_against_oracle(finite, 3.0)


@pytest.mark.parametrize(
    "values",
    [
        [1e200, 3e200, -2e200],  # squares overflow float64
        [1e308, 1e308, -1e308],  # near the float64 maximum: L1 = 3e308 is inf, L2 is not
        [1e-200, 2e-200, -3e-200],  # squares underflow
        [5e-324, 1e-320, -2.5e-310],  # subnormals
        [1e300, 1e-300, 1.0],  # very different magnitudes
        [0.0, -0.0, 0.0],
        [7.0],
    ],
    ids=["huge", "max", "tiny", "subnormal", "mixed", "zeros", "single"],
)
def test_float64_extremes(values: list[float]) -> None:
    x = np.array(values, np.float64)
    for p in (1.0, 2.0, math.inf, 3.0):
        check_against_oracle(x, p)


def test_huge_values_keep_l2_exact_when_the_square_overflows() -> None:
    x = np.full(1000, 1e300)
    s = stats_of(x)
    assert s.sq == math.inf  # Σx² itself is not representable ...
    assert rel(s.l2, Fraction(1e300) * 10 * Fraction(math.sqrt(10))) < 1e-15  # ... the norm is
    assert s.l2 == pytest.approx(1e300 * math.sqrt(1000), rel=1e-15)


def test_float16_values_whose_squares_overflow_float16() -> None:
    x = np.array([60000.0, -65504.0, 300.0] * 100, np.float16)
    s = check_against_oracle(x)
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(60000.0) ** 2)  # why this case matters
    assert math.isfinite(s.l2)


def test_bfloat16_near_max() -> None:
    big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    check_against_oracle(np.array([big, -big, 1.0], ml_dtypes.bfloat16))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_nonfinite_counts(dtype: np.dtype) -> None:
    x = np.array([1.0, np.nan, 2.0, np.nan, 0.0], np.float64).astype(dtype)
    s = check_against_oracle(x)
    assert s.nan == 2
    if dtype != np.dtype(ml_dtypes.float8_e4m3fn):  # e4m3fn has no infinity
        y = np.array([1.0, np.inf, -np.inf, 3.0], np.float64).astype(dtype)
        s = check_against_oracle(y)
        assert (s.nan, s.inf) == (0, 2)
        assert s.linf == math.inf


def test_empty_and_zero_d() -> None:
    s = stats_of(np.array([], np.float32))
    assert (s.numel, s.l1, s.l2, s.linf, s.sq) == (0, 0.0, 0.0, 0.0, 0.0)
    s = stats_of(np.float32(-4.0))
    assert (s.numel, s.l1, s.l2, s.linf) == (1, 4.0, 4.0, 4.0)
    s = stats_of(np.zeros((3, 0, 2)))
    assert s.numel == 0 and not s.all_zero


def test_all_zero() -> None:
    s = stats_of(np.zeros(100, np.float16))
    assert s.all_zero and s.l2 == 0.0
    assert not stats_of(np.array([0.0, 1e-45], np.float32)).all_zero


def test_many_chunks_ten_million_float32(rng: np.random.Generator) -> None:
    """Where float32 accumulation (torch's and numpy's default) can drift; ours stays exact to 1e-12."""
    n = 10_000_000
    x = (rng.standard_normal(n, dtype=np.float32) * 1e-3 + np.float32(1e-3)).astype(np.float32)
    exact_l1, exact_sq = exact_sums(x)
    s = stats_of(x)
    assert s.numel == n and n > 30 * CHUNK
    assert rel(s.sq, exact_sq) <= TOL
    assert rel_sqrt(s.l2, exact_sq) <= TOL
    assert rel(s.l1, exact_l1) <= TOL
    # For information only (run with -s): a float32 dot product, as numpy's BLAS does it. Not asserted:
    # its accuracy is numpy's business and may improve.
    print(f"float32 np.dot relative error: {rel(float(np.dot(x, x)), exact_sq):.1e}; ours: {rel(s.sq, exact_sq):.1e}")


def test_exact_sums_oracle_matches_decode(rng: np.random.Generator) -> None:
    """The vectorised oracle used on large arrays agrees with the bit-level one."""
    x = (rng.standard_normal(3000) * np.exp(rng.uniform(-40, 40, 3000))).astype(np.float32)
    x[:6] = [0.0, 1e-45, -1e-45, 3e38, -3e38, 1.1754944e-38]
    for dt in (np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
        with np.errstate(over="ignore"):
            y = x.astype(dt)
        y = y[np.isfinite(y.astype(np.float64))]
        ex = Exact(decode(y))
        assert exact_sums(y) == (ex.s1, ex.s2), dt


def test_general_p_scaling_avoids_overflow() -> None:
    x = np.array([3e38, -3e38, 1.0], np.float32)  # |x|^10 overflows float64
    check_against_oracle(x, 10.0)
    s = stats_of(x, 10.0)
    assert s.norm == pytest.approx(3e38 * 2 ** 0.1, rel=1e-7)  # float32(3e38) != 3e38 exactly


def test_combine_is_order_independent_and_exact(rng: np.random.Generator) -> None:
    parts = [stats_of(rng.standard_normal(rng.integers(1, 500)) * 10.0 ** rng.integers(-5, 5)) for _ in range(50)]
    a = combine(parts)
    b = combine(parts[::-1])
    assert a == b
    assert combine([]) == Stats()


def test_combine_zero_parts_do_not_hide_tiny_ones() -> None:
    tiny = stats_of(np.array([1e-310, 2e-310]))
    zero = stats_of(np.zeros(5))
    s = combine([zero, tiny, zero])
    assert s.l2 == pytest.approx(math.sqrt(5) * 1e-310, rel=1e-12)


def test_combine_propagates_nonfinite() -> None:
    ok = stats_of(np.ones(3))
    inf = stats_of(np.array([np.inf]))
    nan = stats_of(np.array([np.nan, 1.0]))
    s = combine([ok, inf])
    assert s.l2 == math.inf and (s.nan, s.inf) == (0, 1)
    s = combine([ok, inf, nan])
    assert math.isnan(s.l2) and math.isnan(s.linf) and (s.nan, s.inf) == (1, 1)


def test_share_exact_when_sq_overflows() -> None:
    a = stats_of(np.full(3, 1e300))
    b = stats_of(np.full(1, 1e300))
    total = combine([a, b])
    assert total.sq == math.inf
    assert a.share_of(total) == pytest.approx(0.75, rel=1e-15)
    assert b.share_of(total) == pytest.approx(0.25, rel=1e-15)


def test_reducer_rejects_oversized_chunk_and_integers() -> None:
    r = Reducer(2.0, chunk=4)
    with pytest.raises(ValueError, match="chunk of 5 elements exceeds the reducer's 4"):
        r.reduce(np.ones(5))
    with pytest.raises(TypeError, match="cannot compute norms of dtype int32"):
        r.reduce(np.ones(3, np.int32))


def test_reducer_does_not_modify_its_input() -> None:
    x = np.array([-1.0, 2.0, -3.0], np.float32)
    before = x.copy()
    stats_of(x)
    np.testing.assert_array_equal(x, before)


def test_non_contiguous_input() -> None:
    x = np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2]
    assert stats_of(x).l1 == float(np.abs(x).sum())


@pytest.mark.parametrize(
    "text,expected", [("1", 1.0), ("2", 2.0), ("inf", math.inf), ("Inf", math.inf), ("3.5", 3.5), (0.5, 0.5)]
)
def test_parse_norm_type(text: str, expected: float) -> None:
    assert parse_norm_type(text) == expected


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "two", 0])
def test_parse_norm_type_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"norm type must be 1, 2, inf or a number > 0, not "):
        parse_norm_type(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.5, 7.0, 50.0, 64.0, 1100.0, 1e6])
@pytest.mark.parametrize("n", [1, 2, 1_000, (1 << 20) + 7])
def test_extreme_p_on_many_elements(p: float, n: int) -> None:
    """Σ|x|^p must neither underflow (large p, many elements) nor overflow (small p)."""
    x = np.full(n, 0.75)
    x[n // 2] = 1.0
    x[-1] = 0.5
    s = stats_of(x, p)
    values, counts = np.unique(x, return_counts=True)
    with localcontext() as ctx:
        ctx.prec = 80
        dp = Decimal(p)
        total = sum(int(c) * Decimal(float(v)) ** dp for v, c in zip(values, counts, strict=True))
        exact = total ** (1 / dp)
    assert rel(s.norm, exact) <= TOL


@pytest.mark.parametrize("p", [0.01, 0.3, 3.0, 40.0])
def test_general_p_across_tensors_of_different_magnitudes(p: float, rng: np.random.Generator) -> None:
    parts = [rng.standard_normal(300) * 10.0 ** k for k in (-200, -3, 0, 5, 150)]
    s = combine([stats_of(x, p) for x in parts], p)
    ex = Exact([v for x in parts for v in decode(x)])
    assert rel(s.norm, ex.lp(p)) <= TOL


def test_small_p_with_a_finite_answer_past_the_float_range_of_the_ratio() -> None:
    """(10000 · (2^-1000)^0.01)^100 = 2^-1000 · 10^400 ≈ 9.3e98: finite, though 10000^100 is not."""
    s = stats_of(np.full(10000, 2.0**-1000), 0.01)
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(2) ** -1000 * Decimal(10000) ** 100
    assert rel(s.norm, exact) <= TOL
    assert stats_of(np.full(10000, 1e300), 0.01).norm == math.inf  # 1e300 · 10^400 overflows
