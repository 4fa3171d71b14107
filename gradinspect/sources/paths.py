"""PATHs to sources: files, directories, quoted globs and index files resolved into files,
each opened with the container that recognises it; the checks across files of one call."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import TypeGuard

from ..errors import InputError
from . import limits
from . import store as _store
from .base import Container, Source

__all__ = ["resolve_paths", "open_source", "open_paths", "close_all", "container_for", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _containers() -> tuple[Container, ...]:
    from . import CONTAINERS  # the registry (sources/__init__.py), loaded by now

    return CONTAINERS


def container_for(path: str, is_dir: bool = False) -> Container | None:
    """The registered container that recognises ``path`` (None: none does)."""
    return next((c for c in _containers() if c.recognises(path, is_dir)), None)


def _expands(c: Container | None) -> TypeGuard[Container]:
    return c is not None and c.expands


def _suffix(path: str) -> str:
    return os.path.splitext(path.lower())[1]


def resolve_paths(paths: Sequence[str | os.PathLike[str]], notes: list[str] | None = None,
                  allow_outside_index: bool = False) -> list[str]:
    """The files that ``paths`` name, in order: directories list their supported
    files sorted by name, index files their shards (refused outside the index's
    directory unless ``allow_outside_index``), quoted globs their matches.

    A warning for each directory's other files is appended to ``notes``."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _store.scheme_of(p) and not os.path.exists(p):  # a URL: a byte store must read it
            _store.store_class(p)
        if not os.path.exists(p) and glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise InputError(p, "no file matches this pattern")
            out.extend(resolve_paths(matches, notes, allow_outside_index))
        elif os.path.isdir(p):
            if container_for(p, True) is not None:  # the directory is one container (a distributed checkpoint)
                out.append(p)
                continue
            try:
                names = os.listdir(p)
            except OSError as e:
                raise InputError(p, _store.os_problem(e)) from None
            found = sorted(
                os.path.join(p, n) for n in names
                if _readable(n) and os.path.isfile(os.path.join(p, n))
            )
            if not found:
                raise InputError(p, "directory holds no .safetensors, .npz or .npy file")
            if notes is not None:
                notes.extend(_skipped_files(p, names))
            out.extend(found)
        else:
            c = container_for(p)
            if _expands(c):
                out.extend(c.expand(p, allow_outside_index))
            else:
                out.append(p)
    return out


def _readable(name: str) -> bool:
    """Whether a directory's file is read as tensors (index files are not: their shards are)."""
    c = container_for(name)
    return c is not None and not _expands(c)


def _skipped_files(directory: str, names: list[str]) -> list[str]:
    """A warning naming the files of ``directory`` that are not read (index files' shards are)."""
    other = sorted(n for n in names if container_for(n) is None and os.path.isfile(os.path.join(directory, n)))
    if not other:
        return []
    shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
    label = directory if directory.endswith(os.sep) else directory + os.sep
    line = (f"{label}: skipped {len(other)} file{'s' if len(other) > 1 else ''} that "
            f"{'are' if len(other) > 1 else 'is'} not .safetensors/.npz/.npy ({shown})")
    pickles = sorted({_suffix(n) for n in other if _suffix(n) in PICKLE_SUFFIXES})
    if pickles:
        line += f"; {'/'.join(pickles)} files are pickles, never loaded (they can run code): save with safetensors"
    return [line]


def open_source(path: str) -> Source:
    """Read and validate one file's header; the data is not read.

    The source holds the open file: :meth:`Source.finish` or :meth:`Source.close` it.
    """
    c = container_for(path)
    if (c is None or _expands(c)) and os.path.isdir(path) and (d := container_for(path, True)) is not None:
        return d.describe_dir(path)
    if c is None or _expands(c):
        if _suffix(path) in PICKLE_SUFFIXES:
            raise InputError(path, "pickle-based files are never loaded (they can run code); "
                                   "save gradients with safetensors")
        raise InputError(path, "unsupported file type "
                               "(expected .safetensors, .npz, .npy, a directory or a *.safetensors.index.json)")
    store = _store.store_class(path).open(path)
    try:
        return c.describe(store, path)
    except BaseException:
        store.close()
        raise


def open_paths(paths: Sequence[str | os.PathLike[str]], allow_repeats: bool = False,
               notes: list[str] | None = None, allow_outside_index: bool = False) -> list[Source]:
    """Sources for ``paths``; a tensor name in two files is refused unless ``allow_repeats``
    (``--shards slices`` / ``replicas`` say what such names mean).  Warnings go to ``notes``.

    The caller closes every source (:meth:`Source.finish` or :meth:`Source.close`);
    past :func:`~.store.hold_budget` files, sources are parked between reads.
    """
    if not paths:
        raise ValueError("no paths given")
    files = resolve_paths(paths, notes, allow_outside_index)
    seen: dict[tuple[int, int], str] = {}
    for f in files:
        try:
            st = _store.regular_file(f)
        except InputError:
            if not os.path.isdir(f):
                raise
            st = os.stat(f)  # a directory that is one container
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise InputError(f, f"the same file is given twice (also as {seen[key]})")
        seen[key] = f
    budget = _store.hold_budget() if len(files) > 1 else 1
    sources: list[Source] = []
    count = 0
    try:
        for f in files:
            src = open_source(f)
            sources.append(src)
            if len(sources) > budget:
                src.park()
            count += len(src.tensors)
            if count > limits.MAX_TOTAL_TENSORS:
                raise InputError(f, f"more than {limits.MAX_TOTAL_TENSORS:,} tensors in all (the limit for one call)")
        owner: dict[str, str] = {}
        for src in sources:
            for t in src.tensors:
                if t.name in owner and not allow_repeats:
                    raise InputError(src.path, f"tensor {t.name!r} is also in {owner[t.name]} (the same name in "
                                     "two files: use --shards slices or --shards replicas (shards= in Python) "
                                     "to say what that means)")
                owner.setdefault(t.name, src.path)
        for c in _containers():
            c.check(paths, sources)
    except BaseException:
        close_all(sources)
        raise
    return sources


def close_all(sources: Sequence[Source]) -> None:
    """Close every source (without checks); for cleanup."""
    for s in sources:
        s.close()
