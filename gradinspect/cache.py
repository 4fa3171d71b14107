"""A disk cache of each file's exact statistics, and of each step of ``trend``, so that re-running
``trend`` reads only new files.

One entry per (file, norm type): the per-tensor :class:`~gradinspect.norms.Stats` (the scaled
sums, before any loss scale is divided out) of the file's floating tensors, as
:func:`gradinspect.pipeline.tensor_stats` computes them, written as JSON with every float
exact (``float.hex``) and a SHA-256 checksum.  Never pickle: a cache file is untrusted input.

An entry is used only when its whole key equals the file's: the cache format and the
gradinspect version, the reduction's ``CHUNK``/``SMALL``, the norm type, the absolute path,
the identity of the open descriptor the header was read through (device, inode, size,
mtime_ns, ctime_ns: ``touch -r`` and ``cp -p`` cannot set ctime back) and a hash of the
tensor list (names, dtypes with byte order, shapes, order, extents, CRCs).  A remote object
(:class:`~gradinspect.sources.remote.FsspecStore`) is keyed by its URL, endpoint, size and
version fields (ETag, version id, generation, content hash, modification time); one without
such a version field is never cached.  Anything else
(unreadable, truncated, bad JSON, a wrong checksum, another version or key) is a miss: the
file is read and the entry rewritten.  The file is still checked unchanged after its last
read (:meth:`~gradinspect.sources.Source.finish`), as without a cache.

A file changed less than :data:`SETTLE_NS` before it was read is not stored: a rewrite of
the same size within the filesystem's timestamp granularity would leave its identity
unchanged (git's "racy clean" problem).  Writes go to a temporary file in the cache
directory, then ``os.replace``: concurrent runs never see half an entry.  The cache is
bounded: after a run stores entries, the oldest (by mtime) are removed beyond
``max_files`` entries or ``max_bytes`` bytes (file and step entries together).

A *step entry* (``trend``) holds one step's whole result: its number, its
:class:`~gradinspect.trend.StepResult` (every float as its 8 bytes) and its
warnings, so a warm step costs a ``stat`` of its files and one small read,
no header parse.  Its key: the cache format and version, ``CHUNK``/``SMALL``,
every option that shapes the step (norm type, max_norm, eps, selection,
``--group-by``, ``--shards``, ``--step-pattern``, ...), the step's PATH as
given (and the working directory, when a path is relative), and the identity
(device, inode, size, mtime_ns, ctime_ns) of that PATH and of every file it
resolves to (a directory or index changes when a file is added or removed).  It is stored only when those
identities are the same after the step was computed as before it was read,
and settled (:data:`SETTLE_NS`) before it was read.  The file: a SHA-256 of the
rest, a line of JSON (key, counts, warnings), a line each of the rows' and the
tensors' names (JSON; ``null``: the rows'), then the floats and counts
as little-endian binary, and the rows' norms and shares as JSON spells them
(:attr:`~gradinspect.trend.StepResult.spellings`: a warm ``-f json`` lays them
out, it does not spell them again).  Anything else is a miss, as for file entries.  The checksum
finds damage, not forgery: an entry made by hand with a valid checksum and a well-formed layout is
served as it says (its spellings are laid out only when each is number text, ASCII digits, ``.``, ``e``,
``+``, ``-``, or one of the quoted names: see :func:`gradinspect.trend.series_spellings`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .norms import CHUNK, SMALL, Stats
from .trend import MAX_STEP, SPELLING_WIDTH, StepResult, StepTotals, packed_step, with_spellings

if TYPE_CHECKING:
    from .sources.base import Source

__all__ = ["Cache", "StepKey", "default_dir", "FORMAT", "STEP_FORMAT", "MAX_FILES", "MAX_BYTES", "SETTLE_NS"]

FORMAT = "gradinspect.cache/1"
STEP_FORMAT = "gradinspect.step/2"
MAX_FILES = 20_000  #: entries kept (one per file and norm type, one per step and options)
MAX_BYTES = 512 << 20  #: bytes kept (an entry is about 100 bytes per tensor)
SETTLE_NS = 2_000_000_000  #: a file changed more recently than this is not stored
_MAX_ENTRY = 64 << 20  # a larger entry file is not read
_SUFFIXES = (".json", ".step")  # file entries, step entries
# an entry is opened without waiting: a FIFO (or other special file) put in its place is read as empty, a miss
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


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
    sums = _float(linf), _float(s1), _float(s2), _float(sp)
    if any(x < 0 for x in sums):  # magnitudes: a negative one made a traceback (sqrt, or a complex power)
        raise ValueError("a negative sum")
    _, s1_, s2_, _ = sums
    if math.isfinite(s1_) and math.isfinite(s2_) and s2_ > s1_ * s1_ * (1.0 + 2.0**-20):
        # Σx² <= (Σ|x|)²: combine() scales by the sum of magnitudes, and a larger sum of squares overflowed there
        raise ValueError("a sum of squares beyond the square of the sum")
    return Stats(numel=_int(numel), nan=_int(nan), inf=_int(inf), linf=sums[0], exp=exp, s1=sums[1], s2=sums[2],
                 sp=sums[3], p=p)


#: The exact encoding of :class:`~gradinspect.norms.Stats` (also used by partial results, ``partial.py``).
stats_row = _stats_row
stats_of = _stats_of


def _checksum(key: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    body = json.dumps({"key": key, "stats": stats}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class StepKey:
    """The key of a step entry (:meth:`Cache.step_key`): compared whole with the entry's."""

    doc: dict[str, Any]
    paths: tuple[str, ...]  # statted again before the entry is stored
    at_ns: int  # when their identities were taken
    file: str  # the entry's file


def _identities(paths: Sequence[str]) -> list[list[Any]] | None:
    """``[path, dev, ino, size, mtime_ns, ctime_ns]`` of each path (a local file or directory), or None."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            return None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        out.append([p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _step_bytes(key: StepKey, result: StepResult, warnings: Sequence[str]) -> bytes:
    """A step entry: the SHA-256 of the rest, a line of JSON, then the floats and counts (little-endian)."""
    r, t = result, result.total
    floats = np.array([t.l1, t.l2, t.linf, t.norm, t.sq, r.clip_coef, *r.l1, *r.l2, *r.linf, *r.norm, *r.sq, *r.share],
                      dtype="<f8")
    counts = np.array([*r.nonfinite, *r.tensor_nan, *r.tensor_inf], dtype="<u8")
    zero = np.array(r.tensor_zero, dtype="u1")
    head = {"key": key.doc, "step": r.step, "sources": list(r.sources), "warnings": list(warnings),
            "total": [t.nan, t.inf, t.tensors, t.numel], "clipped": r.clipped}
    lines = [head, list(r.names), None if r.tensor_names == r.names else list(r.tensor_names)]
    body = b"".join(json.dumps(x, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n" for x in lines) + (
        floats.tobytes() + counts.tobytes() + zero.tobytes() + r.spellings.tobytes())
    return hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body


def _strings(x: Any) -> tuple[str, ...]:
    if type(x) is not list or not set(map(type, x)) <= {str}:
        raise ValueError("not a list of strings")
    return tuple(x)


def _names(line: bytes, known: dict[bytes, tuple[str, ...]]) -> tuple[str, ...]:
    """The names a line of an entry holds (a JSON list of strings), the same tuple for the same line."""
    got = known.get(line)
    if got is None:
        if len(known) > 1024:
            known.clear()
        got = known[line] = _strings(json.loads(line))
    return got


_SAME: dict[tuple[type, object, int], tuple[Any, ...]] = {}


def _same(value: object, n: int) -> tuple[Any, ...]:
    """``(value,) * n``, one tuple for all steps (a run's steps mostly hold no NaN and no all-zero tensor)."""
    key = (type(value), value, n)  # False == 0: told apart by type
    got = _SAME.get(key)
    if got is None:
        if len(_SAME) > 64:
            _SAME.clear()
        got = _SAME[key] = (value,) * n
    return got


def _step_of(data: bytes, key: StepKey, known: dict[bytes, tuple[str, ...]]
             ) -> tuple[StepResult, list[str]] | None:
    """The step and warnings in entry ``data`` when it is whole and its key is ``key``; else None (or ValueError).
    ``known``: the name lists of earlier steps, by their line (the steps of a run mostly have the same names:
    parsed once, and one tuple shared)."""
    if len(data) < 66 or data[64:65] != b"\n":
        return None
    if hashlib.sha256(memoryview(data)[65:]).hexdigest().encode("ascii") != data[:64]:
        return None
    end = data.index(b"\n", 65)
    head = json.loads(data[65:end])
    if type(head) is not dict or head.get("key") != key.doc:
        return None
    start, end = end + 1, data.index(b"\n", end + 1)
    names = _names(data[start:end], known)
    start, end = end + 1, data.index(b"\n", end + 1)
    tensor_names = names if data[start:end] == b"null" else _names(data[start:end], known)
    sources, warnings = _strings(head["sources"]), list(_strings(head["warnings"]))
    step, clipped, total = head["step"], head["clipped"], head["total"]
    if (type(step) is not int or not 0 <= step <= MAX_STEP or type(clipped) is not bool or type(total) is not list
            or len(total) != 4 or not all(type(x) is int and x >= 0 for x in total)):
        return None
    n, t = len(names), len(tensor_names)
    at = end + 1  # the binary part: floats, counts, zero flags, spellings
    if len(data) - at != 8 * (6 + 6 * n) + 8 * (n + 2 * t) + t + 2 * n * SPELLING_WIDTH:
        return None
    l1, l2, linf, norm, sq, coef = struct.unpack_from("<6d", data, at)
    floats = np.frombuffer(data, dtype="<f8", count=6 * n, offset=at + 48).reshape(6, n)
    floats = floats.astype(np.float64, copy=False)  # packed_step makes its own copy
    at += 8 * (6 + 6 * n)
    if data[at:at + 8 * (n + 2 * t)].count(0) == 8 * (n + 2 * t):  # no NaN, no Inf (most steps): shared zeros
        nonfinite, tensor_nan, tensor_inf = _same(0, n), _same(0, t), _same(0, t)
    else:
        nonfinite = struct.unpack_from(f"<{n}Q", data, at)
        counts = struct.Struct(f"<{t}Q").unpack_from
        tensor_nan, tensor_inf = counts(data, at + 8 * n), counts(data, at + 8 * (n + t))
    at += 8 * (n + 2 * t)
    zero = data[at:at + t]
    if zero.strip(b"\0\1"):
        return None
    tensor_zero = tuple(map(bool, zero)) if zero.count(0) != t else _same(False, t)
    cells = np.frombuffer(data, dtype=np.uint8, offset=at + t).reshape(2, n, SPELLING_WIDTH).copy()
    return with_spellings(packed_step(
        floats, step=step, sources=sources, total=StepTotals(l1, l2, linf, norm, sq, *total), clip_coef=coef,
        clipped=clipped, names=names, nonfinite=nonfinite, tensor_names=tensor_names, tensor_nan=tensor_nan,
        tensor_inf=tensor_inf, tensor_zero=tensor_zero), cells), warnings


class Cache:
    """The statistics cache in ``directory`` (default :func:`default_dir`); see the module docstring.

    ``hits`` and ``misses`` count the file lookups of this object (files found whole, or not);
    ``step_hits`` and ``step_misses`` its step lookups."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_files: int = MAX_FILES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.directory = os.path.abspath(os.fspath(directory) if directory is not None else default_dir())
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.step_hits = 0
        self.step_misses = 0
        self.stored = 0
        self._options: tuple[Any, str] | None = None
        self._names: dict[bytes, tuple[str, ...]] = {}
        self._made = False  # the directory made (or found) by this object

    def __repr__(self) -> str:
        return f"Cache({self.directory!r})"

    # --- keys ---------------------------------------------------------------------------------------------

    def key(self, src: Source, p: float) -> dict[str, Any] | None:
        """The key of ``src``'s entry, or None when it cannot be cached (not a local file)."""
        from . import __version__

        store = src.store
        ident = store.identity() if store is not None else None
        if store is None:
            return None
        if ident is None:  # a remote object: keyed by its URL, size and version (ETag, version id), if it has one
            fields = store.cache_key()
            if fields is None:
                return None
            return {"format": FORMAT, "version": __version__, "chunk": CHUNK, "small": SMALL, "p": float(p).hex(),
                    **fields, "tensors": _fingerprint(src)}
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
            with os.fdopen(os.open(self._file(key), _READ_FLAGS), "rb") as f:
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
        if time.time_ns() - max(key.get("mtime_ns", 0), key.get("ctime_ns", 0)) < SETTLE_NS:
            return False
        rows = {str(i): _stats_row(s) for i, s in sorted(stats.items())}
        doc = {"key": key, "stats": rows, "checksum": _checksum(key, rows)}
        data = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return self._write(self._file(key), data)

    # --- step entries ---------------------------------------------------------------------------------------

    def step_key(self, path: str, files: Sequence[str], options: Mapping[str, Any]) -> StepKey | None:
        """The key of the entry of step ``path`` (a PATH or glob match as given) whose files are ``files``,
        computed with ``options`` (JSON values: every option that shapes the step's number, numbers or
        warnings); None when ``path`` or a file is not a local file or directory."""
        from . import __version__

        at = time.time_ns()
        paths = (path, *(f for f in files if f != path))
        idents = _identities(paths)
        if idents is None:
            return None
        if self._options is None or self._options[0] is not options:
            try:
                self._options = (options, json.dumps(options, sort_keys=True, ensure_ascii=True))
            except (TypeError, ValueError, RecursionError):  # not plain values: no step entry
                return None
        opts = self._options[1]
        cwd = "" if all(os.path.isabs(p) for p in paths) else os.getcwd()  # what relative paths are in
        doc = {"format": STEP_FORMAT, "version": __version__, "chunk": CHUNK, "small": SMALL, "options": opts,
               "cwd": cwd, "files": idents}
        name = hashlib.sha256(f"{STEP_FORMAT}\0{cwd}\0{path}\0{opts}".encode("utf-8", "surrogatepass")).hexdigest()
        return StepKey(doc, paths, at, os.path.join(self.directory, name[:40] + ".step"))

    def lookup_step(self, key: StepKey) -> tuple[StepResult, list[str]] | None:
        """The step and its warnings from the entry of ``key``, or None (nothing usable)."""
        try:
            fd = os.open(key.file, _READ_FLAGS)
            try:
                size = os.fstat(fd).st_size
                data = os.read(fd, size + 1) if size <= _MAX_ENTRY else b""
            finally:
                os.close(fd)
            got = _step_of(data, key, self._names) if len(data) == size else None  # replaced, never rewritten
        except (OSError, ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError):
            got = None
        if got is None:
            self.step_misses += 1
        else:
            self.step_hits += 1
        return got

    def store_step(self, key: StepKey, result: StepResult, warnings: Sequence[str]) -> bool:
        """Write the entry of ``key`` (atomically); False when not written: a file changed since ``key`` was
        made or less than :data:`SETTLE_NS` before, or an OS error."""
        files = key.doc["files"]
        if key.at_ns - max(max(f[4], f[5]) for f in files) < SETTLE_NS or _identities(key.paths) != files:
            return False
        try:
            data = _step_bytes(key, result, warnings)
        except (ValueError, TypeError, OverflowError):
            return False
        return self._write(key.file, data)

    def _write(self, path: str, data: bytes) -> bool:
        """``data`` written to ``path`` atomically (a temporary file, then a rename); False on an OS error."""
        from .atomic import write_bytes_atomically

        for again in (False, True):
            try:
                if not self._made or again:  # made once per run, not per entry (and again if it was removed)
                    os.makedirs(self.directory, mode=0o700, exist_ok=True)
                    self._made = True
                write_bytes_atomically(path, data, prefix=".tmp-", suffix=os.path.splitext(path)[1])  # 0o600
                break
            except FileNotFoundError:
                continue
            except OSError:
                return False
        else:
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
                    if not e.name.endswith(_SUFFIXES) or not e.is_file(follow_symlinks=False):
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
