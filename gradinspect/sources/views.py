"""Strided views (a torch tensor that is not a C-contiguous view of its storage), gathered in chunks.

A view is its first element's byte offset (the tensor's ``extent.offset``), a shape and element
strides (all >= 0; 0 repeats an element).  :func:`gather` puts the elements ``[a, b)`` of the
view in logical C order (``b - a`` at most a chunk) into an array: it computes their storage
addresses, reads the distinct ones in clusters (addresses closer than 16 KiB are read together:
that costs less than another call; one ``read_into`` of at most the buffer per cluster, packed
into the read buffer) and picks the elements out.  A broadcast (stride 0) row is read once per
chunk, a column in one pass; a transposed matrix reads its storage's span once per chunk (a
64 MiB ``w.t()`` takes seconds, not the tenths of a contiguous one).  Memory is the chunk
buffers whatever the view.  Chunks fall on the same
element boundaries as a contiguous tensor's, so every statistic is bit-for-bit that of the
contiguous copy (``x.contiguous()``, a safetensors file of the same tensor).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .store import ByteStore, ChunkBuffer

__all__ = ["gather", "view_chunks", "is_contiguous", "span_elements"]

_GAP = 16384  # bytes: addresses closer than this are read together (reading 16 KiB costs less than a call)


def is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a view with these element strides is C-contiguous (size-1 dimensions' strides do not matter)."""
    want = 1
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != want:
            return False
        want *= n
    return True


def span_elements(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements from the first to the last element of a non-empty view, both included."""
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))


def gather(store: ByteStore, first: int, dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...],
           a: int, b: int, buf: ChunkBuffer, out: np.ndarray) -> np.ndarray:
    """Elements ``[a, b)`` of the view (C order) in ``out[:b - a]``, read through ``buf``."""
    idx = np.arange(a, b, dtype=np.int64)
    addr = np.zeros(b - a, dtype=np.int64)
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1:
            idx, r = np.divmod(idx, n)
            if s:
                addr += r * s
    order = None
    if addr.size > 1 and not bool(np.all(addr[1:] >= addr[:-1])):
        order = np.argsort(addr, kind="stable")
        addr = addr[order]
    size = dtype.itemsize
    cap = len(buf.view) // size  # elements the read buffer holds
    # clusters: runs of sorted addresses less than _GAP bytes apart, each at most ``cap`` elements long
    cut = np.flatnonzero(np.diff(addr) * size > _GAP) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [addr.size]))
    spans = addr[ends - 1] - addr[starts] + 1
    if int(spans.max()) > cap:
        starts, ends = _split(addr, starts.tolist(), ends.tolist(), cap)
        spans = addr[ends - 1] - addr[starts] + 1
    first_addr = addr[starts]
    csum = np.cumsum(spans)
    dest = out[: b - a]
    data = np.frombuffer(buf.view, dtype=dtype)
    view = buf.view
    k, n = 0, len(starts)
    while k < n:  # a batch: the clusters that fit the buffer together, read one after the other, then picked
        base = int(csum[k - 1]) if k else 0
        m = max(k + 1, int(np.searchsorted(csum, base + cap, side="right")))
        fills = csum[k:m] - spans[k:m] - base  # where each cluster goes in the buffer
        for f, sp, at in zip(fills.tolist(), spans[k:m].tolist(), first_addr[k:m].tolist(), strict=True):
            store.read_into(view[f * size : (f + sp) * size], first + at * size)
        p0, p1 = int(starts[k]), int(ends[m - 1])
        where = addr[p0:p1] + np.repeat(fills - first_addr[k:m], ends[k:m] - starts[k:m])
        if order is None:
            np.take(data, where, out=dest[p0:p1])
        else:
            dest[order[p0:p1]] = data[where]
        k = m
    return dest


def _split(addr: np.ndarray, starts: list[int], ends: list[int], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Clusters cut so that none spans more than ``cap`` elements."""
    s2: list[int] = []
    e2: list[int] = []
    for i, j in zip(starts, ends, strict=True):
        pos = i
        while pos < j:
            hi = pos + int(np.searchsorted(addr[pos:j], int(addr[pos]) + cap, side="left"))
            s2.append(pos)
            e2.append(hi)
            pos = hi
    return np.array(s2, dtype=np.int64), np.array(e2, dtype=np.int64)


def view_chunks(store: ByteStore, first: int, dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...],
                buf: ChunkBuffer) -> Iterator[np.ndarray]:
    """All the view's elements in C order, in chunks of ``buf.chunk`` (each valid until the next)."""
    numel = 1
    for n in shape:
        numel *= n
    read = ChunkBuffer(buf.chunk)
    for a in range(0, numel, buf.chunk):
        b = min(a + buf.chunk, numel)
        yield gather(store, first, dtype, shape, strides, a, b, read, buf.array(dtype, b - a))
