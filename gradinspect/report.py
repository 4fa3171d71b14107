"""What gradinspect reports: frozen dataclasses, and the one place the JSON shape is defined.

``to_dict()`` returns plain Python values (floats may be NaN or infinite);
``gradinspect.formats.json`` writes non-finite floats as strings so the output
is strict JSON.  Adding a field keeps a schema's version; renaming, removing
or changing the meaning of one bumps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .norms import Stats, norm_type_label


def _fields_dict(fields: tuple[str, ...]) -> Callable[[Any], dict[str, Any]]:
    """A ``to_dict`` returning ``{field: value}`` in ``fields`` order (a ``shape`` tuple as a list), written
    out as a dict display, as dataclasses writes its methods: as fast as a hand-written one."""
    items = ", ".join(f"{k!r}: " + (f"None if self.{k} is None else list(self.{k})" if k == "shape" else f"self.{k}")
                      for k in fields)
    namespace: dict[str, Any] = {}
    exec(f"def to_dict(self):\n    return {{{items}}}", namespace)
    to_dict: Callable[[Any], dict[str, Any]] = namespace["to_dict"]
    return to_dict

__all__ = [
    "TensorNorms", "Skipped", "Totals", "Clip", "NormsReport", "NORMS_SCHEMA",
    "Finding", "CheckReport", "CHECK_SCHEMA", "DiffRow", "Mismatch", "Tolerances", "DiffReport", "DIFF_SCHEMA",
    "InfoTensor", "InfoTotals", "InfoReport", "INFO_SCHEMA",
]

NORMS_SCHEMA = "gradinspect.norms/1"


@dataclass(frozen=True, kw_only=True)
class TensorNorms:
    """One row: a tensor, or with ``group_by`` a group of tensors (``members`` > 1 possible).

    Built with keywords, or from a :class:`~gradinspect.norms.Stats` with :meth:`from_stats`.
    """

    #: The JSON keys, in order; the CSV columns derive from them (``formats/csv.py``).
    FIELDS: ClassVar[tuple[str, ...]] = (
        "name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite", "nan",
        "inf", "members", "replica_max_diff", "pieces", "duplicate_of")

    name: str
    source: str | None
    shape: tuple[int, ...] | None
    dtype: str
    numel: int
    l1: float
    l2: float
    linf: float
    norm: float
    sq: float
    share: float
    nan: int = 0
    inf: int = 0
    members: int = 1  # tensors in a --group-by row
    replica_max_diff: float | None = None  # --shards replicas: largest |difference| between copies
    pieces: int = 1  # --shards: the files its slices or copies came from (summed over a group)
    duplicate_of: str | None = None  # an exact copy of this earlier tensor (tied weights saved twice)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def all_zero(self) -> bool:
        return self.numel > 0 and self.linf == 0.0

    @classmethod
    def from_stats(cls, stats: Stats, **row: Any) -> TensorNorms:
        """The row of ``stats``; ``row`` gives the rest (name, source, shape, dtype, share, ...)."""
        return cls(numel=stats.numel, l1=stats.l1, l2=stats.l2, linf=stats.linf, norm=stats.norm, sq=stats.sq,
                   nan=stats.nan, inf=stats.inf, **row)

    to_dict = _fields_dict(FIELDS)


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of every total, and why (e.g. an integer step counter)."""

    name: str
    source: str
    dtype: str
    reason: str

    to_dict = _fields_dict(("name", "source", "dtype", "reason"))

    def warning(self) -> str:
        return f"skipped {self.name} ({self.source}): {self.reason}"


_NOT_FLOAT = "not a floating-point dtype"


def skipped_warnings(skipped: tuple[Skipped, ...], shown: int = 3) -> list[str]:
    """One line per kind of skipped tensor (integers, each other reason), naming a few of them;
    the JSON ``skipped`` list names them all."""
    groups: dict[str, list[Skipped]] = {}
    for s in skipped:
        groups.setdefault(_NOT_FLOAT if s.reason.startswith(_NOT_FLOAT) else s.reason, []).append(s)
    out = []
    for reason, members in groups.items():
        if len(members) == 1:
            out.append(members[0].warning())
            continue
        names = ", ".join(s.name for s in members[:shown])
        names += ", ...; --format json lists them" if len(members) > shown else ""
        if reason == _NOT_FLOAT:
            counts: dict[str, int] = {}
            for s in members:
                counts[s.dtype] = counts.get(s.dtype, 0) + 1
            dtypes = ", ".join(f"{n} {d}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            out.append(f"skipped {len(members)} tensors that are not floating point: {dtypes} ({names})")
        else:
            out.append(f"skipped {len(members)} tensors ({names}): {reason}")
    return out


@dataclass(frozen=True, kw_only=True)
class Totals:
    """Statistics of every selected tensor taken as one vector (:meth:`from_stats`)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("tensors", "numel", "l1", "l2", "linf", "norm", "sq", "nonfinite",
                                         "nan", "inf")

    tensors: int
    numel: int
    l1: float
    l2: float
    linf: float
    norm: float
    sq: float
    nan: int = 0
    inf: int = 0

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @classmethod
    def from_stats(cls, stats: Stats, tensors: int) -> Totals:
        """The totals of ``tensors`` tensors whose merged statistics are ``stats``."""
        return cls(tensors=tensors, numel=stats.numel, l1=stats.l1, l2=stats.l2, linf=stats.linf, norm=stats.norm,
                   sq=stats.sq, nan=stats.nan, inf=stats.inf)

    to_dict = _fields_dict(FIELDS)


@dataclass(frozen=True, kw_only=True)
class Clip:
    """What ``clip_grad_norm_(max_norm)`` would do to these gradients."""

    max_norm: float
    eps: float
    coef: float
    clipped: bool
    norm_after: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_norm": self.max_norm,
            "eps": self.eps,
            "coef": self.coef,
            "clipped": self.clipped,
            "norm_after": self.norm_after,
        }


@dataclass(frozen=True)
class NormsReport:
    """The result of ``gradinspect norms`` / :func:`gradinspect.inspect`.

    ``tensors`` holds the rows in display order (after ``sort`` and ``top``);
    ``total`` is over every selected tensor, shown or not.
    """

    kind: ClassVar[str] = "norms"

    sources: tuple[str, ...]
    norm_type: float
    tensors: tuple[TensorNorms, ...]
    skipped: tuple[Skipped, ...]
    total: Totals
    clip: Clip
    metadata: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    omitted: int = 0
    group_by: int | str | None = None  # an integer depth or a regular expression
    shards: str | None = None
    notes: tuple[str, ...] = ()  # warnings found while computing (e.g. replicas that differ)
    group_sep: str | None = None  # the separator --group-by splits on or joins with
    dedup: bool = False  # exact copies were left out of the rows and totals
    loss_scale: float | None = None  # divided out of every statistic (AMP gradients saved before unscaling)
    loss_scale_from: str | None = None  # "option" or "metadata"

    def input_warnings(self) -> list[str]:
        """Warnings about the input: skipped tensors, files not read, replicas that differ."""
        return skipped_warnings(self.skipped) + list(self.notes)

    def warnings(self) -> list[str]:
        """Human-readable warnings: :meth:`input_warnings`, then :meth:`nonfinite_warnings`."""
        return self.input_warnings() + self.nonfinite_warnings()

    def nonfinite_warnings(self) -> list[str]:
        """Warnings about NaN/Inf values and a clip they make non-finite or zero."""
        out: list[str] = []
        t = self.total
        if t.nonfinite:
            out.append(f"{t.nan} NaN and {t.inf} infinite gradient values: the global norm is {_fmt(t.norm)}")
        if math.isnan(self.clip.coef):
            out.append("the clip coefficient is NaN: clipping would turn every gradient into NaN")
        elif t.nonfinite and self.clip.coef == 0.0:
            out.append("the clip coefficient is 0: clipping would zero every gradient")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": NORMS_SCHEMA,
            "sources": list(self.sources),
            "norm_type": norm_type_label(self.norm_type),
            "group_by": self.group_by,
            "group_sep": self.group_sep,
            "shards": self.shards,
            "dedup": self.dedup,
            "tensors": [t.to_dict() for t in self.tensors],
            "omitted": self.omitted,
            "skipped": [s.to_dict() for s in self.skipped],
            "total": self.total.to_dict(),
            "clip": self.clip.to_dict(),
            "metadata": {k: dict(v) for k, v in self.metadata.items()},
            "loss_scale": self.loss_scale,
        }


def _fmt(x: float) -> str:
    """A number for a message: six significant digits, ``NaN``, ``inf``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def norm_label(p: float) -> str:
    """``L1``, ``L2``, ``L∞`` or ``L3.5``."""
    if math.isinf(p):
        return "L∞"
    return f"L{int(p)}" if p in (1.0, 2.0) else f"L{p:g}"


# --- gradinspect check ---------------------------------------------------------

CHECK_SCHEMA = "gradinspect.check/1"


@dataclass(frozen=True)
class Finding:
    """One failed rule: globally (``tensor`` None) or for one tensor."""

    rule: str
    tensor: str | None
    value: float
    limit: float
    message: str

    to_dict = _fields_dict(("rule", "tensor", "value", "limit", "message"))


@dataclass(frozen=True)
class CheckReport:
    """The result of ``gradinspect check``: ``ok`` exactly when there is no finding."""

    kind: ClassVar[str] = "check"

    rules: tuple[str, ...]
    findings: tuple[Finding, ...]
    report: NormsReport

    @property
    def ok(self) -> bool:
        return not self.findings

    def failed_rules(self) -> list[str]:
        return list(dict.fromkeys(f.rule for f in self.findings))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "ok": self.ok,
            "rules": list(self.rules),
            "findings": [f.to_dict() for f in self.findings],
            "report": self.report.to_dict(),
        }


# --- gradinspect diff ----------------------------------------------------------

DIFF_SCHEMA = "gradinspect.diff/1"


@dataclass(frozen=True, kw_only=True)
class DiffRow:
    """A tensor present in both sets with the same shape, or the global total (``name`` None): :meth:`from_pair`."""

    #: The JSON keys of a tensor's row, in order (the total has the numbers only); the CSV columns derive from them.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "name", "shape", "dtype_a", "dtype_b", "numel", "l2_a", "l2_b", "l2_diff", "rel", "cosine", "linf_diff", "ok")
    TOTAL_FIELDS: ClassVar[tuple[str, ...]] = ("numel", "l2_a", "l2_b", "l2_diff", "rel", "cosine", "linf_diff")

    name: str | None
    shape: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    numel: int
    l2_a: float
    l2_b: float
    l2_diff: float
    rel: float
    cosine: float
    linf_diff: float
    ok: bool | None = None  # None: no tolerance was given

    @classmethod
    def from_pair(cls, ps: Any, **row: Any) -> DiffRow:
        """The row of a :class:`~gradinspect.diff.PairStats`; ``row`` gives name, shape, dtypes and ok."""
        return cls(numel=ps.a.numel, l2_a=ps.a.l2, l2_b=ps.b.l2, l2_diff=ps.d.l2, rel=ps.rel, cosine=ps.cosine,
                   linf_diff=ps.d.linf, **row)

    _row_dict = _fields_dict(FIELDS)
    _total_dict = _fields_dict(TOTAL_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return self._row_dict() if self.name is not None else self._total_dict()


@dataclass(frozen=True)
class Mismatch:
    """A name in both sets whose tensors cannot be compared element by element."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    reason: str = "shapes differ"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "reason": self.reason}


@dataclass(frozen=True)
class Tolerances:
    rtol: float | None = None
    atol: float | None = None
    min_cosine: float | None = None
    allow_missing: bool = False

    @property
    def any(self) -> bool:
        return self.rtol is not None or self.atol is not None or self.min_cosine is not None

    to_dict = _fields_dict(("rtol", "atol", "min_cosine", "allow_missing"))


@dataclass(frozen=True)
class DiffReport:
    """The result of ``gradinspect diff A B``; rows sorted by ``rel``, worst first."""

    kind: ClassVar[str] = "diff"

    a: tuple[str, ...]
    b: tuple[str, ...]
    tensors: tuple[DiffRow, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    mismatched: tuple[Mismatch, ...]
    total: DiffRow
    tolerances: Tolerances
    skipped: tuple[Skipped, ...] = ()
    notes: tuple[str, ...] = ()  # warnings about the input (e.g. files a directory holds but that are not read)

    @property
    def failed(self) -> tuple[DiffRow, ...]:
        return tuple(t for t in self.tensors if t.ok is False)

    @property
    def ok(self) -> bool:
        """True exactly when ``gradinspect diff`` exits 0 (with a tolerance, nothing compared fails)."""
        if not self.tolerances.any:
            return True
        if not self.tensors:
            return False
        sets_differ = bool(self.only_a or self.only_b or self.mismatched)
        return not self.failed and (self.tolerances.allow_missing or not sets_differ)

    def warnings(self) -> list[str]:
        """Human-readable warnings: the input's (files not read, skipped tensors), and a comparison of nothing."""
        out = [*self.notes, *skipped_warnings(self.skipped)]
        if not self.tensors:
            if self.mismatched or self.skipped:
                out.append("no tensor in both A and B can be compared element by element: nothing was compared")
            else:
                out.append("no tensor is in both A and B: nothing was compared (different name prefixes? "
                           "see --strip-prefix)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DIFF_SCHEMA,
            "ok": self.ok,
            "a": list(self.a),
            "b": list(self.b),
            "tolerances": self.tolerances.to_dict(),
            "tensors": [t.to_dict() for t in self.tensors],
            "only_a": list(self.only_a),
            "only_b": list(self.only_b),
            "mismatched": [m.to_dict() for m in self.mismatched],
            "skipped": [s.to_dict() for s in self.skipped],
            # nothing compared: the global numbers were not computed (null, never a cosine of 1)
            "total": self.total.to_dict() if self.tensors else {
                k: (None if isinstance(v, float) else v) for k, v in self.total.to_dict().items()},
        }


# --- gradinspect info ----------------------------------------------------------

INFO_SCHEMA = "gradinspect.info/1"


@dataclass(frozen=True, kw_only=True)
class InfoTensor:
    FIELDS: ClassVar[tuple[str, ...]] = ("name", "source", "dtype", "shape", "numel", "bytes", "chunks")

    name: str
    source: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    bytes: int
    chunks: int = 1  # the pieces it is stored in (a distributed checkpoint's chunks); shape is the whole tensor's

    to_dict = _fields_dict(FIELDS)


@dataclass(frozen=True)
class InfoTotals:
    """Counts over every tensor of an :class:`InfoReport`, and per dtype."""

    tensors: int
    numel: int
    bytes: int
    by_dtype: Mapping[str, Mapping[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "numel": self.numel, "bytes": self.bytes,
                "by_dtype": {k: dict(v) for k, v in self.by_dtype.items()}}


@dataclass(frozen=True)
class InfoReport:
    """A header-only listing of every tensor in the sources, in file order."""

    kind: ClassVar[str] = "info"

    sources: tuple[str, ...]
    tensors: tuple[InfoTensor, ...]
    metadata: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # warnings about the input (e.g. files a directory holds but that are not read)

    def by_dtype(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            d = out.setdefault(t.dtype, {"tensors": 0, "numel": 0, "bytes": 0})
            d["tensors"] += 1
            d["numel"] += t.numel
            d["bytes"] += t.bytes
        return out

    @property
    def total(self) -> InfoTotals:
        """What the JSON's ``total`` holds."""
        return InfoTotals(tensors=len(self.tensors), numel=sum(t.numel for t in self.tensors),
                          bytes=sum(t.bytes for t in self.tensors), by_dtype=self.by_dtype())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": INFO_SCHEMA,
            "sources": list(self.sources),
            "tensors": [t.to_dict() for t in self.tensors],
            "metadata": {k: dict(v) for k, v in self.metadata.items()},
            "total": self.total.to_dict(),
        }
