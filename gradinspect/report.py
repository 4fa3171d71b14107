"""What gradinspect reports: frozen dataclasses, and the one place the JSON shape is defined.

``to_dict()`` returns plain Python values (floats may be NaN or infinite);
``gradinspect.formats.json`` writes non-finite floats as strings so the output
is strict JSON.  Adding a field keeps a schema's version; renaming, removing
or changing the meaning of one bumps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .norms import norm_type_label

__all__ = ["TensorNorms", "Skipped", "Totals", "Clip", "NormsReport", "NORMS_SCHEMA"]

NORMS_SCHEMA = "gradinspect.norms/1"


@dataclass(frozen=True)
class TensorNorms:
    """One row: a tensor, or with ``group_by`` a group of tensors (``members`` > 1 possible)."""

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
    members: int = 1

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def all_zero(self) -> bool:
        return self.numel > 0 and self.linf == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "shape": None if self.shape is None else list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
            "l1": self.l1,
            "l2": self.l2,
            "linf": self.linf,
            "norm": self.norm,
            "sq": self.sq,
            "share": self.share,
            "nonfinite": self.nonfinite,
            "nan": self.nan,
            "inf": self.inf,
            "members": self.members,
        }


@dataclass(frozen=True)
class Skipped:
    """A tensor left out of every total, and why (e.g. an integer step counter)."""

    name: str
    source: str
    dtype: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "dtype": self.dtype, "reason": self.reason}


@dataclass(frozen=True)
class Totals:
    """Statistics of every selected tensor taken as one vector."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "numel": self.numel,
            "l1": self.l1,
            "l2": self.l2,
            "linf": self.linf,
            "norm": self.norm,
            "sq": self.sq,
            "nonfinite": self.nonfinite,
            "nan": self.nan,
            "inf": self.inf,
        }


@dataclass(frozen=True)
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

    sources: tuple[str, ...]
    norm_type: float
    tensors: tuple[TensorNorms, ...]
    skipped: tuple[Skipped, ...]
    total: Totals
    clip: Clip
    metadata: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    omitted: int = 0
    group_by: int | None = None

    @property
    def nonfinite_rows(self) -> tuple[TensorNorms, ...]:
        return tuple(t for t in self.tensors if t.nonfinite)

    def warnings(self) -> list[str]:
        """Human-readable warnings: skipped tensors, non-finite values, a non-finite clip."""
        out = [f"skipped {s.name} ({s.source}): {s.reason}" for s in self.skipped]
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
            "tensors": [t.to_dict() for t in self.tensors],
            "omitted": self.omitted,
            "skipped": [s.to_dict() for s in self.skipped],
            "total": self.total.to_dict(),
            "clip": self.clip.to_dict(),
            "metadata": {k: dict(v) for k, v in self.metadata.items()},
        }


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return f"{x:.6g}"
