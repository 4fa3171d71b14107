"""Strided views (a torch tensor that is not a C-contiguous view of its storage), gathered in chunks.

A view is its first element's byte offset (the tensor's ``extent.offset``), a shape and element
strides (all >= 0; 0 repeats an element).  :func:`gather` puts the elements ``[a, b)`` of the
view in C order (``b - a`` at most a chunk) into an array: it computes their storage
addresses, reads the distinct ones in clusters (addresses closer than 16 KiB are read together:
that costs less than another call; one ``read_into`` of at most the buffer per cluster, packed
into the read buffer) and picks the elements out; one dense run is read straight into the array.
Memory is the chunk buffers whatever the view.

Two orders.  The statistics (norms, check, trend: the engine's ``strided`` units) do not depend on
the order of the elements, so they gather the view in :func:`storage_order`: dimensions by
descending stride, merged where they continue each other.  A permuted dense view (``w.t()``,
``x.permute(...)``) is then one dense run read once, as fast as a contiguous tensor, and its
statistics are bit-for-bit those of its storage saved contiguously (``w`` for ``w.t()``); other
views are summed in chunks on the same element boundaries as a contiguous copy of that order.
Element-wise work (diff, copy detection: ``Source.chunks`` -> :func:`view_chunks`) needs logical
C order, and there a transposed n x n matrix is slow: a chunk of its logical rows is a short run
from every storage row (chunk / n elements), so either the storage's span is read once per chunk
(rows closer than 16 KiB) or n small reads are made per chunk; with memory bounded by the chunk the
cost grows as n^3 / chunk.  Measured (Source.chunks of a float32 ``w.t()``, one thread, loaded
2-core machine): 16 MiB 0.19 s, 64 MiB 1.5-2.8 s (contiguous: 0.015 s), 256 MiB 12.6 s; 1 GiB
would take about 100 s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .store import ByteStore, ChunkBuffer

__all__ = ["gather", "view_chunks", "is_contiguous", "span_elements", "storage_order"]

_GAP = 16384  # bytes: addresses closer than this are read together (reading 16 KiB costs less than a call)


def is_contiguous(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a view with these element strides is C-contiguous (size-1 dimensions' strides do not matter)."""
    want = 1
    for n, s in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and s != want:
            return False
        want *= n
    return True


def storage_order(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same elements as a view walking its storage forwards: size-1 dimensions dropped, the others in
    descending stride order (stride 0 innermost: a repeated element stays repeated).

    The multiset of elements is the view's, so are order-independent statistics; a permuted dense view
    (``w.t()``, ``x.permute(...)``) becomes contiguous and is read once, in storage order."""
    dims = sorted(((s, n) for n, s in zip(shape, strides, strict=True) if n != 1), key=lambda d: -d[0])
    merged: list[tuple[int, int]] = []
    for s, n in dims:  # a dimension that continues the previous one merges with it (a dense view: one dimension)
        if merged and merged[-1][0] == s * n:
            merged[-1] = (s, merged[-1][1] * n)
        else:
            merged.append((s, n))
    return tuple(n for _, n in merged), tuple(s for s, _ in merged)


def span_elements(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements from the first to the last element of a non-empty view, both included."""
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))


def gather(store: ByteStore, first: int, dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...],
           a: int, b: int, buf: ChunkBuffer, out: np.ndarray) -> np.ndarray:
    """Elements ``[a, b)`` of the view (C order) in ``out[:b - a]``, read through ``buf``."""
    if strides == (1,):  # one dense run (a permuted dense view in storage order): read straight into ``out``
        store.read_into(out[: b - a].view(np.uint8).data, first + a * dtype.itemsize)
        return out[: b - a]
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
