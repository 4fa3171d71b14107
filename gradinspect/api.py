"""The library API: files or arrays in, frozen reports out (norms, check, diff, info).

The CLI computes through these functions only (it also reads ``config`` and
builds ``check.Rules``).  Each is a thin call into :mod:`gradinspect.pipeline`
(gradient sets, selection, statistics, merging, reports).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .clip import DEFAULT_EPS
from .norms import parse_norm_type
from .options import COSINE, NON_NEGATIVE
from .pipeline import SHARDS as SHARDS  # re-exported
from .pipeline import (
    SORT_KEYS,
    Progress,
    array_set,
    check_norms_options,
    check_shards,
    diff_report,
    info_report,
    norms_report,
    open_set,
    records_of_sets,
    select,
    tensor_stats,
)
from .pipeline import compile_group_by as compile_group_by  # re-exported
from .pipeline import group_name as group_name  # re-exported
from .pipeline import require_floats as require_floats  # re-exported
from .pipeline import sort_rows as sort_rows  # re-exported
from .report import CheckReport, DiffReport, InfoReport, NormsReport, Tolerances

__all__ = ["inspect", "compute_norms", "check", "diff", "info", "SORT_KEYS", "tensor_stats", "select"]


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
    cache: Any = None,
    void_as: str | None = None,
) -> NormsReport:
    """Norms of the gradients saved at ``paths``: one gradient set, however many files.

    ``paths`` are files (.safetensors, .npz, .npy, torch .pt), directories (not their torch files), ``*.index.json``
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

    ``cache``: a :class:`gradinspect.cache.Cache` of each file's statistics (see there); the numbers
    are bit for bit those without it.

    ``void_as``: what raw void arrays (how ``np.save`` writes ml_dtypes' bfloat16 ``<V2`` and float8
    ``<V1``) are read as: a dtype name (``"bfloat16"``, ``"float16"``, ``"float8_e4m3fn"``, ...) for every
    raw array, of that width only, or ``"skip"``; None reads ``V2`` as bfloat16 (with a note in
    ``notes``) and refuses the others.

    >>> report = inspect("sample_data/healthy.safetensors", max_norm=1.0)  # doctest: +SKIP
    >>> report.total.l2, report.clip.coef  # doctest: +SKIP
    """
    p = parse_norm_type(norm_type)
    check_norms_options(max_norm, eps, sort, top, group_by, group_sep, loss_scale)
    check_shards(shards)
    with open_set(paths, shards, allow_outside_index=allow_outside_index, void_as=void_as) as gset:
        (records,) = records_of_sets([gset], p, include, exclude, progress, jobs, loss_scale, dedup, cache)
        return norms_report(records, p, max_norm, eps, group_by, group_sep, sort, top, dedup)


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
    void_as: str | None = None,
) -> NormsReport:
    """Like :func:`inspect`, for in-memory arrays: ``{name: array}`` or any mapping, or an
    iterable of ``(name, array)`` pairs (a name twice is a ValueError), where an array
    is anything ``np.asarray`` accepts (CPU torch tensors included, bfloat16 too; numpy void
    arrays, as ``np.load`` gives bfloat16 saved by ``np.save``, are read as ``void_as`` says)."""
    p = parse_norm_type(norm_type)
    check_norms_options(max_norm, eps, sort, top, group_by, group_sep, loss_scale)
    (records,) = records_of_sets([array_set(mapping, void_as)], p, include, exclude, None, 1, loss_scale, dedup)
    return norms_report(records, p, max_norm, eps, group_by, group_sep, sort, top, dedup)


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
    void_as: str | None = None,
) -> CheckReport:
    """Evaluate :class:`gradinspect.check.Rules` (default: only ``nonfinite``) on ``paths``."""
    from .check import Rules, evaluate

    report = inspect(paths, norm_type=norm_type, max_norm=max_norm, eps=eps, include=include,
                     exclude=exclude, sort="none", progress=progress, jobs=jobs, shards=shards, dedup=dedup,
                     loss_scale=loss_scale, allow_outside_index=allow_outside_index, void_as=void_as)
    return evaluate(report, rules if rules is not None else Rules())


def info(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
         allow_outside_index: bool = False, void_as: str | None = None) -> InfoReport:
    """Every tensor's name, dtype, shape and size, from the headers alone (shards may repeat names);
    raw void arrays with the dtype ``void_as`` gives them (see :func:`inspect`)."""
    with open_set(paths, allow_repeats=True, allow_outside_index=allow_outside_index, void_as=void_as) as gset:
        return info_report(gset)


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
    shards: str | None = None,
    shards_a: str | None = None,
    shards_b: str | None = None,
    void_as: str | None = None,
    executor: Any = None,
) -> DiffReport:
    """Compare two gradient sets tensor by tensor and as a whole, streaming both.

    A tensor fails when ``l2_diff > atol + rtol * max(l2_a, l2_b)`` (when
    ``rtol`` or ``atol`` is given; the other counts as 0) or when
    ``cosine < min_cosine``.  With a tolerance, nothing compared fails too.

    Names are matched after removing from each the first matching prefix of
    ``strip_prefix_a`` (A) or ``strip_prefix_b`` (B), then of ``strip_prefix``
    (both sides); ``include``/``exclude`` and the report see those names.

    Each side is one gradient set with its own ``shards`` mode (``shards_a`` for A,
    ``shards_b`` for B, else ``shards`` for both; see :func:`inspect`).  Of
    ``"replicas"``, the copy :func:`inspect` shows is compared (the copies are
    compared first, as there: differences are warnings).  ``"slices"`` are
    compared as their concatenation in file order, which is the tensor's
    elements when both sides are sliced alike, or the slices are flat (FSDP,
    ZeRO) or split along the first dimension; otherwise the tensor is listed as
    not compared ("sliced differently").  ``void_as``: see :func:`inspect` (both sides).

    ``executor``: a :class:`~gradinspect.executors_dask.DaskExecutor` computes the pairs on its workers
    (the same bits).
    """
    for name, v, rng in (("rtol", rtol, NON_NEGATIVE), ("atol", atol, NON_NEGATIVE),
                         ("min_cosine", min_cosine, COSINE)):
        if v is not None:
            rng.check(name, v)
    mode_a = shards if shards_a is None else shards_a
    mode_b = shards if shards_b is None else shards_b
    for name, mode in (("shards", shards), ("shards_a", shards_a), ("shards_b", shards_b)):
        check_shards(mode, name)
    tol = Tolerances(rtol=rtol, atol=atol, min_cosine=min_cosine, allow_missing=allow_missing)
    with open_set(a, mode_a, allow_outside_index=allow_outside_index, void_as=void_as) as set_a, \
            open_set(b, mode_b, allow_outside_index=allow_outside_index, void_as=void_as) as set_b:
        return diff_report(set_a, set_b, tol, include, exclude, progress,
                           (*strip_prefix_a, *strip_prefix), (*strip_prefix_b, *strip_prefix), executor)
