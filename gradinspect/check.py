"""Rules that gate a gradient dump in CI.  Pure: a NormsReport in, findings out.

Each rule is one :class:`Rule` entry in :data:`RULES`: its id, the option that
turns it on or sets its limit (the command line's option and the config file's
key, from the same :class:`~gradinspect.options.Option`), the value that leaves
it at its default, how it finds failures and how it words them.  :class:`Rules`,
:meth:`Rules.enabled`, :func:`evaluate`, :func:`rules_from`, ``gradinspect check``'s
options and ``[tool.gradinspect.check]`` keys all come from that table: adding a
rule is adding one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any

from . import options as o
from .options import Option, Range

if TYPE_CHECKING:  # imported when used: the CLI reads RULES for --help without numpy
    from .report import CheckReport, NormsReport, TensorNorms


def _g(x: float) -> str:
    from .report import _fmt

    return _fmt(x)


def _label(p: float) -> str:
    from .report import norm_label

    return norm_label(p)

__all__ = ["Rule", "RULES", "Rules", "evaluate", "rules_from", "RULE_IDS", "COMMAND_OPTIONS"]


@dataclass(frozen=True)
class Hit:
    """A failure a rule found: globally (``tensor`` None) or for one tensor row."""

    tensor: TensorNorms | None
    value: float
    limit: float


def _is_on(value: Any, shards: str | None) -> bool:
    return value is not None and value is not False


@dataclass(frozen=True)
class Rule:
    """One check rule.

    ``field`` is its :class:`Rules` keyword (default: the option's name);
    ``invert``: the option turns the rule off (``--allow-nonfinite``).
    ``evaluate(report, value, rules)`` yields :class:`Hit` objects and
    ``message(hit, report, value)`` words each one.  ``on(value, shards)``:
    whether the rule applies (default: its value is neither None nor False).
    """

    name: str
    option: Option
    default: Any
    evaluate: Callable[[NormsReport, Any, Any], Iterable[Hit]]
    message: Callable[[Hit, NormsReport, Any], str]
    field: str = ""
    invert: bool = False
    on: Callable[[Any, str | None], bool] = _is_on

    @property
    def key(self) -> str:
        return self.field or self.option.name

    def value_from(self, option_value: Any) -> Any:
        """The :class:`Rules` value for the option's value (None: not given)."""
        if option_value is None:
            return self.default
        return (not option_value) if self.invert else option_value


def _tensors(pred: Callable[[TensorNorms, Any], bool], value: Callable[[TensorNorms], float],
             limit: Callable[[Any], float] = float) -> Callable[[NormsReport, Any, Any], Iterable[Hit]]:
    """An evaluate() yielding every tensor row for which ``pred(row, rule value)`` holds."""
    return lambda report, v, rules: (Hit(t, value(t), limit(v)) for t in report.tensors if pred(t, v))


def _total(fails: Callable[[float, float], bool]) -> Callable[[NormsReport, Any, Any], Iterable[Hit]]:
    def evaluate(report: NormsReport, limit: Any, rules: Any) -> Iterable[Hit]:
        norm = report.total.norm
        return [Hit(None, norm, limit)] if fails(norm, limit) else []

    return evaluate


def _clip(report: NormsReport, v: Any, rules: Any) -> Iterable[Hit]:
    return [Hit(None, report.clip.coef, 1.0)] if not report.clip.coef >= 1.0 else []


def _replicas(report: NormsReport, v: Any, rules: Any) -> Iterable[Hit]:
    tol = rules.max_replica_diff
    for t in report.tensors:
        d = t.replica_max_diff
        if d is None or d <= tol or (math.isnan(d) and rules.nonfinite):  # NaN: a nonfinite finding
            continue
        yield Hit(t, d, tol)


def _replica_message(h: Hit, report: NormsReport, v: Any) -> str:
    t = h.tensor
    assert t is not None
    what = ("copies hold NaN/inf values: their difference is undefined" if math.isnan(h.value)
            else f"the {t.pieces} copies differ by up to {_g(h.value)} > {_g(h.limit)}")
    return f"{t.name}: {what}"


def _of_tensor(say: Callable[[TensorNorms, Hit, NormsReport], str]) -> Callable[[Hit, NormsReport, Any], str]:
    """The message of a per-tensor rule's hit (whose ``tensor`` is set)."""
    def message(h: Hit, report: NormsReport, v: Any) -> str:
        assert h.tensor is not None
        return say(h.tensor, h, report)

    return message


def _number(name: str, metavar: str, help: str, rng: Range = o.FINITE) -> Option:
    return Option(name, ("--" + name.replace("_", "-"),), "float", None, help, metavar=metavar, range=rng, config=True)


def _flag(name: str, help: str) -> Option:
    flag = name.replace("_", "-")
    return Option(name, (f"--{flag}/--no-{flag}",), "bool", False, help, config=True)


def _n(report: NormsReport) -> str:
    return _label(report.norm_type)


# "not (x <= limit)" so that a NaN norm fails the limits too.
RULES: tuple[Rule, ...] = (
    Rule("nonfinite", _flag("allow_nonfinite", "Turn off the nonfinite rule (NaN/Inf in a tensor)."), True,
         _tensors(lambda t, v: bool(t.nonfinite), lambda t: float(t.nonfinite), lambda v: 0.0),
         _of_tensor(lambda t, h, r: f"{t.name}: {t.nan} NaN and {t.inf} inf values"),
         field="nonfinite", invert=True),
    Rule("max_total", _number("max_total", "X", "Fail when the global norm > X."), None,
         _total(lambda norm, limit: not norm <= limit),
         lambda h, r, v: f"global {_n(r)} {_g(h.value)} > {_g(h.limit)}"),
    Rule("min_total",
         _number("min_total", "X", "Fail when the global norm < X (vanishing gradients, a detached loss)."),
         None, _total(lambda norm, limit: not norm >= limit),
         lambda h, r, v: f"global {_n(r)} {_g(h.value)} < {_g(h.limit)}"),
    Rule("clip", _flag("fail_on_clip", "Fail when clipping at --max-norm would scale the gradients."), False, _clip,
         lambda h, r, v: f"clipping at max_norm {_g(r.clip.max_norm)} scales gradients by {_g(r.clip.coef)} "
                         f"(global {_n(r)} {_g(r.total.norm)})"),
    Rule("max_share", _number("max_share", "F", "Fail when a tensor holds more than F (0..1) of the squared L2 norm.",
                              o.SHARE), None,
         _tensors(lambda t, v: t.share > v, lambda t: t.share),  # NaN shares belong to the nonfinite rule
         _of_tensor(lambda t, h, r: f"{t.name} holds {h.value:.1%} of the squared L2 norm > {h.limit:.1%}")),
    Rule("zero", _flag("fail_on_zero", "Fail when a tensor's gradient is all zeros (frozen or disconnected)."), False,
         _tensors(lambda t, v: t.all_zero, lambda t: 0.0, lambda v: 0.0),
         _of_tensor(lambda t, h, r: f"{t.name}: gradient is all zeros ({t.numel:,} elements)")),
    Rule("max_tensor_norm", _number("max_tensor_norm", "X", "Fail when a tensor's norm > X."), None,
         _tensors(lambda t, v: not t.norm <= v, lambda t: t.norm),
         _of_tensor(lambda t, h, r: f"{t.name}: {_n(r)} {_g(h.value)} > {_g(h.limit)}")),
    Rule("replicas_differ", _number(
        "max_replica_diff", "X",
        "With --shards replicas (rule replicas_differ, on with it): tolerate copies of a tensor that "
        "differ by max |difference| <= X (default 0: copies must be identical; NaN/Inf in a copy always fails).",
        o.NON_NEGATIVE), 0.0, _replicas, _replica_message, on=lambda v, shards: shards == "replicas"),
)

RULE_IDS = tuple(r.name for r in RULES)

#: ``gradinspect check``'s options, in --help order; those marked ``config`` are the config file's keys.
COMMAND_OPTIONS: tuple[Option, ...] = (*o.NORM_OPTIONS, *o.SELECTION_OPTIONS, *(r.option for r in RULES))
#: The options after --config in ``gradinspect check --help`` (format first: see ``cli.py``).
COMMAND_OPTIONS_AFTER: tuple[Option, ...] = (o.SHARDS, o.DEDUP, o.LOSS_SCALE, o.JOBS, o.SCHEDULER, o.QUIET,
                                             o.ALLOW_OUTSIDE_INDEX, o.VOID_AS)


def _post_init(self: Any) -> None:
    for r in RULES:
        v = getattr(self, r.key)
        if r.option.kind == "float" and v is not None:
            (r.option.range or o.FINITE).check(r.key, v)


def _enabled(self: Any, shards: str | None = None) -> tuple[str, ...]:
    """The rules that apply to a report made with ``shards``."""
    return tuple(r.name for r in RULES if r.on(getattr(self, r.key), shards))


Rules = make_dataclass(
    "Rules", [(r.key, Any, field(default=r.default)) for r in RULES], frozen=True,
    namespace={"__post_init__": _post_init, "enabled": _enabled, "__module__": __name__, "__doc__": (
        "Which rules apply, and their limits (None: the rule is off); one keyword per :data:`RULES` entry.\n\n"
        "``replicas_differ`` is on whenever the report was made with ``shards=\"replicas\"``: copies of a tensor "
        "fail when their largest |difference| > ``max_replica_diff`` (a NaN difference, from NaN/Inf in a copy, "
        "always fails: here when the ``nonfinite`` rule, which reports such tensors already, is off).")})


def evaluate(report: NormsReport, rules: Any) -> CheckReport:
    """Every finding of ``rules`` on ``report`` (which must list every tensor: no ``top``)."""
    from .report import CheckReport, Finding

    if report.omitted or report.group_by:
        raise ValueError("check needs a report of every tensor (no top, no group_by)")
    out: list[Finding] = []
    for r in RULES:
        v = getattr(rules, r.key)
        if not r.on(v, report.shards):
            continue
        for h in r.evaluate(report, v, rules):
            out.append(Finding(r.name, None if h.tensor is None else h.tensor.name, h.value, h.limit,
                               r.message(h, report, v)))
    return CheckReport(rules.enabled(report.shards), tuple(out), report)


def rules_from(values: dict[str, Any]) -> Any:
    """Rules from option-style names (``allow_nonfinite``, ``max_total``, ...)."""
    return Rules(**{r.key: r.value_from(values.get(r.option.name)) for r in RULES})
