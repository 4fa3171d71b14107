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

import glob
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .clip import DEFAULT_EPS
from .errors import InputError
from .trend import DEFAULT_CLIP_TARGET, DEFAULT_SPIKE_FACTOR, DEFAULT_WINDOW, StepResult, TrendReport, analyze

__all__ = ["StepPath", "compile_step_pattern", "find_steps", "trend", "step_warnings"]

_INT = re.compile(r"\d+")


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
        try:
            return int(m.group(1))
        except ValueError:
            raise InputError(path, f"--step-pattern {pattern.pattern} captures {m.group(1)!r} in {name!r}, "
                             "not an integer") from None
    from .api import info

    meta = info(path, allow_outside_index=allow_outside_index).metadata
    first: tuple[str, int] | None = None
    for src, md in meta.items():
        text = md.get("step")
        if text is None:
            continue
        try:
            value = int(text.strip())
        except ValueError:
            raise InputError(src, f"metadata step {text!r} is not an integer (--step-pattern overrides it)") from None
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
    return int(found[-1])


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
) -> TrendReport:
    """The trend of a run whose steps ``paths`` name (see the module docstring and :func:`gradinspect.trend.analyze`).

    ``on_step(step, norms_report)`` is called after each step (for warnings and progress).
    With ``group_by``, each step is read twice: once grouped, once per tensor
    (``first_nonfinite`` and ``dead`` name tensors).
    """
    from .api import inspect
    from .norms import parse_norm_type

    p = parse_norm_type(norm_type)
    steps = find_steps([paths] if isinstance(paths, (str, os.PathLike)) else paths, step_pattern, allow_outside_index)
    opts: dict[str, Any] = dict(norm_type=p, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
                                group_sep=group_sep, sort="none", shards=shards, jobs=jobs, dedup=dedup,
                                loss_scale=loss_scale, allow_outside_index=allow_outside_index)
    results = []
    for st in steps:
        report = inspect(st.path, group_by=group_by, **opts)
        tensor_report = None if group_by is None else inspect(st.path, group_by=None, **opts)
        if on_step is not None:
            on_step(st, report)
        results.append(StepResult.from_reports(st.step, report, tensor_report))
    return analyze(results, norm_type=p, max_norm=max_norm, eps=eps, group_by=group_by, window=window,
                   spike_factor=spike_factor, clip_target=clip_target)


def step_warnings(warnings: Sequence[tuple[StepPath, list[str]]]) -> list[str]:
    """Each step's warnings once: those that differ only in the step's path are said once, with a count."""
    seen: dict[str, list[Any]] = {}
    for st, lines in warnings:
        for line in lines:
            key = line.replace(st.path, "\0")
            got = seen.setdefault(key, [line, 0])
            got[1] += 1
    return [line if n == 1 else f"{line} (and in {n - 1} more step{'s' if n > 2 else ''})" for line, n in seen.values()]
