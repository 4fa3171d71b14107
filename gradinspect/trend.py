"""``gradinspect trend``: a training run over time, one gradient set per step (issue 9).

Pure analysis: numpy and math only, no I/O.  The input is one :class:`StepResult`
per step, the numbers ``gradinspect norms`` reports for that step alone
(:meth:`StepResult.from_reports` takes them from a :class:`~gradinspect.report.NormsReport`
unchanged, so they are bit-for-bit those of ``norms``).  :func:`analyze` turns
a run into a :class:`TrendReport`, whose ``to_dict()`` is the JSON shape
``gradinspect.trend/1``; non-finite numbers stay floats there (the JSON
writer spells them as strings, as for ``norms/1``).

Definitions (issue 9 §3).  A step is *finite* when its ``norm_type`` global
norm is finite and it holds no NaN/Inf value; the others are *non-finite*
steps: never a spike, never in a baseline, left out of the clip summary and of
drift.  Rows are tensors, or groups with ``group_by``; ``first_nonfinite`` and
``dead`` always name tensors.

- Spikes: the baseline of step i is ``numpy.median`` of the global norms of the
  finite steps among the up to ``window`` steps before it in step order
  (a non-finite step takes a slot and is left out); fewer than 3 finite ones:
  no baseline.  A finite step is a spike when its norm > ``spike_factor`` ×
  baseline (ratio ``norm / baseline``, ``inf`` for a zero baseline).
  Culprits: for every row present at the spike, ``sq`` at the spike minus
  ``baseline_sq``, the median of its ``sq`` over the baseline steps where it
  is present (0 when absent from all); ``part`` = its increase / the sum of
  the positive increases; rows with a positive increase only, largest part
  first (ties in row order).  The parts sum to 1 up to rounding.
- Clip summary: over the finite steps, the fraction whose clip coefficient is
  < 1, the p50/p90/p99 (numpy's linear interpolation) and max of their norms,
  and :func:`max_norm_for_target`.
- Missing: rows absent from some steps, and those steps (exactly where the
  series are ``None``).  Dead: tensors all-zero in every step where present.
- Drift: the 10 rows whose median share (over the steps where present)
  changed most, absolute change, between the first and the last ceil(n/4) of
  the n finite steps; rows absent from either end are left out; none for n < 2.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast, overload

import numpy as np

from .clip import DEFAULT_EPS
from .norms import norm_type_label

__all__ = [
    "DEFAULT_CLIP_TARGET",
    "DEFAULT_SPIKE_FACTOR",
    "DEFAULT_WINDOW",
    "DRIFT_TOP",
    "FLOAT_COLUMNS",
    "MAX_STEP",
    "SPELLING_WIDTH",
    "TREND_CSV_COLUMNS",
    "TREND_SCHEMA",
    "ClipSummary",
    "Culprit",
    "Drift",
    "FirstNonfinite",
    "Missing",
    "NonfiniteTensor",
    "Series",
    "Spike",
    "StepResult",
    "StepTotals",
    "TrendFinding",
    "TrendReport",
    "allowed_clipped",
    "analyze",
    "baselines",
    "column_array",
    "evaluate",
    "max_norm_for_target",
    "median_rows",
    "packed_step",
    "percentiles",
    "series",
    "series_spellings",
    "spell",
    "spell_cells",
    "with_spellings",
]

TREND_SCHEMA = "gradinspect.trend/1"
TREND_CSV_COLUMNS = ("step", "name", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite")
DEFAULT_WINDOW = 20
DEFAULT_SPIKE_FACTOR = 3.0
DEFAULT_CLIP_TARGET = 0.1
DRIFT_TOP = 10
FAIL_ON = ("spike", "nonfinite")  # --fail-on rules; --max-clip-fraction is the rule clip_fraction
MIN_BASELINE = 3  # finite steps a baseline needs
MAX_STEP = 2**63 - 1  #: the largest step number (steps are kept as int64)


# --- input: one step ----------------------------------------------------------

@dataclass(frozen=True)
class StepTotals:
    """A step's global statistics, as ``norms`` reports them (``report.total``)."""

    l1: float
    l2: float
    linf: float
    norm: float
    sq: float
    nan: int
    inf: int
    tensors: int
    numel: int

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    def to_dict(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2, "linf": self.linf, "norm": self.norm, "sq": self.sq,
                "nonfinite": self.nonfinite, "nan": self.nan, "inf": self.inf, "tensors": self.tensors,
                "numel": self.numel}


#: A step's float row columns, in this order in :func:`packed_step`'s array.
FLOAT_COLUMNS = ("l1", "l2", "linf", "norm", "sq", "share")
_PACKED = "_packed_floats"  # a packed step's (6, rows) float64 array, in its __dict__


class _FloatColumn:
    """A float row column of :class:`StepResult` (``l1`` .. ``share``): a tuple of floats.  A step the
    cache read (:func:`packed_step`) keeps its six columns as one float64 array, and makes a column's tuple
    only when it is asked for: a warm run of 1,000 steps x 200 tensors analyses the arrays, it does not
    make (and free) a million float objects."""

    def __init__(self, name: str) -> None:
        self.name, self.row = name, FLOAT_COLUMNS.index(name)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _FloatColumn: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> tuple[float, ...]: ...

    def __get__(self, obj: object, owner: type | None = None) -> tuple[float, ...] | _FloatColumn:
        if obj is None:
            return self
        d = vars(obj)
        value: tuple[float, ...] | None = d.get(self.name)
        if value is None:
            if _PACKED not in d:  # not set (an instance not initialised): as for any attribute, for hasattr
                raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}")
            # setdefault: threads that make it at once all get the one kept (a step with a NaN equals itself)
            value = d.setdefault(self.name, tuple(d[_PACKED][self.row].tolist()))
        return value

    def __set__(self, obj: object, value: tuple[float, ...]) -> None:
        vars(obj)[self.name] = value


@dataclass(frozen=True)
class StepResult:
    """One step: its totals and clip, its rows (columns of equal length, in file order), and its tensors.

    Rows (``names`` .. ``nonfinite``) are tensors, or ``group_by`` groups.
    ``tensor_names`` .. ``tensor_zero`` are always tensors (for
    ``first_nonfinite`` and ``dead``); without ``group_by`` they name the
    same tensors as the rows.  A step read from the cache (:func:`packed_step`)
    holds its float columns ``l1`` .. ``share`` as one array and makes each
    tuple when it is first read (:func:`column_array` reads the array).
    """

    step: int
    sources: tuple[str, ...]
    total: StepTotals
    clip_coef: float
    clipped: bool
    names: tuple[str, ...]
    l1: tuple[float, ...]
    l2: tuple[float, ...]
    linf: tuple[float, ...]
    norm: tuple[float, ...]
    sq: tuple[float, ...]
    share: tuple[float, ...]
    nonfinite: tuple[int, ...]
    tensor_names: tuple[str, ...]
    tensor_nan: tuple[int, ...]
    tensor_inf: tuple[int, ...]
    tensor_zero: tuple[bool, ...]  # numel > 0 and every element 0

    def __post_init__(self) -> None:
        n = len(self.names)
        d = vars(self)
        floats = d.get(_PACKED)
        if floats is None:
            lengths = [len(d[c]) for c in FLOAT_COLUMNS]
        else:  # from packed_step: the float columns not made yet
            lengths = [n] * len(FLOAT_COLUMNS) if floats.shape == (len(FLOAT_COLUMNS), n) else [-1]
        if any(k != n for k in (*lengths, len(self.nonfinite))):
            raise ValueError(f"step {self.step}: row columns of different lengths")
        t = len(self.tensor_names)
        if any(len(c) != t for c in (self.tensor_nan, self.tensor_inf, self.tensor_zero)):
            raise ValueError(f"step {self.step}: tensor columns of different lengths")
        if not (_distinct(self.names) and (self.tensor_names is self.names or _distinct(self.tensor_names))):
            raise ValueError(f"step {self.step}: a name twice")

    def __getstate__(self) -> dict[str, Any]:
        """The state copied (copy, deepcopy) or pickled: a packed step's columns are made first, so that the
        step and its copy hold the same tuples (one holding a NaN equals its copy, as a plain step does)."""
        if _PACKED in vars(self):
            for c in FLOAT_COLUMNS:
                getattr(self, c)
        return vars(self)

    @property
    def finite(self) -> bool:
        """True when the global norm is finite and no value is NaN/Inf."""
        return math.isfinite(self.total.norm) and not self.total.nonfinite

    @functools.cached_property
    def spellings(self) -> np.ndarray:
        """Each row's ``norm`` and ``share`` as strict JSON text: :func:`spell_cells` of them, shape
        ``(2, rows, SPELLING_WIDTH)``.  Made once, or given by a step entry of the cache
        (:func:`with_spellings`): a warm ``trend -f json`` lays the series out from these, it does not
        spell 400,000 numbers again.  TypeError when a value is not a float."""
        return spell_cells((self.norm, self.share))

    @classmethod
    def from_reports(cls, step: int, report: Any, tensor_report: Any = None,
                     sources: Sequence[str] | None = None) -> StepResult:
        """A step from the :class:`~gradinspect.report.NormsReport` of that step alone.

        ``report`` must hold every row in file order: made with ``sort="none"``
        and no ``top`` (``omitted`` must be 0; row order cannot be checked, so
        it is up to the caller).  With ``group_by``, its rows are groups, which
        cannot say which tensor held a NaN or was all-zero: ``tensor_report``
        is the same step's report without ``group_by`` (the same options
        otherwise).  Without ``group_by`` it defaults to ``report``.
        ``sources`` defaults to ``report.sources``.  Every number is taken
        unchanged from the reports.
        """
        if report.omitted:
            raise ValueError("report must hold every row: make it with top=None")
        if tensor_report is None:
            if report.group_by is not None:
                raise ValueError("with group_by, pass the same step's report without group_by as tensor_report")
            tensor_report = report
        elif tensor_report.group_by is not None or tensor_report.omitted:
            raise ValueError("tensor_report must have one row per tensor: no group_by, top=None")
        t, u = report.total, tensor_report.total
        if (t.tensors, t.numel, t.nan, t.inf) != (u.tensors, u.numel, u.nan, u.inf):
            raise ValueError("report and tensor_report are not of the same tensors")
        rows = report.tensors
        trows = tensor_report.tensors
        return cls(
            step=int(step),
            sources=tuple(report.sources if sources is None else sources),
            total=StepTotals(t.l1, t.l2, t.linf, t.norm, t.sq, t.nan, t.inf, t.tensors, t.numel),
            clip_coef=report.clip.coef,
            clipped=report.clip.clipped,
            names=tuple(r.name for r in rows),
            l1=tuple(r.l1 for r in rows),
            l2=tuple(r.l2 for r in rows),
            linf=tuple(r.linf for r in rows),
            norm=tuple(r.norm for r in rows),
            sq=tuple(r.sq for r in rows),
            share=tuple(r.share for r in rows),
            nonfinite=tuple(r.nan + r.inf for r in rows),
            tensor_names=tuple(r.name for r in trows),
            tensor_nan=tuple(r.nan for r in trows),
            tensor_inf=tuple(r.inf for r in trows),
            tensor_zero=tuple(r.numel > 0 and r.linf == 0.0 for r in trows),
        )


# Installed once the dataclass is made (its __init__ sets the fields through them, its __eq__ and __repr__ read them).
for _name in FLOAT_COLUMNS:
    setattr(StepResult, _name, _FloatColumn(_name))
_OTHER_FIELDS = {f.name for f in dataclasses.fields(StepResult)} - set(FLOAT_COLUMNS)  # packed_step's

_DISTINCT: dict[int, tuple[str, ...]] = {}  # name tuples found distinct, by id (the tuple kept: the id stays its)


def _distinct(names: tuple[str, ...]) -> bool:
    """No name twice in ``names`` (the steps of a run share one tuple of names: checked once)."""
    if _DISTINCT.get(id(names)) is names:
        return True
    if len(set(names)) != len(names):
        return False
    if len(_DISTINCT) > 256:
        _DISTINCT.clear()
    _DISTINCT[id(names)] = names
    return True


#: Bytes of a spelled number: the longest ``float.__repr__`` is 24 characters ('-2.2250738585072014e-308').
SPELLING_WIDTH = 24
_JSON_NONFINITE = {"nan": '"NaN"', "inf": '"Infinity"', "-inf": '"-Infinity"'}


def spell_cells(columns: Sequence[Sequence[float]]) -> np.ndarray:
    """Floats as strict JSON writes them (``float.__repr__``; non-finite as the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``, quotes included), ASCII, each in a cell of :data:`SPELLING_WIDTH`
    bytes padded with NUL: a uint8 array of shape ``(len(columns), n, SPELLING_WIDTH)``.  TypeError
    for a value that is not a float."""
    out = []
    for col in columns:
        text = ",".join(map(float.__repr__, col))
        if "n" in text:  # finite spellings are digits, '.', 'e', '+', '-'
            text = ",".join(_JSON_NONFINITE.get(x, x) for x in text.split(","))
        out.append(np.array(text.encode("ascii").split(b",") if len(col) else [], dtype=f"S{SPELLING_WIDTH}"))
    return np.stack(out).view(np.uint8).reshape(len(columns), -1, SPELLING_WIDTH) if out else np.zeros(
        (0, 0, SPELLING_WIDTH), np.uint8)


def with_spellings(step: StepResult, cells: np.ndarray) -> StepResult:
    """``step`` with its :attr:`StepResult.spellings` given: ``cells`` must be :func:`spell_cells` of
    its norms and shares (the caller vouches for that, as the cache does for its checksummed entries);
    ValueError for the wrong shape."""
    if cells.shape != (2, len(step.names), SPELLING_WIDTH) or cells.dtype != np.uint8:
        raise ValueError(f"step {step.step}: spellings of shape {cells.shape} for {len(step.names)} rows")
    vars(step)["spellings"] = cells
    return step


def packed_step(floats: np.ndarray, **fields: Any) -> StepResult:
    """A :class:`StepResult` whose float columns ``l1`` .. ``share`` are the rows of ``floats`` (float64,
    shape ``(6, rows)``, in :data:`FLOAT_COLUMNS` order; kept read-only), made into tuples only when asked
    for; ``fields``: every other field.  As the constructor checks, ValueError for columns of different
    lengths or a name twice."""
    if floats.dtype != np.float64 or floats.ndim != 2:
        raise ValueError(f"floats of dtype {floats.dtype} and shape {floats.shape}: float64 (6, rows) expected")
    floats = np.array(floats, copy=True)  # its own: the caller may write to the array it gave
    floats.flags.writeable = False
    if fields.keys() != _OTHER_FIELDS:
        raise TypeError(f"packed_step: fields {', '.join(sorted(fields))}; expected {', '.join(sorted(_OTHER_FIELDS))}")
    step = StepResult.__new__(StepResult)
    d = vars(step)
    d.update(fields)
    d[_PACKED] = floats
    step.__post_init__()
    return step


def column_array(step: StepResult, column: str) -> np.ndarray:
    """The float column ``column`` (one of :data:`FLOAT_COLUMNS`) of ``step`` as float64: the packed
    array's row, without making the tuple, for a step from :func:`packed_step`."""
    floats = vars(step).get(_PACKED)
    if floats is not None:
        row = cast(np.ndarray, floats[FLOAT_COLUMNS.index(column)])
        row.flags.writeable = False  # a copied or unpickled step's array is writeable: the step is frozen
        return row
    return np.array(getattr(step, column), dtype=np.float64)


# --- the series: [row][step] arrays -------------------------------------------

class Series:
    """A run as arrays, steps sorted by number.

    ``names``: rows in order of first appearance (steps in order, rows in
    file order); ``norm``, ``sq``, ``share`` ([row][step] float64, NaN where
    absent) and ``present`` ([row][step] bool).  ``tensor_names``,
    ``tensor_present``, ``tensor_zero`` likewise for tensors.  Per step:
    ``step`` (int64), ``global_norm``, ``clipped`` and ``finite`` (bool).
    """

    def __init__(self, steps: Sequence[StepResult]) -> None:
        ordered = sorted(steps, key=lambda s: s.step)
        for a, b in itertools.pairwise(ordered):
            if a.step == b.step:
                raise ValueError(f"step {a.step} twice")
        self.steps: tuple[StepResult, ...] = tuple(ordered)
        n = len(ordered)
        self.step = np.array([s.step for s in ordered], dtype=np.int64)
        self.global_norm = np.array([s.total.norm for s in ordered], dtype=np.float64)
        self.clipped = np.array([s.clipped for s in ordered], dtype=bool)
        self.finite = np.array([s.finite for s in ordered], dtype=bool)
        self.names, groups = _index(ordered, "names")
        r = len(self.names)
        self.norm = np.full((r, n), np.nan)
        self.sq = np.full((r, n), np.nan)
        self.share = np.full((r, n), np.nan)
        self.present = np.zeros((r, n), dtype=bool)
        for rows, cols in groups:  # the steps with the same rows at once
            at = np.ix_(rows, cols)
            arrays = [vars(ordered[j]).get(_PACKED) for j in cols]  # steps read from the cache: (6, rows) each
            block = None if any(a is None for a in arrays) else np.stack(arrays)
            for column in ("norm", "sq", "share"):
                if block is not None:  # the arrays, not tuples made of them
                    values = block[:, FLOAT_COLUMNS.index(column)]
                elif any(a is not None for a in arrays):  # some steps from the cache, some just read
                    values = np.stack([column_array(ordered[j], column) for j in cols])
                else:
                    chain = itertools.chain.from_iterable(getattr(ordered[j], column) for j in cols)
                    values = np.fromiter(chain, dtype=np.float64, count=len(rows) * len(cols)).reshape(len(cols), -1)
                getattr(self, column)[at] = values.T
            self.present[at] = True
        self.tensor_names, groups = _index(ordered, "tensor_names")
        self.tensor_present = np.zeros((len(self.tensor_names), n), dtype=bool)
        self.tensor_zero = np.zeros((len(self.tensor_names), n), dtype=bool)
        for rows, cols in groups:
            at = np.ix_(rows, cols)
            self.tensor_present[at] = True
            self.tensor_zero[at] = np.array([ordered[j].tensor_zero for j in cols], dtype=bool).reshape(len(cols), -1).T


def series(steps: Sequence[StepResult]) -> Series:
    """The run as [row][step] arrays (for analysis and plots); ValueError for a step number twice."""
    return Series(steps)


def _index(steps: Sequence[StepResult], attr: str) -> tuple[tuple[str, ...], list[tuple[np.ndarray, np.ndarray]]]:
    """Names in order of first appearance, and (row indices, step positions) per distinct list of names."""
    index: dict[str, int] = {}
    known: dict[tuple[str, ...], tuple[np.ndarray, list[int]]] = {}
    for j, st in enumerate(steps):
        names = getattr(st, attr)
        got = known.get(names)
        if got is None:
            rows = np.fromiter((index.setdefault(nm, len(index)) for nm in names), dtype=np.intp, count=len(names))
            got = known[names] = (rows, [])
        got[1].append(j)
    return tuple(index), [(rows, np.array(cols, dtype=np.intp)) for rows, cols in known.values()]


# --- pure statistics ----------------------------------------------------------

def median_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a 2-D array, ``numpy.median`` of its non-NaN values, and how many there are.

    A row with none has median NaN.  The result is bit-for-bit ``np.median``
    of the row's values (the middle one, or the mean of the two middle ones).
    """
    v = np.sort(values, axis=1)  # NaN last
    count = np.count_nonzero(~np.isnan(values), axis=1)
    rows = np.arange(v.shape[0])
    hi = np.minimum(count // 2, max(v.shape[1] - 1, 0))
    lo = np.maximum(count - 1, 0) // 2
    if v.shape[1] == 0:
        return np.full(v.shape[0], np.nan), count
    a, b = v[rows, lo], v[rows, hi]
    with np.errstate(over="ignore", invalid="ignore"):
        med = np.where(count % 2 == 1, a, (a + b) / 2.0)
    med[count == 0] = np.nan
    return med, count


def baselines(norms: np.ndarray, finite: np.ndarray, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """Per step, the median of the finite norms among the up to ``window`` steps before it; NaN with < 3."""
    n = len(norms)
    if window < 1:
        raise ValueError(f"window must be >= 1, not {window}")
    if n == 0:
        return np.zeros(0)
    window = min(window, n)
    pos = np.arange(n)[:, None] - window + np.arange(window)[None, :]  # the window's step positions
    ok = pos >= 0
    ok[ok] = finite[pos[ok]]
    vals = np.where(ok, norms[np.clip(pos, 0, None)], np.nan)
    med, count = median_rows(vals)
    med[count < MIN_BASELINE] = np.nan
    return med


def _baseline_columns(finite: np.ndarray, i: int, window: int) -> np.ndarray:
    cols = np.arange(max(0, i - window), i)
    picked: np.ndarray = cols[finite[cols]]
    return picked


def allowed_clipped(n: int, target: float) -> int:
    """The most steps of ``n`` that may be clipped with ``clipped / n <= target`` (in float, as the fraction is)."""
    if n == 0:
        return 0
    k = min(n, max(0, math.floor(target * n)))
    while k < n and (k + 1) / n <= target:
        k += 1
    while k > 0 and k / n > target:
        k -= 1
    return k


def max_norm_for_target(norms: Sequence[float] | np.ndarray, target: float, eps: float) -> float:
    """The smallest max_norm M at which at most a fraction ``target`` of these (finite) norms is clipped.

    A step is clipped when its coefficient is < 1: torch's ``M / (norm + eps) < 1``,
    optax's (``eps`` 0) ``norm > M``; for positive floats both are exactly
    ``M < d`` with ``d = norm + eps`` as float64 computes it (a correctly
    rounded quotient of two positive floats is < 1 exactly when the numerator
    is smaller).  With k = :func:`allowed_clipped` the steps that may be
    clipped, the k largest ``d`` may exceed M and no more, so M is the
    (n - k)-th smallest ``d``: every step with ``d <= M`` keeps coefficient 1,
    and at any smaller M the (n - k)-th smallest would be clipped too.  NaN
    for no norms; 0.0 when every step may be clipped (k = n).
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"clip target must be between 0 and 1, not {target}")
    d = np.sort(np.asarray(norms, dtype=np.float64) + eps)
    n = len(d)
    if n == 0:
        return math.nan
    k = allowed_clipped(n, target)
    return 0.0 if k == n else float(d[n - k - 1])


# --- output -------------------------------------------------------------------

@dataclass(frozen=True)
class Culprit:
    name: str
    sq: float
    baseline_sq: float
    part: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sq": self.sq, "baseline_sq": self.baseline_sq, "part": self.part}


@dataclass(frozen=True)
class Spike:
    step: int
    norm: float
    baseline: float
    ratio: float
    culprits: tuple[Culprit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "norm": self.norm, "baseline": self.baseline, "ratio": self.ratio,
                "culprits": [c.to_dict() for c in self.culprits]}


@dataclass(frozen=True)
class NonfiniteTensor:
    name: str
    nan: int
    inf: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "nan": self.nan, "inf": self.inf}


@dataclass(frozen=True)
class FirstNonfinite:
    step: int
    tensors: tuple[NonfiniteTensor, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tensors": [t.to_dict() for t in self.tensors]}


@dataclass(frozen=True)
class ClipSummary:
    """Clipping over the finite steps (NaN everywhere when there are none)."""

    fraction_clipped: float
    p50: float
    p90: float
    p99: float
    max: float
    target: float
    max_norm_for_target: float

    def to_dict(self) -> dict[str, Any]:
        return {"fraction_clipped": self.fraction_clipped, "p50": self.p50, "p90": self.p90, "p99": self.p99,
                "max": self.max, "target": self.target, "max_norm_for_target": self.max_norm_for_target}


@dataclass(frozen=True)
class Missing:
    name: str
    steps: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": list(self.steps)}


@dataclass(frozen=True)
class Drift:
    name: str
    first: float
    last: float

    @property
    def change(self) -> float:
        return abs(self.last - self.first)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "first": self.first, "last": self.last}


@dataclass(frozen=True)
class TrendFinding:
    """A failed CI rule (``spike``, ``nonfinite``, ``clip_fraction``), at one step or over the run."""

    rule: str
    step: int | None
    message: str


class _Deferred:
    """A field's value not made yet: ``make(*args)`` makes it when the field is first read (:class:`_Later`).
    Picklable when ``make`` is a module-level function."""

    __slots__ = ("args", "make")

    def __init__(self, make: Callable[..., Any], *args: Any) -> None:
        self.make, self.args = make, args

    def __reduce__(self) -> tuple[Any, ...]:  # pickle protocols 0 and 1 refuse a class with __slots__ otherwise
        return _Deferred, (self.make, *self.args)


_MADE = threading.Lock()


class _Later:
    """A field of a frozen dataclass that may be given as a :class:`_Deferred`: made on first read, then
    kept.  A trend report's series ([row][step] tuples: 400,000 floats for 1,000 steps x 200 tensors) are
    made only when read: the table, and ``-f json`` when it lays the series out from their spellings, never
    read them."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Later: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Any: ...

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        d = vars(obj)
        if self.name not in d:  # not set (an instance not initialised): as for any attribute, for hasattr
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}")
        value = d[self.name]
        if type(value) is _Deferred:
            made = value.make(*value.args)
            with _MADE:  # threads that make it at once all get the one kept
                value = d[self.name]
                if type(value) is _Deferred:
                    value = d[self.name] = made
        return value

    def __set__(self, obj: object, value: Any) -> None:
        vars(obj)[self.name] = value


@dataclass(frozen=True)
class TrendReport:
    """The result of ``gradinspect trend``; ``to_dict()`` is the ``gradinspect.trend/1`` JSON shape.

    ``series_norm`` / ``series_share``: [row][step], ``None`` where the row is
    absent from the step.  ``rules`` and ``findings``: the CI rules checked and
    what failed (:func:`evaluate`); ``ok`` when nothing did.
    """

    kind: ClassVar[str] = "trend"

    norm_type: float
    max_norm: float
    eps: float
    group_by: int | str | None
    window: int
    spike_factor: float
    steps: tuple[StepResult, ...]
    tensors: tuple[str, ...]
    series_norm: tuple[tuple[float | None, ...], ...]
    series_share: tuple[tuple[float | None, ...], ...]
    spikes: tuple[Spike, ...]
    first_nonfinite: FirstNonfinite | None
    clip_summary: ClipSummary
    dead: tuple[str, ...]
    missing: tuple[Missing, ...]
    drift: tuple[Drift, ...]
    rules: tuple[str, ...] = ()
    findings: tuple[TrendFinding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self, *, series: bool = True) -> dict[str, Any]:
        """The ``gradinspect.trend/1`` document.  ``series=False``: its ``"series"`` is None, and the series
        are not made (for a writer that lays them out itself, as ``-f json`` does on a long run)."""
        return {
            "schema": TREND_SCHEMA,
            "norm_type": norm_type_label(self.norm_type),
            "max_norm": self.max_norm,
            "eps": self.eps,
            "group_by": self.group_by,
            "window": self.window,
            "spike_factor": self.spike_factor,
            "steps": [{"step": s.step, "sources": list(s.sources), "total": s.total.to_dict(),
                       "clip": {"coef": s.clip_coef, "clipped": s.clipped}} for s in self.steps],
            "tensors": list(self.tensors),
            "series": {"norm": [list(r) for r in self.series_norm], "share": [list(r) for r in self.series_share]}
            if series else None,
            "spikes": [s.to_dict() for s in self.spikes],
            "first_nonfinite": None if self.first_nonfinite is None else self.first_nonfinite.to_dict(),
            "clip_summary": self.clip_summary.to_dict(),
            "dead": list(self.dead),
            "missing": [m.to_dict() for m in self.missing],
            "drift": [d.to_dict() for d in self.drift],
        }

    def csv_rows(self, spelled: bool = True) -> Iterator[tuple[Any, ...]]:
        """Long format, one row per (step, row present in it), columns :data:`TREND_CSV_COLUMNS`.

        With ``spelled``, floats are strings: ``repr`` or, non-finite, as in
        the JSON (``NaN``, ``Infinity``); names are as they are (the CSV
        writer makes them safe).  Without, raw values.
        """
        for s in self.steps:
            cols: Sequence[Sequence[Any]]
            if spelled:  # as floats (a step made by hand may hold ints); a packed step's tuples are not made
                floats = vars(s).get(_PACKED)
                if floats is None:
                    floats = np.array([getattr(s, c) for c in FLOAT_COLUMNS], dtype=np.float64)
                f = float.__repr__ if np.isfinite(floats).all() else spell
                cols = [list(map(f, c)) for c in floats.tolist()]
            else:
                cols = [getattr(s, c) for c in FLOAT_COLUMNS]
            yield from zip(itertools.repeat(s.step), s.names, *cols, s.nonfinite)


# Installed once the dataclass is made: analyze() gives the series as _Deferred.
for _name in ("series_norm", "series_share"):
    setattr(TrendReport, _name, _Later(_name))


def spell(x: float) -> str:
    """A float for CSV: ``repr``, or ``NaN``, ``Infinity``, ``-Infinity`` as in the JSON."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(float(x))


# --- CI rules -----------------------------------------------------------------

def evaluate(report: TrendReport, fail_on: Sequence[str] = (), max_clip_fraction: float | None = None) -> TrendReport:
    """``report`` with the rules checked and their findings: ``fail_on`` ``spike`` (each spike) and
    ``nonfinite`` (each step with NaN/Inf), and ``clip_fraction`` (more than ``max_clip_fraction`` of
    the finite steps clipped, or no finite step at all)."""
    for rule in fail_on:
        if rule not in FAIL_ON:
            raise ValueError(f"fail_on must be among {', '.join(FAIL_ON)}, not {rule!r}")
    rules = tuple(r for r in FAIL_ON if r in fail_on)
    found: list[TrendFinding] = []
    if "spike" in rules:
        from .report import norm_label

        label = norm_label(report.norm_type)
        for s in report.spikes:
            top = ", ".join(f"{c.name} {c.part:.1%}" for c in s.culprits[:3])
            found.append(TrendFinding("spike", s.step, f"step {s.step}: global {label} norm {s.norm:.6g} is "
                                      f"{s.ratio:.3g}x the baseline {s.baseline:.6g}" + (f" ({top})" if top else "")))
    if "nonfinite" in rules:
        for st in report.steps:
            if st.total.nonfinite:
                bad = [f"{n} ({a} NaN, {b} Inf)" for n, a, b in zip(st.tensor_names, st.tensor_nan, st.tensor_inf,
                                                                     strict=True) if a + b]
                names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                found.append(TrendFinding("nonfinite", st.step, f"step {st.step}: {st.total.nan} NaN and "
                                          f"{st.total.inf} Inf gradient values in {names}"))
    if max_clip_fraction is not None:
        rules += ("clip_fraction",)
        frac = report.clip_summary.fraction_clipped
        if math.isnan(frac):
            found.append(TrendFinding("clip_fraction", None, "no finite step: the fraction clipped is undefined"))
        elif frac > max_clip_fraction:
            n = int(sum(st.finite for st in report.steps))
            found.append(TrendFinding("clip_fraction", None, f"{frac:.1%} of the {n} finite steps are clipped at "
                                      f"max_norm {report.max_norm:g}, more than {max_clip_fraction:g}"))
    out = copy.copy(report)  # as dataclasses.replace, but a series not made yet is not made, and the mark is kept
    object.__setattr__(out, "rules", rules)
    object.__setattr__(out, "findings", tuple(found))
    return out


# --- the analysis -------------------------------------------------------------

def analyze(
    steps: Sequence[StepResult] | Series,
    *,
    norm_type: float = 2.0,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    group_by: int | str | None = None,
    window: int = DEFAULT_WINDOW,
    spike_factor: float = DEFAULT_SPIKE_FACTOR,
    clip_target: float = DEFAULT_CLIP_TARGET,
) -> TrendReport:
    """The trend of a run: spikes and their culprits, first non-finite step, clipping, dead, missing, drift.

    ``steps`` in any order (sorted by step number; a number twice is a
    ValueError).  ``norm_type``, ``max_norm``, ``eps`` and ``group_by`` must
    be those the steps were computed with: they are reported, and ``eps``
    gives :func:`max_norm_for_target`.  See the module docstring.
    """
    if not spike_factor > 0 or math.isinf(spike_factor):
        raise ValueError(f"spike_factor must be a finite number > 0, not {spike_factor}")
    if not 0.0 <= clip_target <= 1.0:
        raise ValueError(f"clip target must be between 0 and 1, not {clip_target}")
    given = isinstance(steps, Series)
    s = steps if isinstance(steps, Series) else Series(steps)
    same = bool(s.steps) and all(st.names == s.names for st in s.steps)  # every step has the series' rows
    # Made when read (_Later), from a Series of the report's own; the caller's may be written to later: now.
    later: Callable[..., Any] = _rows_of if given else functools.partial(_Deferred, _rows_of)
    report = TrendReport(
        norm_type=float(norm_type), max_norm=max_norm, eps=eps, group_by=group_by, window=window,
        spike_factor=spike_factor, steps=s.steps, tensors=s.names,
        series_norm=later(s, "norm", same), series_share=later(s, "share", same),
        spikes=_spikes(s, window, spike_factor), first_nonfinite=_first_nonfinite(s),
        clip_summary=_clip_summary(s, clip_target, eps), dead=_dead(s), missing=_missing(s), drift=_drift(s),
    )
    if same:
        _mark_series_of_steps(report)
    return report


#: A report's private mark: its series are its steps' own values, transposed by :func:`analyze` (so
#: :func:`series_spellings` need not compare them).  Not a field: ``dataclasses.replace`` drops it, and a
#: report with other series is checked value by value; :func:`evaluate`, which changes only the findings,
#: keeps it.
_SERIES_OF_STEPS = "_series_of_steps"


def _mark_series_of_steps(report: TrendReport) -> None:
    object.__setattr__(report, _SERIES_OF_STEPS, True)


def series_spellings(report: TrendReport) -> tuple[np.ndarray, np.ndarray] | None:
    """``report.series_norm`` and ``series_share`` as strict JSON spells them, in :func:`spell_cells`
    cells, [row][step][byte], from its steps' :attr:`StepResult.spellings`; None unless every row is in
    every step, in the same order, with the values of the series (as :func:`analyze` makes them; a row
    holding a NaN, which equals nothing, is checked by its spellings).  A transpose of texts made before,
    much cheaper than spelling the numbers again."""
    steps, names = report.steps, report.tensors
    if not steps or any(s.names != names for s in steps):
        return None
    try:
        cells = np.stack([s.spellings for s in steps], axis=2)  # (2, rows, steps, width)
    except TypeError:
        return None
    if not _well_spelled(cells):  # cells of a step entry are untrusted input
        return None
    if vars(report).get(_SERIES_OF_STEPS):  # made by analyze from these steps: their values, by construction
        return cells[0], cells[1]
    for k, (rows, column) in enumerate(((report.series_norm, "norm"), (report.series_share, "share"))):
        if len(rows) != len(names):
            return None
        values = zip(*(getattr(s, column) for s in steps), strict=True)
        for i in itertools.compress(itertools.count(), map(operator.ne, rows, values)):  # a NaN, or not the values
            row = rows[i]
            if type(row) is not tuple or not all(type(x) is float for x in row) or (
                    not np.array_equal(spell_cells((cast(tuple[float, ...], row),))[0], cells[k, i])):
                return None
    return cells[0], cells[1]


#: What a spelled finite number is made of (``float.__repr__``), and the spellings of the three others.
_NUMBER_BYTES = b"0123456789.e+-"
_NAMES = np.array([b'"NaN"', b'"Infinity"', b'"-Infinity"'], dtype=f"S{SPELLING_WIDTH}").view(np.uint8).reshape(
    3, SPELLING_WIDTH)


def _well_spelled(cells: np.ndarray) -> bool:
    """Every cell is number text (ASCII digits, ``.``, ``e``, ``+``, ``-``) or exactly ``"NaN"``, ``"Infinity"``
    or ``"-Infinity"``, not empty and padded with NUL at its end: laid out, such cells can neither make a
    traceback (not ASCII) nor break the document's structure (a comma, a bracket, a quote, a NUL inside).
    About 12 ms for 400,000 cells, with no temporary array as large as the cells (a regular expression for
    the exact JSON number grammar took 70 ms, more than a tenth of a warm run).  A step entry made by hand
    with a valid checksum is served as it says: its floats, and its texts when they pass this check (a
    malformed number such as ``1e`` is then laid out)."""
    flat = np.ascontiguousarray(cells).reshape(-1, SPELLING_WIDTH)
    if not flat[:, 0].all():  # an empty cell
        return False
    # A cell's text runs to its last byte that is not NUL; it holds that many such bytes when no NUL is inside.
    if int(np.char.str_len(flat.view(f"S{SPELLING_WIDTH}")).sum()) != np.count_nonzero(flat):
        return False
    named = flat[:, 0] == ord('"')
    if named.any():
        if not (flat[named][:, None, :] == _NAMES[None]).all(axis=2).any(axis=1).all():
            return False
        flat = flat[~named]
    return not flat.tobytes().translate(None, _NUMBER_BYTES + b"\0")


def _rows_of(s: Series, column: str, same: bool) -> tuple[tuple[float | None, ...], ...]:
    """The series of ``column`` ([row][step], None where absent): when every step has the series' rows
    (``same``), its steps' very floats (a transpose); else from the arrays."""
    if same and not any(_PACKED in vars(st) for st in s.steps):
        return tuple(zip(*(getattr(st, column) for st in s.steps), strict=True))
    return _with_none(getattr(s, column), s.present)  # the same floats, bit for bit


def _with_none(values: np.ndarray, present: np.ndarray) -> tuple[tuple[float | None, ...], ...]:
    if present.all():
        return tuple(map(tuple, values.tolist()))
    obj = values.astype(object)
    obj[~present] = None
    return tuple(map(tuple, obj.tolist()))


def _spikes(s: Series, window: int, factor: float) -> tuple[Spike, ...]:
    base = baselines(s.global_norm, s.finite, window)
    g = s.global_norm
    with np.errstate(invalid="ignore", over="ignore"):
        hits = np.flatnonzero(s.finite & ~np.isnan(base) & (g > factor * base))
    out = []
    for i in hits.tolist():
        b, norm = float(base[i]), float(g[i])
        ratio = norm / b if b > 0 else math.inf
        out.append(Spike(int(s.step[i]), norm, b, ratio, _culprits(s, i, window)))
    return tuple(out)


def _culprits(s: Series, i: int, window: int) -> tuple[Culprit, ...]:
    cols = _baseline_columns(s.finite, i, window)
    base, count = median_rows(np.where(s.present[:, cols], s.sq[:, cols], np.nan))
    base[count == 0] = 0.0
    here = s.present[:, i]
    sq = s.sq[:, i]
    with np.errstate(invalid="ignore"):
        inc = sq - base
        rows = np.flatnonzero(here & (inc > 0))
    if not len(rows):
        return ()
    total = float(np.sum(inc[rows]))
    parts = inc[rows] / total
    order = np.argsort(-parts, kind="stable")
    return tuple(Culprit(s.names[r], float(sq[r]), float(base[r]), float(p))
                 for r, p in zip(rows[order].tolist(), parts[order].tolist(), strict=True))


def _first_nonfinite(s: Series) -> FirstNonfinite | None:
    for st in s.steps:
        if st.total.nonfinite:
            return FirstNonfinite(st.step, tuple(
                NonfiniteTensor(nm, a, b)
                for nm, a, b in zip(st.tensor_names, st.tensor_nan, st.tensor_inf, strict=True) if a + b))
    return None


def percentiles(values: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
    """``np.percentile(values, qs)`` of a 1-D array without NaN, bit for bit: numpy's default, linear
    interpolation between the sorted values at ``(n - 1) * q / 100``, with its two-sided formula
    (``a + (b - a) * t``, or ``b - (b - a) * (1 - t)`` for ``t >= 0.5``).  Written out because numpy's
    own imports ``numpy.ma`` on its first call (8 ms of a warm ``trend``)."""
    ordered = np.sort(values)
    n = len(ordered)
    out = []
    for q in qs:
        v = (n - 1) * (q / 100)
        lo = math.floor(v)
        if v >= n - 1:
            out.append(float(ordered[-1]))
            continue
        a, b, t = float(ordered[lo]), float(ordered[lo + 1]), v - lo
        diff = b - a
        out.append(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    return tuple(out)


def _clip_summary(s: Series, target: float, eps: float) -> ClipSummary:
    norms = s.global_norm[s.finite]
    if not len(norms):
        return ClipSummary(math.nan, math.nan, math.nan, math.nan, math.nan, target, math.nan)
    p50, p90, p99 = percentiles(norms, (50, 90, 99))
    return ClipSummary(int(np.count_nonzero(s.clipped[s.finite])) / len(norms), p50, p90, p99,
                       float(norms.max()), target, max_norm_for_target(norms, target, eps))


def _dead(s: Series) -> tuple[str, ...]:
    dead = np.all(s.tensor_zero | ~s.tensor_present, axis=1) & np.any(s.tensor_present, axis=1)
    return tuple(s.tensor_names[r] for r in np.flatnonzero(dead).tolist())


def _missing(s: Series) -> tuple[Missing, ...]:
    rows = np.flatnonzero(~np.all(s.present, axis=1))
    return tuple(Missing(s.names[r], tuple(s.step[~s.present[r]].tolist())) for r in rows.tolist())


def _drift(s: Series) -> tuple[Drift, ...]:
    cols = np.flatnonzero(s.finite)
    n = len(cols)
    if n < 2:
        return ()
    q = math.ceil(n / 4)
    share = np.where(s.present, s.share, np.nan)
    first, cf = median_rows(share[:, cols[:q]])
    last, cl = median_rows(share[:, cols[-q:]])
    rows = np.flatnonzero((cf > 0) & (cl > 0))
    change = np.abs(last[rows] - first[rows])
    order = np.argsort(-change, kind="stable")[:DRIFT_TOP]
    return tuple(Drift(s.names[r], float(first[r]), float(last[r])) for r in rows[order].tolist())
