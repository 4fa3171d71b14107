"""torch distributed checkpoints (DCP): a directory holding ``.metadata`` and ``*.distcp`` files, one gradient set.

``torch.distributed.checkpoint.save`` writes, for each tensor of a state dict, chunks (slices of the
global tensor: offsets and sizes in each dimension) spread over ``__<rank>_<n>.distcp`` files, and a
pickled ``Metadata`` saying where each chunk is.  Here:

- ``.metadata`` is read with the restricted unpickler of :mod:`.unpickle`, its allow-list extended to the
  DCP dataclasses (``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``MetadataIndex``,
  ``_StorageInfo``, ``TensorProperties``, ``BytesStorageMetadata``, ``StorageMeta`` and what they hold),
  each mapped to a plain record of this module: nothing named in the pickle is imported or called;
- each chunk's bytes ``[offset, offset + length)`` of its ``.distcp`` file are a torch.save archive (read
  in place by :mod:`.torchzip` through a :class:`~.ranges.SubStore`), or, with DCP's safetensors
  serialization, the tensor's raw bytes inside a safetensors blob that ends the file;
- a tensor's chunks must tile the global tensor exactly: overlaps, gaps and chunks outside its shape
  are refused.  Its bytes are then gathered in row-major order by a :class:`~.ranges.GatherStore`, so the
  tensor is read, reduced (bit for bit as the same tensor in one safetensors file) and compared by
  ``diff`` like a tensor stored whole;
- non-tensor entries are ignored, except an integer ``step`` and a number ``loss_scale`` (the metadata
  keys ``trend`` and the loss scale read, as in safetensors metadata); compressed (``stream.zstd``) or
  other transformed chunks are refused.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from . import limits
from .base import Container, Extent, Source, TensorDesc, dtype_name, skip_reason
from .npz import Window, check_spans, member_data, zip_directory
from .ranges import GatherStore, SubStore
from .store import ByteStore, LocalFile
from .torchzip import read_torch
from .unpickle import DTYPES, DType, Stateful, UnpickleError, Unpickler

__all__ = ["CONTAINER", "METADATA", "SUFFIX", "Chunk", "TensorMeta", "StorageInfo", "Meta", "tile"]

METADATA = ".metadata"
SUFFIX = ".distcp"
_ZIP_MAGIC = b"PK\x03\x04"
_SHARDING_KEY = "DCP_SHARDING_INFO"  # DCP's safetensors serialization: {fqn: {"saved_offsets": [...]}}


# --- what .metadata says, as plain records ------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One slice of a tensor: where it starts in each dimension, and its sizes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class TensorMeta:
    dtype: str  # torch's name without "torch." (float32, bfloat16)
    size: tuple[int, ...]
    chunks: list[Chunk]


@dataclass(frozen=True)
class StorageInfo:
    relative_path: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class Meta:
    """A checkpoint's ``.metadata``: its tensors (in state-dict order), its other entries, where each piece is."""

    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    objects: list[str] = field(default_factory=list)  # BytesStorageMetadata entries (pickled Python objects)
    storage: dict[tuple[str, tuple[int, ...] | None], StorageInfo] = field(default_factory=dict)


# --- tiling: a tensor's chunks as runs of its row-major element order ----------------------------------------


def _c_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides


def _prod(xs: Iterable[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _show(x: Sequence[int]) -> str:
    return "[" + ", ".join(str(v) for v in x) + "]"


def tile(path: str, name: str, shape: tuple[int, ...], chunks: Sequence[Chunk],
         max_runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The runs that lay ``chunks`` out in the row-major order of a tensor of ``shape``, sorted:
    (start in the tensor, length, chunk index, start in the chunk), all in elements.

    InputError unless the chunks tile the tensor exactly (no overlap, no gap, none outside it)."""
    nd = len(shape)
    numel = _prod(shape)
    for c in chunks:
        if len(c.offsets) != nd or len(c.sizes) != nd:
            raise InputError(path, f"tensor {name!r}: chunk at {_show(c.offsets)} of sizes {_show(c.sizes)} does not "
                                   f"have the {nd} dimensions of its shape {_show(shape)}")
        if any(o < 0 or s < 0 or o + s > g for o, s, g in zip(c.offsets, c.sizes, shape, strict=True)):
            raise InputError(path, f"tensor {name!r}: chunk at {_show(c.offsets)} of sizes {_show(c.sizes)} lies "
                                   f"outside its shape {_show(shape)}")
    # the last dimension some chunk does not span whole: below it, each chunk is contiguous runs
    d = max((i for i in range(nd) if any(c.sizes[i] != shape[i] for c in chunks)), default=-1)
    inner = _prod(shape[d + 1:])
    live = [(k, c) for k, c in enumerate(chunks) if _prod(c.sizes)]
    count = sum(_prod(c.sizes[:d]) if d > 0 else 1 for _, c in live)
    if count > max_runs:
        raise InputError(path, f"tensor {name!r}: its chunks split it into {count:,} pieces, more than the "
                               f"{max_runs:,} read here (too finely sharded)")
    gstr = np.array(_c_strides(shape), dtype=np.int64)
    parts = []
    for k, c in live:
        run = c.sizes[d] * inner if d >= 0 else numel
        if d > 0:
            idx = np.indices(c.sizes[:d], dtype=np.int64).reshape(d, -1)
            lstr = np.array(_c_strides(c.sizes), dtype=np.int64)
            gstart = (idx + np.array(c.offsets[:d], dtype=np.int64)[:, None]).T @ gstr[:d] + c.offsets[d] * gstr[d]
            local = idx.T @ lstr[:d]
        else:
            gstart = np.array([c.offsets[0] * gstr[0] if d == 0 else 0], dtype=np.int64)
            local = np.zeros(1, dtype=np.int64)
        parts.append((gstart, np.full(len(gstart), run, np.int64), np.full(len(gstart), k, np.int64), local))
    if not parts:
        if numel:
            raise InputError(path, f"tensor {name!r}: no chunk holds any of its {numel:,} elements")
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, empty
    start, length, which, local = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.argsort(start, kind="stable")
    start, length, which, local = start[order], length[order], which[order], local[order]
    ends = start + length
    if start[0] != 0:
        _gap(path, name, shape, 0)
    bad = np.flatnonzero(start[1:] != ends[:-1])
    if len(bad):
        i = int(bad[0])
        if start[i + 1] < ends[i]:
            a, b = chunks[int(which[i])], chunks[int(which[i + 1])]
            raise InputError(path, f"tensor {name!r}: chunk at {_show(a.offsets)} of sizes {_show(a.sizes)} and chunk "
                                   f"at {_show(b.offsets)} of sizes {_show(b.sizes)} overlap")
        _gap(path, name, shape, int(ends[i]))
    if ends[-1] != numel:
        _gap(path, name, shape, int(ends[-1]))
    return start, length, which, local


def _gap(path: str, name: str, shape: tuple[int, ...], flat: int) -> None:
    where = np.unravel_index(flat, shape) if shape else ()
    raise InputError(path, f"tensor {name!r}: element {_show([int(i) for i in where])} is in no chunk "
                           f"(its chunks leave a gap in its shape {_show(shape)})")


# --- the container -----------------------------------------------------------------------------------------


class DistributedCheckpoint(Container):
    name = "dcp"
    suffixes = (SUFFIX,)

    def recognises(self, path: str, is_dir: bool = False) -> bool:
        if is_dir:
            return os.path.isfile(os.path.join(path, METADATA))
        return super().recognises(path)  # a .distcp file alone: refused with a hint by describe

    def describe(self, store: ByteStore, path: str) -> Source:
        raise InputError(path, "a .distcp file is one piece of a torch distributed checkpoint: give the directory "
                               f"that holds it and its {METADATA} file")

    def describe_dir(self, path: str) -> Source:
        return read_checkpoint(path)


CONTAINER = DistributedCheckpoint()


def np_dtype_of(torch_name: str) -> np.dtype | None:
    """The little-endian numpy dtype of a torch dtype name (None: not one numpy reads)."""
    known = DTYPES.get(torch_name)
    if known is None or known.numpy is None:
        return None
    import ml_dtypes

    name = known.numpy
    dt = np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


class _Files:
    """The checkpoint's ``.distcp`` files, opened once each (by the name ``.metadata`` gives)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.stores: list[LocalFile] = []
        self.index: dict[str, int] = {}
        self.blobs: dict[tuple[int, int], Source] = {}  # safetensors serialization: one blob per file

    def open(self, rel: str, meta_path: str) -> tuple[int, LocalFile]:
        i = self.index.get(rel)
        if i is not None:
            store = self.stores[i]
            if store.fd is None:  # parked below: opened again, its identity checked
                store.__enter__()
            return i, store
        if (not rel or rel in (".", "..") or "\0" in rel or os.path.basename(rel) != rel
                or (os.altsep is not None and os.altsep in rel)):
            raise InputError(meta_path, f"names a data file {rel!r} outside the checkpoint's directory")
        where = os.path.join(self.directory, rel)
        if not os.path.lexists(where):
            raise InputError(where, f"missing: {METADATA} says chunks are stored in it")
        if sum(s.fd is not None for s in self.stores) >= limits.MAX_DCP_OPEN:
            for s in self.stores:  # at most MAX_DCP_OPEN descriptors while the headers are read
                s.park()
        store = LocalFile.open(where)
        self.index[rel] = len(self.stores)
        self.stores.append(store)
        return len(self.stores) - 1, store

    def close(self) -> None:
        for s in self.stores:
            s.close()


def read_checkpoint(directory: str) -> Source:
    """Read a checkpoint directory's ``.metadata`` and every chunk's header; the data is not read."""
    meta_path = os.path.join(directory, METADATA)
    meta_store = LocalFile.open(meta_path)
    files = _Files(directory)
    try:
        if meta_store.size > limits.MAX_DCP_METADATA:
            raise InputError(meta_path, f"file is larger than the {limits.MAX_DCP_METADATA}-byte limit")
        meta = parse_metadata(meta_store.read(meta_store.size, 0), meta_path)
        return _build(directory, meta_path, meta, meta_store, files)
    except BaseException:
        files.close()
        meta_store.close()
        raise


def _build(directory: str, meta_path: str, meta: Meta, meta_store: LocalFile, files: _Files) -> Source:
    tensors: list[TensorDesc] = []
    starts: list[np.ndarray] = []
    which: list[np.ndarray] = []
    at: list[np.ndarray] = []
    key = "dcp:" + os.path.abspath(directory)
    virtual = 0
    runs_left = limits.MAX_DCP_RUNS
    for name, tm in meta.tensors.items():
        np_dtype = np_dtype_of(tm.dtype)
        dname = dtype_name(np_dtype) if np_dtype is not None else tm.dtype
        numel = _prod(tm.size)
        itemsize = np_dtype.itemsize if np_dtype is not None else 0
        if np_dtype is None:
            # not read (unknown size): listed with its reason, never gathered
            tensors.append(TensorDesc(name, directory, dname, tm.size, numel, 0, f"unsupported dtype {tm.dtype}",
                                      None, None, chunks=len(tm.chunks)))
            continue
        if numel * itemsize > limits.MAX_USIZE >> 1:
            raise InputError(meta_path, f"tensor {name!r}: shape {_show(tm.size)} is too large")
        start, _, k, local = tile(meta_path, name, tm.size, tm.chunks, runs_left)
        runs_left -= len(start)
        # where each chunk's data is: (file index, offset of its first byte in the file)
        located = [_locate(meta_path, meta, name, tm, c, np_dtype, files) if _prod(c.sizes) else (0, 0)
                   for c in tm.chunks]
        if len(start):
            file_of = np.array([f for f, _ in located], dtype=np.int64)
            data_of = np.array([o for _, o in located], dtype=np.int64)
            starts.append(virtual + start * itemsize)
            which.append(file_of[k])
            at.append(data_of[k] + local * itemsize)
        nbytes = numel * itemsize
        ext = Extent(key, virtual, nbytes)
        tensors.append(TensorDesc(name, directory, dname, tm.size, numel, nbytes, skip_reason(dname, np_dtype),
                                  np_dtype, ext, chunks=len(tm.chunks)))
        virtual += nbytes
    metadata = _objects(meta_path, meta, files)
    members: list[ByteStore] = [meta_store, *files.stores]
    gather = GatherStore(
        key, directory, members,
        np.concatenate(starts) if starts else np.zeros(0, np.int64),
        np.concatenate(which) + 1 if which else np.zeros(0, np.int64),  # members[0] is .metadata
        np.concatenate(at) if at else np.zeros(0, np.int64), virtual, transient=len(members) > limits.MAX_DCP_OPEN)
    size = sum(s.size for s in members)
    return Source(directory, "dcp", tensors, metadata, size, gather)


def _storage(meta_path: str, meta: Meta, name: str, offsets: tuple[int, ...] | None) -> StorageInfo:
    info = meta.storage.get((name, offsets))
    what = f"tensor {name!r}: chunk at {_show(offsets)}" if offsets is not None else f"entry {name!r}"
    if info is None:
        raise InputError(meta_path, f"{what} has no storage entry (where its bytes are)")
    if info.transforms:
        raise InputError(meta_path, f"{what} is stored with the transform {', '.join(info.transforms)} "
                                    "(compressed chunks are not read: save without _extensions)")
    return info


def _locate(meta_path: str, meta: Meta, name: str, tm: TensorMeta, c: Chunk, np_dtype: np.dtype,
            files: _Files) -> tuple[int, int]:
    """(file index, offset in that file) of the chunk's raw data, checked against what the chunk says."""
    info = _storage(meta_path, meta, name, c.offsets)
    i, store = files.open(info.relative_path, meta_path)
    where = f"tensor {name!r}: chunk at {_show(c.offsets)}"
    sub = SubStore(store, info.offset, info.length, store.path)
    head = sub.read(min(4, info.length), 0)
    if head == _ZIP_MAGIC:
        desc = chunk_archive(sub, where)
    else:
        desc = _safetensors_chunk(files, i, store, info, name, c, where)
    ext = desc.extent
    assert ext is not None
    if desc.shape != c.sizes:
        raise InputError(store.path, f"{where}: holds a tensor of shape {_show(desc.shape)}, but {METADATA} "
                                     f"says {_show(c.sizes)}")
    if desc.np_dtype is None or desc.np_dtype.newbyteorder("<") != np_dtype.newbyteorder("<") or (
            np_dtype.itemsize > 1 and desc.np_dtype.byteorder == ">"):
        raise InputError(store.path, f"{where}: holds {desc.dtype} data, but {METADATA} says {tm.dtype}")
    if ext.encoding != "raw" or desc.nbytes != _prod(c.sizes) * np_dtype.itemsize:
        raise InputError(store.path, f"{where}: its data is not stored as plain bytes")
    return i, ext.offset


def _safetensors_chunk(files: _Files, i: int, store: LocalFile, info: StorageInfo, name: str, c: Chunk,
                       where: str) -> TensorDesc:
    """DCP's safetensors serialization: the chunk is tensor ``name`` of the safetensors blob at ``info.offset``,
    which runs to the end of the file; its ``DCP_SHARDING_INFO`` says at which offsets the chunk lies."""
    from .safetensors import read_safetensors

    blob = files.blobs.get((i, info.offset))
    if blob is None:
        sub = SubStore(store, info.offset, store.size - info.offset, store.path)
        try:
            blob = read_safetensors(sub, store.path)
        except InputError as e:
            raise InputError(store.path, f"{where}: at byte {info.offset} is neither a torch.save archive nor "
                                         f"DCP's safetensors data ({e.problem})") from None
        for t in blob.tensors:
            assert t.extent is not None
            t.extent = sub.rebase(t.extent)
        files.blobs[(i, info.offset)] = blob
    found = next((t for t in blob.tensors if t.name == name), None)
    if found is None:
        raise InputError(store.path, f"{where}: the safetensors data at byte {info.offset} has no tensor {name!r}")
    try:
        saved = json.loads(blob.metadata.get(_SHARDING_KEY, "{}"))[name]["saved_offsets"]
    except (ValueError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, list) or tuple(saved) != c.offsets:
        raise InputError(store.path, f"{where}: the safetensors data says its tensor {name!r} lies at "
                                     f"{saved!r} ({_SHARDING_KEY})")
    if found.nbytes != info.length:
        raise InputError(store.path, f"{where}: {METADATA} says {info.length} bytes, the safetensors data "
                                     f"{found.nbytes}")
    return found


def _objects(meta_path: str, meta: Meta, files: _Files) -> dict[str, str]:
    """The metadata keys read from non-tensor entries: an integer ``step``, a number ``loss_scale``."""
    out: dict[str, str] = {}
    for name in meta.objects:
        if name not in ("step", "loss_scale"):
            continue
        info = _storage(meta_path, meta, name, None)
        _, store = files.open(info.relative_path, meta_path)
        value = object_archive(SubStore(store, info.offset, info.length, store.path), f"entry {name!r}")
        if name == "step" and type(value) is int:
            out[name] = str(value)
        elif name == "loss_scale" and type(value) in (int, float) and math.isfinite(value):
            out[name] = repr(float(value)) if type(value) is float else str(value)
    return out


# --- the pickles: .metadata, and the torch.save archives of chunks and objects --------------------------------
#
# Stand-ins for the DCP dataclasses: the unpickler creates them (NEWOBJ, no arguments) and hands them
# the pickle's state (BUILD); each checks that state's types and keeps only what is read here.


def _str(x: object, what: str) -> str:
    if not isinstance(x, str) or len(x) > limits.MAX_METADATA_VALUE:
        raise UnpickleError(f"{what} must be a string")
    return x


def _nat(x: object, what: str) -> int:
    if type(x) is not int or x < 0:
        raise UnpickleError(f"{what} must be an integer >= 0")
    return x


def _dims(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or len(x) > 64:
        raise UnpickleError(f"{what} must be a torch.Size")
    return tuple(_nat(v, what) for v in x)


def _attrs(state: object, what: str, allowed: Iterable[str]) -> dict[str, object]:
    """A dataclass's pickled ``__dict__`` (``(None, slots)`` pairs are not written by DCP)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UnpickleError(f"the state of a {what} must be a dict of attributes")
    extra = set(state) - set(allowed)
    if extra:
        raise UnpickleError(f"a {what} with unknown attributes {sorted(extra)[:5]}")
    return state


class _Metadata(Stateful):
    def __init__(self) -> None:
        self.tensors: object = None
        self.storage: object = None

    def set_state(self, state: object) -> None:
        d = _attrs(state, "Metadata", ("state_dict_metadata", "planner_data", "storage_data", "storage_meta",
                                       "version"))
        self.tensors, self.storage = d.get("state_dict_metadata"), d.get("storage_data")
        if not isinstance(self.tensors, dict) or not isinstance(self.storage, dict):
            raise UnpickleError("a Metadata without its state_dict_metadata and storage_data dicts")


class _TensorStorage(Stateful):
    def __init__(self) -> None:
        self.meta: TensorMeta | None = None

    def set_state(self, state: object) -> None:
        d = _attrs(state, "TensorStorageMetadata", ("properties", "size", "chunks"))
        props, chunks = d.get("properties"), d.get("chunks")
        if not isinstance(props, _Properties) or props.dtype is None:
            raise UnpickleError("a TensorStorageMetadata without its TensorProperties")
        if not isinstance(chunks, list) or not all(isinstance(c, _Chunk) and c.chunk for c in chunks):
            raise UnpickleError("a TensorStorageMetadata whose chunks are not ChunkStorageMetadata")
        self.meta = TensorMeta(props.dtype.name, _dims(d.get("size"), "a tensor's size"),
                               [c.chunk for c in chunks if c.chunk is not None])


class _Properties(Stateful):
    def __init__(self) -> None:
        self.dtype: DType | None = None

    def set_state(self, state: object) -> None:
        # (dtype, layout, requires_grad, memory format, pin_memory) as its __getstate__ writes it; a dict before
        dtype = state[0] if type(state) is tuple and len(state) == 5 else (
            state.get("dtype") if isinstance(state, dict) else None)
        if not isinstance(dtype, DType):
            raise UnpickleError("TensorProperties without a torch dtype")
        self.dtype = dtype


class _Chunk(Stateful):
    def __init__(self) -> None:
        self.chunk: Chunk | None = None

    def set_state(self, state: object) -> None:
        d = _attrs(state, "ChunkStorageMetadata", ("offsets", "sizes"))
        self.chunk = Chunk(_dims(d.get("offsets"), "a chunk's offsets"), _dims(d.get("sizes"), "a chunk's sizes"))


class _Bytes(Stateful):
    def set_state(self, state: object) -> None:
        _attrs(state, "BytesStorageMetadata", ())


class _Index(Stateful):
    def __init__(self) -> None:
        self.key: tuple[str, tuple[int, ...] | None] | None = None

    def set_state(self, state: object) -> None:
        d = _attrs(state, "MetadataIndex", ("fqn", "offset", "index"))
        offset = d.get("offset")
        self.key = (_str(d.get("fqn"), "a MetadataIndex's fqn"),
                    None if offset is None else _dims(offset, "a MetadataIndex's offset"))


class _Info(Stateful):
    def __init__(self) -> None:
        self.info: StorageInfo | None = None

    def set_state(self, state: object) -> None:
        d = _attrs(state, "_StorageInfo", ("relative_path", "offset", "length", "transform_descriptors"))
        transforms = d.get("transform_descriptors") or ()
        if not isinstance(transforms, list | tuple):
            raise UnpickleError("a _StorageInfo's transform_descriptors must be a list")
        self.info = StorageInfo(_str(d.get("relative_path"), "a _StorageInfo's relative_path"),
                                _nat(d.get("offset"), "a _StorageInfo's offset"),
                                _nat(d.get("length"), "a _StorageInfo's length"),
                                tuple(_str(t, "a transform descriptor") for t in transforms))


class _StorageMeta(Stateful):
    def set_state(self, state: object) -> None:
        _attrs(state, "StorageMeta", ("checkpoint_id", "save_id", "load_id", "modules"))  # not read


def _path(*parts: object) -> str:
    """``pathlib.PosixPath(*parts)`` (StorageMeta.checkpoint_id): the parts joined, nothing touched."""
    return "/".join(_str(p, "a path part") for p in parts)


def _layout(name: object) -> str:
    return _str(name, "a layout")  # torch.serialization._get_layout("torch.strided"): the name


def _memory_format(code: object) -> int:
    if code not in (0, 1, 2) or type(code) is not int:
        raise UnpickleError("an unknown memory format")
    return code


_M = "torch.distributed.checkpoint.metadata"
DCP_GLOBALS: dict[tuple[str, str], object] = {
    (_M, "Metadata"): _Metadata,
    (_M, "TensorStorageMetadata"): _TensorStorage,
    (_M, "TensorProperties"): _Properties,
    (_M, "ChunkStorageMetadata"): _Chunk,
    (_M, "BytesStorageMetadata"): _Bytes,
    (_M, "MetadataIndex"): _Index,
    (_M, "StorageMeta"): _StorageMeta,
    (_M, "_MEM_FORMAT_ENCODING"): _memory_format,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _Info,
    ("torch.serialization", "_get_layout"): _layout,
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "PureWindowsPath"): _path,
}
"""The DCP dataclasses (and what they hold) as this module's stand-ins, for :class:`~.unpickle.Unpickler`."""

_READS = "tensors, plain containers and distributed checkpoint metadata"


def parse_metadata(raw: bytes, path: str) -> Meta:
    """A checkpoint's ``.metadata``, read by the restricted unpickler extended to the DCP dataclasses."""
    obj = Unpickler(raw, path, extra_globals=DCP_GLOBALS, reads=_READS).load()
    if not isinstance(obj, _Metadata) or not isinstance(obj.tensors, dict) or not isinstance(obj.storage, dict):
        raise InputError(path, "not a torch distributed checkpoint's Metadata")
    meta = Meta()
    for name, entry in obj.tensors.items():
        if not isinstance(name, str):
            raise InputError(path, "a state_dict_metadata key that is not a string")
        if isinstance(entry, _TensorStorage) and entry.meta is not None:
            meta.tensors[name] = entry.meta
        elif isinstance(entry, _Bytes):
            meta.objects.append(name)
        else:
            raise InputError(path, f"entry {name!r} is neither a TensorStorageMetadata nor a BytesStorageMetadata")
    if len(meta.tensors) > limits.MAX_TENSORS:
        raise InputError(path, f"more than {limits.MAX_TENSORS:,} tensors (the limit per file)")
    for index, info in obj.storage.items():
        if not isinstance(index, _Index) or index.key is None or not isinstance(info, _Info) or info.info is None:
            raise InputError(path, "storage_data must map MetadataIndex to _StorageInfo")
        if index.key in meta.storage:
            raise InputError(path, f"storage_data lists {index.key[0]!r} at {index.key[1]} twice")
        meta.storage[index.key] = info.info
    return meta


# A chunk's or an object's bytes are a torch.save archive, read in place through a SubStore by the zip
# walker of :mod:`.npz` and the torch reader of :mod:`.torchzip` (their strictness: the archive must end
# exactly where the chunk ends, its records must agree, its members may not overlap).


def _in(where: str, e: InputError) -> InputError:
    return InputError(e.path, f"{where}: {e.problem}")


def chunk_archive(store: SubStore, where: str) -> TensorDesc:
    """The one tensor of a chunk's torch.save archive, which must be contiguous (as DCP saves chunks)."""
    try:
        src = read_torch(store, store.path)
    except InputError as e:
        raise _in(where, e) from None
    if len(src.tensors) != 1 or src.metadata:
        raise InputError(store.path, f"{where}: the archive does not hold one tensor")
    t = src.tensors[0]
    if t.strides is not None or t.extent is None or t.np_dtype is None:
        raise InputError(store.path, f"{where}: the tensor is a non-contiguous view or of an unread dtype ({t.dtype})")
    t.extent = store.rebase(t.extent)
    return t


def _no_storage(pid: object) -> object:
    raise UnpickleError("a tensor where a plain value is expected")


def object_archive(store: SubStore, where: str) -> Any:
    """The plain value a torch.save archive holds (a non-tensor entry such as ``step``)."""
    path = store.path
    try:
        members, cd_off = zip_directory(path, store, store.size)
        window = Window(store)
        pkls = [m for m in members if m[0].count("/") == 1 and m[0].endswith("/data.pkl")]
        if len(pkls) != 1:
            raise InputError(path, "not a torch.save archive (no single data.pkl)")
        spans = []
        for m in members:
            data = member_data(path, window, m)
            spans.append((m[7], data + m[5], m[0]))
        check_spans(path, spans, cd_off)
        _, _, _, method, crc, _, usize, _ = pkls[0]
        if method != 0 or usize > limits.MAX_PICKLE:
            raise InputError(path, "data.pkl is compressed or too large")
        pkl = store.read(usize, member_data(path, window, pkls[0]))
        if zlib.crc32(pkl) != crc:
            raise InputError(path, "data.pkl: CRC-32 mismatch (the archive is corrupt)")
    except InputError as e:
        raise _in(where, e) from None
    return Unpickler(pkl, path, persistent_load=_no_storage).load()
