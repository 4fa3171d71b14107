"""``gradinspect trend`` input: PATHs to numbered steps, each computed exactly as ``norms`` (issue 9 §1, §2).

Each PATH is one step (a file, or a directory or ``*.index.json`` whose files
are one gradient set, per-rank shards with ``shards``), or a quoted glob whose
matches are each a step.  A step's number is ``step_pattern``'s one group
searched in the final path component of the step's PATH (or match), when
given; else the integer safetensors metadata key ``step`` (the files of one
step that carry it must agree); else the last integer in that final path
component.  Steps are sorted by number; a number twice is an error naming
both PATHs.  Every step goes through :func:`gradinspect.api.inspect`
(``sort="none"``, every row), so its numbers are those of ``gradinspect norms``
on that step alone.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .clip import DEFAULT_EPS
from .errors import InputError
from .norms import Stats, combine, general_p
from .report import TensorNorms
from .trend import DEFAULT_CLIP_TARGET, DEFAULT_SPIKE_FACTOR, DEFAULT_WINDOW, StepResult, TrendReport, analyze

__all__ = ["StepPath", "compile_step_pattern", "find_steps", "regroup", "trend", "step_warnings", "files_state"]

_INT = re.compile(r"[0-9]+")
_MAX_STEP = 2**63 - 1  # steps are kept as int64


def _step(text: str, where: str, what: str) -> int:
    """A step number: ASCII digits, at most 2**63 - 1."""
    if not text.isascii() or not text.isdigit() or int(text) > _MAX_STEP:
        raise InputError(where, f"{what} {text[:40]!r} is not a step number (a whole number from 0 to 2**63 - 1)")
    return int(text)


@dataclass(frozen=True)
class StepPath:
    """One step: its number and the PATH (or glob match) that is its gradient set."""

    step: int
    path: str


def compile_step_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """``--step-pattern`` checked: a regular expression with exactly one group (ValueError otherwise)."""
    if pattern is None:
        return None
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"step pattern {pattern!r} is not a valid regular expression ({e})") from None
    if rx.groups != 1:
        raise ValueError(f"step pattern {pattern!r} must have exactly one group (it has {rx.groups})")
    return rx


def _final(path: str) -> str:
    """The final path component, also of ``dir/`` and ``dir/.``."""
    return os.path.basename(os.path.normpath(path))


def _number(path: str, pattern: re.Pattern[str] | None, allow_outside_index: bool) -> int:
    name = _final(path)
    if pattern is not None:
        m = pattern.search(name)
        if m is None or m.group(1) is None:
            raise InputError(path, f"--step-pattern {pattern.pattern} does not match {name!r}")
        return _step(m.group(1), path, f"--step-pattern {pattern.pattern} captures in {name!r}")
    from .api import info

    headers = info(path, allow_outside_index=allow_outside_index)
    meta = headers.metadata
    first: tuple[str, int] | None = None
    without = [src for src in headers.sources if "step" not in meta.get(src, {})]
    for src, md in meta.items():
        text = md.get("step")
        if text is None:
            continue
        value = _step(text, src, "metadata step (--step-pattern overrides it)")
        if without:
            raise InputError(without[0], f"has no metadata step, but {src} says step {value} "
                             "(the files of one step must agree)")
        if first is None:
            first = (src, value)
        elif value != first[1]:
            raise InputError(src, f"metadata step {value} differs from step {first[1]} in {first[0]} "
                             "(the files of one step must agree)")
    if first is not None:
        return first[1]
    found = _INT.findall(name)
    if not found:
        raise InputError(path, f"no step number: no metadata step and no integer in {name!r} (give --step-pattern)")
    return _step(found[-1], path, f"the last integer in {name!r}")


def find_steps(paths: Iterable[str | os.PathLike[str]], step_pattern: str | None = None,
               allow_outside_index: bool = False) -> list[StepPath]:
    """The steps ``paths`` name, sorted by number; InputError for a PATH without a number or a number twice."""
    pattern = compile_step_pattern(step_pattern)
    found: list[StepPath] = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p) and glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise InputError(p, "no file matches this pattern")
        else:
            matches = [p]
        found.extend(StepPath(_number(m, pattern, allow_outside_index), m) for m in matches)
    if not found:
        raise ValueError("no paths given")
    found.sort(key=lambda s: s.step)
    for a, b in itertools.pairwise(found):
        if a.step == b.step:
            raise InputError(b.path, f"step {b.step} twice: also {a.path}")
    return found


def files_state(paths: Iterable[str | os.PathLike[str]], allow_outside_index: bool = False) -> tuple[Any, ...]:
    """What ``trend --follow`` watches: the files ``paths`` resolve to now (globs expanded again), each with
    its identity; when it differs from the last, the trend is computed again.  InputError as
    :func:`~gradinspect.sources.resolve_paths` raises it (a glob that matches nothing yet)."""
    from .sources import resolve_paths

    state: list[tuple[Any, ...]] = []
    for f in resolve_paths(list(paths), allow_outside_index=allow_outside_index):
        try:
            st = os.stat(f)
        except OSError:
            state.append((f, None))
            continue
        state.append((f, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(state)


def trend(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group_by: int | str | None = None,
    group_sep: str = ".",
    shards: str | None = None,
    jobs: int | None = None,
    dedup: bool = False,
    loss_scale: float | None = None,
    allow_outside_index: bool = False,
    step_pattern: str | None = None,
    window: int = DEFAULT_WINDOW,
    spike_factor: float = DEFAULT_SPIKE_FACTOR,
    clip_target: float = DEFAULT_CLIP_TARGET,
    on_step: Callable[[StepPath, Any], None] | None = None,
    progress: Callable[[int], None] | None = None,
    cache: Any = None,
) -> TrendReport:
    """The trend of a run whose steps ``paths`` name (see the module docstring and :func:`gradinspect.trend.analyze`).

    ``on_step(step, norms_report)`` is called after each step (for warnings).  ``progress`` is called
    with the bytes read, as by :func:`~gradinspect.api.inspect`; an object with ``set_total`` is first told
    the size of every step's files.
    With ``group_by``, each step is read once, per tensor (``first_nonfinite``
    and ``dead`` name tensors), and grouped from those rows by :func:`regroup`
    (exactly as ``norms --group-by``); for a ``norm_type`` other than 1, 2 and
    inf, or rows whose sums cannot be rebuilt exactly, the step is read again grouped.
    ``cache``: a :class:`gradinspect.cache.Cache` (the CLI's default), so that a file read before is
    not read again (bit-for-bit the same numbers); pruned after the run.
    """
    from .api import inspect
    from .norms import parse_norm_type

    p = parse_norm_type(norm_type)
    steps = find_steps([paths] if isinstance(paths, (str, os.PathLike)) else paths, step_pattern, allow_outside_index)
    opts: dict[str, Any] = dict(norm_type=p, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
                                group_sep=group_sep, sort="none", shards=shards, jobs=jobs, dedup=dedup,
                                loss_scale=loss_scale, allow_outside_index=allow_outside_index, cache=cache)
    if progress is not None and hasattr(progress, "set_total"):
        from .sources import resolve_paths

        progress.set_total(sum(_size(f) for st in steps
                               for f in resolve_paths([st.path], allow_outside_index=allow_outside_index)))
    opts["progress"] = None if progress is None else (lambda n: progress(n))  # no set_total per step
    results = []
    for st in steps:
        report = tensor_report = inspect(st.path, group_by=None, **opts)
        if group_by is not None:
            report = regroup(tensor_report, group_by, group_sep) or inspect(st.path, group_by=group_by, **opts)
        if on_step is not None:
            on_step(st, report)
        results.append(StepResult.from_reports(st.step, report, tensor_report if group_by is not None else None))
    if cache is not None and cache.stored:
        cache.prune()
    return analyze(results, norm_type=p, max_norm=max_norm, eps=eps, group_by=group_by, window=window,
                   spike_factor=spike_factor, clip_target=clip_target)


def _size(path: str) -> int:
    """A file's size; of a directory that is one container (a distributed checkpoint), its files'."""
    if os.path.isdir(path):
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    return os.path.getsize(path)


def _stats(row: Any, p: float) -> Stats | None:
    """Statistics whose :func:`~gradinspect.norms.combine` is bit-for-bit that of the row's own, or None.

    A row holds ``l1 = ldexp(s1, exp)`` and ``sq = ldexp(s2, 2 exp)``: exact
    when both are finite normal numbers (or both 0), so ``exp`` 0 with
    ``s1 = l1``, ``s2 = sq`` gives the same shared exponent and the same
    rescaled terms in ``combine``.  A row with NaN/Inf needs only its counts,
    ``linf`` and whether ``sq`` is NaN.
    """
    l1, sq = row.l1, row.sq
    if not row.nonfinite:
        tiny = sys.float_info.min
        if not (math.isfinite(l1) and math.isfinite(sq) and (l1 == 0.0) == (sq == 0.0)
                and (l1 == 0.0 or l1 >= tiny) and (sq == 0.0 or sq >= tiny)):
            return None
    return Stats(numel=row.numel, nan=row.nan, inf=row.inf, linf=row.linf, exp=0, s1=l1, s2=sq, p=p)


def regroup(report: Any, group_by: int | str, sep: str = ".") -> Any:
    """The ``group_by`` rows of a per-tensor :class:`~gradinspect.report.NormsReport` made with every row in
    file order (``sort="none"``), exactly as ``norms --group-by`` computes them from the files; None when
    that cannot be done exactly (a general ``norm_type``, sums out of the normal range): read again then."""
    from .api import compile_group_by
    from .pipeline import group_key

    p = report.norm_type
    if general_p(p) or report.omitted or report.group_by is not None:
        return None
    stats = [_stats(r, p) for r in report.tensors]
    if any(s is None for s in stats):
        return None
    by = compile_group_by(group_by)
    assert by is not None
    finite = [s for s, r in zip(stats, report.tensors, strict=True) if not r.nonfinite]
    base = combine(finite if report.total.nonfinite else stats, p)  # type: ignore[arg-type]
    groups: dict[tuple[str, bool], list[tuple[Any, Stats]]] = {}
    for r, s in zip(report.tensors, stats, strict=True):
        groups.setdefault(group_key(r.name, by, sep), []).append((r, s))  # type: ignore[arg-type]
    rows = []
    for (key, _), members in groups.items():
        if len(members) == 1:
            rows.append(dataclasses.replace(members[0][0], name=key))
            continue
        g = combine((s for _, s in members), p)
        rows.append(TensorNorms.from_stats(g, name=key, source=None, shape=None, dtype="mixed",
                                           share=math.nan if g.nonfinite else g.share_of(base), members=len(members)))
    return dataclasses.replace(report, tensors=tuple(rows), group_by=group_by, group_sep=sep)


def step_warnings(warnings: Sequence[tuple[StepPath, list[str]]]) -> list[str]:
    """Each step's warnings once: those that differ only in the step's path are said once, with a count."""
    seen: dict[str, list[Any]] = {}
    for st, lines in warnings:
        for line in lines:
            key = line.replace(st.path, "\0")
            got = seen.setdefault(key, [line, 0])
            got[1] += 1
    return [line if n == 1 else f"{line} (and in {n - 1} more step{'s' if n > 2 else ''})" for line, n in seen.values()]
