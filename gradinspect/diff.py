"""Comparing two gradient sets element by element, in scaled float64.  Pure numpy.

For two tensors A and B of the same shape, :class:`PairStats` holds the
:class:`~gradinspect.norms.Stats` of A, of B and of A − B, and the dot product
A·B as a mantissa and power-of-two exponent; all of them combine exactly across
chunks and tensors, so "global" values are over all compared tensors taken as
one concatenated vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from .norms import CHUNK, Reducer, Stats, _ldexp, combine, to_float64

__all__ = ["Dot", "PairStats", "PairReducer", "combine_pairs"]


@dataclass(frozen=True, slots=True)
class Dot:
    """A·B = s · 2**exp."""

    exp: int = 0
    s: float = 0.0


def combine_dots(parts: Iterable[Dot]) -> Dot:
    parts = list(parts)
    if any(not math.isfinite(d.s) for d in parts):
        return Dot(0, math.nan)
    exps = [d.exp + math.frexp(d.s)[1] for d in parts if d.s]
    e = max(exps) if exps else 0
    return Dot(e, math.fsum(math.ldexp(d.s, d.exp - e) for d in parts))


def _l2_ratio(x: Stats, y: Stats) -> float:
    """‖x‖₂ / ‖y‖₂ without overflow (inf or 0 where the ratio itself leaves the float range)."""
    return _ldexp(math.sqrt(x.s2), x.exp - y.exp) / math.sqrt(y.s2)


@dataclass(frozen=True, slots=True)
class PairStats:
    a: Stats
    b: Stats
    d: Stats  # of A − B
    dot: Dot

    @property
    def nonfinite(self) -> bool:
        return bool(self.a.nonfinite or self.b.nonfinite)

    @property
    def rel(self) -> float:
        """‖A − B‖ / max(‖A‖, ‖B‖); 0 when both are 0."""
        if self.nonfinite:
            return math.nan
        if self.a.s2 == 0.0 and self.b.s2 == 0.0:
            return 0.0
        a_bigger = self.b.s2 == 0.0 or (self.a.s2 != 0.0 and _l2_ratio(self.a, self.b) >= 1.0)
        return _l2_ratio(self.d, self.a if a_bigger else self.b)

    @property
    def cosine(self) -> float:
        """(A·B) / (‖A‖‖B‖): 1 when both are all zeros, 0 when exactly one is."""
        if self.nonfinite:
            return math.nan
        za, zb = self.a.s2 == 0.0, self.b.s2 == 0.0
        if za or zb:
            return 1.0 if za and zb else 0.0
        num = _ldexp(self.dot.s, self.dot.exp - self.a.exp - self.b.exp)
        c = num / math.sqrt(self.a.s2) / math.sqrt(self.b.s2)
        return max(-1.0, min(1.0, c))


def combine_pairs(parts: Iterable[PairStats]) -> PairStats:
    parts = list(parts)
    return PairStats(
        combine(p.a for p in parts),
        combine(p.b for p in parts),
        combine(p.d for p in parts),
        combine_dots(p.dot for p in parts),
    )


_BIG = 2.0**1022


class PairReducer:
    """Reduces pairs of equally long chunks (any float dtypes) to :class:`PairStats`."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._r = Reducer(2.0, chunk)
        self._a = np.empty(chunk, np.float64)
        self._b = np.empty(chunk, np.float64)
        self._d = np.empty(chunk, np.float64)

    def reduce(self, a: np.ndarray, b: np.ndarray) -> PairStats:
        if a.size != b.size:
            raise ValueError(f"chunks of {a.size} and {b.size} elements")
        n = a.size
        sa, sb = self._r.reduce(a), self._r.reduce(b)
        if sa.nonfinite or sb.nonfinite:  # A − B element by element: inf where one side is, NaN where undefined
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.subtract(to_float64(a, self._a), to_float64(b, self._b), out=self._d[:n])
            return PairStats(sa, sb, self._r.reduce(d), Dot(0, math.nan))
        x = to_float64(a, self._a)
        y = to_float64(b, self._b)
        d = self._d[:n]
        # A − B can overflow only near the float64 maximum: then halve both first.
        halve = max(sa.linf, sb.linf) >= _BIG
        if halve:
            np.subtract(x * 0.5, y * 0.5, out=d)
        else:
            np.subtract(x, y, out=d)
        sd = self._r.reduce(d)
        if halve:
            sd = replace(sd, exp=sd.exp + 1, linf=sd.linf * 2.0)
        ea = math.frexp(sa.linf)[1] if sa.linf else 0
        eb = math.frexp(sb.linf)[1] if sb.linf else 0
        np.ldexp(x, -ea, out=x)
        np.ldexp(y, -eb, out=y)
        # numpy's pairwise sum, not a BLAS dot, as in norms: the same bits on every machine
        return PairStats(sa, sb, sd, Dot(ea + eb, float(np.add.reduce(np.multiply(x, y, out=x)))))
