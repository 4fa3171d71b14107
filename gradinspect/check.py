"""Rules that gate a gradient dump in CI.  Pure: a NormsReport in, findings out."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .report import CheckReport, Finding, NormsReport
from .report import _fmt as _g
from .report import norm_label as _label

__all__ = ["Rules", "evaluate", "RULE_IDS"]

RULE_IDS = ("nonfinite", "max_total", "min_total", "clip", "max_share", "zero", "max_tensor_norm", "replicas_differ")


@dataclass(frozen=True)
class Rules:
    """Which rules apply, and their limits (None: the rule is off).

    ``replicas_differ`` is on whenever the report was made with ``shards="replicas"``:
    copies of a tensor fail when their largest |difference| > ``max_replica_diff``
    (a NaN difference, from NaN/Inf in a copy, always fails: here when the
    ``nonfinite`` rule, which reports such tensors already, is off).
    """

    nonfinite: bool = True
    max_total: float | None = None
    min_total: float | None = None
    fail_on_clip: bool = False
    max_share: float | None = None
    fail_on_zero: bool = False
    max_tensor_norm: float | None = None
    max_replica_diff: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"{f.name} must be a number, not NaN")
        if self.max_share is not None and not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"max_share must be between 0 and 1, not {self.max_share}")
        if not self.max_replica_diff >= 0.0:
            raise ValueError(f"max_replica_diff must be >= 0, not {self.max_replica_diff}")

    def enabled(self, shards: str | None = None) -> tuple[str, ...]:
        """The rules that apply to a report made with ``shards``."""
        on = {
            "nonfinite": self.nonfinite,
            "max_total": self.max_total is not None,
            "min_total": self.min_total is not None,
            "clip": self.fail_on_clip,
            "max_share": self.max_share is not None,
            "zero": self.fail_on_zero,
            "max_tensor_norm": self.max_tensor_norm is not None,
            "replicas_differ": shards == "replicas",
        }
        return tuple(r for r in RULE_IDS if on[r])


def evaluate(report: NormsReport, rules: Rules) -> CheckReport:
    """Every finding of ``rules`` on ``report`` (which must list every tensor: no ``top``)."""
    if report.omitted or report.group_by:
        raise ValueError("check needs a report of every tensor (no top, no group_by)")
    out: list[Finding] = []
    norm = report.total.norm
    label = _label(report.norm_type)

    def add(rule: str, tensor: str | None, value: float, limit: float, message: str) -> None:
        out.append(Finding(rule, tensor, value, limit, message))

    if rules.nonfinite:
        for t in report.tensors:
            if t.nonfinite:
                add("nonfinite", t.name, float(t.nonfinite), 0.0, f"{t.name}: {t.nan} NaN and {t.inf} inf values")
    # "not (x <= limit)" so that a NaN norm fails the limits too.
    if rules.max_total is not None and not norm <= rules.max_total:
        add("max_total", None, norm, rules.max_total, f"global {label} {_g(norm)} > {_g(rules.max_total)}")
    if rules.min_total is not None and not norm >= rules.min_total:
        add("min_total", None, norm, rules.min_total, f"global {label} {_g(norm)} < {_g(rules.min_total)}")
    if rules.fail_on_clip:
        c = report.clip
        if not c.coef >= 1.0:
            add("clip", None, c.coef, 1.0,
                f"clipping at max_norm {_g(c.max_norm)} scales gradients by {_g(c.coef)} (global {label} {_g(norm)})")
    if rules.max_share is not None:
        for t in report.tensors:
            if t.share > rules.max_share:  # NaN shares belong to the nonfinite rule
                add("max_share", t.name, t.share, rules.max_share,
                    f"{t.name} holds {t.share:.1%} of the squared L2 norm > {rules.max_share:.1%}")
    if rules.fail_on_zero:
        for t in report.tensors:
            if t.all_zero:
                add("zero", t.name, 0.0, 0.0, f"{t.name}: gradient is all zeros ({t.numel:,} elements)")
    if rules.max_tensor_norm is not None:
        for t in report.tensors:
            if not t.norm <= rules.max_tensor_norm:
                add("max_tensor_norm", t.name, t.norm, rules.max_tensor_norm,
                    f"{t.name}: {label} {_g(t.norm)} > {_g(rules.max_tensor_norm)}")
    if report.shards == "replicas":
        tol = rules.max_replica_diff
        for t in report.tensors:
            d = t.replica_max_diff
            if d is None or d <= tol or (math.isnan(d) and rules.nonfinite):  # NaN: a nonfinite finding
                continue
            what = ("copies hold NaN/inf values: their difference is undefined" if math.isnan(d)
                    else f"the {t.pieces} copies differ by up to {_g(d)} > {_g(tol)}")
            add("replicas_differ", t.name, d, tol, f"{t.name}: {what}")
    return CheckReport(rules.enabled(report.shards), tuple(out), report)


def rules_from(values: dict[str, Any]) -> Rules:
    """Rules from option-style names (``allow_nonfinite``, ``max_total``, ...)."""
    return Rules(
        nonfinite=not values.get("allow_nonfinite", False),
        max_total=values.get("max_total"),
        min_total=values.get("min_total"),
        fail_on_clip=bool(values.get("fail_on_clip", False)),
        max_share=values.get("max_share"),
        fail_on_zero=bool(values.get("fail_on_zero", False)),
        max_tensor_norm=values.get("max_tensor_norm"),
        max_replica_diff=values.get("max_replica_diff") or 0.0,
    )
