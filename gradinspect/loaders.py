"""Paths to streams of named tensors.

This module owns every file format gradinspect reads and every refusal.  It
parses headers itself (safetensors JSON headers, zip directories, ``.npy``
headers) so that tensor data can be read chunk by chunk into reused,
page-aligned buffers: never a whole file, never a whole large tensor.
Nothing is ever unpickled.

A file must not change between its header and its last byte: data read at
the header's offsets from another version would be garbage that looks like
numbers.  :func:`open_source` records the identity of the open file (device,
inode, size, mtime and ctime in ns, from ``fstat``); the file is read through
that same descriptor while it is held open, or, when too many files are open
(see :func:`_hold_budget`), through a reopened one whose ``fstat`` must match
the identity before any byte is read.  After the last byte (:meth:`Source.finish`)
the descriptor is checked again and the path ``stat``-ed: a replaced (renamed
over), rewritten, appended or truncated file raises ``InputError(path,
"changed while being read")``.  Residual risk: a rewrite in place that keeps
the size and lands within the filesystem's timestamp granularity (a clock tick
on many Linux filesystems) as the header read leaves mtime and ctime unchanged
and cannot be seen.
"""

from __future__ import annotations

import ast
import glob
import itertools
import json
import json.decoder
import math
import mmap
import os
import re
import stat
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError
from .norms import CHUNK, is_float_dtype

__all__ = [
    "TensorEntry",
    "Source",
    "ChunkBuffer",
    "resolve_paths",
    "open_source",
    "open_paths",
    "close_all",
    "array_source",
]

INDEX_SUFFIX = ".index.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_MAX_ST_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation's limit
# Limits on what one header or index may ask to be held in memory (a few hundred bytes per tensor):
MAX_TENSORS = 1_000_000  # tensors in one file (a 70B model has ~1,000; large MoE checkpoints ~100,000)
MAX_TOTAL_TENSORS = 2_000_000  # tensors in all the files of one call, and names in an index's weight_map
MAX_METADATA_KEYS = 65_536  # keys in a safetensors __metadata__ object
MAX_METADATA_VALUE = 1 << 20  # characters in one __metadata__ key or value
MAX_INDEX_BYTES = 64 << 20  # size of a *.safetensors.index.json
_MAX_USIZE = (1 << 64) - 1  # safetensors shapes and offsets are u64; so is a tensor's element count
_MAX_NPY_HEADER = 1 << 16
_INFLATE_IN = 1 << 20

try:
    import ml_dtypes as _mld
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _mld = None

# safetensors dtype -> numpy dtype (None: known to the format but not readable here)
_ST_DTYPES: dict[str, tuple[str, np.dtype | None]] = {
    "F64": ("float64", np.dtype("<f8")),
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", None),
    "F8_E4M3": ("float8_e4m3fn", None),
    "F8_E5M2": ("float8_e5m2", None),
    "F8_E8M0": ("float8_e8m0fnu", None),
    "I64": ("int64", np.dtype("<i8")),
    "I32": ("int32", np.dtype("<i4")),
    "I16": ("int16", np.dtype("<i2")),
    "I8": ("int8", np.dtype("i1")),
    "U64": ("uint64", np.dtype("<u8")),
    "U32": ("uint32", np.dtype("<u4")),
    "U16": ("uint16", np.dtype("<u2")),
    "U8": ("uint8", np.dtype("u1")),
    "BOOL": ("bool", np.dtype("?")),
    "C64": ("complex64", np.dtype("<c8")),
}
if _mld is not None:
    for _st, (_name, _dt) in list(_ST_DTYPES.items()):
        if _dt is None and hasattr(_mld, _name):
            _ST_DTYPES[_st] = (_name, np.dtype(getattr(_mld, _name)))
# Sub-byte float formats: bits per element; their norms are not computed.
_ST_PACKED = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _reasons() -> dict[str, str]:
    """The skip reason ("" for none) of every known safetensors dtype, computed once."""
    return {st: _skip_reason(name, dt) or "" for st, (name, dt) in _ST_DTYPES.items()}


def _dtype_name(dtype: np.dtype) -> str:
    """A dtype as numpy spells it (``float32``, ``bfloat16``), whatever its byte order."""
    return dtype.newbyteorder("=").name if dtype.byteorder not in ("=", "|") else dtype.name


def _skip_reason(dtype_name: str, np_dtype: np.dtype | None) -> str | None:
    if np_dtype is not None and is_float_dtype(np_dtype.newbyteorder("=")):
        return None
    if np_dtype is None:
        return f"unsupported dtype {dtype_name}"
    if np_dtype.kind == "c":
        return f"complex dtype ({dtype_name}) is not supported"
    if np_dtype.kind == "V":
        return f"raw bytes ({dtype_name}): np.save loses bfloat16/float8 dtypes; save those with safetensors"
    return f"not a floating-point dtype ({dtype_name})"


_REASONS = _reasons()


@dataclass(eq=False, slots=True)
class TensorEntry:
    """One named tensor in a source, located but not read."""

    name: str
    source: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    skip_reason: str | None = None
    # How to read it (private to the loader that made it):
    _np_dtype: np.dtype | None = field(default=None, repr=False)
    _offset: int = field(default=0, repr=False)
    _method: str = field(default="raw", repr=False)  # raw | deflate | array
    _stored_size: int = field(default=0, repr=False)  # deflate: compressed bytes
    _skip: int = field(default=0, repr=False)  # deflate: .npy header bytes to drop
    _crc: int | None = field(default=None, repr=False)  # zip CRC-32 of the whole member, to verify
    _crc_head: int = field(default=0, repr=False)  # stored member: CRC-32 of its .npy header
    _fortran: bool = field(default=False, repr=False)  # .npy data in column-major order
    _array: Any = field(default=None, repr=False)

    @property
    def is_float(self) -> bool:
        return self.skip_reason is None

    def verify_crc(self, crc: int) -> None:
        """Compare the CRC-32 computed over the member with the zip's (if it has one)."""
        if self._crc is not None and crc != self._crc:
            raise InputError(self.source, f"member {self.name + '.npy'!r}: CRC-32 mismatch (the data is corrupt)")


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


@dataclass(eq=False)
class Source:
    """A file (or an in-memory mapping) and the tensors in it, in file order.

    A file-backed source owns the descriptor its header was read through:
    ``with source:`` is a reading session (it reopens, verified, a source that
    was parked), :meth:`finish` checks the file did not change and releases it,
    :meth:`close` releases it without a check.  Whoever opened it closes it.
    """

    path: str
    kind: str
    tensors: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    _fd: int | None = field(default=None, repr=False)
    _ident: tuple[int, ...] | None = field(default=None, repr=False)  # (dev, ino, size, mtime_ns, ctime_ns)
    _park: bool = field(default=False, repr=False)  # close the descriptor after each session

    def __enter__(self) -> Source:
        if self.kind != "memory" and self._fd is None:
            fd = _open_fd(self.path)
            try:
                self._check(os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            if self._park or (exc_type is not None and issubclass(exc_type, InputError)):
                # a parked descriptor is checked after each session; a read that
                # failed (say, past a new end of file) may be the file changing
                self._check(os.fstat(self._fd))
        finally:
            if self._park:
                self.close()

    def park(self) -> None:
        """Close the descriptor between sessions (reopened and verified on the next)."""
        self._park = True
        self.close()

    def finish(self) -> None:
        """After the last read: raise if the file changed since its header was read; release it."""
        if self._ident is None:
            return
        try:
            if self._fd is not None:
                self._check(os.fstat(self._fd))
            try:
                st = os.stat(self.path)
            except OSError:
                raise InputError(self.path, "changed while being read (it is gone)") from None
            self._check(st)
        finally:
            self._park = True
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _check(self, st: os.stat_result) -> None:
        if self._ident is not None and _identity(st) != self._ident:
            raise InputError(self.path, "changed while being read")

    def chunks(self, entry: TensorEntry, buf: ChunkBuffer) -> Iterator[np.ndarray]:
        """The tensor's elements, in chunks of at most ``buf.chunk``, as 1-d native arrays.

        Each chunk is a view into ``buf``: use it before asking for the next.
        The source must be open (``with source:``) for file-backed tensors.
        """
        dtype = entry._np_dtype
        assert dtype is not None and entry.is_float, entry
        if entry._method == "array":
            flat = entry._array
            for i in range(0, flat.size, buf.chunk):
                yield flat[i : i + buf.chunk]
            return
        if self._fd is None:
            raise RuntimeError("source is not open")
        pieces = self._raw_pieces(entry, buf) if entry._method == "raw" else self._inflate_pieces(entry, buf)
        for nbytes in pieces:
            yield buf.array(dtype, nbytes // dtype.itemsize)

    # Each generator below fills ``buf`` from its start and yields the byte count.

    def _raw_pieces(self, entry: TensorEntry, buf: ChunkBuffer) -> Iterator[int]:
        step = buf.chunk * entry._np_dtype.itemsize  # type: ignore[union-attr]
        pos, end = entry._offset, entry._offset + entry.nbytes
        crc = entry._crc_head
        while pos < end:
            k = min(step, end - pos)
            _pread_into(self._fd, buf.view[:k], pos, self.path)  # type: ignore[arg-type]
            if entry._crc is not None:
                crc = zlib.crc32(buf.view[:k], crc)
            yield k
            pos += k
        entry.verify_crc(crc)

    def _inflate_pieces(self, entry: TensorEntry, buf: ChunkBuffer) -> Iterator[int]:
        """Stream a deflated .npy member: skip its header, yield element-aligned fills."""
        itemsize = entry._np_dtype.itemsize  # type: ignore[union-attr]
        step = buf.chunk * itemsize
        skip = entry._skip
        want = entry.nbytes
        crc = 0
        fill = 0
        for out in _inflate(self._fd, entry, self.path):  # type: ignore[arg-type]
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
            raise InputError(self.path, f"member {entry.name + '.npy'!r}: compressed data ends early")
        entry.verify_crc(crc)


def _inflate(fd: int, entry: TensorEntry, path: str) -> Iterator[bytes]:
    """The decompressed bytes of a deflated zip member, a block at a time.

    The member must inflate to exactly its declared size (its .npy header and data) and its
    stream must end with its compressed bytes; a stream that would give more stops one byte
    past the declared size, so a decompression bomb costs nothing.
    """
    d = zlib.decompressobj(-15)
    pos, remaining = entry._offset, entry._stored_size
    declared = entry._skip + entry.nbytes
    where = f"member {entry.name + '.npy'!r}: "
    got = 0
    tail = b""
    while not d.eof:
        if not tail:
            if not remaining:
                break
            n = min(_INFLATE_IN, remaining)
            tail = _pread(fd, n, pos, path)
            pos, remaining = pos + n, remaining - n
        try:
            out = d.decompress(tail, min(_INFLATE_IN * 4, declared - got + 1))
        except zlib.error as e:
            raise InputError(path, f"{where}corrupt compressed data ({e})") from None
        tail = d.unconsumed_tail
        got += len(out)
        if got > declared:
            raise InputError(path, f"{where}inflates to more than the declared {declared} bytes")
        if out:
            yield out
    if got < declared and d.eof:
        raise InputError(path, f"{where}inflates to {got} bytes, fewer than the declared {declared}")
    if not d.eof:
        raise InputError(path, f"{where}compressed data ends early")
    if remaining or tail or d.unused_data:
        raise InputError(path, f"{where}the compressed stream ends before the declared compressed size")


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hold_budget() -> int:
    """How many files one :func:`open_paths` call keeps open: a quarter of the
    descriptor limit (diff opens two sets), at most 256; the rest are parked."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not Unix
        return 64
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(0, min(256, soft // 4))


def _open_fd(path: str) -> int:
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(path, flags)
    except (OSError, ValueError) as e:
        raise InputError(path, _os_problem(e) if isinstance(e, OSError) else str(e)) from None


def _os_problem(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else str(e)


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
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
            raise InputError(path, f"read failed: {_os_problem(e)}") from None
        if got == 0:
            raise InputError(path, f"unexpected end of file at byte {offset + done}")
        done += got


def _pread(fd: int, n: int, offset: int, path: str) -> bytes:
    b = bytearray(n)
    _pread_into(fd, memoryview(b), offset, path)
    return bytes(b)


# --- safetensors -----------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _check_name(name: str, path: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(path, f"tensor name {name!r} is not valid Unicode") from None


def _is_int(v: object) -> bool:
    return type(v) is int and v >= 0  # not bool, which is an int subclass


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_USIZE


def _short(v: object, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages about hostile values."""
    if isinstance(v, list) and len(v) > limit:  # do not format a million elements to show eighty characters
        v = v[:limit]
    r = repr(v) if not (type(v) is int and v.bit_length() > 256) else f"<a {v.bit_length()}-bit integer>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --- incremental JSON objects -------------------------------------------------------
# A safetensors header is read member by member: each tensor's entry is parsed and
# turned into a TensorEntry at once, so the whole header never exists as Python
# objects, and every count is checked before more is allocated.

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys)
_scanstring = json.decoder.scanstring


def _ws(s: str, pos: int) -> int:
    return _WS.match(s, pos).end()  # type: ignore[union-attr]


def _walk(s: str, pos: int, member: Any) -> int:
    """Call ``member(key, value_pos) -> value_end`` for each member of the JSON object at
    ``s[pos]`` (after whitespace), in order; return where the object ends.
    Duplicate keys are the member function's to catch."""
    pos = _ws(s, pos)
    if not s.startswith("{", pos):
        raise json.JSONDecodeError("Expecting '{'", s, pos)
    pos = _ws(s, pos + 1)
    if s.startswith("}", pos):
        return pos + 1
    while True:
        if not s.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, pos)
        key, pos = _scanstring(s, pos + 1, True)
        pos = _ws(s, pos)
        if not s.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", s, pos)
        pos = _ws(s, member(key, _ws(s, pos + 1)))
        if s.startswith(",", pos):
            pos = _ws(s, pos + 1)
        elif s.startswith("}", pos):
            return pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", s, pos)


def _value(s: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(s, pos)
    except StopIteration:  # pragma: no cover - raw_decode turns it into JSONDecodeError
        raise json.JSONDecodeError("Expecting value", s, pos) from None


def _string_object(s: str, pos: int, what: str, limit: int, too_many: str, not_strings: str,
                   max_len: int | None = None, share: bool = False) -> tuple[dict[str, str], int]:
    """The JSON object of strings at ``s[pos]`` and where it ends, refused (:class:`_Refusal`)
    past ``limit`` keys or with a key or value longer than ``max_len``; ``share``: equal values
    are one string object (an index names each shard thousands of times)."""
    out: dict[str, str] = {}
    shared: dict[str, str] = {}

    def member(key: str, at: int) -> int:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        if len(out) >= limit:
            raise _Refusal(too_many)
        if not s.startswith('"', at):
            raise _Refusal(not_strings)
        v, end = _scanstring(s, at + 1, True)
        if max_len is not None and len(key) > max_len:
            raise _Refusal(f"{what} has a key longer than {max_len:,} characters")
        if max_len is not None and len(v) > max_len:
            raise _Refusal(f"{what} value of {_short(key)} is longer than {max_len:,} characters")
        out[key] = shared.setdefault(v, v) if share else v
        return end

    return out, _walk(s, pos, member)


class _Refusal(ValueError):
    """A problem, found while parsing JSON, that is not a syntax error."""


def _not_an_object(s: str) -> bool:
    """Whether the JSON text ``s`` holds a value other than an object; a syntax error raises.
    Only a short text is parsed whole to find its errors (a long array could take gigabytes)."""
    pos = _ws(s, 0)
    if s.startswith("{", pos):
        return False
    if len(s) <= 1 << 20:
        end = _ws(s, _value(s, pos)[1])
        if end != len(s):
            raise json.JSONDecodeError("Extra data", s, end)
    elif not s.startswith(tuple('["-0123456789tfn'), pos):
        raise json.JSONDecodeError("Expecting value", s, pos)
    return True


def _read_small(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.  The open cannot block (a FIFO
    swapped in after the stat) and at most ``limit + 1`` bytes are read (a file that grows)."""
    _regular_file(path)
    fd = _open_fd(path)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(path, "not a regular file")
        chunks = []
        left = limit + 1
        while left > 0:
            try:
                b = os.read(fd, min(left, 1 << 20))
            except OSError as e:
                raise InputError(path, f"read failed: {_os_problem(e)}") from None
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    finally:
        os.close(fd)
    if left <= 0:
        raise InputError(path, f"file is larger than the {limit}-byte limit")
    return b"".join(chunks)


def _read_safetensors(path: str, fd: int, size: int) -> Source:
    if size < 8:
        raise InputError(path, f"file is too short to be safetensors ({size} bytes)")
    (n,) = struct.unpack("<Q", _pread(fd, 8, 0, path))
    if n > size - 8:
        raise InputError(path, f"header length {n} runs past the end of the file ({size} bytes): truncated or not safetensors")
    if n > _MAX_ST_HEADER:
        raise InputError(path, f"header length {n} exceeds the {_MAX_ST_HEADER}-byte limit")
    data_start = 8 + n
    try:
        raw = bytearray(n)  # decoded in place: one copy of the header less than _pread
        _pread_into(fd, memoryview(raw), 8, path)
        reader = _HeaderReader(path, raw.decode("utf-8"), data_start, size - data_start)
        del raw
        text = reader.text
        if _not_an_object(text):
            raise InputError(path, "header is not a JSON object")
        end = _ws(text, _walk(text, 0, reader.member))
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except _Refusal as e:
        raise InputError(path, str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(path, "header is not valid JSON (nested too deeply)") from None
    except MemoryError:
        raise InputError(path, "header is too large for the memory available") from None
    del text, reader.text, reader.names
    tensors = reader.tensors
    if any(b._offset < a._offset or (b._offset == a._offset and b.nbytes < a.nbytes)
           for a, b in itertools.pairwise(tensors)):
        tensors.sort(key=_by_nbytes)  # two stable sorts: by (offset, end) without a tuple per tensor
        tensors.sort(key=_by_offset)
    prev: TensorEntry | None = None
    for t in tensors:
        if not t.nbytes:
            continue
        if prev is not None and t._offset < prev._offset + prev.nbytes:
            raise InputError(path, f"tensors {prev.name!r} and {t.name!r} overlap in the data")
        prev = t
    return Source(path, "safetensors", tensors, reader.meta or {})


def _by_offset(t: TensorEntry) -> int:
    return t._offset


def _by_nbytes(t: TensorEntry) -> int:
    return t.nbytes


class _HeaderReader:
    """Turns each member of a safetensors header into a TensorEntry as it is parsed."""

    _SHAPES = 4096  # distinct (dtype, shape) pairs whose tuple and sizes are shared

    def __init__(self, path: str, text: str, data_start: int, data_size: int) -> None:
        self.path, self.text, self.data_start, self.data_size = path, text, data_start, data_size
        self.tensors: list[TensorEntry] = []
        self.names: set[str] = set()
        self.meta: dict[str, str] | None = None
        self.seen_meta = False
        self.shapes: dict[tuple[str, tuple[int, ...]], tuple[tuple[int, ...], int, int]] = {}
        self.unknown: dict[str, tuple[str, str | None]] = {}

    def member(self, name: str, at: int) -> int:
        path = self.path
        if name == "__metadata__":
            if self.seen_meta:
                raise ValueError("duplicate key '__metadata__'")
            self.seen_meta = True
            return self.metadata(at)
        if name in self.names:
            raise ValueError(f"duplicate key {name!r}")
        if len(self.tensors) >= MAX_TENSORS:
            raise InputError(path, f"the header lists more than {MAX_TENSORS:,} tensors (the limit per file)")
        info, end = _value(self.text, at)
        self.names.add(name)
        _check_name(name, path)
        if not isinstance(info, dict):
            raise InputError(path, f"tensor {name!r}: header entry is not an object")
        st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(st_dtype, str):
            raise InputError(path, f"tensor {name!r}: missing or invalid dtype")
        if type(shape) is not list or not all(_is_u64(d) for d in shape):
            raise InputError(path, f"tensor {name!r}: invalid shape {_short(shape)}")
        if not (type(offsets) is list and len(offsets) == 2 and _is_u64(offsets[0]) and _is_u64(offsets[1])
                and offsets[0] <= offsets[1]):
            raise InputError(path, f"tensor {name!r}: invalid data_offsets {_short(offsets)}")
        begin, end_ = offsets
        shape_t, numel, expected = self.sizes(name, st_dtype, shape, end_ - begin)
        if end_ - begin != expected:
            raise InputError(path, f"tensor {name!r}: shape {_short(shape)} of {st_dtype} needs {expected} "
                             f"bytes, but data_offsets span {end_ - begin}")
        if end_ > self.data_size:
            raise InputError(path, f"tensor {name!r}: data_offsets end at byte {end_} of the data, past the end of the file (the data holds {self.data_size} bytes): truncated?")
        dtype_name, np_dtype = _ST_DTYPES.get(st_dtype, (st_dtype, None))
        reason = _REASONS.get(st_dtype)
        if reason is None:  # an unknown dtype: one name and one reason string for all its tensors
            dtype_name, reason = self.unknown.setdefault(dtype_name, (dtype_name, _skip_reason(dtype_name, np_dtype)))
        self.tensors.append(TensorEntry(name, path, dtype_name, shape_t, numel, expected,
                                        reason or None, np_dtype, self.data_start + begin))
        return end

    def sizes(self, name: str, st_dtype: str, shape: list[int], span: int) -> tuple[tuple[int, ...], int, int]:
        """The shape as a (shared) tuple, its element count and the bytes it needs."""
        key = (st_dtype, tuple(shape))
        hit = self.shapes.get(key)
        if hit is not None:
            return hit
        numel = 1
        for d in shape:  # not math.prod: a million dimensions of 2 would make a million-bit number
            numel *= d
            if numel > _MAX_USIZE:
                if 0 in shape:
                    numel = 0
                    break
                raise InputError(self.path, f"tensor {name!r}: invalid shape {_short(shape)} (more than 2**64 elements)")
        np_dtype = _ST_DTYPES.get(st_dtype, (st_dtype, None))[1]
        if np_dtype is not None:
            expected = numel * np_dtype.itemsize
        elif st_dtype in _ST_PACKED:
            expected = -(-numel * _ST_PACKED[st_dtype] // 8)
        else:
            return key[1], numel, span  # an unknown dtype: trust the offsets, skip the tensor
        if len(self.shapes) < self._SHAPES:
            self.shapes[key] = (key[1], numel, expected)
        return key[1], numel, expected

    def metadata(self, at: int) -> int:
        if not self.text.startswith("{", at):
            v, end = _value(self.text, at)
            if v is not None:
                raise InputError(self.path, "__metadata__ is not an object of strings")
            return end
        self.meta, end = _string_object(
            self.text, at, "__metadata__", MAX_METADATA_KEYS, f"__metadata__ holds more than {MAX_METADATA_KEYS:,} keys",
            "__metadata__ is not an object of strings", MAX_METADATA_VALUE)
        return end


# --- .npy and .npz ---------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def _parse_npy_header(head: bytes, where: str, path: str) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """(dtype, shape, header length, Fortran order) of an .npy stream starting with ``head``.

    The header is a Python literal read with ``ast.literal_eval``, which
    evaluates no code; object dtypes, whose data would need unpickling, are refused.
    """
    if not head.startswith(_NPY_MAGIC) or len(head) < 10:
        raise InputError(path, f"{where}is not an .npy array (bad magic)")
    major = head[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", head[8:10])
        start = 10
    elif major in (2, 3):
        if len(head) < 12:
            raise InputError(path, f"{where}truncated .npy header")
        (hlen,) = struct.unpack("<I", head[8:12])
        start = 12
    else:
        raise InputError(path, f"{where}unsupported .npy format version {major}")
    if hlen > _MAX_NPY_HEADER:
        raise InputError(path, f"{where}.npy header of {hlen} bytes is too large")
    if len(head) < start + hlen:
        raise InputError(path, f"{where}truncated .npy header")
    raw = head[: start + hlen]
    hit = _NPY_CACHE.get(raw)
    if hit is not None:  # the members of an npz often share one header
        return hit
    try:
        text = raw[start:].decode("utf-8" if major == 3 else "latin1")
    except UnicodeDecodeError as e:
        raise InputError(path, f"{where}corrupt .npy header ({e})") from None
    try:
        d = ast.literal_eval(text)
    except Exception:  # literal_eval's messages show AST nodes (<ast.Call object at 0x...>): say what is wrong
        raise InputError(path, f"{where}corrupt .npy header (not a Python literal)") from None
    try:
        if not isinstance(d, dict):
            raise ValueError("not a dict")
        missing = [k for k in ("descr", "fortran_order", "shape") if k not in d]
        if missing:
            raise ValueError(f"no {missing[0]!r}")
        descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
        if not isinstance(shape, tuple) or not all(_is_int(s) for s in shape) or not isinstance(fortran, bool):
            raise ValueError("bad shape or fortran_order")
        try:
            dtype = np.lib.format.descr_to_dtype(descr)
        except Exception:
            shown = repr(descr)
            raise ValueError(f"descr {shown if len(shown) <= 40 else shown[:39] + '…'} is not a dtype") from None
    except Exception as e:  # any malformed header is the file's fault
        raise InputError(path, f"{where}corrupt .npy header ({e})") from None
    if dtype.hasobject:
        raise InputError(path, f"{where}holds Python objects (dtype {dtype}); refusing to unpickle")
    # Norms do not depend on the element order; diff needs it (``_fortran``).
    fortran = fortran and sum(1 for d in shape if d > 1) > 1
    if len(_NPY_CACHE) < 4096:
        _NPY_CACHE[raw] = (dtype, shape, start + hlen, fortran)
    return dtype, shape, start + hlen, fortran


_NPY_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], int, bool]] = {}


class _Window:
    """Small reads near each other (zip local headers, .npy headers) from one larger pread."""

    SIZE = 1 << 18

    def __init__(self, fd: int, size: int, path: str) -> None:
        self.fd, self.size, self.path = fd, size, path
        self.base, self.data = 0, b""

    def read(self, offset: int, n: int, ahead: bool = True) -> bytes:
        """``n`` bytes at ``offset``; ``ahead``: also fetch what follows (small members)."""
        if not (self.base <= offset and offset + n <= self.base + len(self.data)):
            self.base = offset
            want = max(n, self.SIZE) if ahead else n + 4096
            self.data = _pread(self.fd, min(want, self.size - offset), offset, self.path)
        at = offset - self.base
        return self.data[at : at + n]


_VOID_HINTS = {
    1: "numpy writes float8 types from ml_dtypes this way",
    2: "numpy writes bfloat16 from ml_dtypes this way",
}


def _npy_entry(name: str, path: str, where: str, dtype: np.dtype, shape: tuple[int, ...], **loc: Any) -> TensorEntry:
    if dtype.kind == "V" and dtype.fields is None:  # raw bytes: bfloat16 or float8 that np.save could not name
        hint = _VOID_HINTS.get(dtype.itemsize, "numpy writes ml_dtypes types such as bfloat16 and float8 this way")
        raise InputError(path, f"{where}raw void dtype {dtype.str} ({hint}); refusing to guess its type "
                         "(save bfloat16/float8 gradients with safetensors)")
    numel = math.prod(shape)
    name_ = _dtype_name(dtype) if dtype.fields is None else "structured"
    reason = _skip_reason(name_, dtype) if dtype.fields is None else "structured dtype is not a gradient"
    return TensorEntry(name, path, name_, tuple(shape), numel, numel * dtype.itemsize, reason, dtype, **loc)


def _read_npy(path: str, fd: int, size: int) -> Source:
    head = _pread(fd, min(size, 12 + _MAX_NPY_HEADER), 0, path)
    dtype, shape, hlen, fortran = _parse_npy_header(head, "", path)
    name = os.path.splitext(os.path.basename(path))[0]
    entry = _npy_entry(name, path, "", dtype, shape, _offset=hlen, _fortran=fortran)
    if hlen + entry.nbytes > size:
        raise InputError(path, f"array of shape {list(shape)} {entry.dtype} needs {entry.nbytes} bytes of data, the file has {size - hlen}: truncated")
    return Source(path, "npy", [entry], {})


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
# APPNOTE 4.3.14: signature, size of the rest of the record, version made by, version needed, this disk,
# disk of the central directory, entries on this disk, entries in all, central directory size, its offset.
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_ZIP64_LOCAL = struct.Struct("<HHQQ")  # the ZIP64 extra field of a local header: both sizes
# A central directory above this size is refused (its entries take at least 46 bytes, most npz ones under
# 100: millions of members fit); it is read in windows of _CD_WINDOW bytes, never whole.
_MAX_ZIP_CD = 256 << 20
_CD_WINDOW = 1 << 20

# name, name as stored, flags, method, CRC-32, compressed size, uncompressed size, local header offset
_Member = tuple[str, bytes, int, int, int, int, int, int]


def _zip_end(path: str, fd: int, size: int) -> tuple[int, int, int, int]:
    """(entries, central directory size, its offset, where it must end) from the end records.

    The end-of-central-directory record is the one whose comment reaches exactly to the
    end of the file; a second such record (a forged one inside the comment) is refused.
    """
    tail_len = min(size, _EOCD.size + 0xFFFF)
    base = size - tail_len
    tail = _pread(fd, tail_len, base, path)
    found = []
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        if at + _EOCD.size <= tail_len and at + _EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] == tail_len:
            found.append(at)
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if not found:
        raise InputError(path, "not a zip file (no end-of-central-directory record): corrupt or truncated")
    if len(found) > 1:
        raise InputError(path, f"{len(found)} end-of-central-directory records reach exactly to the end of the file "
                         "(forged ones hide in the archive comment or in member data): refusing an ambiguous zip")
    _, disk, cd_disk, on_disk, count, cd_size, cd_off, _ = _EOCD.unpack_from(tail, found[0])
    end = eocd = base + found[0]
    loc = eocd - _EOCD64_LOC.size
    if loc >= 0 and _pread(fd, 4, loc, path) == b"PK\x06\x07":
        _, _, end, disks = _EOCD64_LOC.unpack(_pread(fd, _EOCD64_LOC.size, loc, path))
        if end + _EOCD64.size > loc:
            raise InputError(path, "corrupt ZIP64 end-of-central-directory locator")
        sig, rest, _, _, disk, cd_disk, on_disk64, count64, cd_size64, cd_off64 = _EOCD64.unpack(
            _pread(fd, _EOCD64.size, end, path))
        if sig != b"PK\x06\x06" or end + 12 + rest != loc or disks > 1:
            raise InputError(path, "corrupt ZIP64 end-of-central-directory record")
        for what, v32, v64, full in (("entries", count, count64, 0xFFFF),
                                     ("central directory size", cd_size, cd_size64, 0xFFFFFFFF),
                                     ("central directory offset", cd_off, cd_off64, 0xFFFFFFFF)):
            if v32 not in (full, v64):  # 0xFFFF...: "see the ZIP64 record"
                raise InputError(path, f"the end record and the ZIP64 end record disagree on the {what} "
                                 f"({v32} vs {v64})")
        on_disk, count, cd_size, cd_off = on_disk64, count64, cd_size64, cd_off64
    if disk or cd_disk or on_disk != count:
        raise InputError(path, "zip archives split over several disks are not supported")
    return count, cd_size, cd_off, end


def _zip_directory(path: str, fd: int, size: int) -> tuple[list[_Member], int]:
    """The members the central directory lists, and where it starts.

    The directory is walked by its recorded size and offset: it must end where the end
    record begins and hold exactly the number of entries the end record counts.
    """
    count, cd_size, cd_off, cd_end = _zip_end(path, fd, size)
    if cd_off + cd_size != cd_end:
        where = "runs past" if cd_off + cd_size > cd_end else "ends before"
        raise InputError(path, f"the central directory ({cd_size} bytes at byte {cd_off}) {where} the end record "
                         f"at byte {cd_end}: corrupt, truncated or not a plain zip")
    if cd_size > _MAX_ZIP_CD:
        raise InputError(path, f"a zip central directory of {cd_size} bytes exceeds the {_MAX_ZIP_CD >> 20} MiB limit")
    if count * _CDIR.size > cd_size:
        raise InputError(path, f"the end record counts {count} entries, more than a central directory "
                         f"of {cd_size} bytes can hold")
    members: list[_Member] = []
    buf, start = b"", cd_off  # buf holds the file's bytes from ``start`` on
    pos = cd_off
    while pos < cd_end:
        if len(members) == count:
            raise InputError(path, f"the end record counts {count} entries but the central directory holds more "
                             f"({cd_end - pos} bytes of it are left over)")
        at = pos - start
        if at + _CDIR.size > len(buf):
            buf, start, at = _pread(fd, min(_CD_WINDOW, cd_end - pos), pos, path), pos, 0
        if at + _CDIR.size > len(buf) or buf[at : at + 4] != b"PK\x01\x02":
            raise InputError(path, f"corrupt zip central directory (entry {len(members) + 1} of {count})")
        f = _CDIR.unpack_from(buf, at)
        flags, method, crc, csize, usize = f[3], f[4], f[7], f[8], f[9]
        nlen, elen, clen, off = f[10], f[11], f[12], f[16]
        n = _CDIR.size + nlen + elen + clen
        if pos + n > cd_end:
            raise InputError(path, f"corrupt zip central directory (entry {len(members) + 1} runs past its end)")
        if at + n > len(buf):
            buf, start, at = _pread(fd, min(max(n, _CD_WINDOW), cd_end - pos), pos, path), pos, 0
        raw = buf[at + _CDIR.size : at + _CDIR.size + nlen]
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise InputError(path, "a zip member name is not valid UTF-8") from None
        if 0xFFFFFFFF in (csize, usize, off):
            extra = buf[at + _CDIR.size + nlen : at + _CDIR.size + nlen + elen]
            usize, csize, off = _zip64_extra(extra, usize, csize, off, path)
        members.append((name, raw, flags, method, crc, csize, usize, off))
        pos += n
    if len(members) != count:
        raise InputError(path, f"the end record counts {count} entries but the central directory holds {len(members)}")
    return members, cd_off


def _zip64_extra(extra: bytes, usize: int, csize: int, off: int, path: str) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        if tag == 1 and i + 4 + ln <= len(extra):
            vals = list(struct.unpack_from(f"<{ln // 8}Q", extra, i + 4))
            need = [usize, csize, off].count(0xFFFFFFFF)
            if len(vals) < need:
                break
            if usize == 0xFFFFFFFF:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF:
                csize = vals.pop(0)
            if off == 0xFFFFFFFF:
                off = vals.pop(0)
            return usize, csize, off
        i += 4 + ln
    raise InputError(path, "corrupt zip64 extra field")


def _check_local(path: str, where: str, local: tuple[Any, ...], lname: bytes, lextra: bytes, m: _Member) -> None:
    """The local header must say what the central directory says about its member."""
    _, raw, _, method, crc, csize, usize, _ = m
    if lname != raw:
        raise InputError(path, f"{where}its local header names it {lname.decode('utf-8', 'replace')!r}")
    if local[3] != method:
        raise InputError(path, f"{where}the local header says compression method {local[3]}, "
                         f"the central directory {method}")
    if local[2] & 8:  # sizes and CRC in a data descriptor after the data
        return
    lcrc, lcsize, lusize = local[6], local[7], local[8]
    if lcsize == lusize == 0xFFFFFFFF and lextra[:4] == b"\x01\x00\x10\x00":  # np.savez: always ZIP64 locals
        lusize, lcsize = struct.unpack_from("<QQ", lextra, 4)
    elif 0xFFFFFFFF in (lcsize, lusize):
        lusize, lcsize, _ = _zip64_extra(lextra, lusize, lcsize, 0, path)
    for what, a, b in (("CRC-32", lcrc, crc), ("compressed size", lcsize, csize), ("uncompressed size", lusize, usize)):
        if a != b:
            raise InputError(path, f"{where}the local header and the central directory disagree on the {what} "
                             f"({a} vs {b})")


def _read_npz(path: str, fd: int, size: int) -> Source:
    members, cd_off = _zip_directory(path, fd, size)
    window = _Window(fd, size, path)
    tensors = []
    seen: set[str] = set()
    spans = []
    for m in members:
        name, _, flags, method, crc, csize, usize, off = m
        where = f"member {name!r}: "
        if flags & 1:
            raise InputError(path, f"{where}is encrypted")
        if method not in (0, 8):
            raise InputError(path, f"{where}unsupported zip compression method {method}")
        if method == 0 and csize != usize:
            raise InputError(path, f"{where}stored, yet its sizes differ ({csize} stored, {usize} declared)")
        if off + _LOCAL.size > size:
            raise InputError(path, f"{where}local header past the end of the file: truncated")
        ahead = csize < _Window.SIZE // 4
        head = window.read(off, min(_LOCAL.size + len(m[1]) + 20, size - off), ahead=ahead)  # the usual extra: 20
        local = _LOCAL.unpack_from(head)
        if local[0] != b"PK\x03\x04":
            raise InputError(path, f"{where}corrupt zip local header")
        nlen, hend = local[9], _LOCAL.size + local[9] + local[10]
        data = off + hend
        if data + csize > size:
            raise InputError(path, f"{where}data runs past the end of the file: truncated")
        if hend > len(head):
            head = window.read(off, hend, ahead=ahead)
        lname, lextra = head[_LOCAL.size : _LOCAL.size + nlen], head[_LOCAL.size + nlen : hend]
        sizes = local[6:9]
        if not (lname == m[1] and local[3] == method and (local[2] & 8 or sizes == (crc, csize, usize) or (
                sizes == (crc, 0xFFFFFFFF, 0xFFFFFFFF) and lextra == _ZIP64_LOCAL.pack(1, 16, usize, csize)))):
            _check_local(path, where, local, lname, lextra, m)  # says what disagrees
        spans.append((off, data + csize, name))
        if name.endswith("/"):
            if usize:
                raise InputError(path, f"{where}is named like a directory but holds {usize} bytes")
            continue  # an empty directory entry
        tname = name[:-4] if name.endswith(".npy") else name
        if tname in seen:
            raise InputError(path, f"{where}appears twice in the archive")
        seen.add(tname)
        if not name.endswith(".npy"):
            tensors.append(TensorEntry(tname, path, "unknown", (), 0, 0, "not an .npy array"))
            continue
        if method == 0:
            head = window.read(data, min(csize, 12 + _MAX_NPY_HEADER), ahead=ahead)
        else:
            head = _inflate_head(fd, data, csize, path, where)[:usize]
        dtype, shape, hlen, fortran = _parse_npy_header(head, where, path)
        if method == 0:
            entry = _npy_entry(tname, path, where, dtype, shape, _offset=data + hlen, _crc=crc,
                               _crc_head=zlib.crc32(head[:hlen]), _fortran=fortran)
        else:
            entry = _npy_entry(tname, path, where, dtype, shape, _offset=data, _method="deflate",
                               _stored_size=csize, _skip=hlen, _crc=crc, _fortran=fortran)
        have = usize - hlen
        if have > entry.nbytes:
            raise InputError(path, f"{where}{have - entry.nbytes} unexpected bytes after the array")
        if entry.nbytes > have:
            raise InputError(path, f"{where}array of shape {list(shape)} {entry.dtype} needs {entry.nbytes} bytes, the member holds {have}: truncated")
        tensors.append(entry)
    _check_spans(path, spans, cd_off)
    return Source(path, "npz", tensors, {})


def _check_spans(path: str, spans: list[tuple[int, int, str]], cd_off: int) -> None:
    """Members (local header to end of data) may not overlap each other or the central directory."""
    spans.sort()
    end, last = 0, ""
    for start, stop, name in spans:
        if start < end:
            raise InputError(path, f"members {last!r} and {name!r} overlap in the archive")
        end, last = stop, name
    if end > cd_off:
        raise InputError(path, f"member {last!r} overlaps the zip central directory")


def _inflate_head(fd: int, pos: int, csize: int, path: str, where: str) -> bytes:
    """The start of a deflated member: enough to hold its .npy header (a few KiB read)."""
    for n in (8192, 1 << 16, 1 << 20):
        d = zlib.decompressobj(-15)
        try:
            head = d.decompress(_pread(fd, min(csize, n), pos, path), 12 + _MAX_NPY_HEADER)
        except zlib.error as e:
            raise InputError(path, f"{where}corrupt compressed data ({e})") from None
        if n >= csize or len(head) >= 12 + _MAX_NPY_HEADER or _npy_header_complete(head):
            return head
    return head


def _npy_header_complete(head: bytes) -> bool:
    if len(head) < 12 or not head.startswith(_NPY_MAGIC):
        return len(head) >= 10  # let the parser say what is wrong
    hlen, start = (struct.unpack("<H", head[8:10])[0], 10) if head[6] == 1 else (struct.unpack("<I", head[8:12])[0], 12)
    return len(head) >= start + hlen


# --- paths -----------------------------------------------------------------

_READERS = {".safetensors": _read_safetensors, ".npz": _read_npz, ".npy": _read_npy}


def _suffix(path: str) -> str:
    low = path.lower()
    if low.endswith(INDEX_SUFFIX):
        return INDEX_SUFFIX
    return os.path.splitext(low)[1]


def _index_shards(path: str, allow_outside: bool = False) -> list[str]:
    wm = _weight_map(path)
    if not allow_outside:
        for shard in dict.fromkeys(wm.values()):
            if _outside(shard):
                raise InputError(path, f"weight_map names shard {_short(shard, 300)} outside the index's directory "
                                 "(use --allow-outside-index to allow)")
    return sorted({_shard_path(path, v) for v in wm.values()})


def _outside(shard: str) -> bool:
    """Whether a weight_map shard path leaves the index's directory: absolute, on another drive,
    or climbing out with ``..``.  The check is on the path as written: symlinks in the directory
    are followed, as its owner (not the index) made them (the Hugging Face cache links every
    shard to ``../../blobs/<hash>``)."""
    if os.path.isabs(shard) or os.path.splitdrive(shard)[0]:
        return True
    return os.path.normpath(shard).split(os.sep)[0] == os.pardir


_NO_WEIGHT_MAP = "no \"weight_map\" object of tensor names to shard files"


def _weight_map(path: str) -> dict[str, str]:
    raw = _read_small(path, MAX_INDEX_BYTES)
    found: dict[str, dict[str, str]] = {}
    seen: set[str] = set()

    def member(key: str, at: int) -> int:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        if key == "weight_map" and text.startswith("{", at):
            found[key], end = _string_object(text, at, "weight_map", MAX_TOTAL_TENSORS,
                                             f"weight_map names more than {MAX_TOTAL_TENSORS:,} tensors",
                                             _NO_WEIGHT_MAP, share=True)
            return end
        return _value(text, at)[1]

    try:
        text = raw.decode("utf-8")
        del raw
        if not _not_an_object(text):
            end = _ws(text, _walk(text, 0, member))
            if end != len(text):
                raise json.JSONDecodeError("Extra data", text, end)
    except _Refusal as e:
        raise InputError(path, str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(path, "not valid JSON (nested too deeply)") from None
    except MemoryError:
        raise InputError(path, "too large for the memory available") from None
    wm = found.get("weight_map")
    if wm is None:
        raise InputError(path, _NO_WEIGHT_MAP)
    if not wm:
        raise InputError(path, "weight_map is empty")
    for v in dict.fromkeys(wm.values()):
        if "\0" in v or not v:
            raise InputError(path, f"weight_map names an invalid shard file {_short(v)}")
    return wm


def _shard_path(index: str, shard: str) -> str:
    return os.path.normpath(os.path.join(os.path.dirname(index), shard))


def _regular_file(path: str) -> os.stat_result:
    """stat() a path that must be a regular file (a FIFO would block a read forever)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise InputError(path, _os_problem(e) if isinstance(e, OSError) else str(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, "not a regular file")
    return st


def resolve_paths(paths: Sequence[str | os.PathLike[str]], notes: list[str] | None = None,
                  allow_outside_index: bool = False) -> list[str]:
    """The files that ``paths`` name, in order: directories list their supported
    files sorted by name, index files their shards (refused outside the index's
    directory unless ``allow_outside_index``), quoted globs their matches.

    A warning for each directory's other files is appended to ``notes``."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if not os.path.exists(p) and glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise InputError(p, "no file matches this pattern")
            out.extend(resolve_paths(matches, notes, allow_outside_index))
        elif os.path.isdir(p):
            try:
                names = os.listdir(p)
            except OSError as e:
                raise InputError(p, _os_problem(e)) from None
            found = sorted(
                os.path.join(p, n) for n in names
                if _suffix(n) in _READERS and os.path.isfile(os.path.join(p, n))
            )
            if not found:
                raise InputError(p, "directory holds no .safetensors, .npz or .npy file")
            if notes is not None:
                notes.extend(_skipped_files(p, names))
            out.extend(found)
        elif _suffix(p) == INDEX_SUFFIX:
            out.extend(_index_shards(p, allow_outside_index))
        else:
            out.append(p)
    return out


def _skipped_files(directory: str, names: list[str]) -> list[str]:
    """A warning naming the files of ``directory`` that are not read (index files' shards are)."""
    other = sorted(n for n in names if _suffix(n) not in (*_READERS, INDEX_SUFFIX)
                   and os.path.isfile(os.path.join(directory, n)))
    if not other:
        return []
    shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
    label = directory if directory.endswith(os.sep) else directory + os.sep
    line = (f"{label}: skipped {len(other)} file{'s' if len(other) > 1 else ''} that "
            f"{'are' if len(other) > 1 else 'is'} not .safetensors/.npz/.npy ({shown})")
    pickles = sorted({_suffix(n) for n in other if _suffix(n) in _PICKLE_SUFFIXES})
    if pickles:
        line += f"; {'/'.join(pickles)} files are pickles, never loaded (they can run code): save with safetensors"
    return [line]


def open_source(path: str) -> Source:
    """Read and validate one file's header; the data is not read.

    The source holds the open file: :meth:`Source.finish` or :meth:`Source.close` it.
    """
    suffix = _suffix(path)
    if suffix not in _READERS:
        if suffix in _PICKLE_SUFFIXES:
            raise InputError(path, "pickle-based files are never loaded (they can run code); save gradients with safetensors")
        raise InputError(path, "unsupported file type (expected .safetensors, .npz, .npy, a directory or a *.safetensors.index.json)")
    _regular_file(path)
    fd = _open_fd(path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
            raise InputError(path, "not a regular file")
        if st.st_size == 0:
            raise InputError(path, "empty file")
        src = _READERS[suffix](path, fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise
    src._fd, src._ident = fd, _identity(st)
    return src


def open_paths(paths: Sequence[str | os.PathLike[str]], allow_repeats: bool = False,
               notes: list[str] | None = None, allow_outside_index: bool = False) -> list[Source]:
    """Sources for ``paths``; a tensor name in two files is refused unless ``allow_repeats``
    (``--shards slices`` / ``replicas`` say what such names mean).  Warnings go to ``notes``.

    The caller closes every source (:meth:`Source.finish` or :meth:`Source.close`);
    past :func:`_hold_budget` files, sources are parked between reads.
    """
    if not paths:
        raise ValueError("no paths given")
    files = resolve_paths(paths, notes, allow_outside_index)
    seen: dict[tuple[int, int], str] = {}
    for f in files:
        st = _regular_file(f)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise InputError(f, f"the same file is given twice (also as {seen[key]})")
        seen[key] = f
    budget = _hold_budget() if len(files) > 1 else 1
    sources: list[Source] = []
    count = 0
    try:
        for f in files:
            src = open_source(f)
            sources.append(src)
            if len(sources) > budget:
                src.park()
            count += len(src.tensors)
            if count > MAX_TOTAL_TENSORS:
                raise InputError(f, f"more than {MAX_TOTAL_TENSORS:,} tensors in all (the limit for one call)")
        owner: dict[str, str] = {}
        for src in sources:
            for t in src.tensors:
                if t.name in owner and not allow_repeats:
                    raise InputError(src.path, f"tensor {t.name!r} is also in {owner[t.name]} (the same name in "
                                     "two files: use --shards slices or --shards replicas (shards= in Python) "
                                     "to say what that means)")
                owner.setdefault(t.name, src.path)
        _check_index_names(paths, sources)
    except BaseException:
        close_all(sources)
        raise
    return sources


def close_all(sources: Sequence[Source]) -> None:
    """Close every source (without checks); for cleanup."""
    for s in sources:
        s.close()


def _check_index_names(paths: Sequence[str | os.PathLike[str]], sources: list[Source]) -> None:
    """Every tensor an index's weight_map names must be in the shard it names."""
    indexes = [os.fspath(p) for p in paths if _suffix(os.fspath(p)) == INDEX_SUFFIX and os.path.isfile(p)]
    if not indexes:  # no set of every tensor without need
        return
    where = {(s.path, t.name) for s in sources for t in s.tensors}
    for p in indexes:
        for name, shard in _weight_map(p).items():
            if (_shard_path(p, shard), name) not in where:
                raise InputError(p, f"weight_map puts tensor {name!r} in {shard}, which does not hold it")


def array_source(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], path: str = "<memory>") -> Source:
    """A source over in-memory arrays (anything ``np.asarray`` accepts): a mapping of
    names to arrays, or (name, array) pairs, whose names must not repeat."""
    tensors = []
    seen: set[str] = set()
    pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
    for pair in pairs:
        try:
            name, value = pair
        except (TypeError, ValueError):
            raise ValueError(f"expected (name, array) pairs, got {type(pair).__name__}") from None
        name = str(name)
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        arr = _as_numpy(value)
        reason = _skip_reason(_dtype_name(arr.dtype), arr.dtype)
        if arr.dtype.fields is not None:
            reason = "structured dtype is not a gradient"
        flat = arr.reshape(-1)
        if reason is None and not arr.dtype.isnative:
            flat = flat.astype(arr.dtype.newbyteorder("="))
        tensors.append(TensorEntry(
            name, path, _dtype_name(arr.dtype), tuple(arr.shape), arr.size, arr.nbytes,
            reason, flat.dtype, _method="array", _array=flat,
        ))
    return Source(path, "memory", tensors)


def _as_numpy(value: Any) -> np.ndarray:
    # torch tensors: detach and move to the CPU; numpy has no bfloat16, so view its bits.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16" and _mld is not None:
            import torch  # only reachable with a torch tensor in hand

            return value.view(torch.int16).numpy().view(_mld.bfloat16)
    return np.asarray(value)
