"""Properties: sharding, splitting, reordering and scaling give the expected totals."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import save_file

import gradinspect
from gradinspect.norms import Reducer, combine, stats_of

finite64 = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
vectors = st.one_of(
    arrays(np.float64, st.integers(1, 300), elements=finite64),
    arrays(np.float32, st.integers(1, 300), elements=finite32),
)
p_values = st.sampled_from([1.0, 2.0, math.inf, 3.0, 1.5])


def close(a: float, b: float, rtol: float = 1e-13) -> bool:
    if a == b:
        return True
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def same_stats(a, b, rtol: float = 1e-13) -> bool:  # type: ignore[no-untyped-def]
    return (a.numel, a.nan, a.inf) == (b.numel, b.nan, b.inf) and a.linf == b.linf and all(
        close(x, y, rtol) for x, y in ((a.l1, b.l1), (a.l2, b.l2), (a.norm, b.norm))
    )


@given(x=vectors, cuts=st.lists(st.integers(0, 300), max_size=6), p=p_values)
def test_splitting_a_tensor_gives_the_same_statistics(x: np.ndarray, cuts: list[int], p: float) -> None:
    pieces = np.split(x, sorted(c % (x.size + 1) for c in cuts))
    assert same_stats(combine((stats_of(piece, p) for piece in pieces), p), stats_of(x, p))


@given(x=vectors, chunk=st.integers(1, 64), p=p_values)
def test_chunk_size_does_not_matter(x: np.ndarray, chunk: int, p: float) -> None:
    r = Reducer(p, chunk=chunk)
    parts = [r.reduce(x[i : i + chunk]) for i in range(0, x.size, chunk)]
    assert same_stats(combine(parts, p), stats_of(x, p))


@given(xs=st.lists(vectors, min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1), p=p_values)
def test_order_does_not_matter_bit_for_bit(xs: list[np.ndarray], seed: int, p: float) -> None:
    parts = [stats_of(x, p) for x in xs]
    order = np.random.default_rng(seed).permutation(len(parts))
    assert combine(parts, p) == combine([parts[i] for i in order], p)


@given(x=vectors, k=st.integers(-60, 60), p=p_values)
def test_scaling_by_a_power_of_two(x: np.ndarray, k: int, p: float) -> None:
    """norm(c·g) = |c|·norm(g); with c = ±2^k the scaled values are exact."""
    c = -(2.0**k)
    with np.errstate(over="ignore"):
        y = x.astype(np.float64) * c
    # Scaling must not leave the normal range, or the values themselves change.
    assume(np.all(np.isfinite(y)))
    assume(not np.any((y != 0) & (np.abs(y) < 2.0**-1022)) and not np.any((x != 0) & (np.abs(x) < 2.0**-1022)))
    a, b = stats_of(x.astype(np.float64), p), stats_of(y, p)
    for u, v in ((a.l1, b.l1), (a.l2, b.l2), (a.linf, b.linf), (a.norm, b.norm)):
        if math.isfinite(u * abs(c)) and math.isfinite(v):
            assert close(u * abs(c), v, 1e-13)


normal64 = st.floats(-1e6, 1e6).filter(lambda v: v == 0 or abs(v) > 1e-290)  # norms far from subnormal


@given(x=arrays(np.float64, st.integers(1, 200), elements=normal64),
       c=st.floats(-1e3, 1e3).filter(lambda c: abs(c) > 1e-3))
def test_scaling_by_any_constant(x: np.ndarray, c: float) -> None:
    a, b = stats_of(x), stats_of(x * c)
    assert close(b.l2, abs(c) * a.l2, 1e-12)
    assert close(b.l1, abs(c) * a.l1, 1e-12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xs=st.lists(vectors, min_size=1, max_size=6), shards=st.integers(1, 4), seed=st.integers(0, 1000))
def test_sharding_across_files_gives_the_same_totals(xs: list[np.ndarray], shards: int, seed: int) -> None:
    tensors = {f"t{i}": x for i, x in enumerate(xs)}
    assign = np.random.default_rng(seed).integers(0, shards, len(xs))
    with tempfile.TemporaryDirectory() as d:
        save_file(tensors, str(Path(d) / "whole.safetensors"))
        paths = []
        for s in range(shards):
            part = {k: v for (k, v), a in zip(tensors.items(), assign, strict=True) if a == s}
            if part:
                paths.append(Path(d) / f"shard{s}.safetensors")
                save_file(part, str(paths[-1]))
        whole = gradinspect.inspect(Path(d) / "whole.safetensors").total
        sharded = gradinspect.inspect(paths).total
    assert (whole.tensors, whole.numel) == (sharded.tensors, sharded.numel)
    assert whole.l2 == sharded.l2 and whole.l1 == sharded.l1 and whole.linf == sharded.linf
