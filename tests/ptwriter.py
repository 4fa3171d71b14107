"""Write torch.save-format files without torch: a small pickle emitter and the zip layout torch uses.

``save(obj, path)`` writes what ``torch.save(obj, path)`` writes for dicts, lists, tuples,
primitives and :class:`T` (a view of a :class:`Storage` of numpy data), so the reader can be
tested under an environment without torch.  ``dumps(obj, protocol)`` gives the pickle alone;
``op`` helpers build hand-made (hostile) pickles.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STORAGE_CLASS = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                 "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                 "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


@dataclass(eq=False)
class Storage:
    data: np.ndarray  # 1-d, the storage's elements
    key: str | None = None  # assigned when saved (the last file's key)


@dataclass(eq=False)
class T:
    """A tensor: a view of a storage (offset, shape, strides in elements), as torch pickles it."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(arr: np.ndarray) -> T:
        a = np.ascontiguousarray(arr)
        strides = tuple(s // a.itemsize for s in a.strides)
        return T(Storage(a.reshape(-1).copy()), 0, a.shape, strides)

    def view(self) -> np.ndarray:
        """What torch.load gives: the view as a numpy array."""
        d = self.storage.data
        return np.lib.stride_tricks.as_strided(d[self.offset:], self.shape, tuple(s * d.itemsize for s in self.stride))


def global_(module: str, name: str, protocol: int) -> bytes:
    if protocol >= 4:
        return unicode(module) + unicode(name) + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes([len(b)]) if len(b) < 256 else b"X" + struct.pack("<I", len(b))) + b


def integer(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


class _Writer:
    def __init__(self, protocol: int) -> None:
        self.p = protocol
        self.keys: dict[int, str] = {}
        self.storages: list[Storage] = []

    def w(self, obj: Any) -> bytes:
        p = self.p
        if obj is None:
            return b"N"
        if obj is True or obj is False:
            return b"\x88" if obj else b"\x89"
        if isinstance(obj, int):
            return integer(obj)
        if isinstance(obj, float):
            return b"G" + struct.pack(">d", obj)
        if isinstance(obj, str):
            return unicode(obj)
        if isinstance(obj, bytes):
            if p < 3:
                return global_("_codecs", "encode", p) + unicode(obj.decode("latin-1")) + unicode("latin1") \
                    + b"\x86R"
            return b"C" + bytes([len(obj)]) + obj if len(obj) < 256 else b"B" + struct.pack("<I", len(obj)) + obj
        if isinstance(obj, OrderedDict):
            return global_("collections", "OrderedDict", p) + b")R" + self.items(obj)
        if isinstance(obj, dict):
            return b"}" + self.items(obj)
        if isinstance(obj, list):
            return b"](" + b"".join(self.w(v) for v in obj) + b"e"
        if isinstance(obj, tuple):
            return b"(" + b"".join(self.w(v) for v in obj) + b"t"
        if isinstance(obj, T):
            return self.tensor(obj)
        raise TypeError(type(obj))

    def items(self, d: dict[Any, Any]) -> bytes:
        return (b"(" + b"".join(self.w(k) + self.w(v) for k, v in d.items()) + b"u") if d else b""

    def tensor(self, t: T) -> bytes:
        p, s = self.p, t.storage
        dt = s.data.dtype.name
        if id(s) not in self.keys:  # keys are numbered per file, as torch.save does
            self.keys[id(s)] = s.key = str(len(self.storages))
            self.storages.append(s)
        key = self.keys[id(s)]
        if dt in STORAGE_CLASS:
            stype, numel, fn, tail = global_("torch", STORAGE_CLASS[dt], p), s.data.size, "_rebuild_tensor_v2", b""
        else:
            stype, numel, fn = global_("torch.storage", "UntypedStorage", p), s.data.nbytes, "_rebuild_tensor_v3"
            tail = global_("torch", dt, p)
        pid = b"(" + unicode("storage") + stype + unicode(key) + unicode("cpu") + integer(numel) + b"tQ"
        args = pid + integer(t.offset) + self.w(tuple(t.shape)) + self.w(tuple(t.stride)) + b"\x89" \
            + global_("collections", "OrderedDict", p) + b")R" + tail
        return global_("torch._utils", fn, p) + b"(" + args + b"tR"


def dumps(obj: Any, protocol: int = 2) -> tuple[bytes, list[Storage]]:
    w = _Writer(protocol)
    body = w.w(obj)
    return b"\x80" + bytes([protocol]) + body + b".", w.storages


def archive(pickle: bytes, storages: dict[str, bytes], prefix: str = "archive", byteorder: str | None = "little",
            extra: dict[str, bytes] | None = None, compress: bool = False) -> bytes:
    """The zip torch.save writes: ``<prefix>/data.pkl``, ``byteorder``, ``data/<key>``, ``version``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"{prefix}/{name}", data)
    return buf.getvalue()


def save(obj: Any, path: Any, protocol: int = 2, **kw: Any) -> None:
    """``torch.save(obj, path)`` for what this module can write."""
    pkl, storages = dumps(obj, protocol)
    with open(path, "wb") as f:
        f.write(archive(pkl, {s.key or "": s.data.tobytes() for s in storages}, **kw))
