"""Exact norm statistics of gradient tensors, in scaled form.

Pure numpy: no I/O, no click, no rich.

A :class:`Stats` summarises any set of elements: their count, how many are
NaN or infinite, the largest magnitude, and the sums Σ|x|, Σx² and (for a
general p) Σ|x|^p.  The sums are kept as a mantissa and a shared power-of-two
exponent ``exp`` (LAPACK ``dlassq`` keeps a ``scale`` and a ``sumsq`` in the same
spirit)::

    Σ|x|   = s1 · 2**exp
    Σx²    = s2 · 4**exp

and, for a general p, relative to the largest magnitude::

    Σ|x|^p = sp · linf**p      (1 <= sp <= count, for any p > 0)

so no finite input overflows or underflows, whatever its dtype or p.  (The
ratios |x|/linf are rounded once; raising them to the p-th power multiplies
that rounding by p, and the p-th root divides it by p again.)  Statistics of
disjoint sets combine exactly with :func:`combine`: that is what lets tensors
stream chunk by chunk, shards merge and work split across threads.

Accuracy: every element is converted exactly to float64 (all supported
storage dtypes are subsets of float64); squares of float32 and narrower values
are exact in float64; chunks of at most ``CHUNK`` elements are summed in
float64 with numpy's pairwise summation (error O(log n) ulps, in an order
that does not depend on the machine or its BLAS); chunk partials are combined
with :func:`math.fsum`, which is correctly rounded and independent of order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import numpy.typing as npt

__all__ = [
    "CHUNK",
    "SMALL",
    "Stats",
    "Reducer",
    "combine",
    "parse_norm_type",
    "norm_type_label",
    "is_float_dtype",
    "stats_of",
    "to_float64",
    "unscaled",
]

#: Elements reduced per step.  Large enough that numpy's per-call overhead
#: does not matter, small enough that work buffers stay in the CPU cache.
CHUNK = 1 << 17

#: Tensors of at most this many elements are reduced many at a time
#: (:meth:`Reducer.reduce_segments`); larger ones chunk by chunk.
SMALL = 4096

# A float64 chunk whose largest magnitude lies in [2**-_SAFE_EXP, 2**_SAFE_EXP]
# is summed unscaled: CHUNK squares of such values cannot overflow, and the
# squares that underflow are below 2**-1022, a relative 2**-200 of the largest.
_SAFE_EXP = 400
_SAFE_LO, _SAFE_HI = 2.0**-_SAFE_EXP, 2.0**_SAFE_EXP


def parse_norm_type(value: float | int | str) -> float:
    """``1``, ``2``, ``"inf"`` or any float > 0, as a float (``math.inf`` for L∞)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "infinity", "+inf", "linf", "max"):
            return math.inf
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"norm type must be 1, 2, inf or a number > 0, not {value!r}") from None
    p = float(value)
    if not p > 0 or math.isnan(p):
        raise ValueError(f"norm type must be 1, 2, inf or a number > 0, not {value!r}")
    return p


def norm_type_label(p: float) -> int | float | str:
    """The JSON spelling of a norm type: ``1``, ``2``, ``"inf"`` or a float."""
    if math.isinf(p):
        return "inf"
    if p in (1.0, 2.0):
        return int(p)
    return p


def general_p(p: float) -> bool:
    """True for a p other than 1, 2 and inf, whose p-norm is computed on its own."""
    return not (p == 1.0 or p == 2.0 or math.isinf(p))


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """Norm statistics of a set of elements; see the module docstring."""

    numel: int = 0
    nan: int = 0
    inf: int = 0
    linf: float = 0.0
    exp: int = 0
    s1: float = 0.0
    s2: float = 0.0
    sp: float = 0.0
    p: float = 2.0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def l1(self) -> float:
        return _ldexp(self.s1, self.exp)

    @property
    def l2(self) -> float:
        return _ldexp(math.sqrt(self.s2), self.exp)

    @property
    def sq(self) -> float:
        """Σx²: may overflow to inf for float64 data whose L2 norm passes ~1.3e154."""
        return _ldexp(self.s2, 2 * self.exp)

    def lp(self, p: float | None = None) -> float:
        """The p-norm for the ``p`` these statistics were made with (or 1, 2, inf)."""
        p = self.p if p is None else p
        if p == 1.0:
            return self.l1
        if p == 2.0:
            return self.l2
        if math.isinf(p):
            return self.linf
        if p != self.p:
            raise ValueError(f"these statistics were computed for p={self.p}, not p={p}")
        if not math.isfinite(self.sp) or self.sp == 0.0:
            return self.sp
        return _scaled_root(self.linf, self.sp, p)

    @property
    def norm(self) -> float:
        """The norm of the type these statistics were made with."""
        return self.lp(self.p)

    @property
    def all_zero(self) -> bool:
        """True when there is at least one element and every element is 0."""
        return self.numel > 0 and self.linf == 0.0

    def share_of(self, total: Stats) -> float:
        """This set's fraction of ``total``'s squared L2 norm, exact even when Σx² overflows."""
        if not (math.isfinite(total.s2) and math.isfinite(self.s2)):
            return self.sq / total.sq if total.sq else math.nan
        if total.s2 == 0.0:
            return 0.0
        return _ldexp(self.s2, 2 * (self.exp - total.exp)) / total.s2


def _scaled_root(m: float, s: float, p: float) -> float:
    """m · s**(1/p) for m >= 0 and s >= 1, without intermediate overflow."""
    try:
        r: float = s ** (1.0 / p)
    except OverflowError:
        r = math.inf
    if math.isfinite(r):
        v = m * r
        if math.isfinite(v) or m == 0.0:
            return v
    # m · 2**(log2(s)/p), with the integer part of the exponent applied exactly.
    fm, em = math.frexp(m)
    y = math.log2(s) / p
    if not y < 2200:  # also inf, for p of 1e-310
        return math.inf
    k = math.floor(y)
    return _ldexp(fm * 2.0 ** (y - k), em + k)


def _ldexp(x: float, e: int) -> float:
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def combine(parts: Iterable[Stats], p: float | None = None) -> Stats:
    """Statistics of the union of disjoint sets, from the statistics of each.

    Exact up to one rounding per sum, and independent of the order of ``parts``.
    """
    parts = list(parts)
    if p is None:
        p = parts[0].p if parts else 2.0
    if len(parts) == 1 and parts[0].p == p:
        return parts[0]
    for s in parts:
        if s.p != p and (general_p(p) or general_p(s.p)) and s.numel:
            raise ValueError(f"cannot combine statistics for p={s.p} with p={p}")
    numel = sum(s.numel for s in parts)
    nan = sum(s.nan for s in parts)
    inf = sum(s.inf for s in parts)
    if nan or inf or any(not math.isfinite(s.s2) for s in parts):
        bad = math.nan if nan or any(math.isnan(s.s2) for s in parts) else math.inf
        # max() skips a NaN that is not first: a part whose sums are NaN (a difference of NaN/Inf) stays NaN
        linf = math.nan if nan or any(math.isnan(s.linf) for s in parts) else max((s.linf for s in parts), default=0.0)
        return Stats(numel=numel, nan=nan, inf=inf, linf=linf, exp=0, s1=bad, s2=bad, sp=bad, p=p)
    linf = max((s.linf for s in parts), default=0.0)
    # Shared exponent: that of the largest Σ|x|, so every rescaled sum is <= 1
    # per part (and Σx² <= (Σ|x|)²); far smaller parts may underflow, harmlessly.
    exps = [s.exp + math.frexp(s.s1)[1] for s in parts if s.s1 > 0.0]
    e = max(exps) if exps else 0
    s1 = math.fsum(math.ldexp(s.s1, s.exp - e) for s in parts)
    s2 = math.fsum(math.ldexp(s.s2, 2 * (s.exp - e)) for s in parts)
    sp = 0.0
    if general_p(p) and linf > 0.0:
        # Σ|x|^p relative to the largest magnitude: the largest part's term is >= 1.
        sp = math.fsum(s.sp * (s.linf / linf) ** p for s in parts if s.sp)
    return Stats(numel=numel, linf=linf, exp=e, s1=s1, s2=s2, sp=sp, p=p)


# --- reducing arrays -------------------------------------------------------

# Storage dtypes whose sign is the top bit of an unsigned integer view and
# whose non-finite values are exactly the bit patterns >= the +inf pattern.
_IEEE: dict[np.dtype, tuple[type, int, int]] = {}


def _ieee(dtype: npt.DTypeLike, uint: type, bits: int, exp_bits: int) -> None:
    sign = 1 << (bits - 1)
    inf = ((1 << exp_bits) - 1) << (bits - 1 - exp_bits)
    _IEEE[np.dtype(dtype)] = (uint, sign - 1, inf)


_ieee(np.float64, np.uint64, 64, 11)
_ieee(np.float32, np.uint32, 32, 8)
_ieee(np.float16, np.uint16, 16, 5)

_TABLES: dict[np.dtype, np.ndarray] = {}  # |value| of each 1-byte code
_SIGNED: dict[np.dtype, np.ndarray] = {}  # value of each 1-byte code

# bfloat16 and the float8 family come from ml_dtypes
_ieee(ml_dtypes.bfloat16, np.uint16, 16, 8)
for _name in (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3",
    "float8_e3m4",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "float8_e8m0fnu",
):
    _t = getattr(ml_dtypes, _name, None)
    if _t is not None:
        # |value| of each of the 256 codes, decoded exactly by ml_dtypes.
        _codes = np.arange(256, dtype=np.uint8).view(_t)
        with np.errstate(invalid="ignore"):
            _SIGNED[np.dtype(_t)] = _codes.astype(np.float64)
        _TABLES[np.dtype(_t)] = np.abs(_SIGNED[np.dtype(_t)])


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for the dtypes whose norms we compute (IEEE floats, bfloat16, float8)."""
    dtype = np.dtype(dtype)
    return dtype in _IEEE or dtype in _TABLES or (dtype.kind == "f" and dtype.itemsize <= 8)


class Reducer:
    """Reduces 1-d chunks of at most ``chunk`` elements to :class:`Stats`.

    Holds work buffers that are reused for every chunk, so reducing allocates
    nothing per chunk.  Not thread-safe: use one per thread.
    """

    def __init__(self, p: float = 2.0, chunk: int = CHUNK) -> None:
        self.p = float(p)
        self.chunk = chunk
        self._general = general_p(self.p)
        self._w = np.empty(chunk, np.float64)
        self._bits = np.empty(chunk * 8, np.uint8)
        self._tmp = np.empty(chunk if self._general else 0, np.float64)  # used only for a general p

    def magnitudes(self, x: np.ndarray, scratch: bool = False) -> tuple[np.ndarray, float]:
        """(|x| as float64 in a work buffer, max |x|) for a 1-d chunk; the max is
        NaN or inf when the chunk holds NaN or inf.  ``scratch``: ``x`` may be overwritten."""
        n = x.size
        w = self._w[:n]
        dtype = x.dtype
        if dtype.kind == "f" and dtype.isnative:  # float16/32/64: SIMD abs and max
            a = x if scratch else self._bits[: n * dtype.itemsize].view(dtype)
            np.abs(x, out=a)
            m = float(a.max())
            if m < math.inf:
                np.copyto(w, a)
            else:  # widening a signalling NaN raises "invalid": quietly, it is counted as NaN
                with np.errstate(invalid="ignore"):
                    np.copyto(w, a)
            return w, m
        ieee = _IEEE.get(dtype)
        if ieee is not None:  # bfloat16: clear the sign bit; the integer max finds NaN/inf too
            uint, mask, inf_bits = ieee
            a = self._bits[: n * dtype.itemsize].view(uint)
            np.bitwise_and(x.view(uint), uint(mask), out=a)
            top = a.max()
            if top < inf_bits:
                np.copyto(w, a.view(dtype), casting="unsafe")
                return w, float(np.asarray(top).view(dtype))
            with np.errstate(invalid="ignore"):  # signalling NaNs, as above
                np.copyto(w, a.view(dtype), casting="unsafe")
            return w, math.nan
        table = _TABLES.get(dtype)
        if table is not None:  # 1-byte floats: a lookup table of magnitudes
            np.take(table, x.view(np.uint8), out=w, mode="clip")
            return w, float(w.max())
        if dtype.kind == "f":  # byte-swapped or long double: rare, so always quiet about signalling NaNs
            with np.errstate(invalid="ignore"):
                np.abs(x, out=w, casting="unsafe")
            return w, float(w.max())
        raise TypeError(f"cannot compute norms of dtype {dtype}")

    def reduce(self, x: np.ndarray, scratch: bool = False) -> Stats:
        """Statistics of the elements of ``x`` (any shape, up to ``chunk`` elements).

        ``scratch``: ``x`` is a buffer of the caller's that may be overwritten."""
        if x.ndim != 1:
            x = x.reshape(-1)
        n = x.size
        if n > self.chunk:
            raise ValueError(f"chunk of {n} elements exceeds the reducer's {self.chunk}")
        if n == 0:
            return Stats(p=self.p)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        w, m = self.magnitudes(x, scratch)
        if not m < math.inf:  # NaN or inf somewhere in the chunk
            return self._nonfinite(w)
        sp = 0.0
        if self._general and m > 0.0:
            t = self._tmp[:n]
            np.divide(w, m, out=t)
            np.power(t, self.p, out=t)
            sp = float(np.add.reduce(t))
        e = 0
        if m > 0.0 and not (_SAFE_LO <= m <= _SAFE_HI):
            e = math.frexp(m)[1]
            np.ldexp(w, -e, out=w)
        # numpy's pairwise summation, not a BLAS dot: its order is fixed, whatever
        # the machine's BLAS threads, so results are the same everywhere.
        s1 = float(np.add.reduce(w))
        s2 = float(np.add.reduce(np.square(w, out=w)))
        return Stats(numel=n, linf=m, exp=e, s1=s1, s2=s2, sp=sp, p=self.p)

    def reduce_segments(self, x: np.ndarray, lengths: list[int], scratch: bool = False) -> list[Stats]:
        """Statistics of consecutive segments of the 1-d chunk ``x`` (many small tensors at once).

        Sums run sequentially within each segment (at most ``SMALL`` elements
        each, so within n·u of exact), independently of the other segments.
        """
        n = x.size
        if sum(lengths) != n or n > self.chunk:
            raise ValueError("segments must cover the chunk")
        out: list[Stats | None] = [None] * len(lengths)
        nonempty = [i for i, k in enumerate(lengths) if k]
        if not nonempty:
            return [Stats(p=self.p) for _ in lengths]
        lens = np.array([lengths[i] for i in nonempty], dtype=np.intp)
        starts = np.zeros(len(lens), dtype=np.intp)
        np.cumsum(lens[:-1], out=starts[1:])
        w, _ = self.magnitudes(x, scratch)
        # Segments that overflow or hold NaN/inf are redone below: no warnings here.
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            mx = np.maximum.reduceat(w, starts)
            s1 = np.add.reduceat(w, starts)
            sp = None
            if self._general:
                t = self._tmp[:n]
                np.divide(w, np.repeat(np.where(mx > 0.0, mx, 1.0), lens), out=t)
                np.power(t, self.p, out=t)
                sp = np.add.reduceat(t, starts).tolist()
            s2 = np.add.reduceat(np.square(w, out=w), starts).tolist()
        mxl, s1l = mx.tolist(), s1.tolist()
        redo = []
        for j, i in enumerate(nonempty):
            m = mxl[j]
            if m < math.inf and (m == 0.0 or _SAFE_LO <= m <= _SAFE_HI):
                out[i] = Stats(numel=lengths[i], linf=m, s1=s1l[j], s2=s2[j], sp=sp[j] if sp else 0.0, p=self.p)
            else:  # NaN/inf or extreme float64: the careful path, one segment at a time
                redo.append((i, int(starts[j])))
        for i, a in redo:
            out[i] = self.reduce(x[a : a + lengths[i]])
        return [s if s is not None else Stats(p=self.p) for s in out]

    def _nonfinite(self, w: np.ndarray) -> Stats:
        nan = int(np.count_nonzero(np.isnan(w)))
        inf = int(np.count_nonzero(np.isinf(w)))
        bad = math.nan if nan else math.inf
        return Stats(numel=w.size, nan=nan, inf=inf, linf=bad, exp=0, s1=bad, s2=bad, sp=bad, p=self.p)


def to_float64(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Every element of the 1-d chunk ``x`` as float64, exactly, in ``out[:x.size]``."""
    out = out[: x.size]
    table = _SIGNED.get(x.dtype)
    if table is not None:
        np.take(table, x.view(np.uint8), out=out, mode="clip")
    else:
        np.copyto(out, x, casting="unsafe")
    return out


def stats_of(array: object, p: float = 2.0, reducer: Reducer | None = None) -> Stats:
    """Statistics of an in-memory array (anything ``np.asarray`` accepts)."""
    x = np.asarray(array)
    reducer = reducer or Reducer(p)
    flat = x.reshape(-1)
    step = reducer.chunk
    return combine((reducer.reduce(flat[i : i + step]) for i in range(0, max(flat.size, 1), step)), p=reducer.p)


def unscaled(st: Stats, scale: float) -> Stats:
    """The statistics of every element divided by ``scale`` (finite, > 0), e.g. an AMP loss scale.

    A power of two only shifts the exponent: exact.  Otherwise, with ``scale =
    m · 2**e`` (0.5 <= m < 1), Σ|x| and Σx² gain a rounding or two (divided by m
    and m²) and L∞ one; ratios such as Σ|x|^p / L∞^p do not change.
    """
    if scale == 1.0:
        return st
    m, e = math.frexp(scale)
    linf = _ldexp(st.linf, -(e - 1)) if m == 0.5 else st.linf / scale
    if m == 0.5:
        return replace(st, linf=linf, exp=st.exp - (e - 1))
    return replace(st, linf=linf, exp=st.exp - e, s1=st.s1 / m, s2=st.s2 / m / m)
