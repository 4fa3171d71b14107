"""Streaming every selected tensor of a source through reducers, on several threads.

Work is cut into items that do not depend on the thread count: a chunk of
``CHUNK`` elements of a raw tensor, a slice of an in-memory array, or a whole
compressed member (a deflate stream can only be read in order).  Worker threads
pull items from a shared counter, each with its own read buffer and reducer;
numpy's kernels, ``os.preadv`` and zlib release the GIL, so threads overlap.
Each item's result lands in its own slot and a tensor's chunks are combined
in chunk order, so results are bit-for-bit identical for every ``jobs`` value.
"""

from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .config import MAX_JOBS
from .loaders import ChunkBuffer, Source, TensorEntry, _pread_into
from .norms import CHUNK, SMALL, Reducer, Stats, combine

__all__ = ["default_jobs", "reduce_entries", "crc32_combine"]

Progress = Callable[[int], None]


def default_jobs() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _Item:
    kind: str  # raw | array | stream | batch (small raw tensors) | array-batch (small arrays)
    entries: tuple[int, ...]  # indices into the entries list (several for a batch)
    part: int  # chunk number within the entry
    offset: int  # raw/batch: file offset; array: element offset
    size: int  # raw/batch: bytes read; array: elements
    nbytes: int  # tensor bytes this item covers, for progress


class _Worker:
    """One thread's buffers."""

    def __init__(self, p: float, chunk: int) -> None:
        self.reducer = Reducer(p, chunk)
        self.buf = ChunkBuffer(chunk)
        self.pack = ChunkBuffer(chunk)


def _plan(entries: Sequence[TensorEntry], chunk: int) -> list[_Item]:
    """Cut the work into items; the cut depends only on the entries, never on ``jobs``."""
    items: list[_Item] = []
    batch: list[int] = []
    batch_elems = 0

    def flush() -> None:
        nonlocal batch, batch_elems
        if batch:
            first, last = entries[batch[0]], entries[batch[-1]]
            kind = "batch" if first._method == "raw" else "array-batch"
            items.append(_Item(kind, tuple(batch), 0, first._offset, last._offset + last.nbytes - first._offset,
                               sum(entries[i].nbytes for i in batch)))
        batch, batch_elems = [], 0

    span_limit = chunk * 8  # a batch's bytes, gaps included, fit one read buffer
    for i, t in enumerate(entries):
        small = t.numel <= SMALL and t._method in ("raw", "array")
        if small:
            if batch:
                head = entries[batch[0]]
                fits = (
                    t._method == head._method
                    and t._np_dtype == head._np_dtype
                    and batch_elems + t.numel <= chunk
                    and (t._method == "array" or (t._offset >= entries[batch[-1]]._offset + entries[batch[-1]].nbytes
                                                  and t._offset + t.nbytes - head._offset <= span_limit))
                )
                if not fits:
                    flush()
            batch.append(i)
            batch_elems += t.numel
            continue
        flush()
        if t._method == "raw":
            step = chunk * t._np_dtype.itemsize  # type: ignore[union-attr]
            items += [_Item("raw", (i,), k, t._offset + pos, min(step, t.nbytes - pos), min(step, t.nbytes - pos))
                      for k, pos in enumerate(range(0, t.nbytes, step))]
        elif t._method == "array":
            size = t._np_dtype.itemsize  # type: ignore[union-attr]
            items += [_Item("array", (i,), k, pos, min(chunk, t.numel - pos), min(chunk, t.numel - pos) * size)
                      for k, pos in enumerate(range(0, t.numel, chunk))]
        else:  # a compressed stream can only be read in order: one item
            items.append(_Item("stream", (i,), 0, 0, 0, t.nbytes))
    flush()
    return items


def reduce_entries(
    src: Source,
    entries: Sequence[TensorEntry],
    p: float,
    jobs: int = 1,
    progress: Progress | None = None,
    chunk: int = CHUNK,
) -> list[Stats]:
    """Statistics of each of ``entries`` (floating tensors of ``src``), in order."""
    items = _plan(entries, chunk)
    parts: list[list[Any]] = [[] for _ in entries]
    for it in items:
        for i in it.entries:
            parts[i].append(None)

    def work(w: _Worker, n: int) -> None:
        it = items[n]
        t = entries[it.entries[0]]
        dtype = t._np_dtype
        if it.kind == "raw":
            view = w.buf.view[: it.size]
            _pread_into(src._fd, view, it.offset, src.path)  # type: ignore[arg-type]
            crc = zlib.crc32(view) if t._crc is not None else None
            x = w.buf.array(dtype, it.size // dtype.itemsize)
            parts[it.entries[0]][it.part] = (w.reducer.reduce(x, scratch=True), crc)  # our buffer
        elif it.kind == "array":
            x = t._array[it.offset : it.offset + it.size]
            parts[it.entries[0]][it.part] = (w.reducer.reduce(x), None)
        elif it.kind == "stream":
            st = combine((w.reducer.reduce(x, scratch=True) for x in src.chunks(t, w.buf)), p)
            parts[it.entries[0]][0] = (st, None)
        elif it.kind == "batch":
            _batch(src, entries, it, w, parts)
        else:  # array-batch
            arrays = [entries[i]._array for i in it.entries]
            x = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            for i, st in zip(it.entries, w.reducer.reduce_segments(x, [a.size for a in arrays])):
                parts[i][0] = (st, None)
        if progress is not None:
            progress(it.nbytes)

    _run(items, work, p, chunk, jobs)

    out: list[Stats] = []
    chunk_crcs: dict[int, list[tuple[int, int]]] = {}  # entry -> [(crc, bytes)] of its raw chunks
    for it in items:
        if it.kind == "raw":
            chunk_crcs.setdefault(it.entries[0], []).append((parts[it.entries[0]][it.part][1], it.size))
    for i, (t, mine) in enumerate(zip(entries, parts)):
        out.append(combine((s for s, _ in mine), p))
        if t._crc is not None and i in chunk_crcs:  # stored npz member read chunk by chunk
            crc = t._crc_head
            for c, n in chunk_crcs[i]:
                crc = crc32_combine(crc, c, n)
            t.verify_crc(crc)
    return out


def _batch(src: Source, entries: Sequence[TensorEntry], it: _Item, w: _Worker, parts: list[list[Any]]) -> None:
    """Many small tensors from one read: pack their bytes and reduce them by segment."""
    span = w.buf.view[: it.size]
    _pread_into(src._fd, span, it.offset, src.path)  # type: ignore[arg-type]
    batch = [entries[i] for i in it.entries]
    dtype = batch[0]._np_dtype
    total = sum(t.nbytes for t in batch)
    contiguous = all(b._offset == a._offset + a.nbytes for a, b in zip(batch, batch[1:]))
    if contiguous:
        data, raw = w.buf, span
    else:  # members with headers between them (npz): copy the data together
        pos = 0
        for t in batch:
            rel = t._offset - it.offset
            w.pack.view[pos : pos + t.nbytes] = span[rel : rel + t.nbytes]
            pos += t.nbytes
        data, raw = w.pack, w.pack.view[:total]
    pos = 0
    for t in batch:
        if t._crc is not None:
            t.verify_crc(zlib.crc32(raw[pos : pos + t.nbytes], t._crc_head))
        pos += t.nbytes
    x = data.array(dtype, total // dtype.itemsize)
    for i, st in zip(it.entries, w.reducer.reduce_segments(x, [t.numel for t in batch], scratch=True)):
        parts[i][0] = (st, None)


def _run(items: list[_Item], work: Callable[[_Worker, int], None], p: float, chunk: int, jobs: int) -> None:
    """Run ``work`` on every item, on ``jobs`` threads (at most ``MAX_JOBS``); re-raise the first error.

    A thread that cannot be started (``RuntimeError``: a thread or memory limit), or
    cannot get its buffers, is not an error: the threads that did start do the work,
    or this thread alone.
    """
    jobs = min(jobs, MAX_JOBS)
    if jobs <= 1 or len(items) <= 1:
        w = _Worker(p, chunk)
        for n in range(len(items)):
            work(w, n)
        return
    lock = threading.Lock()
    next_item = [0]
    errors: list[BaseException] = []

    def loop(w: _Worker | None = None) -> None:
        if w is None:
            try:
                w = _Worker(p, chunk)
            except (MemoryError, OSError):  # no buffers for one more thread: the others do its share
                return
        while not errors:
            with lock:
                n = next_item[0]
                next_item[0] += 1
            if n >= len(items):
                return
            try:
                work(w, n)
            except BaseException as e:  # handed to the main thread
                errors.append(e)
                return

    threads = []
    for _ in range(min(jobs, len(items))):
        t = threading.Thread(target=loop, daemon=True)
        try:
            t.start()
        except RuntimeError:  # "can't start new thread": make do with those that did
            break
        threads.append(t)
    for t in threads:
        t.join()
    if not errors and next_item[0] < len(items):  # no thread started, or none could get its buffers
        loop(_Worker(p, chunk))
    if errors:
        raise errors[0]


# --- CRC-32 of a concatenation (zlib's crc32_combine, which Python does not expose) ---

_POLY = 0xEDB88320  # reflected CRC-32 polynomial


def _multmodp(a: int, b: int) -> int:
    """a(x) · b(x) modulo the CRC-32 polynomial, in the reflected bit order."""
    m, prod = 1 << 31, 0
    while True:
        if a & m:
            prod ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return prod


_X2N = [1 << 30]  # x^(2^k) mod p
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))

_SHIFT_CACHE: dict[int, int] = {}


def _x8n(nbytes: int) -> int:
    """x^(8·nbytes) mod p: appending ``nbytes`` zero bytes."""
    op = _SHIFT_CACHE.get(nbytes)
    if op is None:
        op, k, n = 1 << 31, 3, nbytes
        while n:
            if n & 1:
                op = _multmodp(_X2N[k & 31], op)
            n >>= 1
            k += 1
        if len(_SHIFT_CACHE) < 64:
            _SHIFT_CACHE[nbytes] = op
    return op


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x8n(len2), crc1) ^ crc2
