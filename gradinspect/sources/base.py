"""The public, immutable, picklable descriptions every container produces, and the Container interface.

A :class:`TensorDesc` says what a tensor is (name, dtype, shape) and where its
bytes are: :class:`Extent`s in byte stores named by key.  Descriptions hold no
open file and no array, so they can be planned over and sent to other processes.
"""

from __future__ import annotations

import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from ..norms import is_float_dtype
from . import codec
from .store import ByteStore, ChunkBuffer

__all__ = ["Extent", "TensorDesc", "Source", "Container", "dtype_name", "sub_array_name", "skip_reason"]


class Extent(NamedTuple):
    """Where (part of) a tensor's bytes are stored."""

    store: str  # the byte store's key (a local file: its absolute path)
    offset: int  # of the stored bytes in the store
    length: int  # bytes stored
    encoding: str = "raw"  # raw | deflate
    crc: int | None = None  # CRC-32 of the decoded bytes of the whole member, to verify (or None)
    crc_head: int = 0  # CRC-32 of the member's bytes before the data (a stored npz member's .npy header)
    skip: int = 0  # decoded bytes to drop first (a deflated member's .npy header)
    size: int = 0  # decoded size (deflate)


@dataclass(slots=True, eq=False)
class TensorDesc:
    """One named tensor in a source, located but not read.

    Treat it as immutable: it is not a frozen dataclass only because freezing costs about
    1.4 µs per tensor to build (30 ms more to open 20,000 tensors)."""

    name: str
    source: str  # the file path shown to users
    dtype: str  # numpy's name ("float32", "bfloat16")
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    skip_reason: str | None = None
    np_dtype: np.dtype | None = field(default=None, repr=False)  # byte order included
    extent: Extent | None = field(default=None, repr=False)
    order: str = "C"  # "F": .npy data in column-major order
    strides: tuple[int, ...] | None = None  # a strided view (torch): element strides from the extent's first element
    chunks: int = 1  # the pieces it is stored in (a distributed checkpoint's chunks), gathered by its store

    @property
    def is_float(self) -> bool:
        return self.skip_reason is None

    @property
    def extents(self) -> tuple[Extent, ...]:
        """Where the bytes are (every container here stores a tensor in one extent)."""
        return (self.extent,) if self.extent is not None else ()

    def verify_crc(self, crc: int) -> None:
        """Compare the CRC-32 computed over the member with the zip's (if it has one)."""
        ext = self.extent
        if ext is not None and ext.crc is not None and crc != ext.crc:
            raise InputError(self.source, f"member {self.name + '.npy'!r}: CRC-32 mismatch (the data is corrupt)")


TensorEntry = TensorDesc  # the name the library used before


@dataclass(eq=False)
class Source:
    """A container (a file, or in-memory arrays) and the tensors in it, in file order.

    It owns the byte store its header was read through: ``with source:`` is a
    reading session (it reopens, verified, a store that was parked),
    :meth:`finish` checks the file did not change and releases it, :meth:`close`
    releases it without a check.  Whoever opened it closes it.
    """

    path: str
    kind: str
    tensors: list[TensorDesc]
    metadata: dict[str, str] = field(default_factory=dict)
    size: int = 0
    store: ByteStore | None = field(default=None, repr=False)

    def __enter__(self) -> Source:
        if self.store is not None:
            self.store.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.store is not None:
            self.store.__exit__(exc_type, *exc)

    def park(self) -> None:
        """Close the descriptor between sessions (reopened and verified on the next)."""
        if self.store is not None:
            self.store.park()

    def finish(self) -> None:
        """After the last read: raise if the file changed since its header was read; release it."""
        if self.store is not None:
            self.store.finish()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def chunks(self, entry: TensorDesc, buf: ChunkBuffer) -> Iterator[np.ndarray]:
        """The tensor's elements, in chunks of at most ``buf.chunk``, as 1-d native arrays.

        Each chunk is a view into ``buf`` (or into the in-memory array): use it before
        asking for the next.  The source must be open (``with source:``) for file-backed tensors.
        """
        dtype, ext, store = entry.np_dtype, entry.extent, self.store
        assert dtype is not None and ext is not None and store is not None and entry.is_float, entry
        if entry.strides is not None:  # a strided view (torch): its elements in logical C order
            from .views import view_chunks

            yield from view_chunks(store, ext.offset, dtype, entry.shape, entry.strides, buf)
            return
        if ext.encoding == "raw":
            whole = store.buffer(ext.offset, entry.nbytes)
            if whole is not None:  # in memory: views, no copy
                flat = np.frombuffer(whole, dtype=dtype)
                for i in range(0, flat.size, buf.chunk):
                    yield flat[i : i + buf.chunk]
                return
        pieces = raw_pieces(store, entry, buf) if ext.encoding == "raw" else inflate_pieces(store, entry, buf)
        for nbytes in pieces:
            yield buf.array(dtype, nbytes // dtype.itemsize)


# Each generator below fills ``buf`` from its start and yields the byte count.

def raw_pieces(store: ByteStore, entry: TensorDesc, buf: ChunkBuffer) -> Iterator[int]:
    ext = entry.extent
    assert ext is not None and entry.np_dtype is not None
    step = buf.chunk * entry.np_dtype.itemsize
    pos, end = ext.offset, ext.offset + entry.nbytes
    crc = ext.crc_head
    while pos < end:
        k = min(step, end - pos)
        store.read_into(buf.view[:k], pos)
        if ext.crc is not None:
            crc = zlib.crc32(buf.view[:k], crc)
        yield k
        pos += k
    entry.verify_crc(crc)


def inflate_pieces(store: ByteStore, entry: TensorDesc, buf: ChunkBuffer) -> Iterator[int]:
    """Stream a deflated .npy member: skip its header, yield element-aligned fills."""
    ext = entry.extent
    assert ext is not None and entry.np_dtype is not None
    step = buf.chunk * entry.np_dtype.itemsize
    skip = ext.skip
    want = entry.nbytes
    crc = 0
    fill = 0
    where = f"member {entry.name + '.npy'!r}: "
    for out in codec.inflate(store, ext.offset, ext.length, ext.size, where):
        crc = zlib.crc32(out, crc)
        view = memoryview(out)
        if skip:
            cut = min(skip, len(view))
            view, skip = view[cut:], skip - cut
        while len(view) and want:
            k = min(step - fill, len(view), want)
            buf.view[fill : fill + k] = view[:k]
            view, fill, want = view[k:], fill + k, want - k
            if fill == step or not want:
                yield fill
                fill = 0
    if want:
        raise InputError(store.path, f"{where}compressed data ends early")
    entry.verify_crc(crc)


class Container(ABC):
    """One container format: recognises its paths and describes a store's tensors (headers only)."""

    name: str
    suffixes: tuple[str, ...] = ()

    def recognises(self, path: str, is_dir: bool = False) -> bool:
        """By suffix (a file named just ``.npy`` has none, as for ``os.path.splitext``)."""
        low = os.path.basename(path.lower())
        return not is_dir and any(low.endswith(s) and len(low) > len(s) for s in self.suffixes)

    @abstractmethod
    def describe(self, store: ByteStore, path: str) -> Source:
        """Read and validate the header; never the data."""

    # A container may instead stand for other files (an index and its shards):
    expands: bool = False
    # False: read only when named or matched by a glob, never picked up from a directory (torch files:
    # a checkpoint folder's optimizer.pt or training_args.bin are not gradients)
    in_directories: bool = True

    def describe_dir(self, path: str) -> Source:
        """A directory that is one container (``recognises(path, True)``): open its files, read its headers."""
        raise InputError(path, "is a directory")

    def expand(self, path: str, allow_outside: bool = False) -> list[str]:
        """The files ``path`` stands for (only when ``expands``)."""
        raise NotImplementedError

    def check(self, paths: Sequence[str | os.PathLike[str]], sources: list[Source]) -> None:
        """A check across the opened sources of one call (an index's names are in its shards)."""


def dtype_name(dtype: np.dtype) -> str:
    """A dtype as numpy spells it (``float32``, ``bfloat16``), whatever its byte order."""
    name: str = dtype.newbyteorder("=").name if dtype.byteorder not in ("=", "|") else dtype.name
    return name


def sub_array_name(dtype: np.dtype) -> str:
    """A sub-array dtype as ``float32[3,2]`` (numpy calls every one of them ``void<bits>``)."""
    assert dtype.subdtype is not None
    base, sub = dtype.subdtype
    return f"{dtype_name(base) if base.fields is None else 'structured'}[{','.join(map(str, sub))}]"


def skip_reason(name: str, np_dtype: np.dtype | None) -> str | None:
    """Why a tensor of this dtype has no norms (None: it has)."""
    if np_dtype is not None and is_float_dtype(np_dtype.newbyteorder("=")):
        return None
    if np_dtype is None:
        return f"unsupported dtype {name}"
    if np_dtype.kind == "c":
        return f"complex dtype ({name}) is not supported"
    if np_dtype.fields is not None:
        return "structured dtype is not a gradient"
    if np_dtype.subdtype is not None:
        return f"sub-array dtype ({name}) is not read"
    if np_dtype.kind == "V":
        return f"raw bytes ({name}): np.save loses bfloat16/float8 dtypes; save those with safetensors"
    return f"not a floating-point dtype ({name})"
