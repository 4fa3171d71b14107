"""Hugging Face ``*.safetensors.index.json`` files: a container that expands to its shard files.

The weight_map is read incrementally and bounded (:mod:`.limits`); shards outside
the index's directory are refused unless allowed, and after the shards are opened
every tensor the weight_map names must be in the shard it names.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence

from ..errors import InputError
from . import limits
from . import store as _store
from .base import Container, Source
from .jsonscan import not_an_object, refusals, short, string_object, value, walk_all
from .store import ByteStore

__all__ = ["CONTAINER", "INDEX_SUFFIX", "weight_map", "check_index_names"]

INDEX_SUFFIX = ".index.json"


class Index(Container):
    name = "index"
    suffixes = (INDEX_SUFFIX,)
    expands = True

    def expand(self, path: str, allow_outside: bool = False) -> list[str]:
        """The shard files, sorted; refused outside the index's directory unless ``allow_outside``."""
        return index_shards(path, allow_outside)

    def describe(self, store: ByteStore, path: str) -> Source:  # pragma: no cover - expanded, never opened
        raise InputError(path, "an index file is expanded into its shards, not read as tensors")

    def check(self, paths: Sequence[str | os.PathLike[str]], sources: list[Source]) -> None:
        check_index_names(paths, sources)


def index_shards(path: str, allow_outside: bool = False) -> list[str]:
    wm = weight_map(path)
    if not allow_outside:
        for shard in dict.fromkeys(wm.values()):
            if _outside(shard):
                raise InputError(path, f"weight_map names shard {short(shard, 300)} outside the index's directory "
                                 "(use --allow-outside-index to allow)")
    return sorted({_shard_path(path, v) for v in wm.values()})


def _outside(shard: str) -> bool:
    """Whether a weight_map shard path leaves the index's directory: absolute, on another drive,
    or climbing out with ``..``.  The check is on the path as written: symlinks in the directory
    are followed, as its owner (not the index) made them (the Hugging Face cache links every
    shard to ``../../blobs/<hash>``)."""
    if os.path.isabs(shard) or os.path.splitdrive(shard)[0]:
        return True
    return os.path.normpath(shard).split(os.sep)[0] == os.pardir


_NO_WEIGHT_MAP = "no \"weight_map\" object of tensor names to shard files"


def _read_index(path: str) -> bytes:
    """The index file's bytes (a URL's by a ranged read), at most ``MAX_INDEX_BYTES``."""
    if not _is_url(path):
        return _store.read_small(path, limits.MAX_INDEX_BYTES)
    store = _store.store_class(path).open(path)
    try:
        if store.size > limits.MAX_INDEX_BYTES:
            raise InputError(store.path, f"file is larger than the {limits.MAX_INDEX_BYTES}-byte limit")
        raw = store.read(store.size, 0)
        store.finish()
    finally:
        store.close()
    return raw


def _is_url(path: str) -> bool:
    return bool(_store.scheme_of(path)) and not os.path.exists(path)


def weight_map(path: str) -> dict[str, str]:
    raw = _read_index(path)
    found: dict[str, dict[str, str]] = {}
    seen: set[str] = set()

    def member(key: str, at: int) -> int:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        if key == "weight_map" and text.startswith("{", at):
            found[key], end = string_object(text, at, "weight_map", limits.MAX_TOTAL_TENSORS,
                                             f"weight_map names more than {limits.MAX_TOTAL_TENSORS:,} tensors",
                                             _NO_WEIGHT_MAP, share=True)
            return end
        return value(text, at)[1]

    with refusals(path):
        text = raw.decode("utf-8")
        del raw
        if not not_an_object(text):
            walk_all(text, member)
    wm = found.get("weight_map")
    if wm is None:
        raise InputError(path, _NO_WEIGHT_MAP)
    if not wm:
        raise InputError(path, "weight_map is empty")
    for v in dict.fromkeys(wm.values()):
        if "\0" in v or not v:
            raise InputError(path, f"weight_map names an invalid shard file {short(v)}")
    return wm


def _shard_path(index: str, shard: str) -> str:
    if _is_url(index):  # a URL's shards: the same scheme, '/'-joined
        scheme, sep, rest = index.partition("://")
        return scheme + sep + posixpath.normpath(posixpath.join(posixpath.dirname(rest), shard))
    return os.path.normpath(os.path.join(os.path.dirname(index), shard))


def check_index_names(paths: Sequence[str | os.PathLike[str]], sources: list[Source]) -> None:
    """Every tensor an index's weight_map names must be in the shard it names."""
    indexes = [os.fspath(p) for p in paths if os.fspath(p).lower().endswith(INDEX_SUFFIX)
               and (os.path.isfile(p) or _is_url(os.fspath(p)))]
    if not indexes:  # no set of every tensor without need
        return
    where = {(s.path, t.name) for s in sources for t in s.tensors}
    for p in indexes:
        for name, shard in weight_map(p).items():
            if (_shard_path(p, shard), name) not in where:
                raise InputError(p, f"weight_map puts tensor {name!r} in {shard}, which does not hold it")


CONTAINER = Index()
