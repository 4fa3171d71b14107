"""In-memory arrays (numpy, torch, anything ``np.asarray`` accepts) as a source.

Each floating array's bytes are an extent of one :class:`~.store.MemoryStore`,
so the engine reads them like any other store (without a copy when it can).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from .base import Container, Extent, Source, TensorDesc, dtype_name, skip_reason
from .store import ByteStore, MemoryStore

__all__ = ["CONTAINER", "array_source"]

try:
    import ml_dtypes as _mld
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _mld = None


def array_source(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], path: str = "<memory>") -> Source:
    """A source over in-memory arrays (anything ``np.asarray`` accepts): a mapping of
    names to arrays, or (name, array) pairs, whose names must not repeat."""
    pending: list[tuple[str, np.ndarray, str | None]] = []
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
        reason = skip_reason(dtype_name(arr.dtype), arr.dtype)
        if arr.dtype.fields is not None:
            reason = "structured dtype is not a gradient"
        pending.append((name, arr, reason))
    flats = []
    for _, arr, reason in pending:
        if reason is None:
            flat = arr.reshape(-1)
            flats.append(flat.astype(arr.dtype.newbyteorder("=")) if not arr.dtype.isnative else flat)
    store = MemoryStore(flats, path)
    tensors = []
    floats = iter(zip(flats, store.offsets))
    for name, arr, reason in pending:
        np_dtype, ext = arr.dtype, None
        if reason is None:
            flat, offset = next(floats)
            np_dtype, ext = flat.dtype, Extent(store.key, offset, flat.nbytes)
        tensors.append(TensorDesc(name, path, dtype_name(arr.dtype), tuple(arr.shape), arr.size, arr.nbytes,
                                  reason, np_dtype, ext))
    return Source(path, "memory", tensors, {}, 0, store)


def _as_numpy(value: Any) -> np.ndarray:
    # torch tensors: detach and move to the CPU; numpy has no bfloat16, so view its bits.
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16" and _mld is not None:
            import torch  # only reachable with a torch tensor in hand

            return value.view(torch.int16).numpy().view(_mld.bfloat16)
    return np.asarray(value)


class Memory(Container):
    """In-memory arrays: never recognised from a path; built with :func:`array_source`."""

    name = "memory"

    def recognises(self, path: str, is_dir: bool = False) -> bool:
        return False

    def describe(self, store: ByteStore, path: str) -> Source:  # pragma: no cover - built, not opened
        raise TypeError("in-memory arrays are described by array_source()")


CONTAINER = Memory()
