"""In-memory arrays (numpy, torch, anything ``np.asarray`` accepts) as a source.

Each floating array's bytes are an extent of one :class:`~.store.MemoryStore`,
so the engine reads them like any other store (without a copy when it can).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from .base import Container, Extent, Source, TensorDesc, dtype_name, skip_reason
from .store import ByteStore, MemoryStore

__all__ = ["CONTAINER", "array_source"]


def array_source(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], path: str = "<memory>") -> Source:
    """A source over in-memory arrays (anything ``np.asarray`` accepts): a mapping of
    names to arrays, or (name, array) pairs, whose names must not repeat."""
    pending: list[tuple[str, np.ndarray, str, str | None]] = []
    flats: list[np.ndarray] = []
    seen: set[str] = set()
    known: dict[np.dtype, tuple[str, str | None]] = {}  # dtype -> (name, skip reason)
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
        dt = arr.dtype
        hit = known.get(dt)
        if hit is None:
            dname = dtype_name(dt)
            hit = known[dt] = (dname, skip_reason(dname, dt) if dt.fields is None
                               else "structured dtype is not a gradient")
        dname, reason = hit
        if reason is None:
            flat = arr.reshape(-1)
            flats.append(flat if dt.isnative else flat.astype(dt.newbyteorder("=")))
        pending.append((name, arr, dname, reason))
    store = MemoryStore(flats, path)
    tensors = []
    k = 0
    key, offsets = store.key, store.offsets
    for name, arr, dname, reason in pending:
        if reason is None:
            flat = flats[k]
            tensors.append(TensorDesc(name, path, dname, arr.shape, arr.size, arr.nbytes, None, flat.dtype,
                                      Extent(key, offsets[k], flat.nbytes)))
            k += 1
        else:
            tensors.append(TensorDesc(name, path, dname, arr.shape, arr.size, arr.nbytes, reason, arr.dtype))
    return Source(path, "memory", tensors, {}, 0, store)


def _as_numpy(value: Any) -> np.ndarray:
    # torch tensors: detach and move to the CPU; numpy has no bfloat16, so view its bits.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            import torch  # only reachable with a torch tensor in hand

            bits: np.ndarray = value.view(torch.int16).numpy()
            return bits.view(ml_dtypes.bfloat16)
    return np.asarray(value)


class Memory(Container):
    """In-memory arrays: never recognised from a path; built with :func:`array_source`."""

    name = "memory"

    def recognises(self, path: str, is_dir: bool = False) -> bool:
        return False

    def describe(self, store: ByteStore, path: str) -> Source:  # pragma: no cover - built, not opened
        raise TypeError("in-memory arrays are described by array_source()")


CONTAINER = Memory()
