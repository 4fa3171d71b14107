"""Byte stores: where a container's bytes come from, behind one interface.

A :class:`ByteStore` has a ``key`` (a local file's absolute path; an in-memory
store's ``memory:<n>``), a ``size``, and reads: :meth:`~ByteStore.read_into`
fills a buffer or raises ``InputError`` (truncation), :meth:`~ByteStore.read`
returns bytes.  Work units name stores by key only, so another process can
reopen a local file by its key and check that it is the same file.

A file must not change between its header and its last byte: data read at
the header's offsets from another version would be garbage that looks like
numbers.  :class:`LocalFile` records the identity of the open file (device,
inode, size, mtime and ctime in ns, from ``fstat``); the file is read through
that same descriptor while it is held open, or, when too many files are open
(see :func:`hold_budget`), through a reopened one whose ``fstat`` must match
the identity before any byte is read.  After the last byte (:meth:`LocalFile.finish`)
the descriptor is checked again and the path ``stat``-ed: a replaced (renamed
over), rewritten, appended or truncated file raises ``InputError(path,
"changed while being read")``.  Residual risk: a rewrite in place that keeps
the size and lands within the filesystem's timestamp granularity (a clock tick
on many Linux filesystems) as the header read leaves mtime and ctime unchanged
and cannot be seen.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..norms import CHUNK

__all__ = ["ByteStore", "LocalFile", "MemoryStore", "ChunkBuffer", "Identity", "identity", "open_fd",
           "regular_file", "read_small", "hold_budget", "os_problem", "STORES", "store_class", "scheme_of"]

Identity = tuple[int, int, int, int, int]  # (dev, ino, size, mtime_ns, ctime_ns)


class ByteStore(ABC):
    """The bytes of one container, read at offsets."""

    key: str
    path: str  # what error messages name
    size: int

    @abstractmethod
    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``, or raise InputError (truncated)."""

    def read(self, n: int, offset: int) -> bytes:
        b = bytearray(n)
        self.read_into(memoryview(b), offset)
        return bytes(b)

    def buffer(self, offset: int, length: int) -> memoryview | None:
        """The bytes at ``offset`` without a copy, when the store holds them in memory (else None)."""
        return None

    def identity(self) -> Identity | None:
        return None

    def cache_key(self) -> dict[str, Any] | None:
        """For a store without a local :meth:`identity`: the fields that key its bytes in the statistics
        cache (``path`` and what identifies this version; ``mtime_ns`` when known), or None: not cached."""
        return None

    #: URL schemes whose paths this store opens ("" for local paths); see :func:`store_class`.
    schemes: tuple[str, ...] = ()

    @classmethod
    def open(cls, path: str) -> ByteStore:
        """Open the container at ``path`` and record what identifies it."""
        raise InputError(path, f"{cls.__name__} cannot be opened by path")

    @classmethod
    def reopen(cls, path: str, ident: Identity | None, key: str) -> ByteStore:
        """Open ``path`` again (in another process): it must be what ``ident`` describes."""
        raise InputError(path, f"{cls.__name__} cannot be reopened")

    def reopen_spec(self) -> tuple[type[ByteStore], str, Identity | None] | None:
        """What another process needs to :meth:`reopen` this store (plain, picklable data), or None."""
        return None

    def verify(self) -> None:
        """Raise InputError("changed while being read") if the store is no longer what it was."""

    def finish(self) -> None:
        """After the last read: verify and release."""

    def park(self) -> None:
        """Release what can be reopened (verified) for the next session."""

    def close(self) -> None:
        """Release without checks."""

    def __enter__(self) -> ByteStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        return None


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def os_problem(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else str(e)


def open_fd(path: str) -> int:
    """A read-only descriptor; the open cannot block (a FIFO)."""
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(path, flags)
    except (OSError, ValueError) as e:
        raise InputError(path, os_problem(e) if isinstance(e, OSError) else str(e)) from None


def regular_file(path: str) -> os.stat_result:
    """stat() a path that must be a regular file (a FIFO would block a read forever)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise InputError(path, os_problem(e) if isinstance(e, OSError) else str(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "not a regular file")
    return st


def hold_budget() -> int:
    """How many files one :func:`~gradinspect.sources.open_paths` call keeps open: a quarter of the
    descriptor limit (diff opens two sets), at most 256; the rest are parked."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not Unix
        return 64
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(0, min(256, soft // 4))


def pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill ``view`` from ``offset`` or fail with a truncation error."""
    done = 0
    n = len(view)
    while done < n:
        try:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [view[done:]], offset + done)
            else:  # pragma: no cover - Windows
                os.lseek(fd, offset + done, os.SEEK_SET)
                got = os.readv(fd, [view[done:]])
        except OSError as e:
            raise InputError(path, f"read failed: {os_problem(e)}") from None
        if got == 0:
            raise InputError(path, f"unexpected end of file at byte {offset + done}")
        done += got


def read_small(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.  The open cannot block (a FIFO
    swapped in after the stat) and at most ``limit + 1`` bytes are read (a file that grows)."""
    regular_file(path)
    fd = open_fd(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(path, "not a regular file")
        chunks = []
        left = limit + 1
        while left > 0:
            try:
                b = os.read(fd, min(left, 1 << 20))
            except OSError as e:
                raise InputError(path, f"read failed: {os_problem(e)}") from None
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    if left <= 0:
        raise InputError(path, f"file is larger than the {limit}-byte limit")
    return b"".join(chunks)


class LocalFile(ByteStore):
    """A local regular file, read with ``pread`` through the descriptor its header came from.

    ``with store:`` is a reading session (it reopens, verified, a parked store);
    :meth:`finish` checks the file did not change and releases it; :meth:`close`
    releases it without a check.
    """

    def __init__(self, path: str, fd: int | None, ident: Identity | None, key: str | None = None) -> None:
        self.path = path
        self.key = key if key is not None else os.path.abspath(path)
        self.fd = fd
        self.ident = ident
        self.size = ident[2] if ident is not None else 0
        self.parked = False  # close the descriptor after each session

    schemes = ("",)

    @classmethod
    def open(cls, path: str) -> LocalFile:
        """Open a regular, non-empty file and record its identity."""
        regular_file(path)
        fd = open_fd(path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced between a stat and the open
                raise InputError(path, "not a regular file")
            if st.st_size == 0:
                raise InputError(path, "empty file")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, identity(st))

    @classmethod
    def reopen(cls, path: str, ident: Identity | None, key: str | None = None) -> LocalFile:
        """Open ``path`` again (say, in another process); it must be the file ``ident`` describes."""
        store = cls(path, None, ident, key)
        store.parked = True
        return store.__enter__()

    def reopen_spec(self) -> tuple[type[ByteStore], str, Identity | None] | None:
        return (LocalFile, self.path, self.ident)

    def read_into(self, view: memoryview, offset: int) -> None:
        if self.fd is None:
            raise RuntimeError("source is not open")
        pread_into(self.fd, view, offset, self.path)

    def identity(self) -> Identity | None:
        return self.ident

    def __enter__(self) -> LocalFile:
        if self.fd is None:
            fd = open_fd(self.path)
            try:
                self.check(os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.fd is None:
            return
        try:
            if self.parked or (exc_type is not None and issubclass(exc_type, InputError)):
                # a parked descriptor is checked after each session; a read that
                # failed (say, past a new end of file) may be the file changing
                self.check(os.fstat(self.fd))
        finally:
            if self.parked:
                self.close()

    def park(self) -> None:
        self.parked = True
        self.close()

    def verify(self) -> None:
        if self.fd is not None:
            self.check(os.fstat(self.fd))
        try:
            st = os.stat(self.path)
        except OSError:
            raise InputError(self.path, "changed while being read (it is gone)") from None
        self.check(st)

    def finish(self) -> None:
        if self.ident is None:
            return
        try:
            self.verify()
        finally:
            self.parked = True
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def check(self, st: os.stat_result) -> None:
        if self.ident is not None and identity(st) != self.ident:
            raise InputError(self.path, "changed while being read")



_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(path: str) -> str:
    """The URL scheme of ``path`` (``"s3"`` for ``s3://bucket/key``), or ``""`` for a local path."""
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else ""


def store_class(path: str) -> type[ByteStore]:
    """The byte store that opens ``path``."""
    scheme = scheme_of(path)
    for cls in STORES:
        if scheme in cls.schemes:
            return cls
    raise InputError(path, f"{scheme}:// URLs are not supported")


_MEMORY_KEYS = itertools.count()


class MemoryStore(ByteStore):
    """Arrays in memory laid end to end at virtual offsets; reads copy, :meth:`buffer` does not."""

    def __init__(self, arrays: Sequence[np.ndarray], path: str = "<memory>") -> None:
        self.key = f"memory:{next(_MEMORY_KEYS)}"
        self.path = path
        self.arrays = [np.ascontiguousarray(a.reshape(-1)).view(np.uint8) if a.size else np.empty(0, np.uint8)
                       for a in arrays]
        self.offsets = list(itertools.accumulate((a.nbytes for a in self.arrays), initial=0))
        self.size = self.offsets[-1]

    def locate(self, offset: int) -> tuple[np.ndarray, int]:
        i = bisect.bisect_right(self.offsets, offset) - 1
        while i + 1 < len(self.arrays) and not self.arrays[i].nbytes:
            i += 1
        return self.arrays[i], offset - self.offsets[i]

    def buffer(self, offset: int, length: int) -> memoryview | None:
        if not length:
            return memoryview(b"")
        arr, rel = self.locate(offset)
        if rel + length > arr.nbytes:  # spans several arrays: no single view
            return None
        return memoryview(arr[rel : rel + length])  # type: ignore[arg-type]

    def read_into(self, view: memoryview, offset: int) -> None:
        n = len(view)
        i = bisect.bisect_right(self.offsets, offset) - 1
        j = bisect.bisect_left(self.offsets, offset + n)
        if (self.offsets[i] == offset and j < len(self.offsets) and self.offsets[j] == offset + n
                and j - i > 1):  # whole arrays (a batch of small tensors): one concatenate
            np.concatenate(self.arrays[i:j], out=np.frombuffer(view, np.uint8))
            return
        done = 0
        while done < n:
            arr, rel = self.locate(offset + done)
            k = min(n - done, arr.nbytes - rel)
            if k <= 0:
                raise InputError(self.path, f"unexpected end of data at byte {offset + done}")
            view[done : done + k] = memoryview(arr[rel : rel + k])  # type: ignore[arg-type]
            done += k


class ChunkBuffer:
    """A page-aligned, reused read buffer of ``chunk`` elements of up to 8 bytes.

    Memory from ``mmap`` is page-aligned; numpy's own large allocations sit a
    few bytes past a page boundary, which halves the speed of reading into them.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self.size = chunk * 8
        self._map = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        """The first ``count`` elements as ``dtype`` in native byte order (swapped in place if need be)."""
        arr = np.frombuffer(self._map, dtype=dtype, count=count)
        if not dtype.isnative:  # big-endian .npy
            arr = arr.byteswap(inplace=True).view(dtype.newbyteorder("="))
        return arr


# The byte stores that open paths, by URL scheme: a new store is one module with a ByteStore
# subclass and one line here (imported last: it subclasses ByteStore).
from .remote import FsspecStore  # noqa: E402

STORES: tuple[type[ByteStore], ...] = (LocalFile, FsspecStore)
