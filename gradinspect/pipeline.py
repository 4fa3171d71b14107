"""The pipeline between the library functions (api.py) and the engine: PATHs in, reports out.

Stages, each a function here, in this order:

1. resolve: :func:`open_set` turns the PATHs of one gradient set, with its own ``--shards`` mode,
   into a :class:`GradientSet` (its sources, opened and closed as a unit, finished after the last read);
2. select: :func:`select` (``--include``/``--exclude``) and :func:`require_floats` (nothing selected: an error);
3. statistics: :func:`tensor_stats`, through the engine's reducers;
4. merge, in a fixed order: the loss scale divided out of each tensor's statistics (before merging, so that
   numbers do not depend on how a tensor was sharded), ``--shards`` (:func:`merge_shards`: slices merged,
   replicas compared and counted once), exact copies (:func:`find_copies`; ``dedup`` leaves them out);
5. report: :func:`norms_report` (grouping, sorting, top), :func:`diff_report`, :func:`info_report`.

Gradient sets are independent of each other: :func:`records_of_sets` computes the merged records of each
of a list of sets (a ``trend`` over steps is a loop over sets); ``diff`` opens two, each with its own shards.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import numpy as np

from .clip import clip_coef
from .errors import InputError
from .hooks import HOOK
from .norms import Stats, combine, unscaled
from .options import EPS, LOSS_SCALE, MAX_NORM, Range
from .report import (
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
from .sources import ChunkBuffer, Source, TensorEntry, array_source, close_all, open_paths

SORT_KEYS = ("share", "norm", "name", "numel", "none")
SHARDS = ("slices", "replicas")

#: Called with the bytes each piece of work covered (from worker threads); an
#: object with a ``set_total(bytes)`` method is told the total first.
Progress = Callable[[int], None]

Piece = tuple[Source, TensorEntry]  # one tensor of one file


def _column_major(t: TensorEntry) -> bool:
    """Whether ``t``'s elements are stored in Fortran (column-major) order."""
    return t.order == "F"


# --- 1. resolve: gradient sets ------------------------------------------------------------------------------


@dataclass
class GradientSet:
    """One gradient set: the sources its PATHs resolve to, and what a name in several of them means.

    ``shards`` is None (a repeated name was refused when opening), ``"slices"`` or ``"replicas"``.
    The sources are opened and closed as a unit (:func:`open_set`); :meth:`finish` after the last
    read checks that no file changed and releases them.
    """

    sources: list[Source]
    shards: str | None = None
    notes: list[str] = field(default_factory=list)  # warnings found while resolving the PATHs

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.sources)

    @property
    def metadata(self) -> dict[str, Mapping[str, str]]:
        return {s.path: s.metadata for s in self.sources if s.metadata}

    def finish(self) -> None:
        """After the last read: raise if a file changed since its header was read; release them all."""
        for src in self.sources:
            src.finish()

    def close(self) -> None:
        """Release every source without checks (cleanup)."""
        close_all(self.sources)


def check_shards(shards: str | None, name: str = "shards") -> None:
    if shards not in (None, *SHARDS):
        raise ValueError(f"{name} must be one of {', '.join(SHARDS)}, not {shards!r}")


def _paths(paths: Any) -> list[str | os.PathLike[str]]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


@contextlib.contextmanager
def open_set(paths: Any, shards: str | None = None, *, allow_repeats: bool | None = None,
             allow_outside_index: bool = False, void_as: str | None = None) -> Iterator[GradientSet]:
    """The gradient set of ``paths`` (files, directories, index files, quoted globs), closed at the end.

    A tensor name in several files is refused unless ``shards`` (or ``allow_repeats``) allows it.
    Raw void arrays (bfloat16/float8 written by ``np.save``) are read as ``void_as`` says.
    """
    check_shards(shards)
    notes: list[str] = []
    repeats = shards is not None if allow_repeats is None else allow_repeats
    hook = HOOK.get()
    opener = open_paths if hook is None else hook.open_paths  # --part and merge (hooks.py)
    gset = GradientSet(opener(_paths(paths), allow_repeats=repeats, notes=notes,
                              allow_outside_index=allow_outside_index, void_as=void_as), shards, notes)
    try:
        yield gset
    finally:
        gset.close()


def array_set(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], void_as: str | None = None) -> GradientSet:
    """The gradient set of in-memory arrays (nothing to close); numpy void arrays are read as ``void_as`` says."""
    from .sources.voids import memory_voids

    pairs, notes = memory_voids(mapping, void_as)
    return GradientSet([array_source(pairs)], notes=notes)


# --- 2. select ---------------------------------------------------------------------------------------------


def select(include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Callable[[str], bool]:
    """A predicate: included by any ``include`` glob (all when none) and by no ``exclude`` glob."""
    inc, exc = tuple(include), tuple(exclude)

    def chosen(name: str) -> bool:
        if inc and not any(fnmatchcase(name, g) for g in inc):
            return False
        return not any(fnmatchcase(name, g) for g in exc)

    return chosen


def _where(sources: Sequence[Source]) -> str:
    """The first source's path, and how many more there are."""
    more = len(sources) - 1
    return sources[0].path + (f" (and {more} more file{'s' if more != 1 else ''})" if more else "")


def _unread_values(t: TensorEntry) -> bool:
    """A tensor whose values may be gradients but are not read: complex, float128, sub-byte floats, a zip
    member that is not an .npy array, float sub-arrays not read.  Integers and booleans (step counters, masks) are
    merely skipped."""
    d = t.np_dtype if t.np_dtype is None or t.np_dtype.subdtype is None else t.np_dtype.subdtype[0]
    return not t.is_float and (d is None or d.kind in "cf")


def require_floats(sources: Sequence[Source], chosen: Callable[[TensorEntry], bool]) -> None:
    """Raise InputError unless ``chosen`` picks a floating-point tensor: a gate that checked nothing must not pass."""
    every = [t for s in sources for t in s.tensors]
    picked = [t for t in every if chosen(t)]
    for t in picked:
        if _unread_values(t):
            raise InputError(t.source, f"tensor {t.name!r}: {t.skip_reason}: its values would be left out of every "
                             f"total (--exclude {t.name!r} leaves it out knowingly)")
    if any(t.is_float and t.numel for t in picked):
        return
    if any(t.is_float for t in picked):  # a gate over zero elements checked nothing either
        raise InputError(_where(sources), "every selected floating-point tensor is empty (0 elements)")
    where = _where(sources)
    if not every:
        raise InputError(where, "no tensors")
    if not picked:
        raise InputError(where, f"--include/--exclude matched none of the {len(every)} tensors")
    seen = ", ".join(f"{d} x{n}" for d, n in Counter(t.dtype for t in picked).items())
    which = "every tensor" if len(picked) == len(every) else "every selected tensor"
    raise InputError(where, f"no floating-point tensor: {which} was skipped (dtypes seen: {seen})")


# --- 3. statistics -----------------------------------------------------------------------------------------


def _selected_bytes(sources: Sequence[Source], chosen: Callable[[str], bool]) -> int:
    return sum(t.nbytes for s in sources for t in s.tensors if t.is_float and chosen(t.name))


def tensor_stats(
    sources: Sequence[Source],
    p: float,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    progress: Progress | None = None,
    jobs: int | None = None,
    cache: Any = None,
) -> tuple[list[tuple[TensorEntry, Stats]], list[Skipped]]:
    """Stream every selected floating tensor through reducers, source by source.

    ``jobs`` threads (default: one per core) share the work; the results do not
    depend on ``jobs``.  The caller finishes the sources (:meth:`Source.finish`:
    checked unchanged, released) after its last read of them.  ``cache``: a
    :class:`~gradinspect.cache.Cache` whose entries stand for the reads (the same bits).
    """
    from .engine import default_jobs, reduce_entries

    jobs = default_jobs() if jobs is None else jobs
    hook = HOOK.get()
    reduce = reduce_entries if hook is None else hook.reduce  # --part and merge (hooks.py)
    chosen = select(include, exclude)
    results: list[tuple[TensorEntry, Stats]] = []
    skipped: list[Skipped] = []
    if progress is not None and hasattr(progress, "set_total"):
        progress.set_total(_selected_bytes(sources, chosen))
    prefetch = getattr(jobs, "prefetch", None)  # a cluster (Dask): every file's work is submitted at once
    if prefetch is not None:
        prefetch([(src, floats) for src in sources
                  if (floats := [t for t in src.tensors if t.is_float and chosen(t.name)])
                  and (cache is None or not cache.lookup(src, p))], p)
    for src in sources:
        entries = [t for t in src.tensors if chosen(t.name)]
        skipped.extend(Skipped(t.name, t.source, t.dtype, t.skip_reason or "") for t in entries if not t.is_float)
        floats = [t for t in entries if t.is_float]
        if floats and cache is not None:
            from .cache import cached_stats

            def compute(todo: list[TensorEntry], src: Source = src) -> list[Stats]:
                with src:
                    return reduce_entries(src, todo, p, jobs, progress)

            results.extend(zip(floats, cached_stats(cache, src, floats, p, compute, progress), strict=True))
        elif floats:
            with src:
                results.extend(zip(floats, reduce(src, floats, p, jobs, progress), strict=True))
    return results, skipped


# --- 4. merge: loss scale, --shards, copies ----------------------------------------------------------------


def loss_scale_of(given: float | None, sources: Sequence[Source]) -> tuple[float, str] | None:
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
            def say(t: str | None) -> str:
                return "none" if t is None else repr(t)

            raise InputError(s.path, f"metadata loss_scale {say(text)} differs from {say(first[1])} in {first[0]} "
                             "(--loss-scale, loss_scale= in Python, overrides it)")
    return None if first is None or first[2] is None else (first[2], "metadata")


class Record(NamedTuple):
    """A tensor after --shards merging: one file's tensor, or the pieces/copies of one name."""

    name: str
    source: str | None
    shape: tuple[int, ...] | None
    dtype: str
    stats: Stats
    pieces: int = 1  # files its slices or copies came from
    replica_diff: float | None = None
    entry: TensorEntry | None = None  # the one tensor whose bytes it is (None: merged slices)


def _order(t: TensorEntry) -> str:
    return "Fortran (column-major)" if _column_major(t) else "C (row-major)"


def _check_replicas(name: str, copies: Sequence[TensorEntry]) -> None:
    """Copies of a tensor must have its shape and element order."""
    t0 = copies[0]
    for t in copies[1:]:
        if t.shape != t0.shape:
            raise InputError(t.source,
                             f"replica of {name!r} has shape {list(t.shape)}, but {list(t0.shape)} in {t0.source}")
        if _column_major(t) != _column_major(t0):
            raise InputError(t.source, f"replica of {name!r} is stored in {_order(t)} order, "
                                       f"but in {_order(t0)} order in {t0.source}")


def merge_shards(results: list[tuple[TensorEntry, Stats]], shards: str | None,
                 sources: Sequence[Source], p: float, scale: float = 1.0) -> tuple[list[Record], list[str]]:
    """Records for the rows, and warnings; see ``--shards``."""
    if shards is None:  # names are unique (open_paths made sure)
        return [Record(t.name, t.source, t.shape, t.dtype, st, entry=t) for t, st in results], []
    by_name: dict[str, list[tuple[TensorEntry, Stats]]] = {}
    for t, st in results:
        by_name.setdefault(t.name, []).append((t, st))
    records: list[Record] = []
    warnings: list[str] = []
    src_of = {s.path: s for s in sources}
    tools: _PairTools | None = None
    for name, copies in by_name.items():
        t0, s0 = copies[0]
        if len(copies) == 1:
            records.append(Record(name, t0.source, t0.shape, t0.dtype, s0, entry=t0))
            continue
        dtypes = {t.dtype for t, _ in copies}
        dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
        if shards == "slices":
            stats = combine((st for _, st in copies), p)
            records.append(Record(name, None, None, dtype, stats, len(copies)))
            continue
        _check_replicas(name, [t for t, _ in copies])
        bad = [(t, st) for t, st in copies if st.nonfinite]
        if bad:  # NaN/inf in any copy must show, whichever copy it is in
            worst = math.nan
            warnings.append(f"copies of {name} hold NaN/inf values: their difference is undefined")
            t0, s0 = bad[0]
        else:
            tools = tools or _PairTools.make()
            worst = max(pair_stats([(src_of[t0.source], t0)], [(src_of[t.source], t)], tools).d.linf
                        for t, _ in copies[1:]) / scale
            if worst != 0.0:
                warnings.append(f"the {len(copies)} copies of {name} differ: max |difference| {worst:.6g}")
        records.append(Record(name, None, t0.shape, dtype, s0, len(copies), worst, t0))
    return records, warnings


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


def _elements(pieces: Sequence[Piece], buf: ChunkBuffer) -> Iterator[np.ndarray]:
    """The elements of ``pieces`` one after the other, in chunks (views into ``buf``: use each before the next)."""
    for src, t in pieces:
        with src:
            yield from src.chunks(t, buf)


_EMPTY = np.empty(0)


def _aligned(ga: Iterator[np.ndarray], gb: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Equally long pairs of chunks from two element streams, until either ends."""
    ca = cb = _EMPTY
    while True:
        while not len(ca):
            nxt = next(ga, None)
            if nxt is None:
                return
            ca = nxt
        while not len(cb):
            nxt = next(gb, None)
            if nxt is None:
                return
            cb = nxt
        if len(ca) == len(cb):  # the usual case: equal chunks, no views to make
            yield ca, cb
            ca = cb = _EMPTY
            continue
        k = min(len(ca), len(cb))
        yield ca[:k], cb[:k]
        ca, cb = ca[k:], cb[k:]


def pair_stats(a: Sequence[Piece], b: Sequence[Piece], tools: _PairTools) -> Any:
    """PairStats of two tensors with as many elements, each the concatenation of its pieces in order, streamed."""
    from .diff import combine_pairs

    hook = HOOK.get()
    if hook is not None:  # --part and merge (hooks.py)
        return hook.pair_stats(a, b, tools)

    reducer, buf_a, buf_b = tools
    if len(a) == len(b) == 1:  # one tensor each (the usual case): their chunks pair up as they come
        (sa, ta), (sb, tb) = a[0], b[0]
        with sa, sb:
            ga, gb = sa.chunks(ta, buf_a), sb.chunks(tb, buf_b)
            parts = [reducer.reduce(ca, cb) for ca, cb in zip(ga, gb, strict=False)]  # _drain checks the ends
            _drain(ga, gb)
    else:
        ga, gb = _elements(a, buf_a), _elements(b, buf_b)
        parts = [reducer.reduce(ca, cb) for ca, cb in _aligned(ga, gb)]
        _drain(ga, gb)
    return combine_pairs(parts)


def pair_stats_of(pairs: Sequence[tuple[Sequence[Piece], Sequence[Piece]]]) -> list[Any]:
    """:func:`pair_stats` of each pair, with one reducer and its buffers (what a Dask task runs)."""
    tools = _PairTools.make()
    return [pair_stats(a, b, tools) for a, b in pairs]


def _drain(*readers: Iterator[np.ndarray]) -> None:
    """Run readers past their last chunk, where they check CRCs and that the data was all there
    (equal element counts end together)."""
    for rest in readers:
        for _ in rest:
            pass


def find_copies(records: list[Record], sources: Sequence[Source]) -> dict[str, str]:
    """{name: name of the first record in file order with the same bytes} (tied weights saved twice).

    Only tensors with the same largest magnitude (exact and cheap: one dict, so
    a set without copies costs nothing), dtype, shape, order, element and
    NaN/Inf counts, and the same sums (within rounding: the same bytes may be
    summed in another order, one tensor deflated and one not) have their bytes
    compared, streamed chunk by chunk.  All-zero or empty tensors are never copies.
    """
    seen: dict[float, Record] = {}
    clash: dict[float, list[Record]] = {}
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
        firsts: list[Record] = []
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


def _may_be_copies(a: Record, b: Record) -> bool:
    ta, tb, sa, sb = a.entry, b.entry, a.stats, b.stats
    assert ta is not None and tb is not None
    if (ta.dtype, ta.shape, _column_major(ta), sa.numel, sa.nan, sa.inf) != (
            tb.dtype, tb.shape, _column_major(tb), sb.numel, sb.nan, sb.inf):
        return False
    if sa.nonfinite:
        return True  # equal NaN/Inf counts: only the bytes can tell
    return math.isclose(sa.l1, sb.l1, rel_tol=1e-9) and math.isclose(sa.l2, sb.l2, rel_tol=1e-9)


def _same_bytes(sa: Source, ta: TensorEntry, sb: Source, tb: TensorEntry, tools: _PairTools) -> bool:
    """True when two tensors of the same dtype and shape hold the same bytes (NaN payloads and -0.0 included)."""
    if sa is sb and (ta.extent, ta.strides, ta.np_dtype, ta.shape) == (tb.extent, tb.strides, tb.np_dtype, tb.shape):
        return True  # two names of the very same bytes (tied weights in a torch state_dict): nothing to read
    hook = HOOK.get()
    if hook is not None:  # --part and merge (hooks.py)
        return bool(hook.same_bytes(sa, ta, sb, tb, tools))
    _, buf_a, buf_b = tools
    with sa, sb:
        for ca, cb in zip(sa.chunks(ta, buf_a), sb.chunks(tb, buf_b), strict=False):  # stops at a difference
            if not np.array_equal(np.ascontiguousarray(ca).view(np.uint8), np.ascontiguousarray(cb).view(np.uint8)):
                return False
    return True


@dataclass
class SetRecords:
    """One gradient set's statistics after every merge stage: what a report (or a step of a trend) is made of."""

    gset: GradientSet
    records: list[Record]
    skipped: list[Skipped]
    copies: dict[str, str]  # {name: the earlier tensor it is an exact copy of}; empty with dedup (left out)
    warnings: list[str]  # found while merging (replicas that differ, copies)
    loss_scale: tuple[float, str] | None  # divided out, and where it came from ("option" or "metadata")


def set_records(gset: GradientSet, p: float, include: Iterable[str] = (), exclude: Iterable[str] = (),
                progress: Progress | None = None, jobs: int | None = None, loss_scale: float | None = None,
                dedup: bool = False, cache: Any = None) -> SetRecords:
    """Select, compute and merge one gradient set; finishes its sources (their last read is here)."""
    scale_from = loss_scale_of(loss_scale, gset.sources)
    chosen = select(include, exclude)
    require_floats(gset.sources, lambda t: chosen(t.name))
    results, skipped = tensor_stats(gset.sources, p, include, exclude, progress, jobs, cache)
    scale = 1.0 if scale_from is None else scale_from[0]
    if scale != 1.0:
        results = [(t, unscaled(st, scale)) for t, st in results]
    records, warnings = merge_shards(results, gset.shards, gset.sources, p, scale)
    if gset.shards:
        skipped = list({sk.name: sk for sk in skipped}.values())
    copies = find_copies(records, gset.sources)
    gset.finish()  # the last read was above (replicas and copies compare bytes)
    for name, first in copies.items():
        warnings.append(f"{name} is an exact copy of {first} (tied weights?): "
                        + ("counted once (--dedup)" if dedup else "counted twice; --dedup counts it once"))
    if dedup:  # left out, as model.parameters() leaves out tied parameters
        records = [r for r in records if r.name not in copies]
        copies = {}
    return SetRecords(gset, records, skipped, copies, warnings, scale_from)


def records_of_sets(sets: Sequence[GradientSet], p: float, include: Iterable[str] = (),
                    exclude: Iterable[str] = (), progress: Progress | None = None, jobs: int | None = None,
                    loss_scale: float | None = None, dedup: bool = False, cache: Any = None) -> list[SetRecords]:
    """:func:`set_records` of each independent set in turn; ``progress`` is told the total of them all."""
    if len(sets) > 1 and progress is not None and hasattr(progress, "set_total"):
        chosen = select(include, exclude)
        progress.set_total(sum(_selected_bytes(s.sources, chosen) for s in sets))
        told = progress

        def progress(n: int) -> None:  # no set_total: the total of every set was told
            told(n)

    return [set_records(s, p, include, exclude, progress, jobs, loss_scale, dedup, cache) for s in sets]


# --- 5. reports --------------------------------------------------------------------------------------------


def check_norms_options(max_norm: float, eps: float, sort: str, top: int | None, group_by: int | str | None,
                        group_sep: str = ".", loss_scale: float | None = None) -> None:
    """The library's checks of the norm options: the ranges declared once in :mod:`gradinspect.options`."""
    if loss_scale is not None:
        LOSS_SCALE.check(loss_scale)
    MAX_NORM.check(max_norm)
    EPS.check(eps)
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if top is not None:
        Range(0, integer=True).check("top", top)
    compile_group_by(group_by)
    if not isinstance(group_sep, str) or not group_sep:
        raise ValueError(f"group_sep must be a non-empty string, not {group_sep!r}")


def norms_report(sr: SetRecords, p: float, max_norm: float, eps: float, group_by: int | str | None = None,
                 group_sep: str = ".", sort: str = "share", top: int | None = None,
                 dedup: bool = False) -> NormsReport:
    """The norms report of one set's records: rows (grouped, sorted, cut to ``top``), totals and the clip."""
    records = sr.records
    total = combine((r.stats for r in records), p)
    # Shares are fractions of the global Σx²; when NaN/Inf make that undefined,
    # finite tensors get their fraction of the finite tensors' Σx² instead.
    base = combine((r.stats for r in records if not r.stats.nonfinite), p) if total.nonfinite else total
    by = compile_group_by(group_by)
    if by is not None:
        rows = _group_rows(records, base, by, group_sep)
    else:
        rows = [_row(r, base, duplicate_of=sr.copies.get(r.name)) for r in records]
    rows = sort_rows(rows, sort)
    omitted = 0
    if top is not None and len(rows) > top:
        rows, omitted = rows[:top], len(rows) - top
    norm = total.norm
    coef = clip_coef(norm, max_norm, eps)
    return NormsReport(
        sources=sr.gset.paths,
        norm_type=p,
        tensors=tuple(rows),
        skipped=tuple(sr.skipped),
        total=Totals(tensors=len(records), numel=total.numel, l1=total.l1, l2=total.l2, linf=total.linf, norm=norm,
                     sq=total.sq, nan=total.nan, inf=total.inf),
        clip=Clip(max_norm=max_norm, eps=eps, coef=coef, clipped=coef < 1.0, norm_after=norm * coef),
        metadata=sr.gset.metadata,
        omitted=omitted,
        group_by=group_by,
        group_sep=group_sep if group_by is not None else None,
        shards=sr.gset.shards,
        dedup=dedup,
        notes=(*sr.gset.notes, *sr.warnings),
        loss_scale=None if sr.loss_scale is None else sr.loss_scale[0],
        loss_scale_from=None if sr.loss_scale is None else sr.loss_scale[1],
    )


def _row(r: Record, base: Stats, name: str | None = None, members: int = 1,
         duplicate_of: str | None = None) -> TensorNorms:
    s = r.stats
    share = math.nan if s.nonfinite else s.share_of(base)
    return TensorNorms(name=name or r.name, source=r.source, shape=r.shape, dtype=r.dtype, numel=s.numel, l1=s.l1,
                       l2=s.l2, linf=s.linf, norm=s.norm, sq=s.sq, share=share, nan=s.nan, inf=s.inf,
                       members=members, replica_max_diff=r.replica_diff, pieces=r.pieces, duplicate_of=duplicate_of)


def group_name(name: str, by: int | str | re.Pattern[str], sep: str = ".") -> str:
    """The group of a tensor name.

    ``by`` an integer N: the first N ``sep``-separated parts of the name.
    ``by`` a regular expression (searched in the name): the text of its
    capturing groups that matched, joined by ``sep``, or the whole match when
    it has none; a name it does not match is a group of its own.
    """
    return group_key(name, by, sep)[0]


def group_key(name: str, by: int | str | re.Pattern[str], sep: str = ".") -> tuple[str, bool]:
    """(the group's name, whether the tensor is a group of its own because the pattern does not match it):
    rows are keyed by both, so a tensor named like a group is never merged into that group."""
    if isinstance(by, int):
        return sep.join(name.split(sep)[:by]), False
    m = re.search(by, name)
    key = "" if m is None else sep.join(g for g in m.groups() if g) if m.re.groups else m.group(0)
    return (key, False) if key else (name, True)


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


def _group_rows(records: list[Record], base: Stats, by: int | re.Pattern[str], sep: str) -> list[TensorNorms]:
    groups: dict[tuple[str, bool], list[Record]] = {}
    for r in records:
        groups.setdefault(group_key(r.name, by, sep), []).append(r)
    rows = []
    for (key, _), members in groups.items():
        if len(members) == 1:
            rows.append(_row(members[0], base, key))
            continue
        sources = {r.source for r in members}
        dtypes = {r.dtype for r in members}
        diffs = [r.replica_diff for r in members if r.replica_diff is not None]
        merged = Record(key, sources.pop() if len(sources) == 1 else None, None,
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


def info_report(gset: GradientSet) -> InfoReport:
    """Every tensor of the set from its headers, in file order (names may repeat)."""
    return InfoReport(
        sources=gset.paths,
        tensors=tuple(InfoTensor(name=t.name, source=t.source, dtype=t.dtype, shape=t.shape, numel=t.numel,
                                 bytes=t.nbytes, chunks=t.chunks) for s in gset.sources for t in s.tensors),
        metadata=gset.metadata,
        notes=tuple(gset.notes),
    )


# --- diff: two gradient sets, tensor by tensor -------------------------------------------------------------


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
        if first.name != t.name:  # the same name in several files is a --shards set's pieces or copies
            raise InputError(s.path, f"--strip-prefix turns both {first.name!r} and {t.name!r} into {name!r}")
    return out


def _side(gset: GradientSet, named: list[tuple[str, Source, TensorEntry]], label: str, tools: _PairTools,
          warnings: list[str]) -> dict[str, list[Piece]]:
    """{compared name: its pieces in file order} of one diff side after its --shards merge.

    Slices stay pieces (compared as their concatenation); of replicas, the copy whose numbers
    ``norms`` shows is kept, after the copies were compared as ``norms`` compares them.
    """
    side: dict[str, list[Piece]] = {}
    for name, s, t in named:
        side.setdefault(name, []).append((s, t))
    if gset.shards == "replicas":
        for name, copies in side.items():
            if len(copies) > 1:
                side[name] = [_shown_replica(name, copies, label, tools, warnings)]
    return side


def _shown_replica(name: str, copies: list[Piece], label: str, tools: _PairTools, warnings: list[str]) -> Piece:
    """The first copy, or the first holding NaN/Inf; warns when the copies differ."""
    if not all(t.is_float for _, t in copies):
        return copies[0]
    _check_replicas(name, [t for _, t in copies])
    pairs = [pair_stats([copies[0]], [c], tools) for c in copies[1:]]
    bad = [pairs[0].a.nonfinite, *(ps.b.nonfinite for ps in pairs)]
    if any(bad):
        warnings.append(f"{label}: copies of {name} hold NaN/inf values: their difference is undefined")
        return copies[bad.index(True)]
    worst = max(ps.d.linf for ps in pairs)
    if worst != 0.0:
        warnings.append(f"{label}: the {len(copies)} copies of {name} differ: max |difference| {worst:.6g}")
    return copies[0]


def _shape(pieces: Sequence[Piece]) -> tuple[int, ...]:
    """A tensor's shape; of one merged from slices, its element count."""
    return pieces[0][1].shape if len(pieces) == 1 else (sum(t.numel for _, t in pieces),)


def _dtype(pieces: Sequence[Piece]) -> str:
    if len(pieces) == 1:
        return pieces[0][1].dtype
    dtypes = {t.dtype for _, t in pieces}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def _layout(pieces: Sequence[Piece]) -> tuple[int, ...] | bool | None:
    """How the pieces, concatenated in file order, lay out a C-order tensor.

    One tensor: its trailing dimensions.  Flat (0-d or 1-d) slices, as FSDP and
    ZeRO save them: None (any shape).  Slices along the first dimension: their
    common trailing dimensions.  Anything else (Fortran order, other splits): False.
    """
    if any(_column_major(t) for _, t in pieces):
        return False
    if len(pieces) == 1:
        return pieces[0][1].shape[1:]
    if all(len(t.shape) <= 1 for _, t in pieces):
        return None
    tails = {t.shape[1:] for _, t in pieces}
    return tails.pop() if len(tails) == 1 and all(t.shape for _, t in pieces) else False


def _unpaired(name: str, pa: list[Piece], pb: list[Piece]) -> Mismatch | Skipped | None:
    """Why the tensors of ``name`` on sides A and B cannot be compared element by element (None: they can)."""
    ta = pa[0][1]
    shape_a, shape_b = _shape(pa), _shape(pb)

    def mismatch(reason: str) -> Mismatch:
        return Mismatch(name=name, shape_a=shape_a, shape_b=shape_b, dtype_a=_dtype(pa), dtype_b=_dtype(pb),
                        reason=reason)

    single = len(pa) == len(pb) == 1
    if shape_a != shape_b and (single or sum(t.numel for _, t in pa) != sum(t.numel for _, t in pb)):
        return mismatch("shapes differ")
    float_a, float_b = all(t.is_float for _, t in pa), all(t.is_float for _, t in pb)
    same_slicing = single or [t.shape for _, t in pa] == [t.shape for _, t in pb]
    if not float_a and not float_b:  # e.g. a step counter on both sides: not gradients
        return Skipped(ta.name, ta.source, ta.dtype, ta.skip_reason or "")
    if float_a != float_b:
        return mismatch("one side is not a floating-point tensor")
    if same_slicing:
        for (_, x), (_, y) in zip(pa, pb, strict=True):
            if _column_major(x) != _column_major(y):
                return mismatch(f"A is in {_order(x)} order, B in {_order(y)} order")
        return None
    la, lb = _layout(pa), _layout(pb)
    if la is False or lb is False or (la is not None and lb is not None and la != lb):
        return mismatch("sliced differently")
    return None


def diff_report(set_a: GradientSet, set_b: GradientSet, tol: Tolerances, include: Iterable[str] = (),
                exclude: Iterable[str] = (), progress: Progress | None = None, strip_a: Sequence[str] = (),
                strip_b: Sequence[str] = (), executor: Any = None) -> DiffReport:
    """Compare two gradient sets tensor by tensor; finishes both sets' sources.

    ``executor``: one with ``run_pairs`` (:class:`~gradinspect.executors_dask.DaskExecutor`) computes the
    pairs' statistics elsewhere, bit for bit as here."""
    from .diff import combine_pairs

    chosen = select(include, exclude)
    named_a = _named(set_a.sources, chosen, strip_a)
    named_b = _named(set_b.sources, chosen, strip_b)
    tools = _PairTools.make()
    warnings: list[str] = []
    for label, gset in (("A", set_a), ("B", set_b)):  # diff compares stored values: say when they are scaled
        scales = sorted({s.metadata["loss_scale"] for s in gset.sources
                         if "loss_scale" in s.metadata and _scaled(s.metadata["loss_scale"])})
        if scales:
            warnings.append(f"{label} ({_where(gset.sources)}) holds metadata loss_scale {', '.join(scales)}: diff "
                            "compares the stored (scaled) values; norms, check and trend divide it out")
    side_a = _side(set_a, named_a, "A", tools, warnings)
    side_b = _side(set_b, named_b, "B", tools, warnings)
    skipped: list[Skipped] = []
    pairs: list[tuple[str, list[Piece], list[Piece]]] = []
    mismatched: list[Mismatch] = []
    only_a: list[str] = []
    for name, pa in side_a.items():
        pb = side_b.get(name)
        if pb is None:
            only_a.append(name)
            continue
        why = _unpaired(name, pa, pb)
        if why is None:
            pairs.append((name, pa, pb))
        elif isinstance(why, Skipped):
            skipped.append(why)
        else:
            mismatched.append(why)
    only_b = [n for n in side_b if n not in side_a]
    rows: list[DiffRow] = []
    stats = []
    computed = None if executor is None else iter(executor.run_pairs([(pa, pb) for _, pa, pb in pairs], progress))
    for name, pa, pb in pairs:
        if computed is not None:
            ps = next(computed)
        else:
            ps = pair_stats(pa, pb, tools)
            if progress is not None:
                progress(sum(t.nbytes for _, t in (*pa, *pb)))
        stats.append(ps)
        shape = pa[0][1].shape if len(pa) == 1 else _shape(pb)
        rows.append(_diff_row(name, shape, _dtype(pa), _dtype(pb), ps, tol))
    set_a.finish()
    set_b.finish()
    total = _diff_row(None, None, None, None, combine_pairs(stats), Tolerances())
    if not rows:  # nothing compared: no global number means anything (JSON: null)
        nan = math.nan
        total = DiffRow(name=None, shape=None, dtype_a=None, dtype_b=None, numel=0, l2_a=nan, l2_b=nan, l2_diff=nan,
                        rel=nan, cosine=nan, linf_diff=nan)
    rows.sort(key=lambda r: _desc(r.rel))
    return DiffReport(
        a=set_a.paths,
        b=set_b.paths,
        tensors=tuple(rows),
        only_a=tuple(only_a),
        only_b=tuple(only_b),
        mismatched=tuple(mismatched),
        total=total,
        tolerances=tol,
        skipped=tuple(skipped),
        notes=(*set_a.notes, *set_b.notes, *warnings),
    )


def _scaled(text: str) -> bool:
    """Whether a metadata ``loss_scale`` says the values are scaled (any value but the number 1)."""
    try:
        return float(text) != 1.0
    except ValueError:
        return True


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
    return DiffRow(name=name, shape=shape, dtype_a=dtype_a, dtype_b=dtype_b, numel=ps.a.numel, l2_a=l2_a, l2_b=l2_b,
                   l2_diff=l2_d, rel=rel, cosine=cos, linf_diff=ps.d.linf, ok=ok)
