"""torch.save files (``.pt``, ``.pth``, ``.bin``): torch's zip format, read without torch.

The archive is walked with the npz reader's zip walker (the same strictness: end records,
ZIP64, central directory against local headers, overlapping members, bombs).  Its members
are ``<prefix>/data.pkl`` (the pickle), ``<prefix>/data/<key>`` (one per storage, stored
uncompressed), ``<prefix>/byteorder`` and ``<prefix>/version``.  ``data.pkl`` is read by the
restricted machine of :mod:`.unpickle` (nothing from the file runs; see its docstring): each
tensor becomes a view (element offset, shape, strides) of a storage member, described like a
safetensors tensor (one extent in the archive), or, when not C-contiguous, with its strides
(read through :mod:`.views`).  Nested dicts/lists flatten to dotted names; a top-level integer
``step`` and number ``loss_scale`` become metadata as in safetensors; other leaves are ignored.

Refused: the legacy (pre-1.6, non-zip) format, big-endian archives (``byteorder`` ``big``: not
read), compressed members, storages missing or shorter than the pickle says, views outside
their storage, more than ``limits.MAX_TENSORS`` tensors.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np

from ..errors import InputError
from . import limits
from .base import Container, Extent, Source, TensorDesc, skip_reason
from .npz import Window, check_spans, member_data, zip_directory
from .store import ByteStore
from .unpickle import TensorRef, Unpickler, walk
from .views import is_contiguous, span_elements

__all__ = ["CONTAINER", "read_torch"]

# torch.save's legacy format: a pickled magic number first (protocol 2, LONG1 of 10 bytes)
_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _np_dtype(name: str | None) -> np.dtype | None:
    if name is None:
        return None
    try:
        return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    except TypeError:
        return None


def _number(v: object) -> bool:
    return type(v) is int or type(v) is float


def read_torch(store: ByteStore, path: str) -> Source:
    size = store.size
    head = store.read(min(size, len(_LEGACY)), 0)
    if head.startswith(_LEGACY[:3]) and head == _LEGACY:
        raise InputError(path, "the legacy torch.save format (torch < 1.6, or _use_new_zipfile_serialization="
                         "False) is not read: save it again with a current torch.save")
    if not head.startswith(b"PK"):
        raise InputError(path, "not a torch.save zip archive")
    members, cd_off = zip_directory(path, store, size)
    window = Window(store)
    pkls = [m for m in members if m[0].endswith("/data.pkl") and m[0].count("/") == 1]
    if len(pkls) != 1:
        raise InputError(path, "not a torch.save archive: " + (
            "no <name>/data.pkl member" if not pkls else f"{len(pkls)} data.pkl members"))
    prefix = pkls[0][0][: -len("data.pkl")]
    by_name: dict[str, tuple[int, int, int]] = {}  # name -> (data offset, size, crc)
    spans = []
    for m in members:
        name, _, _, method, crc, csize, usize, off = m
        if not name.startswith(prefix):
            raise InputError(path, f"member {name!r} is outside the archive's directory {prefix!r}")
        if name in by_name:
            raise InputError(path, f"member {name!r} appears twice in the archive")
        data = member_data(path, window, m)
        spans.append((off, data + csize, name))
        by_name[name] = (data, usize, crc) if method == 0 else (-1, usize, crc)
    check_spans(path, spans, cd_off)

    def member(name: str, what: str) -> tuple[int, int, int] | None:
        got = by_name.get(prefix + name)
        if got is not None and got[0] < 0:
            raise InputError(path, f"{what} (member {prefix + name!r}) is compressed: torch.save stores members "
                             "uncompressed; this archive was rewritten and is not read")
        return got

    order = member("byteorder", "the byte order")
    if order is not None:
        text = store.read(min(order[1], 16), order[0])
        if text == b"big":
            raise InputError(path, "a big-endian archive (byteorder 'big'): not read")
        if text != b"little":
            raise InputError(path, f"unknown byteorder {text[:16]!r}")
    pkl = member("data.pkl", "the pickle")
    assert pkl is not None
    if pkl[1] > limits.MAX_PICKLE:
        raise InputError(path, f"data.pkl of {pkl[1]} bytes exceeds the {limits.MAX_PICKLE >> 20} MiB limit")
    raw = store.read(pkl[1], pkl[0])
    if zlib.crc32(raw) != pkl[2]:
        raise InputError(path, f"member {prefix + 'data.pkl'!r}: CRC-32 mismatch (the data is corrupt)")
    obj = Unpickler(raw, path).load()
    tensors: list[TensorDesc] = []
    metadata: dict[str, str] = {}
    names: set[str] = set()
    for name, leaf in walk(obj, path):
        if not isinstance(leaf, TensorRef):
            if name == "step" and type(leaf) is int:
                metadata["step"] = str(leaf)
            elif name == "loss_scale" and _number(leaf):
                metadata["loss_scale"] = repr(leaf)
            continue
        name = name or "tensor"  # torch.save(tensor): one unnamed tensor
        if name in names:
            raise InputError(path, f"tensor name {name!r} appears twice (dotted names of nested containers collide)")
        names.add(name)
        if len(tensors) >= limits.MAX_TENSORS:
            raise InputError(path, f"more than {limits.MAX_TENSORS:,} tensors (the limit for one file)")
        tensors.append(_desc(name, leaf, path, store.key, member(f"data/{leaf.storage.key}", f"tensor {name!r}")))
    return Source(path, "torch", tensors, metadata, size, store)


def _desc(name: str, t: TensorRef, path: str, key: str, member: tuple[int, int, int] | None) -> TensorDesc:
    st = t.storage
    where = f"tensor {name!r}: storage {st.key!r}"
    if member is None:
        raise InputError(path, f"{where} is missing from the archive")
    data, usize, _ = member
    if usize < st.nbytes:
        raise InputError(path, f"{where} holds {usize} bytes, the pickle says {st.nbytes}: truncated")
    np_dtype = _np_dtype(t.dtype.numpy)
    b = t.dtype.itemsize
    numel = t.numel
    nbytes = numel * b
    if numel > limits.MAX_USIZE:
        raise InputError(path, f"tensor {name!r} of shape {list(t.shape)} overflows")
    reason = skip_reason(t.dtype.name, np_dtype)
    if not numel:
        return TensorDesc(name, path, t.dtype.name, t.shape, 0, 0, reason, np_dtype, Extent(key, data, 0))
    first = data + t.offset * b
    if is_contiguous(t.shape, t.stride):
        ext = Extent(key, first, nbytes)  # (no CRC-32 check: a view is rarely the whole member, as in safetensors)
        return TensorDesc(name, path, t.dtype.name, t.shape, numel, nbytes, reason, np_dtype, ext)
    ext = Extent(key, first, span_elements(t.shape, t.stride) * b)
    return TensorDesc(name, path, t.dtype.name, t.shape, numel, nbytes, reason, np_dtype, ext, strides=t.stride)


class TorchZip(Container):
    name = "torch"
    suffixes = (".pt", ".pth", ".bin")

    def describe(self, store: ByteStore, path: str) -> Source:
        return read_torch(store, path)


CONTAINER = TorchZip()
