"""Writing a gradient dump from a JAX training loop: :func:`save_grads` (the optional extra ``gradinspect[jax]``).

jax is imported inside :func:`save_grads` only; without it, :func:`save_grads` raises ImportError
saying ``pip install 'gradinspect[jax]'``.  The file is ``.safetensors`` (written by the safetensors
library's numpy API): every leaf of the pytree is one tensor named by its key path joined with ``.``
(``{"params": {"dense": {"kernel": g}}}`` → ``params.dense.kernel``; list and tuple items by index;
attributes by name), its dtype kept (bfloat16 too: ``np.asarray`` of a JAX array is an ml_dtypes
array).  The metadata holds ``step`` (which ``gradinspect trend`` takes as the step number) and
``loss_scale`` (which gradinspect divides out of every norm) when given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .dumps import dump_metadata, save_atomically

__all__ = ["save_grads", "JAX_EXTRA"]

JAX_EXTRA = "pip install 'gradinspect[jax]'"


def _jax() -> Any:
    try:
        import jax
    except ImportError as e:
        raise ImportError(f"gradinspect.jax.save_grads needs JAX: {JAX_EXTRA}") from e
    return jax


def _key(k: Any) -> str:
    """One step of a key path: a dict key, an attribute name, a sequence index."""
    for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _readable() -> set[np.dtype]:
    """The dtypes a safetensors file can name and gradinspect reads back."""
    from .sources.safetensors import ST_DTYPES

    return {dt for _, dt in ST_DTYPES.values() if dt is not None}


def save_grads(pytree: Any, path: str | os.PathLike[str], *, step: int | None = None,
               loss_scale: float | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Save a pytree of gradients (``jax.grad``'s result, flax ``params``-shaped) to the ``.safetensors``
    file ``path``, atomically; see the module docstring.

    ``step``: the training step (metadata ``step``); ``loss_scale``: the scale the gradients still
    carry, divided out by gradinspect; ``metadata``: more ``str`` keys and values.  ValueError for
    two leaves with the same dotted name or a bare array (no name); TypeError for a leaf whose dtype a
    safetensors file cannot hold as gradinspect reads it.
    """
    jax = _jax()
    from safetensors.numpy import save_file

    md = dump_metadata(step, loss_scale, metadata)
    leaves, _ = jax.tree_util.tree_flatten_with_path(pytree)
    readable = _readable()
    tensors: dict[str, np.ndarray] = {}
    for keypath, leaf in leaves:
        name = ".".join(_key(k) for k in keypath)
        if not keypath:
            raise ValueError("a bare array has no name: pass a dict (or another pytree) of gradients")
        if name in tensors:
            raise ValueError(f"two leaves are both named {name!r} once their key paths are joined with '.'")
        arr = np.asarray(jax.device_get(leaf))
        if arr.dtype.newbyteorder("<") not in readable:
            raise TypeError(f"leaf {name!r}: dtype {arr.dtype} cannot be saved so that gradinspect reads it")
        tensors[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")  # 0-d stays 0-d
    save_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=md))
