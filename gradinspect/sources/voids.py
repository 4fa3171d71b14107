"""Raw void arrays: how ``np.save``/``np.savez`` write most ml_dtypes types (``--void-as``).

numpy cannot name ml_dtypes' types in an ``.npy`` header, so it writes their bytes as raw
void values: ``<V2`` for bfloat16, ``<V1`` for the float8 types (all of them but
``float8_e5m2``, which every ml_dtypes release writes as ``<f1``: read as float8_e5m2 by
:mod:`.npy`).  Containers describe such an array with its descr as dtype (``<V2``) and a
skip reason; :func:`resolve` then decides, for every source of one call:

- ``void_as=None``: ``V2`` is read as bfloat16 (by far the most common 2-byte type numpy
  cannot name; one note per call says so), any other width is refused (which float8 a
  ``V1`` holds is not recorded anywhere);
- ``void_as=DTYPE``: the raw arrays of DTYPE's width are read as DTYPE, the others as without it
  (so ``float8_e4m3fn`` reads ``V1`` as that and ``V2`` still as bfloat16; ``bfloat16`` leaves ``V1``
  refused, naming the mismatch);
- ``void_as="skip"``: every raw array is skipped (listed as skipped).

The byte order is the descr's (``>V2``: big-endian); ``|V2`` (a genuine numpy void array)
is read as little-endian, as every machine that writes bfloat16 today is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..options import VOID_AS_CHOICES
from .base import Source, TensorDesc, dtype_name

__all__ = ["VOID_AS_CHOICES", "check_void_as", "raw_reason", "raw_dtype", "is_raw", "resolve", "memory_voids"]

_DEFAULT = {2: "bfloat16"}  # width -> the dtype read without --void-as
_HINT = "give --void-as DTYPE (e.g. float8_e4m3fn; void_as= in Python) or --void-as skip"
_SKIP = "--void-as skip skips them"


def check_void_as(void_as: str | None) -> None:
    """ValueError unless ``void_as`` is None or one of :data:`VOID_AS_CHOICES`."""
    if void_as is not None and void_as not in VOID_AS_CHOICES:
        raise ValueError(f"void_as must be one of {', '.join(VOID_AS_CHOICES)}, not {void_as!r}")


def _dtype(name: str) -> np.dtype:
    if name == "float16":
        return np.dtype(np.float16)
    import ml_dtypes

    t = getattr(ml_dtypes, name, None)
    if t is None:
        raise ValueError(f"void_as {name!r}: the installed ml_dtypes {ml_dtypes.__version__} has no such type")
    dt: np.dtype = np.dtype(t)
    return dt


def raw_reason(width: int, descr: str) -> str:
    """The skip reason of a raw array not (yet) given a dtype."""
    return f"raw {width}-byte values ({descr}): their type is not recorded; --void-as DTYPE reads them"


def raw_dtype(d: np.dtype | None) -> bool:
    """Whether ``d`` is numpy's raw void type (not a structured one, not an ml_dtypes type, whose kind is V too)."""
    return d is not None and d.type is np.void and d.fields is None and d.subdtype is None


def is_raw(t: TensorDesc) -> bool:
    """Whether ``t`` is a raw void array as a container described it."""
    return raw_dtype(t.np_dtype)


def _target(width: int, descr: str, void_as: str | None, what: str) -> tuple[np.dtype | None, bool]:
    """(the dtype of raw ``width``-byte values (None: skipped), whether it is the default), or ValueError
    saying why they cannot be read."""
    if void_as == "skip":
        return None, False
    chosen = None if void_as is None else _dtype(void_as)
    if chosen is not None and chosen.itemsize == width:
        name = void_as
    else:
        name = _DEFAULT.get(width)
    if name is None:
        why = ("which float8 they hold is not recorded (np.save writes ml_dtypes' float8 types this way)"
               if width == 1 else f"no {width}-byte type is read from raw bytes")
        if chosen is not None:
            why = (f"--void-as {void_as} is {chosen.itemsize} byte{'s' if chosen.itemsize > 1 else ''} wide, and "
                   + why)
            raise ValueError(f"{what}raw {width}-byte values ({descr}) do not match --void-as {void_as}: {why}; "
                             f"--void-as skip skips them")
        raise ValueError(f"{what}raw {width}-byte values ({descr}): {why}; {_HINT if width == 1 else _SKIP}")
    dt: np.dtype = _dtype(name).newbyteorder(">" if descr.startswith(">") else "<")
    return dt, name != void_as


def _note(where: list[str], counts: dict[str, int]) -> str:
    files = sorted(set(where), key=where.index)
    more = len(files) - 1
    label = files[0] + (f" (and {more} more file{'s' if more > 1 else ''})" if more else "")
    n = sum(counts.values())
    return (f"{label}: {n} array{'s' if n > 1 else ''} of raw 2-byte values ({'/'.join(counts)}) read as "
            "bfloat16; --void-as DTYPE to choose")


def resolve(sources: Sequence[Source], void_as: str | None = None) -> list[str]:
    """Give every raw void array of ``sources`` its dtype (or skip it), in place; the note to show (or none).

    InputError for an array that cannot be read (no default for its width, or not ``void_as``'s width)."""
    check_void_as(void_as)
    where: list[str] = []
    counts: dict[str, int] = {}
    for src in sources:
        if not any(is_raw(t) for t in src.tensors):
            continue
        for i, t in enumerate(src.tensors):
            if not is_raw(t):
                continue
            assert t.np_dtype is not None
            what = f"member {t.name + '.npy'!r}: " if src.kind == "npz" else ""
            try:
                dt, default = _target(t.np_dtype.itemsize, t.dtype, void_as, what)
            except ValueError as e:
                raise InputError(src.path, str(e)) from None
            if dt is None:
                src.tensors[i] = dataclasses.replace(t, skip_reason="raw void values skipped (--void-as skip)")
                continue
            src.tensors[i] = dataclasses.replace(t, dtype=dtype_name(dt), skip_reason=None, np_dtype=dt)
            if default:
                where.append(src.path)
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return [_note(where, counts)] if counts else []


def memory_voids(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]], void_as: str | None = None,
                 path: str = "<memory>") -> tuple[Mapping[str, Any] | Iterable[tuple[str, Any]], list[str]]:
    """In-memory numpy void arrays (``np.load`` of a bfloat16 ``.npy``) viewed as :func:`resolve` reads them
    (``skip``: left as they are, then skipped), as (name, array) pairs; and the note."""
    check_void_as(void_as)
    pairs = list(mapping.items() if isinstance(mapping, Mapping) else mapping)
    out: list[Any] = []
    counts: dict[str, int] = {}
    for pair in pairs:
        try:
            name, value = pair
        except (TypeError, ValueError):
            out.append(pair)  # array_source says what is wrong
            continue
        d = getattr(value, "dtype", None)
        if isinstance(value, np.ndarray) and isinstance(d, np.dtype) and raw_dtype(d):
            try:
                dt, default = _target(d.itemsize, d.str, void_as, f"array {str(name)!r}: ")
            except ValueError as e:
                raise InputError(path, str(e)) from None
            if dt is not None:
                value = value.view(dt)
                if default:
                    counts[d.str] = counts.get(d.str, 0) + 1
        out.append((name, value))
    return out, ([_note([path], counts)] if counts else [])
