"""``gradinspect trend`` input: PATHs to numbered steps, each computed exactly as ``norms`` (issue 9 §1, §2).

Each PATH is one step (a file, or a directory or ``*.index.json`` whose files
are one gradient set, per-rank shards with ``shards``), or a quoted glob whose
matches are each a step.  A step's number is ``step_pattern``'s one group
searched in the final path component of the step's PATH (or match), when
given; else the integer safetensors metadata key ``step`` (the files of one
step that carry it must agree); else the last integer in that final path
component.  A directory PATH whose files are all named
``step_N[_rankR].safetensors`` with several N (the layout
:class:`gradinspect.torch.GradDumper` writes) is a run: one step per N, made
of its files (the ranks of a step, in rank order: ``_rank10`` after ``_rank9``).  Steps are sorted by number;
a number twice is an error naming both PATHs.  Every step goes through :func:`gradinspect.api.inspect`
(``sort="none"``, every row), so its numbers are those of ``gradinspect norms``
on that step alone.  With a cache, a step whose files and options are those
of a step entry (:meth:`gradinspect.cache.Cache.lookup_step`) is taken from
it: its files are only ``stat``-ed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .clip import DEFAULT_EPS
from .errors import InputError
from .trend import (
    DEFAULT_CLIP_TARGET,
    DEFAULT_SPIKE_FACTOR,
    DEFAULT_WINDOW,
    MAX_STEP,
    StepResult,
    TrendReport,
    analyze,
)

if TYPE_CHECKING:
    from .norms import Stats

__all__ = ["StepPath", "compile_step_pattern", "find_steps", "regroup", "trend", "step_warnings", "files_state"]

_INT = re.compile(r"[0-9]+")


def _step(text: str, where: str, what: str) -> int:
    """A step number: ASCII digits, at most 2**63 - 1."""
    if not text.isascii() or not text.isdigit() or int(text) > MAX_STEP:
        raise InputError(where, f"{what} {text[:40]!r} is not a step number (a whole number from 0 to 2**63 - 1)")
    return int(text)


@dataclass(frozen=True)
class StepPath:
    """One step: its number and the PATH (or glob match) that is its gradient set; or, for a step
    of a directory of several steps, ``files``, the files of that step (``path`` is the first)."""

    step: int
    path: str
    files: tuple[str, ...] = ()

    @property
    def paths(self) -> str | list[str]:
        """What is read for this step."""
        return list(self.files) if self.files else self.path


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


def _number(path: str, pattern: re.Pattern[str] | None, allow_outside_index: bool, void_as: str | None = None) -> int:
    name = _final(path)
    if pattern is not None:
        m = pattern.search(name)
        if m is None or m.group(1) is None:
            raise InputError(path, f"--step-pattern {pattern.pattern} does not match {name!r}")
        return _step(m.group(1), path, f"--step-pattern {pattern.pattern} captures in {name!r}")
    from .api import info

    headers = info(path, allow_outside_index=allow_outside_index, void_as=void_as)
    return _number_from(path, headers.metadata, headers.sources)


def _number_from(path: str, meta: Mapping[str, Mapping[str, str]], sources: Sequence[str]) -> int:
    """A step's number from its files' metadata ``step`` (they must agree), else the last integer in the
    final component of ``path``."""
    name = _final(path)
    first: tuple[str, int] | None = None
    without = [src for src in sources if "step" not in meta.get(src, {})]
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


_DUMPER_FILE = re.compile(r"step_([0-9]+)(?:_rank([0-9]+))?\.safetensors")  # gradinspect.torch.GradDumper's


def _directory_steps(path: str, allow_outside_index: bool) -> list[StepPath] | None:
    """A directory of :class:`gradinspect.torch.GradDumper`'s files (every file named ``step_N[_rankR].safetensors``),
    with several steps N: one step per N, its files (ranks) in rank order (R as a number: GradDumper wrote R
    unpadded before it padded it to the width of the largest rank); None for any other directory."""
    from .sources import resolve_paths

    ranked: dict[int, list[tuple[int, str]]] = {}
    for f in resolve_paths([path], allow_outside_index=allow_outside_index):
        m = _DUMPER_FILE.fullmatch(os.path.basename(f))
        if m is None:
            return None
        rank = -1 if m.group(2) is None else int(m.group(2))
        ranked.setdefault(_step(m.group(1), f, "the step in the name"), []).append((rank, f))
    if len(ranked) < 2:
        return None
    steps = {n: [f for _, f in sorted(files)] for n, files in ranked.items()}  # by rank, then name (names differ)
    from .api import info

    metadata = info(path, allow_outside_index=allow_outside_index).metadata
    for n, files in steps.items():
        for f in files:
            text = metadata.get(f, {}).get("step")
            if text is not None and _step(text, f, "metadata step") != n:
                raise InputError(f, f"metadata step {text} differs from step {n} in its name")
    return [StepPath(n, files[0], tuple(files)) for n, files in steps.items()]


def _matches(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Each step's PATH: a PATH, or each match of a quoted glob (sorted); InputError for a glob with none."""
    from .sources.paths import expand_glob

    for p in paths:
        p = os.fspath(p)
        globbed = expand_glob(p)  # a URL's listed through fsspec
        if globbed is not None:
            matches = globbed
            if not matches:
                raise InputError(p, "no file matches this pattern")
            yield from matches
        else:
            yield p


def _split(m: str, pattern: re.Pattern[str] | None, allow_outside_index: bool) -> list[StepPath] | None:
    """The steps of a GradDumper directory ``m`` (no ``--step-pattern``), or None: ``m`` is one step."""
    return _directory_steps(m, allow_outside_index) if pattern is None and os.path.isdir(m) else None


def _in_order(found: list[Any]) -> list[Any]:
    """``found`` (items whose first field is a :class:`StepPath`) sorted by step; InputError for a number twice."""
    if not found:
        raise ValueError("no paths given")
    found.sort(key=lambda f: f[0].step)
    for (a, *_), (b, *_) in itertools.pairwise(found):
        if a.step == b.step:
            raise InputError(b.path, f"step {b.step} twice: also {a.path}")
    return found


def find_steps(paths: Iterable[str | os.PathLike[str]], step_pattern: str | None = None,
               allow_outside_index: bool = False, void_as: str | None = None) -> list[StepPath]:
    """The steps ``paths`` name, sorted by number; InputError for a PATH without a number or a number twice."""
    from .hooks import HOOK

    hook = HOOK.get()
    if hook is not None:  # --part and merge (hooks.py)
        return list(hook.find_steps(paths, step_pattern, allow_outside_index, void_as))
    pattern = compile_step_pattern(step_pattern)
    found: list[tuple[StepPath]] = []
    for m in _matches(paths):
        split = _split(m, pattern, allow_outside_index)
        found.extend((st,) for st in split or [StepPath(_number(m, pattern, allow_outside_index, void_as), m)])
    return [st for st, in _in_order(found)]


def files_state(paths: Iterable[str | os.PathLike[str]], allow_outside_index: bool = False) -> tuple[Any, ...]:
    """What ``trend --follow`` watches: the files ``paths`` resolve to now (globs expanded again), each with
    its identity, a directory that is one container (a distributed checkpoint) followed by its files' (one
    rewritten in place leaves the directory's own as it was); when it differs from the last, the trend is
    computed again.  InputError as :func:`~gradinspect.sources.resolve_paths` raises it (a glob that matches
    nothing yet)."""
    from .sources import resolve_paths
    from .sources.paths import file_state, member_files

    def members(f: str) -> list[str]:
        try:
            return member_files(f)
        except OSError:  # gone since it was resolved: its own state says so
            return []

    return tuple(file_state(g) for f in resolve_paths(list(paths), allow_outside_index=allow_outside_index)
                 for g in (f, *members(f)))


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
    on_step: Callable[[StepPath, list[str]], None] | None = None,
    progress: Callable[[int], None] | None = None,
    cache: Any = None,
    void_as: str | None = None,
) -> TrendReport:
    """The trend of a run whose steps ``paths`` name (see the module docstring and :func:`gradinspect.trend.analyze`).

    ``on_step(step, warnings)`` is called after each step with its input warnings (as
    :meth:`~gradinspect.report.NormsReport.input_warnings` says them).  ``progress`` is called
    with the bytes read, as by :func:`~gradinspect.api.inspect`; an object with ``set_total`` is first told
    the size of every step's files.
    With ``group_by``, each step is read once, per tensor (``first_nonfinite``
    and ``dead`` name tensors), and grouped from those rows by :func:`regroup`
    (exactly as ``norms --group-by``); for a ``norm_type`` other than 1, 2 and
    inf, or rows whose sums cannot be rebuilt exactly, the step is read again grouped.
    ``cache``: a :class:`gradinspect.cache.Cache` (the CLI's default), so that a step or file read before is
    not read again (bit-for-bit the same numbers); pruned after the run.
    ``void_as``: what raw void arrays are read as (see :func:`gradinspect.api.inspect`).
    Every step must hold a floating-point tensor with elements (InputError otherwise, as for ``norms``):
    a run is never reported with a step of zeros.
    """
    from .hooks import HOOK
    from .norms import parse_norm_type
    from .sources import resolve_paths
    from .sources.paths import file_size, is_one_file

    p = parse_norm_type(norm_type)
    pattern = compile_step_pattern(step_pattern)
    include, exclude = tuple(include), tuple(exclude)
    opts: dict[str, Any] = dict(norm_type=p, max_norm=max_norm, eps=eps, include=include, exclude=exclude,
                                group_sep=group_sep, sort="none", shards=shards, jobs=jobs, dedup=dedup,
                                loss_scale=loss_scale, allow_outside_index=allow_outside_index, cache=cache,
                                void_as=void_as)
    options = None if cache is None else _step_options(opts, group_by, step_pattern)
    listed = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    # each step: its PATH and number, its files, its step entry's key, and its (result, warnings) when known:
    # from the entry (a hit), or computed already because its number is in its metadata
    found: list[tuple[StepPath, list[str] | None, Any, tuple[StepResult, list[str]] | None, bool]] = []
    if HOOK.get() is not None:  # --part and merge: the steps the parts recorded, no step entries
        found = [(st, None, None, None, False)
                 for st in find_steps(listed, step_pattern, allow_outside_index, void_as)]
    for m in () if found else _matches(listed):
        one = is_one_file(m)  # most steps: one file, its own resolution (found with one stat)
        split = None if one else _split(m, pattern, allow_outside_index)
        if split is not None:  # a GradDumper directory: several steps, each of its files
            for st in split:
                key = None if options is None else cache.step_key(st.path, _key_files(st.files), options)
                hit = None if key is None else cache.lookup_step(key)
                if hit is not None and hit[0].step != st.step:  # an entry made by hand: the name says the number
                    hit = None
                found.append((st, list(st.files), key, hit, hit is not None))
            continue
        number = None if pattern is None else _number(m, pattern, allow_outside_index, void_as)
        files = [m] if one else resolve_paths([m], allow_outside_index=allow_outside_index)
        key = None if options is None else cache.step_key(m, files if one else _key_files(files), options)
        hit = None if key is None else cache.lookup_step(key)
        if hit is not None and number is not None and hit[0].step != number:  # made by hand: --step-pattern says
            hit = None
        if number is None and hit is not None:
            number = hit[0].step
        found.append((StepPath(-1 if number is None else number, m), files, key, hit, hit is not None))
    sizes: dict[str, int] = {}
    if progress is not None and hasattr(progress, "set_total"):
        sizes = {st.path: sum(file_size(f) for f in (files if files is not None else
                                                  resolve_paths(st.files or [st.path],
                                                                allow_outside_index=allow_outside_index)))
                 for st, files, *_ in found}
        progress.set_total(sum(sizes.values()))
    opts["progress"] = None if progress is None else (lambda n: progress(n))  # no set_total per step
    for i, (st, step_files, key, done, _) in enumerate(found):
        if done is None and st.step < 0:  # its number is in its metadata: found as the step is read (once)
            def number_of(report: Any, path: str = st.path) -> int:
                return _number_from(path, report.metadata, report.sources)

            done = _compute(st, opts, group_by, group_sep, number_of)
            found[i] = (StepPath(done[0].step, st.path), step_files, key, done, False)
    results = []
    for st, _, key, done, from_entry in _in_order(found):
        if done is None:
            done = _compute(st, opts, group_by, group_sep)
        result, warnings = done
        if from_entry:
            if sizes and progress is not None:
                progress(sizes[st.path])  # a step from the cache: its files count as read
        elif key is not None:
            cache.store_step(key, result, warnings)
        if on_step is not None:
            on_step(st, warnings)
        results.append(result)
    if cache is not None and cache.stored:
        cache.prune()
    return analyze(results, norm_type=p, max_norm=max_norm, eps=eps, group_by=group_by, window=window,
                   spike_factor=spike_factor, clip_target=clip_target)


def _step_options(opts: dict[str, Any], group_by: int | str | None, step_pattern: str | None) -> dict[str, Any] | None:
    """What shapes a step's number, numbers and warnings, as JSON values (a step entry's key); None when an
    option is not plain (then no step entry is used: the step is computed, and its options checked)."""
    text = [*opts["include"], *opts["exclude"], opts["group_sep"]]
    if not (all(type(x) is str for x in text) and type(group_by) in (int, str, type(None))
            and type(opts["shards"]) in (str, type(None)) and type(opts["void_as"]) in (str, type(None))):
        return None
    try:
        return {"p": float(opts["norm_type"]).hex(), "max_norm": float(opts["max_norm"]).hex(),
                "eps": float(opts["eps"]).hex(), "include": list(opts["include"]), "exclude": list(opts["exclude"]),
                "group_by": group_by, "group_sep": opts["group_sep"], "shards": opts["shards"],
                "dedup": bool(opts["dedup"]),
                "loss_scale": None if opts["loss_scale"] is None else float(opts["loss_scale"]).hex(),
                "allow_outside_index": bool(opts["allow_outside_index"]), "step_pattern": step_pattern,
                "void_as": opts["void_as"]}
    except (TypeError, ValueError, OverflowError):
        return None


def _compute(st: StepPath, opts: dict[str, Any], group_by: int | str | None, group_sep: str,
             number_of: Callable[[Any], int] | None = None) -> tuple[StepResult, list[str]]:
    """One step computed as ``norms`` computes it, and its input warnings; ``number_of(report)``: the step's
    number from its per-tensor report (its metadata), when it is not known yet."""
    from .api import inspect

    report = tensor_report = inspect(st.paths, group_by=None, **opts)
    step = st.step if number_of is None else number_of(tensor_report)
    if group_by is not None:
        report = regroup(tensor_report, group_by, group_sep) or inspect(st.paths, group_by=group_by, **opts)
    result = StepResult.from_reports(step, report, tensor_report if group_by is not None else None)
    return result, report.input_warnings()
def _key_files(files: Sequence[str]) -> list[str]:
    """What a step entry's key holds the identity of: the step's files, each followed by the files in it
    when it is a directory that is one container (a distributed checkpoint)."""
    from .sources.paths import member_files

    return [g for f in files for g in (f, *member_files(f))]


def _stats(row: Any, p: float) -> Stats | None:
    """Statistics whose :func:`~gradinspect.norms.combine` is bit-for-bit that of the row's own, or None.

    A row holds ``l1 = ldexp(s1, exp)`` and ``sq = ldexp(s2, 2 exp)``: exact
    when both are finite normal numbers (or both 0), so ``exp`` 0 with
    ``s1 = l1``, ``s2 = sq`` gives the same shared exponent and the same
    rescaled terms in ``combine``.  A row with NaN/Inf needs only its counts,
    ``linf`` and whether ``sq`` is NaN.
    """
    from .norms import Stats

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
    from .norms import combine, general_p
    from .pipeline import group_key
    from .report import TensorNorms

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
