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
C order.  Gathered chunk by chunk, a transposed n x n matrix was slow: a chunk of its logical rows is
a short run from every storage row, so n reads per chunk, n^3 / chunk in all.  :func:`view_chunks`
puts the view in C order a box of up to ``_BAND`` bytes at a time instead (a range of logical rows:
for ``w.t()`` a band of storage columns), read tile-wise in storage order (one read per storage row
of the band, or fewer where rows lie closer than 16 KiB; stride-0 dimensions read once and
broadcast) and transposed in memory; the chunks are cut from the boxes at the usual boundaries, so
the elements and chunks are those of before.  Memory is ``_BAND`` plus the read buffer; a band's
runs are ``_BAND / n`` bytes, so the reads are few while n is up to some thousands.  Measured
(Source.chunks of a float32 ``w.t()``, one thread, loaded 2-core machine; contiguous in brackets):
16 MiB 0.05 s (0.007), 64 MiB 0.08 s, 256 MiB 0.45 s (0.08; gathered chunk by chunk: 14.6 s), 1 GiB
2.6 s (0.39; chunk by chunk: 96 s).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from .store import ByteStore, ChunkBuffer

__all__ = ["gather", "view_chunks", "is_contiguous", "span_elements", "storage_order"]

_GAP = 16384  # bytes: addresses closer than this are read together (reading 16 KiB costs less than a call)
_BAND = 1 << 24  # bytes: how much of a view is put in logical C order at a time (view_chunks)


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


def _logical_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """(size, stride) of the view's dimensions in C order: size-1 dimensions dropped, a dimension merged into the
    one before it where it continues it (the same elements in the same order)."""
    dims: list[tuple[int, int]] = []
    for n, s in zip(shape, strides, strict=True):
        if n == 1:
            continue
        if dims and dims[-1][1] == s * n:
            dims[-1] = (dims[-1][0] * n, s)
        else:
            dims.append((n, s))
    return dims


def _boxes(dims: list[tuple[int, int]], most: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """The view cut into boxes of at most ``most`` elements, in C order: (first element, dimensions) of each.

    A box fixes the outer indices, takes a range of the first dimension whose inner block fits and all the
    inner dimensions; each box but the last of a range holds more than ``most / 2`` elements."""
    inner = [1] * (len(dims) + 1)  # inner[i]: elements of dimensions i and after
    for i in range(len(dims) - 1, -1, -1):
        inner[i] = inner[i + 1] * dims[i][0]
    if inner[0] <= most:
        yield 0, dims
        return
    j = next(i for i in range(len(dims)) if inner[i + 1] <= most)
    n, s = dims[j]
    step = most // inner[j + 1]
    for index in itertools.product(*(range(m) for m, _ in dims[:j])):
        base = sum(i * t for i, (_, t) in zip(index, dims, strict=False))
        for a in range(0, n, step):
            yield base + a * s, [(min(step, n - a), s), *dims[j + 1 :]]


def _read_box(store: ByteStore, first: int, dtype: np.dtype, dims: list[tuple[int, int]], read: memoryview,
              out: np.ndarray) -> None:
    """The box (dimensions ``dims`` from the element at byte ``first``) in C order into ``out`` (its shape).

    Read in storage order (strided dimensions by descending stride; stride-0 ones are read once and repeated
    by broadcasting): the inner dimensions that lie less than ``_GAP`` apart in one read each, as much of
    the next dimension as the read buffer holds in one read (or, when its steps are farther apart, one read
    per index, many packed in the buffer); each buffer full goes to its place in ``out`` in one copy."""
    size = dtype.itemsize
    cap = len(read) // size
    axes = sorted((i for i, (n, s) in enumerate(dims) if s and n != 1), key=lambda i: -dims[i][1])
    rest = [i for i in range(len(dims)) if i not in axes]
    target = out.transpose(axes + rest)  # out in storage order, then the repeated dimensions
    wide = (Ellipsis, *(None,) * len(rest))  # a read array broadcast over them
    sd = [dims[i] for i in axes]
    q, span = len(sd), 1  # dimensions q and after: one read of ``span`` elements
    while q:
        n, s = sd[q - 1]
        if (s - span) * size >= _GAP or span + (n - 1) * s > cap:
            break
        q, span = q - 1, span + (n - 1) * s
    shape = tuple(n for n, _ in sd[q:])
    steps = tuple(s * size for _, s in sd[q:])
    if q == 0:
        store.read_into(read[: span * size], first)
        np.copyto(target, np.ndarray(shape, dtype, read, 0, steps)[wide])
        return
    n, s = sd[q - 1]
    near = (s - span) * size < _GAP  # several indices of dimension q - 1 in one read (it did not fit the buffer)
    per = (cap - span) // s + 1 if near else cap // span  # indices of dimension q - 1 per buffer
    for index in itertools.product(*(range(m) for m, _ in sd[: q - 1])):
        at = first + sum(i * t for i, (_, t) in zip(index, sd, strict=False)) * size
        for a in range(0, n, per):
            k = min(per, n - a)
            if near:
                store.read_into(read[: ((k - 1) * s + span) * size], at + a * s * size)
                pitch = s * size
            else:
                pitch = span * size
                for c in range(k):
                    store.read_into(read[c * pitch : (c + 1) * pitch], at + (a + c) * s * size)
            where = (*index, slice(a, a + k))
            np.copyto(target[where], np.ndarray((k, *shape), dtype, read, 0, (pitch, *steps))[wide])


def view_chunks(store: ByteStore, first: int, dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...],
                buf: ChunkBuffer, band: int = _BAND) -> Iterator[np.ndarray]:
    """All the view's elements in C order, in chunks of ``buf.chunk`` (each valid until the next).

    The view is put in C order a box of at most ``band`` bytes (or a chunk) at a time (:func:`_boxes`,
    :func:`_read_box`; ``buf`` is the read buffer); the chunks are cut from the boxes at multiples of the chunk."""
    numel = 1
    for n in shape:
        numel *= n
    if not numel:
        return
    chunk = buf.chunk
    most = max(chunk, band // dtype.itemsize)
    stage = np.empty(min(numel, most + chunk), dtype.newbyteorder("="))
    fill = 0
    for at, dims in _boxes(_logical_dims(shape, strides), most):
        count = 1
        for n, _ in dims:
            count *= n
        _read_box(store, first + at * dtype.itemsize, dtype, dims, buf.view, stage[fill : fill + count].reshape(
            [n for n, _ in dims]))
        fill += count
        done = 0
        while fill - done >= chunk:
            yield stage[done : done + chunk]
            done += chunk
        if done:  # the rest (less than a chunk) to the front
            stage[: fill - done] = stage[done:fill]
            fill -= done
    if fill:
        yield stage[:fill]
