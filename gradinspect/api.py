"""The library API: files or arrays in, frozen reports out (norms, check, diff, info).

The CLI computes through these functions only (it also reads ``config`` and
builds ``check.Rules``).
"""

from __future__ import annotations

import math
import os
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from .clip import DEFAULT_EPS, clip_coef
from .errors import InputError
from .loaders import ChunkBuffer, Source, TensorEntry, array_source, open_paths
from .norms import Reducer, Stats, combine, parse_norm_type
from .report import (
    CheckReport,
    Clip,
    DiffReport,
    DiffRow,
    InfoReport,
    InfoTensor,
    Mismatch,
    NormsReport,
    Skipped,
    TensorNorms,
    Tolerances,
    Totals,
)

__all__ = ["inspect", "compute_norms", "check", "diff", "info", "SORT_KEYS", "tensor_stats", "select"]

SORT_KEYS = ("share", "norm", "name", "numel", "none")

#: Called with the bytes each piece of work covered (from worker threads); an
#: object with a ``set_total(bytes)`` method is told the total first.
Progress = Callable[[int], None]


def _paths(paths: Any) -> list[str | os.PathLike[str]]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def inspect(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group_by: int | None = None,
    sort: str = "share",
    top: int | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    shards: str | None = None,
    allow_outside_index: bool = False,
) -> NormsReport:
    """Norms of the gradients saved at ``paths``: one gradient set, however many files.

    ``paths`` are files (.safetensors, .npz, .npy), directories, ``*.index.json``
    files or quoted globs.  ``jobs`` threads share the work (default: one per
    core); results are identical for every value.

    The same tensor name in several files is an error unless ``shards`` says
    what it means: ``"slices"``, disjoint pieces of one tensor (ZeRO/FSDP
    shards, tensor-parallel splits), merged exactly; ``"replicas"``, copies
    of one tensor (data-parallel ranks), counted once, with the largest
    difference between the copies in ``replica_max_diff``.  Raises :class:`~gradinspect.errors.InputError` for
    input that cannot be read, and an index.json naming a shard outside its
    directory unless ``allow_outside_index``.

    >>> report = inspect("sample_data/healthy.safetensors", max_norm=1.0)  # doctest: +SKIP
    >>> report.total.l2, report.clip.coef  # doctest: +SKIP
    """
    p = parse_norm_type(norm_type)
    _check_options(max_norm, eps, sort, top, group_by)
    if shards not in (None, *SHARDS):
        raise ValueError(f"shards must be one of {', '.join(SHARDS)}, not {shards!r}")
    sources = open_paths(_paths(paths), allow_repeats=shards is not None, allow_outside_index=allow_outside_index)
    return _report(sources, p, max_norm, eps, include, exclude, group_by, sort, top, progress, jobs, shards)


def compute_norms(
    mapping: Mapping[str, Any],
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group_by: int | None = None,
    sort: str = "share",
    top: int | None = None,
) -> NormsReport:
    """Like :func:`inspect`, for in-memory arrays: ``{name: array}`` where an array
    is anything ``np.asarray`` accepts (CPU torch tensors included, bfloat16 too)."""
    p = parse_norm_type(norm_type)
    _check_options(max_norm, eps, sort, top, group_by)
    return _report([array_source(mapping)], p, max_norm, eps, include, exclude, group_by, sort, top, None, 1)


def _check_options(max_norm: float, eps: float, sort: str, top: int | None, group_by: int | None) -> None:
    if not max_norm > 0 or math.isinf(max_norm):
        raise ValueError(f"max_norm must be a finite number > 0, not {max_norm}")
    if not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, not {eps}")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, not {top}")
    if group_by is not None and group_by < 1:
        raise ValueError(f"group_by must be >= 1, not {group_by}")


def select(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Callable[[str], bool]:
    """A predicate: included by any ``include`` glob (all when none) and by no ``exclude`` glob."""
    inc, exc = tuple(include), tuple(exclude)

    def chosen(name: str) -> bool:
        if inc and not any(fnmatchcase(name, g) for g in inc):
            return False
        return not any(fnmatchcase(name, g) for g in exc)

    return chosen


def tensor_stats(
    sources: Sequence[Source],
    p: float,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: Progress | None = None,
    jobs: int | None = None,
) -> tuple[list[tuple[TensorEntry, Stats]], list[Skipped]]:
    """Stream every selected floating tensor through reducers, source by source.

    ``jobs`` threads (default: one per core) share the work; the results do not
    depend on ``jobs``.
    """
    from .engine import default_jobs, reduce_entries

    jobs = default_jobs() if jobs is None else jobs
    chosen = select(include, exclude)
    results: list[tuple[TensorEntry, Stats]] = []
    skipped: list[Skipped] = []
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(sum(t.nbytes for s in sources for t in s.tensors if t.is_float and chosen(t.name)))
    for src in sources:
        entries = [t for t in src.tensors if chosen(t.name)]
        skipped.extend(Skipped(t.name, t.source, t.dtype, t.skip_reason or "") for t in entries if not t.is_float)
        floats = [t for t in entries if t.is_float]
        if not floats:
            continue
        with src:
            results.extend(zip(floats, reduce_entries(src, floats, p, jobs, progress)))
    return results, skipped


class _Record(NamedTuple):
    """A tensor after --shards merging: one file's tensor, or the pieces/copies of one name."""

    name: str
    source: str | None
    shape: tuple[int, ...] | None
    dtype: str
    stats: Stats
    pieces: int = 1  # files its slices or copies came from
    replica_diff: float | None = None


SHARDS = ("slices", "replicas")


def _merge(results: list[tuple[TensorEntry, Stats]], shards: str | None,
           sources: Sequence[Source], p: float) -> tuple[list[_Record], list[str]]:
    """Records for the rows, and warnings; see ``--shards``."""
    if shards is None:  # names are unique (open_paths made sure)
        return [_Record(t.name, t.source, t.shape, t.dtype, st) for t, st in results], []
    by_name: dict[str, list[tuple[TensorEntry, Stats]]] = {}
    for t, st in results:
        by_name.setdefault(t.name, []).append((t, st))
    records: list[_Record] = []
    warnings: list[str] = []
    src_of = {s.path: s for s in sources}
    tools: _PairTools | None = None
    for name, copies in by_name.items():
        t0, s0 = copies[0]
        if len(copies) == 1:
            records.append(_Record(name, t0.source, t0.shape, t0.dtype, s0))
            continue
        dtypes = {t.dtype for t, _ in copies}
        dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
        if shards == "slices":
            stats = combine((st for _, st in copies), p)
            records.append(_Record(name, None, None, dtype, stats, len(copies)))
            continue
        for t, _ in copies[1:]:
            if t.shape != t0.shape:
                raise InputError(t.source, f"replica of {name!r} has shape {list(t.shape)}, but {list(t0.shape)} in {t0.source}")
            if t._fortran != t0._fortran:
                raise InputError(t.source, f"replica of {name!r} is stored in {_order(t)} order, but in {_order(t0)} order in {t0.source}")
        bad = [st for _, st in copies if st.nonfinite]
        if bad:  # NaN/inf in any copy must show, whichever copy it is in
            worst = math.nan
            warnings.append(f"copies of {name} hold NaN/inf values: their difference is undefined")
            s0 = bad[0]
        else:
            tools = tools or _PairTools.make()
            worst = max(_pair_stats(src_of[t0.source], t0, src_of[t.source], t, tools).d.linf for t, _ in copies[1:])
            if worst != 0.0:
                warnings.append(f"the {len(copies)} copies of {name} differ: max |difference| {worst:.6g}")
        records.append(_Record(name, None, t0.shape, dtype, s0, len(copies), worst))
    return records, warnings


def _order(t: TensorEntry) -> str:
    return "Fortran (column-major)" if t._fortran else "C (row-major)"


class _PairTools(NamedTuple):
    """A pair reducer and its two read buffers, made once and reused for every pair."""

    reducer: Any
    buf_a: ChunkBuffer
    buf_b: ChunkBuffer

    @classmethod
    def make(cls) -> _PairTools:
        from .diff import PairReducer

        reducer = PairReducer()
        return cls(reducer, ChunkBuffer(reducer.chunk), ChunkBuffer(reducer.chunk))


def _pair_stats(sa: Source, ta: TensorEntry, sb: Source, tb: TensorEntry, tools: _PairTools) -> Any:
    """PairStats of two tensors of the same shape, streamed chunk by chunk."""
    from .diff import combine_pairs

    reducer, buf_a, buf_b = tools
    with sa, sb:
        ga, gb = sa.chunks(ta, buf_a), sb.chunks(tb, buf_b)
        parts = [reducer.reduce(ca, cb) for ca, cb in zip(ga, gb)]
        # Equal shapes give equal chunk counts; run both readers past their last
        # chunk, where they check CRCs and that the data was all there.
        for rest in (ga, gb):
            for _ in rest:
                pass
        return combine_pairs(parts)


def _report(
    sources: Sequence[Source],
    p: float,
    max_norm: float,
    eps: float,
    include: Iterable[str],
    exclude: Iterable[str],
    group_by: int | None,
    sort: str,
    top: int | None,
    progress: Progress | None,
    jobs: int | None,
    shards: str | None = None,
) -> NormsReport:
    results, skipped = tensor_stats(sources, p, include, exclude, progress, jobs)
    records, warnings = _merge(results, shards, sources, p)
    if shards:
        skipped = list({sk.name: sk for sk in skipped}.values())
    total = combine((r.stats for r in records), p)
    # Shares are fractions of the global Σx²; when NaN/Inf make that undefined,
    # finite tensors get their fraction of the finite tensors' Σx² instead.
    base = combine((r.stats for r in records if not r.stats.nonfinite), p) if total.nonfinite else total
    if group_by:
        rows = _group_rows(records, base, group_by)
    else:
        rows = [_row(r, base) for r in records]
    rows = sort_rows(rows, sort)
    omitted = 0
    if top is not None and len(rows) > top:
        rows, omitted = rows[:top], len(rows) - top
    norm = total.norm
    coef = clip_coef(norm, max_norm, eps)
    return NormsReport(
        sources=tuple(s.path for s in sources),
        norm_type=p,
        tensors=tuple(rows),
        skipped=tuple(skipped),
        total=Totals(len(records), total.numel, total.l1, total.l2, total.linf, norm, total.sq,
                     total.nan, total.inf),
        clip=Clip(max_norm, eps, coef, coef < 1.0, norm * coef),
        metadata={s.path: s.metadata for s in sources if s.metadata},
        omitted=omitted,
        group_by=group_by,
        shards=shards,
        notes=tuple(warnings),
    )


def _row(r: _Record, base: Stats, name: str | None = None, members: int = 1) -> TensorNorms:
    s = r.stats
    share = math.nan if s.nonfinite else s.share_of(base)
    return TensorNorms(name or r.name, r.source, r.shape, r.dtype, s.numel, s.l1, s.l2, s.linf, s.norm, s.sq, share,
                       s.nan, s.inf, members, r.replica_diff, r.pieces)


def group_name(name: str, depth: int) -> str:
    """The first ``depth`` dot-separated parts of a tensor name."""
    return ".".join(name.split(".")[:depth])


def _group_rows(records: list[_Record], base: Stats, depth: int) -> list[TensorNorms]:
    groups: dict[str, list[_Record]] = {}
    for r in records:
        groups.setdefault(group_name(r.name, depth), []).append(r)
    rows = []
    for key, members in groups.items():
        if len(members) == 1:
            rows.append(_row(members[0], base, key))
            continue
        sources = {r.source for r in members}
        dtypes = {r.dtype for r in members}
        diffs = [r.replica_diff for r in members if r.replica_diff is not None]
        merged = _Record(key, sources.pop() if len(sources) == 1 else None, None,
                         dtypes.pop() if len(dtypes) == 1 else "mixed",
                         combine((r.stats for r in members), base.p), sum(r.pieces for r in members),
                         replica_diff=(math.nan if any(math.isnan(d) for d in diffs) else max(diffs)) if diffs else None)
        rows.append(_row(merged, base, members=len(members)))
    return rows


def _desc(x: float) -> tuple[int, float]:
    # NaN first (it is what a user is looking for), then largest first.
    return (0, 0.0) if math.isnan(x) else (1, -x)


_SORTS: dict[str, Callable[[TensorNorms], Any]] = {
    "share": lambda r: _desc(r.share),
    "norm": lambda r: _desc(r.norm),
    "name": lambda r: r.name,
    "numel": lambda r: -r.numel,
}


def sort_rows(rows: list[TensorNorms], key: str) -> list[TensorNorms]:
    """Rows in ``key`` order; ``"none"`` keeps file order.  Ties keep file order."""
    if key == "none":
        return list(rows)
    return sorted(rows, key=_SORTS[key])


def check(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    rules: Any = None,
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: Progress | None = None,
    jobs: int | None = None,
    shards: str | None = None,
    allow_outside_index: bool = False,
) -> CheckReport:
    """Evaluate :class:`gradinspect.check.Rules` (default: only ``nonfinite``) on ``paths``."""
    from .check import Rules, evaluate

    report = inspect(paths, norm_type=norm_type, max_norm=max_norm, eps=eps, include=include,
                     exclude=exclude, sort="none", progress=progress, jobs=jobs, shards=shards,
                     allow_outside_index=allow_outside_index)
    return evaluate(report, rules if rules is not None else Rules())


def info(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
         allow_outside_index: bool = False) -> InfoReport:
    """Every tensor's name, dtype, shape and size, from the headers alone (shards may repeat names)."""
    sources = open_paths(_paths(paths), allow_repeats=True, allow_outside_index=allow_outside_index)
    return InfoReport(
        sources=tuple(s.path for s in sources),
        tensors=tuple(InfoTensor(t.name, t.source, t.dtype, t.shape, t.numel, t.nbytes) for s in sources for t in s.tensors),
        metadata={s.path: s.metadata for s in sources if s.metadata},
    )


def diff(
    a: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    b: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    min_cosine: float | None = None,
    allow_missing: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: Progress | None = None,
    allow_outside_index: bool = False,
) -> DiffReport:
    """Compare two gradient sets tensor by tensor and as a whole, streaming both.

    A tensor fails when ``l2_diff > atol + rtol * max(l2_a, l2_b)`` (when
    ``rtol`` or ``atol`` is given; the other counts as 0) or when
    ``cosine < min_cosine``.
    """
    from .diff import combine_pairs

    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not 0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, not {v}")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be between -1 and 1, not {min_cosine}")
    tol = Tolerances(rtol, atol, min_cosine, allow_missing)
    srcs_a = open_paths(_paths(a), allow_outside_index=allow_outside_index)
    srcs_b = open_paths(_paths(b), allow_outside_index=allow_outside_index)
    chosen = select(include, exclude)
    where_b = {t.name: (s, t) for s in srcs_b for t in s.tensors if chosen(t.name)}
    names_a: set[str] = set()
    skipped: list[Skipped] = []
    pairs: list[tuple[Source, TensorEntry, Source, TensorEntry]] = []
    mismatched: list[Mismatch] = []
    only_a: list[str] = []
    for sa in srcs_a:
        for ta in sa.tensors:
            if not chosen(ta.name):
                continue
            names_a.add(ta.name)
            hit = where_b.get(ta.name)
            if hit is None:
                only_a.append(ta.name)
                continue
            sb, tb = hit
            if ta.shape != tb.shape:
                mismatched.append(Mismatch(ta.name, ta.shape, tb.shape, ta.dtype, tb.dtype, "shapes differ"))
            elif not ta.is_float and not tb.is_float:  # e.g. a step counter on both sides: not gradients
                skipped.append(Skipped(ta.name, ta.source, ta.dtype, ta.skip_reason or ""))
            elif ta.is_float != tb.is_float:
                mismatched.append(Mismatch(ta.name, ta.shape, tb.shape, ta.dtype, tb.dtype,
                                           "one side is not a floating-point tensor"))
            elif ta._fortran != tb._fortran:
                mismatched.append(Mismatch(ta.name, ta.shape, tb.shape, ta.dtype, tb.dtype,
                                           f"A is in {_order(ta)} order, B in {_order(tb)} order"))
            else:
                pairs.append((sa, ta, sb, tb))
    only_b = [n for n in where_b if n not in names_a]
    tools = _PairTools.make()
    rows: list[DiffRow] = []
    stats = []
    for sa, ta, sb, tb in pairs:
        ps = _pair_stats(sa, ta, sb, tb, tools)
        if progress is not None:
            progress(ta.nbytes + tb.nbytes)
        stats.append(ps)
        rows.append(_diff_row(ta.name, ta.shape, ta.dtype, tb.dtype, ps, tol))
    total = combine_pairs(stats)
    rows.sort(key=lambda r: _desc(r.rel))
    return DiffReport(
        a=tuple(s.path for s in srcs_a),
        b=tuple(s.path for s in srcs_b),
        tensors=tuple(rows),
        only_a=tuple(only_a),
        only_b=tuple(only_b),
        mismatched=tuple(mismatched),
        total=_diff_row(None, None, None, None, total, Tolerances()),
        tolerances=tol,
        skipped=tuple(skipped),
    )


def _diff_row(name: str | None, shape: tuple[int, ...] | None, dtype_a: str | None, dtype_b: str | None,
              ps: Any, tol: Tolerances) -> DiffRow:
    l2_a, l2_b, l2_d, rel, cos = ps.a.l2, ps.b.l2, ps.d.l2, ps.rel, ps.cosine
    ok: bool | None = None
    if tol.any:
        ok = True
        if tol.rtol is not None or tol.atol is not None:
            # not (x <= limit): NaN fails
            ok = bool(l2_d <= (tol.atol or 0.0) + (tol.rtol or 0.0) * max(l2_a, l2_b))
        if tol.min_cosine is not None:
            ok = ok and bool(cos >= tol.min_cosine)
    return DiffRow(name, shape, dtype_a, dtype_b, ps.a.numel, l2_a, l2_b, l2_d, rel, cos, ps.d.linf, ok)
