"""Number spelling and the summary lines shared by the human-facing formats."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ..clip import DEFAULT_EPS
from ..norms import general_p
from ..report import norm_label as norm_label  # re-exported for the formats

_EIGHTHS = " ▏▎▍▌▋▊▉█"


def num(x: float, digits: int = 3) -> str:
    """A compact number: ``0.0123``, ``1.23e-05``, ``NaN``, ``inf``."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if digits <= 4 and 1e3 <= abs(x) < 1e5:
        return f"{x:.0f}"
    text = f"{x:.{digits}g}"
    if "e" in text:  # 1.23e-05 -> 1.23e-5
        mant, exp = text.split("e")
        text = f"{mant}e{int(exp)}"
    return text


def percent(share: float) -> str:
    if math.isnan(share):
        return "NaN"
    if 0 < share < 0.0005:
        return "<0.1%"
    return f"{share * 100:.1f}%"


def bar(share: float, width: int) -> str:
    """A bar of ``width`` cells, in eighths of a cell."""
    if not math.isfinite(share) or share <= 0:
        return " " * width
    eighths = min(width * 8, max(1, round(share * width * 8)))
    full, part = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[part] if part else "")).ljust(width)


def shape(s: tuple[int, ...] | None) -> str:
    if s is None:
        return "-"
    return "×".join(map(str, s)) if s else "scalar"


def nonfinite(row: Any) -> str:
    """``NaN/inf`` counts, blank for a finite row."""
    return f"{row.nan}/{row.inf}" if row.nonfinite else ""


def middle_elide(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, an ellipsis standing for the cut.

    The cut is near the middle but avoids digits where it can, so
    ``model.layers.12.self_attn.q_proj.weight`` keeps its layer number.
    """
    if len(text) <= width:
        return text
    if width <= 2:
        return text[:width - 1] + "…" if width == 2 else "…"[:width]
    cut = len(text) - (width - 1)
    start = min(range(1, len(text) - cut), key=_cut_key(text, cut))
    return text[:start] + "…" + text[start + cut:]


def _cut_key(text: str, cut: int) -> Callable[[int], tuple[int, float]]:
    """How good a cut of ``cut`` characters from ``start`` is: digits lost, then distance from the middle."""
    digits = [0]
    for ch in text:
        digits.append(digits[-1] + ch.isdigit())
    middle = len(text) / 2
    return lambda i: (digits[i + cut] - digits[i], abs(i + cut / 2 - middle))


def elide_names(names: Sequence[str], width: int) -> list[str]:
    """Each of ``names`` in at most ``width`` characters, elided so that distinct names stay distinct.

    A name is cut as :func:`middle_elide` does unless the result, ``head…tail``,
    could stand for another of ``names`` as well (another name starts with head
    and ends with tail: ``transformer.h.0…c_proj.weight`` for both
    ``…attn.c_proj…`` and ``…mlp.c_proj…``); then the best cut that tells it
    apart wins (``transformer.h.0.a…proj.weight``).  When no cut at this width
    does, the best one that at least shows differently from the other rows is taken.
    """
    out = [middle_elide(n, width) for n in names]
    if width <= 2 or not any(len(n) > width for n in names):
        return out
    # An elided name shows width - 1 characters: a head of i, a tail of width - 1 - i.
    # For each i, how many distinct names (of at least width characters) show each (head, tail).
    candidates = [n for n in set(names) if len(n) >= width]
    patterns: dict[int, Counter[tuple[str, str]]] = {}

    def alone(name: str, i: int, cut: int) -> bool:
        seen = patterns.get(i)
        if seen is None:
            k = width - 1 - i
            seen = patterns[i] = Counter((o[:i], o[len(o) - k:]) for o in candidates)
        return seen[name[:i], name[i + cut:]] == 1

    shown = Counter(out)
    for j, name in enumerate(names):
        if len(name) <= width:
            continue
        cut = len(name) - (width - 1)
        key = _cut_key(name, cut)
        starts = range(1, len(name) - cut)
        best = min(starts, key=key)  # middle_elide's cut
        if alone(name, best, cut):
            continue
        ranked = sorted(starts, key=key)
        pick = next((i for i in ranked if alone(name, i, cut)), None)
        if pick is None:  # the best cut that no other row shows
            texts = {i: name[:i] + "…" + name[i + cut:] for i in ranked}
            pick = next((i for i in ranked if shown[texts[i]] == (texts[i] == out[j])), best)
        text = name[:pick] + "…" + name[pick + cut:]
        shown[out[j]] -= 1
        shown[text] += 1
        out[j] = text
    return out


def summary(report: Any) -> list[tuple[str, str]]:
    """(label, value) lines below the table."""
    t, c = report.total, report.clip
    shown = len(report.tensors)
    rows_word = "groups" if report.group_by else "tensors"
    tensors = f"{t.tensors:,}"
    if report.group_by:
        how = f"--group-by {report.group_by}" if report.group_sep == "." else \
            f"--group-by {report.group_by} --sep {report.group_sep}"
        tensors += f" in {shown + report.omitted:,} groups ({how})"
    if report.omitted:
        tensors += f", {shown:,} {rows_word} shown (--top)"
    if report.skipped:
        tensors += f"; {len(report.skipped)} skipped (not floating point)"
    lines = [
        ("files", f"{len(report.sources)}"),
        ("tensors", tensors),
        ("elements", f"{t.numel:,}"),
    ]
    if report.loss_scale is not None:
        s = f"{report.loss_scale:g}"
        s = s if float(s) == report.loss_scale else repr(report.loss_scale)
        where = "from metadata" if report.loss_scale_from == "metadata" else "--loss-scale"
        lines.append(("loss scale", f"{s} removed ({where})"))
    lines += [
        ("global L2", num(t.l2, 8)),
        ("global L1", num(t.l1, 8)),
        ("global L∞", num(t.linf, 8)),
    ]
    p = report.norm_type
    if general_p(p):
        lines.append((f"global {norm_label(p)}", num(t.norm, 8)))
    if t.nonfinite:
        lines.append(("non-finite", f"{t.nan:,} NaN, {t.inf:,} inf"))
    by = "" if p == 2.0 else f" (of the {norm_label(p)} norm)"
    lines += [
        ("max_norm", num(c.max_norm, 8)),
        ("clip coef", num(c.coef, 8) + by + (f", eps {num(c.eps)}" if c.eps != DEFAULT_EPS else "")),
        ("clipped", "yes" if c.clipped else "no"),
        ("norm after clip", num(c.norm_after, 8)),
    ]
    return lines


def size(nbytes: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``28.0 GiB``."""
    x = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError  # unreachable


def dtypes(a: str | None, b: str | None) -> str:
    return a or "" if a == b else f"{a}/{b}"


def diff_summary(report: Any) -> list[tuple[str, str]]:
    t, tol = report.total, report.tolerances
    lines = [
        ("compared", f"{len(report.tensors):,} tensors, {t.numel:,} elements"),
        ("global L2 A / B", f"{num(t.l2_a, 8)} / {num(t.l2_b, 8)}"),
        ("global L2 of A−B", num(t.l2_diff, 8)),
        ("relative diff", num(t.rel, 6)),
        ("cosine", num(t.cosine, 10)),
        ("max |A−B|", num(t.linf_diff, 6)),
    ] if report.tensors else [("compared", "nothing compared")]
    if report.only_a:
        lines.append(("only in A", _names(report.only_a)))
    if report.only_b:
        lines.append(("only in B", _names(report.only_b)))
    for m in report.mismatched:
        if m.reason == "shapes differ":
            lines.append(("shape differs", f"{m.name}: {shape(m.shape_a)} vs {shape(m.shape_b)}"))
        else:
            lines.append(("not compared", f"{m.name}: {m.reason} ({m.dtype_a} vs {m.dtype_b})"))
    if tol.any:
        parts = []
        if tol.rtol is not None or tol.atol is not None:
            parts.append(f"l2_diff <= {num(tol.atol or 0.0)} + {num(tol.rtol or 0.0)}·max(l2_a, l2_b)")
        if tol.min_cosine is not None:
            parts.append(f"cosine >= {num(tol.min_cosine, 8)}")
        lines.append(("tolerance", " and ".join(parts)))
        n = len(report.failed)
        verdict = "ok" if report.ok else f"FAIL: {n} tensor{'s' if n != 1 else ''} outside tolerance"
        if not report.tensors:
            verdict = "FAIL: nothing was compared"
        elif not report.ok and not report.failed:
            verdict = "FAIL: the tensor sets or shapes differ"
        elif not report.ok and (report.only_a or report.only_b or report.mismatched) and not tol.allow_missing:
            verdict += "; the tensor sets or shapes differ"
        lines.append(("verdict", verdict))
    return lines


def _names(names: tuple[str, ...], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def shard_columns(report: Any) -> list[tuple[str, Any]]:
    """(header, cell function) of the columns that --shards adds to a norms table."""
    if report.shards == "slices":
        return [("pieces", lambda r: str(r.pieces))]
    if report.shards == "replicas":
        return [("copies", lambda r: str(r.pieces)),
                ("max Δ", lambda r: "" if r.replica_max_diff is None else num(r.replica_max_diff))]
    return []
