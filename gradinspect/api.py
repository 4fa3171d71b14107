"""The library API: files or arrays in, frozen reports out (norms, check, diff, info).

The CLI computes through these functions only (it also reads ``config`` and
builds ``check.Rules``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .clip import DEFAULT_EPS, clip_coef
from .errors import InputError
from .sources import ChunkBuffer, Source, TensorEntry, array_source, close_all, open_paths
from .norms import Reducer, Stats, combine, parse_norm_type, unscaled
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


@contextlib.contextmanager
def _opened(paths: Any, allow_repeats: bool = False, notes: list[str] | None = None,
            allow_outside_index: bool = False) -> Iterator[list[Source]]:
    """The sources of ``paths``, every one closed at the end, also on error; warnings to ``notes``."""
    sources = open_paths(_paths(paths), allow_repeats=allow_repeats, notes=notes,
                         allow_outside_index=allow_outside_index)
    try:
        yield sources
    finally:
        close_all(sources)


def inspect(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group_by: int | str | None = None,
    group_sep: str = ".",
    sort: str = "share",
    top: int | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    shards: str | None = None,
    dedup: bool = False,
    loss_scale: float | None = None,
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
    input that cannot be read, or when no floating-point tensor is selected, and
    for an index.json naming a shard outside its directory unless ``allow_outside_index``.

    A tensor whose bytes, dtype and shape equal an earlier one's (tied weights
    saved twice, e.g. GPT-2's ``lm_head.weight``) is a warning and names that
    one in ``duplicate_of``; ``dedup`` counts it once, as ``model.parameters()``
    does: its row is left out.  All-zero tensors are never copies; neither are
    tensors merged from several ``"slices"``.

    Gradients saved before an AMP loss scale was removed: every statistic is
    divided by ``loss_scale``, or else by the files' safetensors metadata
    ``loss_scale`` (a decimal string; the files must agree), and the clip is
    computed on the result.

    >>> report = inspect("sample_data/healthy.safetensors", max_norm=1.0)  # doctest: +SKIP
    >>> report.total.l2, report.clip.coef  # doctest: +SKIP
    """
    p = parse_norm_type(norm_type)
    _check_options(max_norm, eps, sort, top, group_by, group_sep, loss_scale)
    if shards not in (None, *SHARDS):
        raise ValueError(f"shards must be one of {', '.join(SHARDS)}, not {shards!r}")
    notes: list[str] = []
    with _opened(paths, allow_repeats=shards is not None, notes=notes,
                 allow_outside_index=allow_outside_index) as sources:
        return _report(sources, p, max_norm, eps, include, exclude, group_by, sort, top, progress, jobs, shards,
                       notes=notes, loss_scale=_loss_scale(loss_scale, sources), group_sep=group_sep, dedup=dedup)


def compute_norms(
    mapping: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    norm_type: float | int | str = 2,
    max_norm: float = 1.0,
    eps: float = DEFAULT_EPS,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    group_by: int | str | None = None,
    group_sep: str = ".",
    sort: str = "share",
    top: int | None = None,
    dedup: bool = False,
    loss_scale: float | None = None,
) -> NormsReport:
    """Like :func:`inspect`, for in-memory arrays: ``{name: array}`` or any mapping, or an
    iterable of ``(name, array)`` pairs (a name twice is a ValueError), where an array
    is anything ``np.asarray`` accepts (CPU torch tensors included, bfloat16 too)."""
    p = parse_norm_type(norm_type)
    _check_options(max_norm, eps, sort, top, group_by, group_sep, loss_scale)
    return _report([array_source(mapping)], p, max_norm, eps, include, exclude, group_by, sort, top, None, 1,
                   loss_scale=None if loss_scale is None else (float(loss_scale), "option"), group_sep=group_sep,
                   dedup=dedup)


def _loss_scale(given: float | None, sources: Sequence[Source]) -> tuple[float, str] | None:
    """The loss scale to divide out, and where it came from: ``given``, else the files' metadata."""
    if given is not None:
        return float(given), "option"
    first: tuple[str, str | None, float | None] | None = None
    for s in sources:
        text = s.metadata.get("loss_scale")
        value = None
        if text is not None:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not 0.0 < value < math.inf:
                raise InputError(s.path, f"metadata loss_scale {text!r} is not a finite number > 0")
        if first is None:
            first = (s.path, text, value)
        elif value != first[2]:
            say = (lambda t: "none" if t is None else repr(t))
            raise InputError(s.path, f"metadata loss_scale {say(text)} differs from {say(first[1])} in {first[0]} "
                             "(--loss-scale, loss_scale= in Python, overrides it)")
    return None if first is None or first[2] is None else (first[2], "metadata")


def _check_options(max_norm: float, eps: float, sort: str, top: int | None, group_by: int | str | None,
                   group_sep: str = ".", loss_scale: float | None = None) -> None:
    if loss_scale is not None and not 0.0 < loss_scale < math.inf:
        raise ValueError(f"loss_scale must be a finite number > 0, not {loss_scale}")
    if not max_norm > 0 or math.isinf(max_norm):
        raise ValueError(f"max_norm must be a finite number > 0, not {max_norm}")
    if not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, not {eps}")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if top is not None and top < 0:
        raise ValueError(f"top must be >= 0, not {top}")
    compile_group_by(group_by)
    if not isinstance(group_sep, str) or not group_sep:
        raise ValueError(f"group_sep must be a non-empty string, not {group_sep!r}")


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
    depend on ``jobs``.  The caller finishes the sources (:meth:`Source.finish`:
    checked unchanged, released) after its last read of them.
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
        if floats:
            with src:
                results.extend(zip(floats, reduce_entries(src, floats, p, jobs, progress)))
    return results, skipped


def _where(sources: Sequence[Source]) -> str:
    """The first source's path, and how many more there are."""
    more = len(sources) - 1
    return sources[0].path + (f" (and {more} more file{'s' if more != 1 else ''})" if more else "")


def require_floats(sources: Sequence[Source], chosen: Callable[[TensorEntry], bool]) -> None:
    """Raise InputError unless ``chosen`` picks a floating-point tensor: a gate that checked nothing must not pass."""
    every = [t for s in sources for t in s.tensors]
    picked = [t for t in every if chosen(t)]
    if any(t.is_float for t in picked):
        return
    where = _where(sources)
    if not every:
        raise InputError(where, "no tensors")
    if not picked:
        raise InputError(where, f"--include/--exclude matched none of the {len(every)} tensors")
    seen = ", ".join(f"{d} x{n}" for d, n in Counter(t.dtype for t in picked).items())
    which = "every tensor" if len(picked) == len(every) else "every selected tensor"
    raise InputError(where, f"no floating-point tensor: {which} was skipped (dtypes seen: {seen})")


class _Record(NamedTuple):
    """A tensor after --shards merging: one file's tensor, or the pieces/copies of one name."""

    name: str
    source: str | None
    shape: tuple[int, ...] | None
    dtype: str
    stats: Stats
    pieces: int = 1  # files its slices or copies came from
    replica_diff: float | None = None
    entry: TensorEntry | None = None  # the one tensor whose bytes it is (None: merged slices)


SHARDS = ("slices", "replicas")


def _merge(results: list[tuple[TensorEntry, Stats]], shards: str | None,
           sources: Sequence[Source], p: float, scale: float = 1.0) -> tuple[list[_Record], list[str]]:
    """Records for the rows, and warnings; see ``--shards``."""
    if shards is None:  # names are unique (open_paths made sure)
        return [_Record(t.name, t.source, t.shape, t.dtype, st, entry=t) for t, st in results], []
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
            records.append(_Record(name, t0.source, t0.shape, t0.dtype, s0, entry=t0))
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
            if t.order != t0.order:
                raise InputError(t.source, f"replica of {name!r} is stored in {_order(t)} order, but in {_order(t0)} order in {t0.source}")
        bad = [(t, st) for t, st in copies if st.nonfinite]
        if bad:  # NaN/inf in any copy must show, whichever copy it is in
            worst = math.nan
            warnings.append(f"copies of {name} hold NaN/inf values: their difference is undefined")
            t0, s0 = bad[0]
        else:
            tools = tools or _PairTools.make()
            worst = max(_pair_stats(src_of[t0.source], t0, src_of[t.source], t, tools).d.linf
                        for t, _ in copies[1:]) / scale
            if worst != 0.0:
                warnings.append(f"the {len(copies)} copies of {name} differ: max |difference| {worst:.6g}")
        records.append(_Record(name, None, t0.shape, dtype, s0, len(copies), worst, t0))
    return records, warnings


def _order(t: TensorEntry) -> str:
    return "Fortran (column-major)" if t.order == "F" else "C (row-major)"


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
    group_by: int | str | None,
    sort: str,
    top: int | None,
    progress: Progress | None,
    jobs: int | None,
    shards: str | None = None,
    group_sep: str = ".",
    dedup: bool = False,
    notes: Sequence[str] = (),
    loss_scale: tuple[float, str] | None = None,
) -> NormsReport:
    chosen = select(include, exclude)
    require_floats(sources, lambda t: chosen(t.name))
    results, skipped = tensor_stats(sources, p, include, exclude, progress, jobs)
    scale = 1.0 if loss_scale is None else loss_scale[0]
    if scale != 1.0:
        results = [(t, unscaled(st, scale)) for t, st in results]
    records, warnings = _merge(results, shards, sources, p, scale)
    if shards:
        skipped = list({sk.name: sk for sk in skipped}.values())
    copies = _copies(records, sources)
    for src in sources:  # the last read was above (replicas and copies compare bytes)
        src.finish()
    for name, first in copies.items():
        warnings.append(f"{name} is an exact copy of {first} (tied weights?): "
                        + ("counted once (--dedup)" if dedup else "counted twice; --dedup counts it once"))
    if dedup:  # left out, as model.parameters() leaves out tied parameters
        records = [r for r in records if r.name not in copies]
        copies = {}
    total = combine((r.stats for r in records), p)
    # Shares are fractions of the global Σx²; when NaN/Inf make that undefined,
    # finite tensors get their fraction of the finite tensors' Σx² instead.
    base = combine((r.stats for r in records if not r.stats.nonfinite), p) if total.nonfinite else total
    by = compile_group_by(group_by)
    if by is not None:
        rows = _group_rows(records, base, by, group_sep)
    else:
        rows = [_row(r, base, duplicate_of=copies.get(r.name)) for r in records]
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
        group_sep=group_sep if group_by is not None else None,
        shards=shards,
        dedup=dedup,
        notes=(*notes, *warnings),
        loss_scale=None if loss_scale is None else loss_scale[0],
        loss_scale_from=None if loss_scale is None else loss_scale[1],
    )


def _row(r: _Record, base: Stats, name: str | None = None, members: int = 1,
         duplicate_of: str | None = None) -> TensorNorms:
    s = r.stats
    share = math.nan if s.nonfinite else s.share_of(base)
    return TensorNorms(name or r.name, r.source, r.shape, r.dtype, s.numel, s.l1, s.l2, s.linf, s.norm, s.sq, share,
                       s.nan, s.inf, members, r.replica_diff, r.pieces, duplicate_of)


def _copies(records: list[_Record], sources: Sequence[Source]) -> dict[str, str]:
    """{name: name of the first record in file order with the same bytes} (tied weights saved twice).

    Only tensors with the same largest magnitude (exact and cheap: one dict, so
    a set without copies costs nothing), dtype, shape, order, element and
    NaN/Inf counts, and the same sums (within rounding: the same bytes may be
    summed in another order, one tensor deflated and one not) have their bytes
    compared, streamed chunk by chunk.  All-zero or empty tensors are never copies.
    """
    seen: dict[float, _Record] = {}
    clash: dict[float, list[_Record]] = {}
    for r in records:
        m = r.stats.linf  # 0.0 only for finite all-zero or empty tensors; NaN when any NaN
        if m == 0.0 or r.entry is None:
            continue
        if math.isnan(m):
            m = -float(r.stats.nan)  # NaN is no dict key; real magnitudes are >= 0
        first = seen.setdefault(m, r)
        if first is not r:
            clash.setdefault(m, [first]).append(r)
    out: dict[str, str] = {}
    src_of = {s.path: s for s in sources}
    tools: _PairTools | None = None
    for group in clash.values():
        firsts: list[_Record] = []
        for r in group:
            for f in firsts:
                if _may_be_copies(f, r):
                    tools = tools or _PairTools.make()
                    ta, tb = f.entry, r.entry
                    assert ta is not None and tb is not None
                    if _same_bytes(src_of[ta.source], ta, src_of[tb.source], tb, tools):
                        out[r.name] = f.name
                        break
            else:
                firsts.append(r)
    return out


def _may_be_copies(a: _Record, b: _Record) -> bool:
    ta, tb, sa, sb = a.entry, b.entry, a.stats, b.stats
    assert ta is not None and tb is not None
    if (ta.dtype, ta.shape, ta.order, sa.numel, sa.nan, sa.inf) != (tb.dtype, tb.shape, tb.order, sb.numel,
                                                                        sb.nan, sb.inf):
        return False
    if sa.nonfinite:
        return True  # equal NaN/Inf counts: only the bytes can tell
    return math.isclose(sa.l1, sb.l1, rel_tol=1e-9) and math.isclose(sa.l2, sb.l2, rel_tol=1e-9)


def _same_bytes(sa: Source, ta: TensorEntry, sb: Source, tb: TensorEntry, tools: _PairTools) -> bool:
    """True when two tensors of the same dtype and shape hold the same bytes (NaN payloads and -0.0 included)."""
    _, buf_a, buf_b = tools
    with sa, sb:
        for ca, cb in zip(sa.chunks(ta, buf_a), sb.chunks(tb, buf_b)):
            if not np.array_equal(np.ascontiguousarray(ca).view(np.uint8), np.ascontiguousarray(cb).view(np.uint8)):
                return False
    return True


def group_name(name: str, by: int | str | re.Pattern[str], sep: str = ".") -> str:
    """The group of a tensor name.

    ``by`` an integer N: the first N ``sep``-separated parts of the name.
    ``by`` a regular expression (searched in the name): the text of its
    capturing groups that matched, joined by ``sep``, or the whole match when
    it has none; a name it does not match is a group of its own.
    """
    if isinstance(by, int):
        return sep.join(name.split(sep)[:by])
    m = re.search(by, name)
    if m is None:
        return name
    key = sep.join(g for g in m.groups() if g) if m.re.groups else m.group(0)
    return key or name


def compile_group_by(group_by: int | str | None) -> int | re.Pattern[str] | None:
    """``group_by`` checked: an integer >= 1, a regular expression, or None."""
    if group_by is None or isinstance(group_by, int):
        if group_by is not None and (isinstance(group_by, bool) or group_by < 1):
            raise ValueError(f"group_by must be an integer >= 1 or a regular expression, not {group_by!r}")
        return group_by
    if not isinstance(group_by, str) or not group_by:
        raise ValueError(f"group_by must be an integer >= 1 or a regular expression, not {group_by!r}")
    try:
        return re.compile(group_by)
    except re.error as e:
        raise ValueError(f"group_by {group_by!r} is not a valid regular expression ({e})") from None


def _group_rows(records: list[_Record], base: Stats, by: int | re.Pattern[str], sep: str) -> list[TensorNorms]:
    groups: dict[str, list[_Record]] = {}
    for r in records:
        groups.setdefault(group_name(r.name, by, sep), []).append(r)
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
    dedup: bool = False,
    loss_scale: float | None = None,
    allow_outside_index: bool = False,
) -> CheckReport:
    """Evaluate :class:`gradinspect.check.Rules` (default: only ``nonfinite``) on ``paths``."""
    from .check import Rules, evaluate

    report = inspect(paths, norm_type=norm_type, max_norm=max_norm, eps=eps, include=include,
                     exclude=exclude, sort="none", progress=progress, jobs=jobs, shards=shards, dedup=dedup,
                     loss_scale=loss_scale, allow_outside_index=allow_outside_index)
    return evaluate(report, rules if rules is not None else Rules())


def info(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
         allow_outside_index: bool = False) -> InfoReport:
    """Every tensor's name, dtype, shape and size, from the headers alone (shards may repeat names)."""
    notes: list[str] = []
    with _opened(paths, allow_repeats=True, notes=notes, allow_outside_index=allow_outside_index) as sources:
        return InfoReport(
            sources=tuple(s.path for s in sources),
            tensors=tuple(InfoTensor(t.name, t.source, t.dtype, t.shape, t.numel, t.nbytes)
                          for s in sources for t in s.tensors),
            metadata={s.path: s.metadata for s in sources if s.metadata},
            notes=tuple(notes),
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
    strip_prefix: Iterable[str] = (),
    strip_prefix_a: Iterable[str] = (),
    strip_prefix_b: Iterable[str] = (),
    allow_outside_index: bool = False,
) -> DiffReport:
    """Compare two gradient sets tensor by tensor and as a whole, streaming both.

    A tensor fails when ``l2_diff > atol + rtol * max(l2_a, l2_b)`` (when
    ``rtol`` or ``atol`` is given; the other counts as 0) or when
    ``cosine < min_cosine``.  With a tolerance, nothing compared fails too.

    Names are matched after removing from each the first matching prefix of
    ``strip_prefix_a`` (A) or ``strip_prefix_b`` (B), then of ``strip_prefix``
    (both sides); ``include``/``exclude`` and the report see those names.
    """
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not 0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, not {v}")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be between -1 and 1, not {min_cosine}")
    tol = Tolerances(rtol, atol, min_cosine, allow_missing)
    notes: list[str] = []
    with _opened(a, notes=notes, allow_outside_index=allow_outside_index) as srcs_a, \
            _opened(b, notes=notes, allow_outside_index=allow_outside_index) as srcs_b:
        return _diff(srcs_a, srcs_b, tol, include, exclude, progress, notes,
                     (*strip_prefix_a, *strip_prefix), (*strip_prefix_b, *strip_prefix))


def _diff(srcs_a: list[Source], srcs_b: list[Source], tol: Tolerances, include: Iterable[str],
          exclude: Iterable[str], progress: Progress | None, notes: list[str],
          strip_a: tuple[str, ...], strip_b: tuple[str, ...]) -> DiffReport:
    from .diff import combine_pairs

    chosen = select(include, exclude)
    side_a = _named(srcs_a, chosen, strip_a)
    side_b = _named(srcs_b, chosen, strip_b)
    where_b = {name: (s, t) for name, s, t in side_b}
    names_a: set[str] = set()
    skipped: list[Skipped] = []
    pairs: list[tuple[str, Source, TensorEntry, Source, TensorEntry]] = []
    mismatched: list[Mismatch] = []
    only_a: list[str] = []
    for name, sa, ta in side_a:
        names_a.add(name)
        hit = where_b.get(name)
        if hit is None:
            only_a.append(name)
            continue
        sb, tb = hit
        if ta.shape != tb.shape:
            mismatched.append(Mismatch(name, ta.shape, tb.shape, ta.dtype, tb.dtype, "shapes differ"))
        elif not ta.is_float and not tb.is_float:  # e.g. a step counter on both sides: not gradients
            skipped.append(Skipped(ta.name, ta.source, ta.dtype, ta.skip_reason or ""))
        elif ta.is_float != tb.is_float:
            mismatched.append(Mismatch(name, ta.shape, tb.shape, ta.dtype, tb.dtype,
                                       "one side is not a floating-point tensor"))
        elif ta.order != tb.order:
            mismatched.append(Mismatch(name, ta.shape, tb.shape, ta.dtype, tb.dtype,
                                       f"A is in {_order(ta)} order, B in {_order(tb)} order"))
        else:
            pairs.append((name, sa, ta, sb, tb))
    only_b = [n for n in where_b if n not in names_a]
    tools = _PairTools.make()
    rows: list[DiffRow] = []
    stats = []
    for name, sa, ta, sb, tb in pairs:
        ps = _pair_stats(sa, ta, sb, tb, tools)
        if progress is not None:
            progress(ta.nbytes + tb.nbytes)
        stats.append(ps)
        rows.append(_diff_row(name, ta.shape, ta.dtype, tb.dtype, ps, tol))
    for src in (*srcs_a, *srcs_b):
        src.finish()
    total = _diff_row(None, None, None, None, combine_pairs(stats), Tolerances())
    if not rows:  # nothing compared: no global number means anything (JSON: null)
        nan = math.nan
        total = DiffRow(None, None, None, None, 0, nan, nan, nan, nan, nan, nan)
    rows.sort(key=lambda r: _desc(r.rel))
    return DiffReport(
        a=tuple(s.path for s in srcs_a),
        b=tuple(s.path for s in srcs_b),
        tensors=tuple(rows),
        only_a=tuple(only_a),
        only_b=tuple(only_b),
        mismatched=tuple(mismatched),
        total=total,
        tolerances=tol,
        skipped=tuple(skipped),
        notes=tuple(notes),
    )


def _strip(name: str, prefixes: Sequence[str]) -> str:
    """``name`` without the first of ``prefixes`` it starts with."""
    for pre in prefixes:
        if pre and name.startswith(pre):
            return name[len(pre):]
    return name


def _named(sources: Sequence[Source], chosen: Callable[[str], bool],
           prefixes: Sequence[str]) -> list[tuple[str, Source, TensorEntry]]:
    """(compared name, source, tensor) of one diff side's selected tensors, in file order."""
    out = [(_strip(t.name, prefixes), s, t) for s in sources for t in s.tensors]
    out = [x for x in out if chosen(x[0])]
    picked = {id(t) for _, _, t in out}
    require_floats(sources, lambda t: id(t) in picked)
    seen: dict[str, TensorEntry] = {}
    for name, s, t in out:
        first = seen.setdefault(name, t)
        if first is not t:
            raise InputError(s.path, f"--strip-prefix turns both {first.name!r} and {t.name!r} into {name!r}")
    return out


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
