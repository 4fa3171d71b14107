"""A disk cache of each file's exact statistics, so that re-running ``trend`` reads only new files.

One entry per (file, norm type): the per-tensor :class:`~gradinspect.norms.Stats` (the scaled
sums, before any loss scale is divided out) of the file's floating tensors, as
:func:`gradinspect.pipeline.tensor_stats` computes them, written as JSON with every float
exact (``float.hex``) and a SHA-256 checksum.  Never pickle: a cache file is untrusted input.

An entry is used only when its whole key equals the file's: the cache format and the
gradinspect version, the reduction's ``CHUNK``/``SMALL``, the norm type, the absolute path,
the identity of the open descriptor the header was read through (device, inode, size,
mtime_ns, ctime_ns: ``touch -r`` and ``cp -p`` cannot set ctime back) and a hash of the
tensor list (names, dtypes with byte order, shapes, order, extents, CRCs).  Anything else
(unreadable, truncated, bad JSON, a wrong checksum, another version or key) is a miss: the
file is read and the entry rewritten.  The file is still checked unchanged after its last
read (:meth:`~gradinspect.sources.Source.finish`), as without a cache.

A file changed less than :data:`SETTLE_NS` before it was read is not stored: a rewrite of
the same size within the filesystem's timestamp granularity would leave its identity
unchanged (git's "racy clean" problem).  Writes go to a temporary file in the cache
directory, then ``os.replace``: concurrent runs never see half an entry.  The cache is
bounded: after a run stores entries, the oldest (by mtime) are removed beyond
``max_files`` entries or ``max_bytes`` bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .norms import CHUNK, SMALL, Stats
from .sources.base import Source

__all__ = ["Cache", "default_dir", "FORMAT", "MAX_FILES", "MAX_BYTES", "SETTLE_NS"]

FORMAT = "gradinspect.cache/1"
MAX_FILES = 20_000  #: entries kept (one per file and norm type)
MAX_BYTES = 512 << 20  #: bytes kept (an entry is about 100 bytes per tensor)
SETTLE_NS = 2_000_000_000  #: a file changed more recently than this is not stored
_MAX_ENTRY = 64 << 20  # a larger entry file is not read


def default_dir() -> str:
    """``$GRADINSPECT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradinspect``, else ``~/.cache/gradinspect``."""
    env = os.environ.get("GRADINSPECT_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradinspect")


def _fingerprint(src: Source) -> str:
    """A hash of the tensor list as the header describes it (names, dtypes, shapes, where the bytes are)."""
    rows = [(t.name, t.dtype, t.np_dtype.str if t.np_dtype is not None else "", t.shape, t.numel, t.nbytes, t.order,
             t.skip_reason, None if t.extent is None else tuple(t.extent), t.strides) for t in src.tensors]
    return hashlib.sha256(repr(rows).encode("utf-8", "surrogatepass")).hexdigest()


def _stats_row(s: Stats) -> list[Any]:
    return [s.numel, s.nan, s.inf, s.linf.hex(), s.exp, s.s1.hex(), s.s2.hex(), s.sp.hex()]


def _int(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError("not a count")
    return x


def _float(x: Any) -> float:
    if type(x) is not str:
        raise ValueError("not a hex float")
    return float.fromhex(x)


def _stats_of(row: Any, p: float) -> Stats:
    if type(row) is not list or len(row) != 8:
        raise ValueError("not a stats row")
    numel, nan, inf, linf, exp, s1, s2, sp = row
    if type(exp) is not int or abs(exp) > 100_000:
        raise ValueError("bad exponent")
    return Stats(numel=_int(numel), nan=_int(nan), inf=_int(inf), linf=_float(linf), exp=exp, s1=_float(s1),
                 s2=_float(s2), sp=_float(sp), p=p)


def _checksum(key: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    body = json.dumps({"key": key, "stats": stats}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


class Cache:
    """The statistics cache in ``directory`` (default :func:`default_dir`); see the module docstring.

    ``hits`` and ``misses`` count the lookups of this object (files found whole, or not)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_files: int = MAX_FILES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.directory = os.path.abspath(os.fspath(directory) if directory is not None else default_dir())
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.stored = 0

    def __repr__(self) -> str:
        return f"Cache({self.directory!r})"

    # --- keys ---------------------------------------------------------------------------------------------

    def key(self, src: Source, p: float) -> dict[str, Any] | None:
        """The key of ``src``'s entry, or None when it cannot be cached (not a local file)."""
        from . import __version__

        store = src.store
        ident = store.identity() if store is not None else None
        if store is None or ident is None:
            return None
        dev, ino, size, mtime_ns, ctime_ns = ident
        return {"format": FORMAT, "version": __version__, "chunk": CHUNK, "small": SMALL, "p": float(p).hex(),
                "path": store.key, "dev": dev, "ino": ino, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
                "tensors": _fingerprint(src)}

    def _file(self, key: Mapping[str, Any]) -> str:
        name = hashlib.sha256(f"{FORMAT}\0{key['path']}\0{key['p']}".encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.directory, name[:40] + ".json")

    # --- lookup and store ---------------------------------------------------------------------------------

    def lookup(self, src: Source, p: float, key: dict[str, Any] | None = None) -> dict[int, Stats]:
        """The cached statistics of ``src``'s tensors, by index in ``src.tensors`` (empty: nothing usable).
        ``key``: :meth:`key` of ``src`` and ``p``, when the caller has it."""
        key = key or self.key(src, p)
        if key is None:
            return {}
        try:
            with open(self._file(key), "rb") as f:
                raw = f.read(_MAX_ENTRY + 1)
            if len(raw) > _MAX_ENTRY:
                return {}
            doc = json.loads(raw.decode("utf-8"))
            if type(doc) is not dict or doc.get("key") != key:
                return {}
            stats = doc.get("stats")
            if type(stats) is not dict or doc.get("checksum") != _checksum(key, stats):
                return {}
            n = len(src.tensors)
            out: dict[int, Stats] = {}
            for k, row in stats.items():
                i = int(k)
                if not 0 <= i < n or str(i) != k or not src.tensors[i].is_float:
                    return {}
                out[i] = _stats_of(row, p)
            return out
        except (OSError, ValueError, TypeError, KeyError, RecursionError, OverflowError):
            return {}

    def store(self, src: Source, p: float, stats: Mapping[int, Stats], key: dict[str, Any] | None = None) -> bool:
        """Write ``src``'s entry (atomically); False when not written (not cacheable, too recent, an OS error)."""
        key = key or self.key(src, p)
        if key is None or not stats:
            return False
        if time.time_ns() - max(key["mtime_ns"], key["ctime_ns"]) < SETTLE_NS:
            return False
        rows = {str(i): _stats_row(s) for i, s in sorted(stats.items())}
        doc = {"key": key, "stats": rows, "checksum": _checksum(key, rows)}
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._file(key))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            return False
        self.stored += 1
        return True

    def prune(self) -> int:
        """Remove the oldest entries beyond ``max_files`` or ``max_bytes`` (and stale temporary files);
        returns how many were removed."""
        try:
            found = []
            now = time.time()
            with os.scandir(self.directory) as it:
                for e in it:
                    if not e.name.endswith(".json") or not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                    if e.name.startswith(".tmp-"):
                        if now - st.st_mtime > 3600:  # left behind by a killed run
                            _unlink(e.path)
                        continue
                    found.append((st.st_mtime_ns, st.st_size, e.path))
        except OSError:
            return 0
        found.sort(reverse=True)  # newest first
        kept = total = removed = 0
        for _, size, path in found:
            if kept < self.max_files and total + size <= self.max_bytes:
                kept += 1
                total += size
            else:
                removed += _unlink(path)
        return removed


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
        return 1
    except OSError:
        return 0


def cached_stats(cache: Cache, src: Source, floats: Sequence[Any], p: float,
                 compute: Callable[[list[Any]], list[Stats]], progress: Callable[[int], None] | None = None,
                 ) -> list[Stats]:
    """Statistics of ``floats`` (tensors of ``src``): from ``cache`` when it has them all, else the missing
    ones computed with ``compute(tensors) -> [Stats]`` and the entry rewritten.  ``progress`` is told the
    bytes of the tensors found in the cache."""
    index = {id(t): i for i, t in enumerate(src.tensors)}
    key = cache.key(src, p)
    have = cache.lookup(src, p, key)
    want = [index[id(t)] for t in floats]
    missing = [t for t, i in zip(floats, want, strict=True) if i not in have]
    if progress is not None and len(missing) < len(floats):
        progress(sum(t.nbytes for t, i in zip(floats, want, strict=True) if i in have))
    if missing:
        cache.misses += 1
        have.update(zip((index[id(t)] for t in missing), compute(missing), strict=True))
        cache.store(src, p, have, key)
    else:
        cache.hits += 1
    return [have[i] for i in want]
