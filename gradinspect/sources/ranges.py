"""Byte stores made of ranges of other stores, read in place (never copied but into the read buffer).

- :class:`SubStore`: bytes ``[offset, offset + length)`` of another store, as a store of its own: a
  container stored inside a larger file (a distributed checkpoint's chunk, a torch.save archive at an
  offset in a ``.distcp`` file) is parsed by its usual reader, which sees exactly those bytes: a read
  past their end is a truncation, so a container must end exactly where the range ends.
- :class:`GatherStore`: a virtual address space whose bytes are runs of ranges of several files (a
  distributed checkpoint's tensors, each the runs of its chunks laid out in row-major order), so a
  tensor stored in pieces is read, planned and compared like a tensor stored whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .base import Extent
from .store import ByteStore

__all__ = ["SubStore", "GatherStore"]


class SubStore(ByteStore):
    """Bytes ``[offset, offset + length)`` of ``base``; offsets here start at 0.

    Errors name ``path`` (by default the base's).  :meth:`rebase` turns an extent a reader
    produced over this store into one over ``base``."""

    def __init__(self, base: ByteStore, offset: int, length: int, path: str | None = None) -> None:
        self.path = path if path is not None else base.path
        if offset < 0 or length < 0 or offset + length > base.size:
            raise InputError(self.path, f"bytes {offset} to {offset + length} lie past the end of the file "
                                        f"({base.size} bytes): truncated?")
        self.base = base
        self.offset = offset
        self.size = length
        self.key = f"{base.key}@{offset}+{length}"

    def read_into(self, view: memoryview, offset: int) -> None:
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise InputError(self.path, f"unexpected end of data at byte {min(max(offset, 0), self.size)} "
                                        f"(the range holds {self.size} bytes)")
        self.base.read_into(view, self.offset + offset)

    def buffer(self, offset: int, length: int) -> memoryview | None:
        if offset < 0 or offset + length > self.size:
            return None
        return self.base.buffer(self.offset + offset, length)

    def rebase(self, ext: Extent) -> Extent:
        """``ext`` (over this store) as an extent over the base store."""
        return ext._replace(store=self.base.key, offset=ext.offset + self.offset)


class GatherStore(ByteStore):
    """A virtual address space of ``size`` bytes; byte ranges of it are runs of the ``members``' bytes.

    ``starts[i]`` (increasing, the first 0) is where run ``i`` begins in the virtual space; it
    holds the bytes of member ``which[i]`` from its offset ``at[i]`` up to the next run's start.
    The members are the stores of the files (``with``, park, finish and close go to each);
    :meth:`identity` is None (no single file: nothing is cached, and other processes do not reopen it).
    ``transient``: the members are parked and each read opens the ones it needs (identity checked) and
    closes them, so a checkpoint of thousands of files holds no descriptor between reads.
    """

    def __init__(self, key: str, path: str, members: Sequence[ByteStore], starts: np.ndarray, which: np.ndarray,
                 at: np.ndarray, size: int, transient: bool = False) -> None:
        self.key = key
        self.path = path
        self.members = list(members)
        self.starts = starts
        self.which = which
        self.at = at
        self.size = size
        self.transient = transient
        if transient:
            self.park()

    def read_into(self, view: memoryview, offset: int) -> None:
        n = len(view)
        if offset < 0 or offset + n > self.size:
            raise InputError(self.path, f"unexpected end of data at byte {offset + n}")
        first = int(np.searchsorted(self.starts, offset, side="right")) - 1
        stop = int(np.searchsorted(self.starts, offset + n, side="left"))  # the runs this read covers
        starts = self.starts[first : stop + 1].tolist()  # Python ints: a read covers few runs, often hundreds
        if len(starts) == stop - first:
            starts.append(self.size)
        which, at = self.which[first:stop].tolist(), self.at[first:stop].tolist()
        done = 0
        opened: dict[int, ByteStore] = {}
        try:
            for j, w in enumerate(which):
                pos = offset + done
                k = min(n - done, starts[j + 1] - pos)
                if k > 0:
                    member = opened.get(w) or self._member(w, opened)
                    member.read_into(view[done : done + k], at[j] + pos - starts[j])
                    done += k
            if done != n:  # pragma: no cover - the runs tile the space
                raise AssertionError("runs do not cover the read")
        finally:
            for m in opened.values():
                m.close()

    def _member(self, w: int, opened: dict[int, ByteStore]) -> ByteStore:
        """Member ``w``, held open by this store, or (transient) opened again for one read."""
        m = self.members[w]
        spec = m.reopen_spec() if self.transient else None
        if spec is None:
            return m
        cls, path, ident = spec
        opened[w] = cls.reopen(path, ident, m.key)
        return opened[w]

    def __enter__(self) -> GatherStore:
        if self.transient:
            return self
        entered: list[ByteStore] = []
        try:
            for m in self.members:
                m.__enter__()
                entered.append(m)
        except BaseException:
            for m in entered:
                m.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.transient:
            return
        first: BaseException | None = None
        for m in self.members:
            try:
                m.__exit__(exc_type, *exc)
            except BaseException as e:  # every member is released; the first problem is raised
                first = first or e
        if first is not None:
            raise first

    def park(self) -> None:
        for m in self.members:
            m.park()

    def verify(self) -> None:
        for m in self.members:
            m.verify()

    def finish(self) -> None:
        try:
            for m in self.members:
                m.finish()
        finally:
            self.close()

    def close(self) -> None:
        for m in self.members:
            m.close()
