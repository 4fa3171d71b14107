"""Streaming the selected tensors of a source through reducers: plan, run, merge.

The work is cut into :class:`WorkUnit` s, plain frozen data computed from the
tensor descriptions alone (never from the number of workers): a chunk of
``CHUNK`` elements of a raw tensor, a batch of small tensors read at once, or a
whole compressed member (a deflate stream can only be read in order).
:func:`run_unit` is a pure function of a unit and the bytes it reads through
the byte-store interface; an :class:`~.executors.Executor` (threads or
processes) runs the units, and the results are merged in plan order, so they
are bit-for-bit identical for every executor and every worker count.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .norms import CHUNK, SMALL, Reducer, Stats, combine
from .sources.base import Source, TensorDesc, inflate_pieces
from .sources.codec import crc32_combine
from .sources.store import ByteStore, ChunkBuffer

if TYPE_CHECKING:
    from .executors import Executor

__all__ = ["default_jobs", "reduce_entries", "crc32_combine", "WorkUnit", "plan", "run_unit", "Worker"]

Progress = Callable[[int], None]
# What a unit gives: (tensor index, chunk index, statistics, CRC-32 of the chunk's bytes or None)
Part = tuple[int, int, Stats, int | None]


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkUnit:
    """One piece of work: bytes ``[offset, offset + size)`` of store ``store``."""

    kind: str  # raw (a chunk of one tensor) | batch (small tensors, one read) | stream (a whole deflate member)
    #          | strided (chunk ``part`` of a strided view, gathered in C order by sources/views.py)
    store: str  # the byte store's key
    offset: int
    size: int  # bytes read (stream: 0, the member is read whole)
    encoding: str  # raw | deflate
    tensors: tuple[int, ...]  # indices into the planned descriptions
    part: int  # chunk index within the tensor (raw)
    nbytes: int  # tensor bytes covered, for progress


class Worker:
    """One worker's reducer and read buffers."""

    def __init__(self, p: float, chunk: int) -> None:
        self.reducer = Reducer(p, chunk)
        self.buf = ChunkBuffer(chunk)
        self.pack = ChunkBuffer(chunk)


def plan(descs: Sequence[TensorDesc], chunk: int = CHUNK) -> list[WorkUnit]:
    """Cut the work into units; the cut depends only on the descriptions."""
    units: list[WorkUnit] = []
    batch: list[int] = []
    batch_elems = 0

    def flush() -> None:
        nonlocal batch, batch_elems
        if batch:
            first, last = descs[batch[0]].extent, descs[batch[-1]]
            assert first is not None and last.extent is not None
            units.append(WorkUnit("batch", first.store, first.offset,
                                  last.extent.offset + last.nbytes - first.offset, "raw", tuple(batch), 0,
                                  sum(descs[i].nbytes for i in batch)))
        batch, batch_elems = [], 0

    span_limit = chunk * 8  # a batch's bytes, gaps included, fit one read buffer
    for i, t in enumerate(descs):
        ext = t.extent
        assert ext is not None and t.np_dtype is not None, t
        if t.strides is not None:
            flush()
            units += _strided_units(i, t, chunk)
            continue
        if t.numel <= SMALL and ext.encoding == "raw":
            if batch:
                head = descs[batch[0]]
                prev = descs[batch[-1]]
                fits = (
                    ext.store == head.extent.store  # type: ignore[union-attr]
                    and t.np_dtype == head.np_dtype
                    and batch_elems + t.numel <= chunk
                    and ext.offset >= prev.extent.offset + prev.nbytes  # type: ignore[union-attr]
                    and ext.offset + t.nbytes - head.extent.offset <= span_limit  # type: ignore[union-attr]
                )
                if not fits:
                    flush()
            batch.append(i)
            batch_elems += t.numel
            continue
        flush()
        if ext.encoding == "raw":
            step = chunk * t.np_dtype.itemsize
            units += [WorkUnit("raw", ext.store, ext.offset + pos, min(step, t.nbytes - pos), "raw", (i,), k,
                               min(step, t.nbytes - pos))
                      for k, pos in enumerate(range(0, t.nbytes, step))]
        else:  # a compressed stream can only be read in order: one unit
            units.append(WorkUnit("stream", ext.store, ext.offset, 0, ext.encoding, (i,), 0, t.nbytes))
    flush()
    return units


def _strided_units(i: int, t: TensorDesc, chunk: int) -> list[WorkUnit]:
    """A strided view's units: its elements in C order cut like a contiguous tensor's (see :mod:`.sources.views`)."""
    assert t.extent is not None and t.np_dtype is not None
    size = t.np_dtype.itemsize
    return [WorkUnit("strided", t.extent.store, t.extent.offset, 0, "raw", (i,), k, min(chunk, t.numel - a) * size)
            for k, a in enumerate(range(0, t.numel, chunk))]


def run_unit(unit: WorkUnit, descs: Mapping[int, TensorDesc] | Sequence[TensorDesc],
             stores: Mapping[str, ByteStore], w: Worker) -> list[Part]:
    """The statistics of one unit (a pure function of the unit and the bytes it reads)."""
    store = stores[unit.store]
    t = descs[unit.tensors[0]]
    dtype = t.np_dtype
    assert dtype is not None and t.extent is not None
    if unit.kind == "raw":
        mem = store.buffer(unit.offset, unit.size)
        if mem is not None:  # in memory: reduce the caller's bytes in place (never written)
            x = np.frombuffer(mem, dtype=dtype)
            crc = zlib.crc32(mem) if t.extent.crc is not None else None
            return [(unit.tensors[0], unit.part, w.reducer.reduce(x), crc)]
        view = w.buf.view[: unit.size]
        store.read_into(view, unit.offset)
        crc = zlib.crc32(view) if t.extent.crc is not None else None
        x = w.buf.array(dtype, unit.size // dtype.itemsize)
        return [(unit.tensors[0], unit.part, w.reducer.reduce(x, scratch=True), crc)]  # our buffer
    if unit.kind == "strided":  # gathered in C order; summed as a contiguous tensor's chunk or batch would be
        from .sources.views import gather

        assert t.strides is not None
        a = unit.part * w.buf.chunk
        b = min(a + w.buf.chunk, t.numel)
        x = gather(store, unit.offset, dtype, t.shape, t.strides, a, b, w.pack, w.buf.array(dtype, b - a))
        if t.numel <= SMALL:
            return [(unit.tensors[0], 0, w.reducer.reduce_segments(x, [t.numel], scratch=True)[0], None)]
        return [(unit.tensors[0], unit.part, w.reducer.reduce(x, scratch=True), None)]
    if unit.kind == "stream":
        st = combine((w.reducer.reduce(w.buf.array(dtype, n // dtype.itemsize), scratch=True)
                      for n in inflate_pieces(store, t, w.buf)), w.reducer.p)
        return [(unit.tensors[0], 0, st, None)]
    return _batch(unit, descs, store, w)


def _batch(unit: WorkUnit, descs: Mapping[int, TensorDesc] | Sequence[TensorDesc], store: ByteStore,
           w: Worker) -> list[Part]:
    """Many small tensors from one read: pack their bytes and reduce them by segment."""
    span = w.buf.view[: unit.size]
    store.read_into(span, unit.offset)
    batch = [descs[i] for i in unit.tensors]
    dtype = batch[0].np_dtype
    assert dtype is not None
    offsets = [t.extent.offset for t in batch]  # type: ignore[union-attr]
    total = sum(t.nbytes for t in batch)
    contiguous = all(b == a + t.nbytes for a, b, t in zip(offsets, offsets[1:], batch, strict=False))
    if contiguous:
        data, raw = w.buf, span
    else:  # members with headers between them (npz): copy the data together
        pos = 0
        for t, off in zip(batch, offsets, strict=True):
            rel = off - unit.offset
            w.pack.view[pos : pos + t.nbytes] = span[rel : rel + t.nbytes]
            pos += t.nbytes
        data, raw = w.pack, w.pack.view[:total]
    pos = 0
    for t in batch:
        ext = t.extent
        if ext is not None and ext.crc is not None:
            t.verify_crc(zlib.crc32(raw[pos : pos + t.nbytes], ext.crc_head))
        pos += t.nbytes
    x = data.array(dtype, total // dtype.itemsize)
    stats = w.reducer.reduce_segments(x, [t.numel for t in batch], scratch=True)
    return [(i, 0, st, None) for i, st in zip(unit.tensors, stats, strict=True)]


def merge(descs: Sequence[TensorDesc], units: Sequence[WorkUnit], results: Sequence[list[Part]],
          p: float) -> list[Stats]:
    """Each tensor's statistics from its units' results, combined in plan order; stored npz
    members read chunk by chunk have their CRC-32 combined from the chunks' and checked."""
    parts: list[list[Stats]] = [[] for _ in descs]
    crcs: dict[int, list[tuple[int, int]]] = {}  # tensor -> [(crc, bytes)] of its raw chunks
    for unit, got in zip(units, results, strict=True):
        for i, _, st, crc in got:
            parts[i].append(st)
            if unit.kind == "raw" and crc is not None:
                crcs.setdefault(i, []).append((crc, unit.size))
    out = [combine(mine, p) for mine in parts]
    for i, chunks in crcs.items():
        t = descs[i]
        crc = t.extent.crc_head  # type: ignore[union-attr]
        for c, n in chunks:
            crc = crc32_combine(crc, c, n)
        t.verify_crc(crc)
    return out


def reduce_entries(
    src: Source,
    entries: Sequence[TensorDesc],
    p: float,
    jobs: int | Executor = 1,
    progress: Progress | None = None,
    chunk: int = CHUNK,
) -> list[Stats]:
    """Statistics of each of ``entries`` (floating tensors of ``src``), in order.

    ``jobs``: a number of threads, or an :class:`~.executors.Executor`
    (``ProcessExecutor(4)``, ``ThreadExecutor(4)``).
    """
    from .executors import ThreadExecutor

    executor = ThreadExecutor(jobs) if isinstance(jobs, int) else jobs
    # names of the very same bytes (one view twice in a torch file: tied weights) are read once
    first: dict[tuple[object, ...], int] = {}
    which = [first.setdefault((t.extent, t.strides, t.np_dtype, t.shape), i) for i, t in enumerate(entries)]
    unique = [entries[i] for i in first.values()]
    units = plan(unique, chunk)
    assert src.store is not None
    results = executor.run(units, unique, {src.store.key: src.store}, p, chunk, progress)
    stats = merge(unique, units, results, p)
    if len(unique) == len(entries):
        return stats
    if progress is not None:
        progress(sum(t.nbytes for i, t in enumerate(entries) if which[i] != i))
    at = {i: k for k, i in enumerate(first.values())}
    return [stats[at[w]] for w in which]
