"""safetensors files: an 8-byte header length, a JSON header, then the raw little-endian data."""

from __future__ import annotations

import itertools
import struct

import ml_dtypes
import numpy as np

from ..errors import InputError
from . import limits
from .base import Container, Extent, Source, TensorDesc, skip_reason
from .jsonscan import not_an_object, refusals, short, string_object, value, walk_all
from .store import ByteStore

__all__ = ["CONTAINER", "ST_DTYPES"]

# safetensors dtype -> numpy dtype (None: known to the format but not readable here)
ST_DTYPES: dict[str, tuple[str, np.dtype | None]] = {
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
for _st, (_name, _dt) in list(ST_DTYPES.items()):  # bfloat16 and the float8 family come from ml_dtypes
    if _dt is None and hasattr(ml_dtypes, _name):
        ST_DTYPES[_st] = (_name, np.dtype(getattr(ml_dtypes, _name)))
# Sub-byte float formats: bits per element; their norms are not computed.
_ST_PACKED = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _reasons() -> dict[str, str]:
    """The skip reason ("" for none) of every known safetensors dtype, computed once."""
    return {st: skip_reason(name, dt) or "" for st, (name, dt) in ST_DTYPES.items()}


_REASONS = _reasons()


def _check_name(name: str, path: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(path, f"tensor name {name!r} is not valid Unicode") from None


_new = tuple.__new__  # Extent(...) without its Python-level __new__: one per tensor, 20,000 in a header
_MAX_USIZE = limits.MAX_USIZE  # the format's bound, not a tunable limit


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_USIZE


class Safetensors(Container):
    name = "safetensors"
    suffixes = (".safetensors",)

    def describe(self, store: ByteStore, path: str) -> Source:
        return read_safetensors(store, path)


CONTAINER = Safetensors()


def read_safetensors(store: ByteStore, path: str) -> Source:
    size = store.size
    if size < 8:
        raise InputError(path, f"file is too short to be safetensors ({size} bytes)")
    (n,) = struct.unpack("<Q", store.read(8, 0))
    if n > size - 8:
        raise InputError(path, f"header length {n} runs past the end of the file ({size} bytes): "
                               "truncated or not safetensors")
    if n > limits.MAX_ST_HEADER:
        raise InputError(path, f"header length {n} exceeds the {limits.MAX_ST_HEADER}-byte limit")
    data_start = 8 + n
    with refusals(path, "header is "):
        raw = bytearray(n)  # decoded in place: one copy of the header less than store.read
        store.read_into(memoryview(raw), 8)
        reader = _HeaderReader(path, store.key, raw.decode("utf-8"), data_start, size - data_start)
        del raw
        text = reader.text
        if not_an_object(text):
            raise InputError(path, "header is not a JSON object")
        walk_all(text, reader.member)
    del text, reader.text, reader.names
    tensors = reader.tensors
    if any(b.extent.offset < a.extent.offset  # type: ignore[union-attr]
           or (b.extent.offset == a.extent.offset and b.nbytes < a.nbytes)  # type: ignore[union-attr]
           for a, b in itertools.pairwise(tensors)):
        tensors.sort(key=_by_nbytes)  # two stable sorts: by (offset, end) without a tuple per tensor
        tensors.sort(key=_by_offset)
    # As the reference implementation requires: the tensors tile the data exactly, so no byte
    # is left out of the totals (a header entry removed would otherwise drop a tensor silently).
    pos = data_start
    prev: TensorDesc | None = None
    for t in tensors:
        begin = t.extent.offset  # type: ignore[union-attr]
        if begin < pos:
            assert prev is not None
            raise InputError(path, f"tensors {prev.name!r} and {t.name!r} overlap in the data")
        if begin > pos:
            raise InputError(path, f"bytes {pos - data_start} to {begin - data_start} of the data belong to no tensor "
                             "(the header does not describe the whole file)")
        pos, prev = begin + t.nbytes, t
    if pos != size:
        raise InputError(path, f"the last {size - pos} bytes of the data belong to no tensor "
                         "(the header does not describe the whole file)")
    return Source(path, "safetensors", tensors, reader.meta or {}, size, store)


def _by_offset(t: TensorDesc) -> int:
    return t.extent.offset  # type: ignore[union-attr]


def _by_nbytes(t: TensorDesc) -> int:
    return t.nbytes


class _HeaderReader:
    """Turns each member of a safetensors header into a TensorDesc as it is parsed."""

    _SHAPES = 4096  # distinct (dtype, shape) pairs whose tuple and sizes are shared

    def __init__(self, path: str, key: str, text: str, data_start: int, data_size: int) -> None:
        self.path, self.text, self.data_start, self.data_size = path, text, data_start, data_size
        self.key = key
        self.tensors: list[TensorDesc] = []
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
        if len(self.tensors) >= limits.MAX_TENSORS:
            raise InputError(path, f"the header lists more than {limits.MAX_TENSORS:,} tensors (the limit per file)")
        info, end = value(self.text, at)
        self.names.add(name)
        _check_name(name, path)
        if not isinstance(info, dict):
            raise InputError(path, f"tensor {name!r}: header entry is not an object")
        st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(st_dtype, str):
            raise InputError(path, f"tensor {name!r}: missing or invalid dtype")
        if type(shape) is not list or not all(_is_u64(d) for d in shape):
            raise InputError(path, f"tensor {name!r}: invalid shape {short(shape)}")
        if not (type(offsets) is list and len(offsets) == 2 and _is_u64(offsets[0]) and _is_u64(offsets[1])
                and offsets[0] <= offsets[1]):
            raise InputError(path, f"tensor {name!r}: invalid data_offsets {short(offsets)}")
        begin, end_ = offsets
        shape_t, numel, expected = self.sizes(name, st_dtype, shape, end_ - begin)
        if end_ - begin != expected:
            raise InputError(path, f"tensor {name!r}: shape {short(shape)} of {st_dtype} needs {expected} "
                             f"bytes, but data_offsets span {end_ - begin}")
        if end_ > self.data_size:
            raise InputError(path, f"tensor {name!r}: data_offsets end at byte {end_} of the data, past the end of "
                                   f"the file (the data holds {self.data_size} bytes): truncated?")
        dtype_name, np_dtype = ST_DTYPES.get(st_dtype, (st_dtype, None))
        reason = _REASONS.get(st_dtype)
        if reason is None:  # a sub-byte float: one name and one reason string for all its tensors
            dtype_name, reason = self.unknown.setdefault(dtype_name, (dtype_name, skip_reason(dtype_name, np_dtype)))
        ext = _new(Extent, (self.key, self.data_start + begin, expected, "raw", None, 0, 0, 0))
        self.tensors.append(TensorDesc(name, path, dtype_name, shape_t, numel, expected, reason or None, np_dtype, ext))
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
            if numel > limits.MAX_USIZE:
                if 0 in shape:
                    numel = 0
                    break
                raise InputError(self.path, f"tensor {name!r}: invalid shape {short(shape)} (more than 2**64 elements)")
        np_dtype = ST_DTYPES.get(st_dtype, (st_dtype, None))[1]
        if np_dtype is not None:
            expected = numel * np_dtype.itemsize
        elif st_dtype in _ST_PACKED:
            expected = -(-numel * _ST_PACKED[st_dtype] // 8)
        else:  # not a safetensors dtype: its size, and so what the file holds, is unknown
            raise InputError(self.path, f"tensor {name!r}: unknown dtype {short(st_dtype)} (not a safetensors dtype)")
        if len(self.shapes) < self._SHAPES:
            self.shapes[key] = (key[1], numel, expected)
        return key[1], numel, expected

    def metadata(self, at: int) -> int:
        if not self.text.startswith("{", at):
            v, end = value(self.text, at)
            if v is not None:
                raise InputError(self.path, "__metadata__ is not an object of strings")
            return end
        self.meta, end = string_object(
            self.text, at, "__metadata__", limits.MAX_METADATA_KEYS,
            f"__metadata__ holds more than {limits.MAX_METADATA_KEYS:,} keys",
            "__metadata__ is not an object of strings", limits.MAX_METADATA_VALUE)
        return end


