"""The library API: files or arrays in, a :class:`~gradinspect.report.NormsReport` out.

The CLI calls only these functions.
"""

from __future__ import annotations

import math
import os
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Mapping, Sequence

from .clip import DEFAULT_EPS, clip_coef
from .loaders import ChunkBuffer, Source, TensorEntry, array_source, open_paths
from .norms import Reducer, Stats, combine, parse_norm_type
from .report import Clip, NormsReport, Skipped, TensorNorms, Totals

__all__ = ["inspect", "compute_norms", "SORT_KEYS", "tensor_stats", "select"]

SORT_KEYS = ("share", "norm", "name", "numel", "none")

Progress = Callable[[int], None]


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
) -> NormsReport:
    """Norms of the gradients saved at ``paths``: one gradient set, however many files.

    ``paths`` are files (.safetensors, .npz, .npy), directories, ``*.index.json``
    files or quoted globs.  Raises :class:`~gradinspect.errors.InputError` for
    input that cannot be read.

    >>> report = inspect("sample_data/healthy.safetensors", max_norm=1.0)  # doctest: +SKIP
    >>> report.total.l2, report.clip.coef  # doctest: +SKIP
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    p = parse_norm_type(norm_type)
    _check_options(max_norm, eps, sort, top, group_by)
    sources = open_paths(list(paths))
    return _report(sources, p, max_norm, eps, include, exclude, group_by, sort, top, progress)


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
    return _report([array_source(mapping)], p, max_norm, eps, include, exclude, group_by, sort, top, None)


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


def select(names: Iterable[str], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Callable[[str], bool]:
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
) -> tuple[list[tuple[TensorEntry, Stats]], list[Skipped]]:
    """Stream every selected floating tensor through a reducer, in file order."""
    chosen = select((), include, exclude)
    results: list[tuple[TensorEntry, Stats]] = []
    skipped: list[Skipped] = []
    reducer = Reducer(p)
    buf = ChunkBuffer(reducer.chunk)
    for src in sources:
        entries = [t for t in src.tensors if chosen(t.name)]
        skipped.extend(Skipped(t.name, t.source, t.dtype, t.skip_reason or "") for t in entries if not t.is_float)
        floats = [t for t in entries if t.is_float]
        if not floats:
            continue
        with src:
            for t in floats:
                parts = []
                for chunk in src.chunks(t, buf):
                    parts.append(reducer.reduce(chunk))
                    if progress is not None:
                        progress(chunk.nbytes)
                results.append((t, combine(parts, p)))
    return results, skipped


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
) -> NormsReport:
    results, skipped = tensor_stats(sources, p, include, exclude, progress)
    total = combine((s for _, s in results), p)
    # Shares are fractions of the global Σx²; when NaN/Inf make that undefined,
    # finite tensors get their fraction of the finite tensors' Σx² instead.
    base = combine((s for _, s in results if not s.nonfinite), p) if total.nonfinite else total
    if group_by:
        rows = _group_rows(results, base, group_by)
    else:
        rows = [_row(t.name, t.source, t.shape, t.dtype, s, base) for t, s in results]
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
        total=Totals(len(results), total.numel, total.l1, total.l2, total.linf, norm, total.sq, total.nan, total.inf),
        clip=Clip(max_norm, eps, coef, coef < 1.0, norm * coef),
        metadata={s.path: s.metadata for s in sources if s.metadata},
        omitted=omitted,
        group_by=group_by,
    )


def _row(name: str, source: str | None, shape: tuple[int, ...] | None, dtype: str, s: Stats, base: Stats, members: int = 1) -> TensorNorms:
    share = math.nan if s.nonfinite else s.share_of(base)
    return TensorNorms(name, source, shape, dtype, s.numel, s.l1, s.l2, s.linf, s.norm, s.sq, share, s.nan, s.inf, members)


def group_name(name: str, depth: int) -> str:
    """The first ``depth`` dot-separated parts of a tensor name."""
    return ".".join(name.split(".")[:depth])


def _group_rows(results: list[tuple[TensorEntry, Stats]], base: Stats, depth: int) -> list[TensorNorms]:
    groups: dict[str, list[tuple[TensorEntry, Stats]]] = {}
    for t, s in results:
        groups.setdefault(group_name(t.name, depth), []).append((t, s))
    rows = []
    for key, members in groups.items():
        if len(members) == 1:
            t, s = members[0]
            rows.append(_row(key, t.source, t.shape, t.dtype, s, base))
            continue
        sources = {t.source for t, _ in members}
        dtypes = {t.dtype for t, _ in members}
        stats = combine((s for _, s in members), base.p)
        rows.append(_row(
            key, sources.pop() if len(sources) == 1 else None, None,
            dtypes.pop() if len(dtypes) == 1 else "mixed", stats, base, len(members),
        ))
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
