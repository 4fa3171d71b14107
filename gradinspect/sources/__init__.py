"""Inputs: container formats (one module each) over byte stores, resolved from PATHs.

Every file format gradinspect reads and every refusal live here.  Headers are
parsed here (safetensors JSON headers, zip directories, ``.npy`` headers) so
tensor data can be read chunk by chunk into reused, page-aligned buffers: never
a whole file, never a whole large tensor.  Nothing is ever unpickled.

- :mod:`.base`: the public, immutable, picklable descriptions (:class:`Extent`,
  :class:`TensorDesc`, :class:`Source`) and the :class:`Container` interface;
- :mod:`.store`: byte stores (:class:`LocalFile`: pread, identity checks, parking;
  :class:`MemoryStore`), :class:`ChunkBuffer`; :mod:`.remote`: URLs through fsspec, by ranges;
- :mod:`.codec`: deflate streaming, CRC-32 combining;  :mod:`.limits`: every limit;
- one module per container: :mod:`.safetensors`, :mod:`.npz`, :mod:`.npy`,
  :mod:`.index` (expands to shard files), :mod:`.memory` (in-memory arrays), :mod:`.dcp` (a torch
  distributed checkpoint directory, one container; :mod:`.ranges` gathers its chunks);
- :mod:`.paths`: PATHs (files, directories, globs, index files) to sources;
- :mod:`.voids`: the dtype of raw void arrays (bfloat16/float8 written by ``np.save``; ``--void-as``).

A new container format is one module exporting ``CONTAINER`` and one line below.
"""

from __future__ import annotations

from ..errors import InputError
from . import dcp, index, memory, npy, npz, safetensors, torchzip
from .base import Container, Extent, Source, TensorDesc, TensorEntry
from .memory import array_source
from .paths import close_all, open_paths, open_source, resolve_paths
from .store import ByteStore, ChunkBuffer, LocalFile, MemoryStore

CONTAINERS: tuple[Container, ...] = (
    safetensors.CONTAINER,
    npz.CONTAINER,
    npy.CONTAINER,
    torchzip.CONTAINER,
    index.CONTAINER,
    memory.CONTAINER,
    dcp.CONTAINER,
)

__all__ = [
    "CONTAINERS", "Container", "Extent", "TensorDesc", "TensorEntry", "Source", "ByteStore", "LocalFile",
    "MemoryStore", "ChunkBuffer", "InputError", "resolve_paths", "open_source", "open_paths", "close_all",
    "array_source",
]
