"""PATHs to sources: files, directories, quoted globs and index files resolved into files,
each opened with the container that recognises it; the checks across files of one call."""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Callable, Sequence
from typing import TypeGuard

from ..errors import InputError
from . import limits, voids
from . import store as _store
from .base import Container, Source
from .dcp import METADATA
from .dcp import SUFFIX as DCP_SUFFIX

__all__ = ["resolve_paths", "open_source", "open_paths", "close_all", "container_for", "PICKLE_SUFFIXES",
           "expand_glob", "file_size", "file_state"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _containers() -> tuple[Container, ...]:
    from . import CONTAINERS  # the registry (sources/__init__.py), loaded by now

    return CONTAINERS


def container_for(path: str, is_dir: bool = False) -> Container | None:
    """The registered container that recognises ``path`` (None: none does)."""
    if _store.scheme_of(path) in ("http", "https"):
        path = path.partition("?")[0]  # the name, not the query (a signed URL)
    return next((c for c in _containers() if c.recognises(path, is_dir)), None)


def _is_url(path: str) -> bool:
    return bool(_store.scheme_of(path)) and not os.path.exists(path)


def _shown(path: str) -> str:
    """A PATH as messages name it (a URL without password or query string)."""
    if _is_url(path):
        from .remote import display

        return display(path)
    return path


def expand_glob(path: str) -> list[str] | None:
    """The sorted matches of a quoted glob (a URL's listed through fsspec), or None: ``path`` is no glob."""
    if _is_url(path) and _store.store_class(path) is not _store.LocalFile:
        from .remote import resolve_url

        kind, found, _ = resolve_url(path, _readable)
        return found if kind == "glob" else None
    if not os.path.exists(path) and glob.has_magic(path):
        return sorted(glob.glob(path))
    return None


def file_size(path: str) -> int:
    """The size of a resolved file (a URL's from fsspec; of a directory that is one container, its files')."""
    if _is_url(path):
        from .remote import url_size

        return url_size(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(f) for f in member_files(path))
    return os.path.getsize(path)


def member_files(path: str) -> list[str]:
    """The files, sorted, of a resolved PATH that is a directory holding one container (a distributed
    checkpoint: rewriting one of them in place leaves the directory's own identity as it was); [] for a
    file or a URL."""
    if _is_url(path) or not os.path.isdir(path):
        return []
    return sorted(e.path for e in os.scandir(path) if e.is_file())


def file_state(path: str) -> tuple[object, ...]:
    """What tells a file changed: its identity ((path, None) when it is gone)."""
    if _is_url(path):
        from .remote import url_state

        return url_state(path)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _expands(c: Container | None) -> TypeGuard[Container]:
    return c is not None and c.expands


def _suffix(path: str) -> str:
    return os.path.splitext(path.lower())[1]


def is_one_file(path: str) -> bool:
    """True when ``path`` is a local regular file that :func:`resolve_paths` gives back as itself (a
    container that is one file, not an index of others): a cheaper test than resolving it, one ``stat``."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and not _expands(container_for(path))


def resolve_paths(paths: Sequence[str | os.PathLike[str]], notes: list[str] | None = None,
                  allow_outside_index: bool = False) -> list[str]:
    """The files that ``paths`` name, in order: directories list their supported
    files sorted by name, index files their shards (refused outside the index's
    directory unless ``allow_outside_index``), quoted globs their matches.

    A warning for each directory's other files is appended to ``notes``."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _is_url(p) and _store.store_class(p) is not _store.LocalFile:  # a URL: a byte store reads it
            out.extend(_resolve_url(p, notes, allow_outside_index))
            continue
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
                raise InputError(p, "; ".join(filter(None, ("directory holds no .safetensors, .npz or .npy file",
                                                              _named_only_hint(p, names)))))
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


def _resolve_url(url: str, notes: list[str] | None, allow_outside_index: bool) -> list[str]:
    """:func:`resolve_paths` of a URL: globs and directories listed through fsspec (sorted as local ones)."""
    from .remote import display, resolve_url

    c = container_for(url)
    if _expands(c):
        if "?" in url and _store.scheme_of(url) in ("http", "https"):  # a signed index cannot sign its shards
            raise InputError(display(url), "an index file URL with a query string: give the shard URLs")
        return resolve_paths(c.expand(url, allow_outside_index), notes, allow_outside_index)
    kind, found, other = resolve_url(url, _readable)
    if kind == "glob":
        if not found:
            raise InputError(display(url), "no file matches this pattern")
        return resolve_paths(found, notes, allow_outside_index)
    if kind == "dir":
        if METADATA in other and any(f.endswith(DCP_SUFFIX) for f in found):
            raise InputError(display(url).rstrip("/") + "/", "a torch distributed checkpoint (.metadata and .distcp "
                             "files) is read from a local directory only, not from a URL: give its local path")
        if not found:
            hint = _named_only_hint(display(url).rstrip("/"), other, set(other).__contains__, "/")
            raise InputError(display(url), "; ".join(filter(None, ("directory holds no .safetensors, .npz or .npy "
                                                                   "file", hint))))
        if notes is not None:
            notes.extend(_skipped_files(display(url).rstrip("/"), other, files=set(other), sep="/"))
    return found


def _readable(name: str) -> bool:
    """Whether a directory's file is read as tensors (index files are not: their shards are; nor torch files)."""
    c = container_for(name)
    return c is not None and not _expands(c) and c.in_directories


def _named_only(directory: str, names: list[str], is_file: Callable[[str], bool] | None = None) -> list[str]:
    """The files of ``directory`` read only when named or globbed (torch files), sorted."""
    return sorted(n for n in names if (c := container_for(n)) is not None and not c.in_directories
                  and (is_file(n) if is_file is not None else os.path.isfile(os.path.join(directory, n))))


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _named_only_hint(directory: str, names: list[str], is_file: Callable[[str], bool] | None = None,
                     sep: str = os.sep) -> str:
    """Why a directory's torch files were not read, and how to read them ('' when it has none)."""
    torch = _named_only(directory, names, is_file)
    if not torch:
        return ""
    label = directory if directory.endswith(sep) else directory + sep
    return (f"skipped {len(torch)} torch file{'s' if len(torch) > 1 else ''} ({_listed(torch)}): "
            f"{'/'.join(sorted({_suffix(n) for n in torch}))} files are not read from a directory (a checkpoint's "
            f"optimizer state and training arguments are not gradients): name them or use a glob "
            f"('{label}*{_suffix(torch[0])}')")


def _skipped_files(directory: str, names: list[str], files: set[str] | None = None, sep: str = os.sep) -> list[str]:
    """A warning naming the files of ``directory`` that are not read (index files' shards are; torch files
    are named with how to read them); ``files``: the names that are files, when known (a listed URL)."""
    def is_file(n: str) -> bool:
        return n in files if files is not None else os.path.isfile(os.path.join(directory, n))

    other = sorted(n for n in names if container_for(n) is None and is_file(n))
    hint = _named_only_hint(directory, names, is_file, sep)
    if not other and not hint:
        return []
    label = directory if directory.endswith(sep) else directory + sep
    if not other:
        return [f"{label}: {hint}"]
    line = (f"{label}: skipped {len(other)} file{'s' if len(other) > 1 else ''} that "
            f"{'are' if len(other) > 1 else 'is'} not .safetensors/.npz/.npy ({_listed(other)})")
    pickles = sorted({_suffix(n) for n in other if _suffix(n) in PICKLE_SUFFIXES})
    if pickles:
        line += f"; {'/'.join(pickles)} files are pickles, never loaded (they can run code): save with safetensors"
    return [line + (f"; {hint}" if hint else "")]


def open_source(path: str) -> Source:
    """Read and validate one file's header; the data is not read.

    The source holds the open file: :meth:`Source.finish` or :meth:`Source.close` it.
    """
    c = container_for(path)
    if (c is None or _expands(c)) and os.path.isdir(path) and (d := container_for(path, True)) is not None:
        return d.describe_dir(path)
    if c is None or _expands(c):
        if _suffix(path) in PICKLE_SUFFIXES:
            raise InputError(_shown(path), "pickle-based files are never loaded (they can run code); "
                                   "save gradients with safetensors")
        raise InputError(_shown(path), "unsupported file type "
                               "(expected .safetensors, .npz, .npy, a torch.save .pt/.pth/.bin, a directory "
                               "or a *.safetensors.index.json)")
    store = _store.store_class(path).open(path)
    try:
        return c.describe(store, store.path)  # a URL as shown: without password or query string
    except BaseException:
        store.close()
        raise


def open_paths(paths: Sequence[str | os.PathLike[str]], allow_repeats: bool = False,
               notes: list[str] | None = None, allow_outside_index: bool = False,
               void_as: str | None = None) -> list[Source]:
    """Sources for ``paths``; a tensor name in two files is refused unless ``allow_repeats``
    (``--shards slices`` / ``replicas`` say what such names mean).  Warnings go to ``notes``.
    Raw void arrays (bfloat16/float8 written by ``np.save``) are read as ``void_as`` says (:mod:`.voids`).

    The caller closes every source (:meth:`Source.finish` or :meth:`Source.close`);
    past :func:`~.store.hold_budget` files, sources are parked between reads.
    """
    if not paths:
        raise ValueError("no paths given")
    files = resolve_paths(paths, notes, allow_outside_index)
    seen: dict[tuple[object, ...], str] = {}
    for f in files:
        if _is_url(f):  # opened below
            key: tuple[object, ...] = (f,)
        else:
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
        said = voids.resolve(sources, void_as)
        if notes is not None:
            notes.extend(said)
    except BaseException:
        close_all(sources)
        raise
    return sources


def close_all(sources: Sequence[Source]) -> None:
    """Close every source (without checks); for cleanup."""
    for s in sources:
        s.close()
