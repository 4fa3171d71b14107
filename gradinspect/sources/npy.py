""".npy files: a magic string, a header that is a Python literal (read with ``ast.literal_eval``), the data."""

from __future__ import annotations

import ast
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import InputError
from . import limits, voids
from .base import Container, Extent, Source, TensorDesc, dtype_name, skip_reason, sub_array_name
from .store import ByteStore

__all__ = ["CONTAINER", "parse_npy_header", "npy_header_complete", "npy_desc", "NPY_HEAD_MAX"]

NPY_MAGIC = b"\x93NUMPY"
NPY_HEAD_MAX = 12 + limits.MAX_NPY_HEADER  # enough bytes to hold any accepted header


def _is_int(v: object) -> bool:
    return type(v) is int and v >= 0  # not bool, which is an int subclass


def parse_npy_header(head: bytes, where: str, path: str) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    """(dtype, shape, header length, Fortran order) of an .npy stream starting with ``head``.

    The header is a Python literal read with ``ast.literal_eval``, which
    evaluates no code; object dtypes, whose data would need unpickling, are refused.
    """
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
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
    if head[7] != 0:  # numpy writes and reads only minor version 0
        raise InputError(path, f"{where}unsupported .npy format version {major}.{head[7]}")
    if hlen > limits.MAX_NPY_HEADER:
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
        if len(d) != 3:  # numpy refuses other keys too: a header it would not read is not read here
            extra = sorted(repr(k) for k in d if k not in ("descr", "fortran_order", "shape"))
            raise ValueError(f"unexpected key {extra[0][:40]}")
        descr, fortran, shape = d["descr"], d["fortran_order"], d["shape"]
        if not isinstance(shape, tuple) or not all(_is_int(s) for s in shape) or not isinstance(fortran, bool):
            raise ValueError("bad shape or fortran_order")
        try:
            if isinstance(descr, str) and descr in _F1:  # how every ml_dtypes release writes float8_e5m2
                dtype = np.dtype(ml_dtypes.float8_e5m2)
            else:
                dtype = np.lib.format.descr_to_dtype(descr)
        except Exception:
            shown = repr(descr)
            raise ValueError(f"descr {shown if len(shown) <= 40 else shown[:39] + '…'} is not a dtype") from None
    except Exception as e:  # any malformed header is the file's fault
        raise InputError(path, f"{where}corrupt .npy header ({e})") from None
    if dtype.hasobject:
        raise InputError(path, f"{where}holds Python objects (dtype {dtype}); refusing to unpickle")
    if dtype.subdtype is not None:  # ('<f4', (3,)): numpy's arrays of it are its base of shape (*shape, *sub)
        base, sub = dtype.subdtype
        full = shape + sub
        if not (fortran and sum(1 for d in full if d > 1) > 1):  # else ambiguous: npy_desc says why it is skipped
            dtype, shape, fortran = base, full, False
            descr = descr[0] if isinstance(descr, tuple) else descr
    if voids.raw_dtype(dtype) and isinstance(descr, str):
        dtype = np.dtype(dtype, metadata={"descr": descr})  # raw values (ml_dtypes): keep the byte order written
    # Norms do not depend on the element order; diff needs it (``order``).
    fortran = fortran and sum(1 for d in shape if d > 1) > 1
    if len(_NPY_CACHE) < 4096:
        _NPY_CACHE[raw] = (dtype, shape, start + hlen, fortran)
    return dtype, shape, start + hlen, fortran


_NPY_CACHE: dict[bytes, tuple[np.dtype, tuple[int, ...], int, bool]] = {}


_NAMES: dict[np.dtype, tuple[str, str | None]] = {}  # dtype -> (name, skip reason)

_F1 = ("<f1", "|f1", ">f1", "=f1")  # no numpy type: ml_dtypes' float8_e5m2 (the one float8 of kind "f")


def npy_desc(name: str, path: str, where: str, dtype: np.dtype, shape: tuple[int, ...], key: str, offset: int,
             fortran: bool, encoding: str = "raw", stored: int = 0, crc: int | None = None, crc_head: int = 0,
             skip: int = 0) -> TensorDesc:
    """The description of an .npy array whose data (or deflated member, header included) is at ``offset``."""
    numel = math.prod(shape)
    hit = _NAMES.get(dtype)
    if voids.raw_dtype(dtype):  # raw values (bfloat16, float8 that np.save could not name): see voids.resolve
        meta: Any = dtype.metadata or {}
        descr = str(meta.get("descr", dtype.str))
        hit = (descr, voids.raw_reason(dtype.itemsize, descr))
    elif hit is None:  # numpy's dtype names are slow to compute: once per dtype
        if dtype.subdtype is not None:  # left by parse_npy_header: a Fortran-order array of sub-arrays
            name_ = sub_array_name(dtype)
            hit = (name_, f"Fortran-order array of sub-arrays ({name_}): whether each sub-array's values are "
                          "contiguous is not recorded")
        else:
            name_ = dtype_name(dtype) if dtype.fields is None else "structured"
            hit = (name_, skip_reason(name_, dtype) if dtype.fields is None else "structured dtype is not a gradient")
        if len(_NAMES) < 256:
            _NAMES[dtype] = hit
    name_, reason = hit
    nbytes = numel * dtype.itemsize
    ext = (Extent(key, offset, nbytes, crc=crc, crc_head=crc_head) if encoding == "raw"
           else Extent(key, offset, stored, encoding, crc, 0, skip, skip + nbytes))
    return TensorDesc(name, path, name_, tuple(shape), numel, nbytes, reason, dtype, ext, "F" if fortran else "C")


def read_npy(store: ByteStore, path: str) -> Source:
    size = store.size
    head = store.read(min(size, 12 + limits.MAX_NPY_HEADER), 0)
    dtype, shape, hlen, fortran = parse_npy_header(head, "", path)
    name = os.path.splitext(os.path.basename(path))[0]
    entry = npy_desc(name, path, "", dtype, shape, store.key, hlen, fortran)
    if hlen + entry.nbytes > size:
        raise InputError(path, f"array of shape {list(shape)} {entry.dtype} needs {entry.nbytes} bytes of data, "
                               f"the file has {size - hlen}: truncated")
    return Source(path, "npy", [entry], {}, size, store)


def npy_header_complete(head: bytes) -> bool:
    """Whether ``head`` holds a whole .npy header (or enough for the parser to say what is wrong)."""
    if len(head) < 12 or not head.startswith(NPY_MAGIC):
        return len(head) >= 10  # let the parser say what is wrong
    start = 10 if head[6] == 1 else 12
    hlen: int = struct.unpack("<H" if start == 10 else "<I", head[8:start])[0]
    return len(head) >= start + hlen


class Npy(Container):
    name = "npy"
    suffixes = (".npy",)

    def describe(self, store: ByteStore, path: str) -> Source:
        return read_npy(store, path)


CONTAINER = Npy()
