"""Exact partial results: ``--part I/N --partial OUT`` computes one share of a run, ``merge`` combines them.

A part run computes its command twice through :mod:`gradinspect.hooks`:

1. a *plan run* reads headers only (every statistic a placeholder) and records what the command
   would read: each source's selected floating tensors (cut into engine work units by
   :func:`gradinspect.engine.plan`, from the descriptions alone), each pair of tensors compared
   element by element (``diff``, ``--shards replicas``), the steps of a ``trend``;
2. the plan is cut into N parts: the work units, in plan order (files, then tensors, then chunk
   ranges), into N contiguous runs of about equal bytes; the element-wise comparisons by tensor name
   (all comparisons of one name in one part, so a choice that depends on the data is made with it);
3. a *compute run* runs the part's own units with an executor (any: the results are merged in plan
   order later), its own comparisons, and a SHA-256 of the bytes of every unit of a tensor that shares
   its dtype and shape with another tensor of its set (copy detection needs the bytes; merge does not
   read files).  The numbers are written as ``float.hex`` (the cache's encoding) to OUT, atomically,
   with the identity of every input file, the command and its options, I, N and a digest of the plan.

``merge`` checks the parts (one format, command, options, plan, and the same file identities; every
part from 0 to N-1 once) and computes the command again with every read answered from the parts: the
report is the one a plain run prints, bit for bit.  Part numbers count from 0.

The file (canonical JSON, one object): ``format`` (``gradinspect.partial/1``), ``version``, ``command``,
``options`` (floats as ``{"f": hex}``), ``format_default`` (a ``--format`` the part was given), ``part``
([I, N]), ``plan`` (SHA-256 of the plan: command, options, headers, work units, comparisons), ``units``
(how many in the plan), ``files`` ({store key: path as given, size, mtime_ns, header: SHA-256 of the
parsed header}), ``sets`` (each opened set's PATHs, notes and sources' headers), ``steps``, ``requests``
(per source: the tensors reduced, their units' span in the plan), ``results`` (per own unit: [global
index, request, unit, [[tensor, chunk, Stats as float.hex, CRC-32]]]), ``pairs`` (own comparisons:
PairStats), ``digests`` (own fingerprints), ``checksum`` (SHA-256 of all the rest).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import hooks
from .cache import stats_of, stats_row
from .errors import InputError
from .norms import CHUNK, Stats

__all__ = ["FORMAT", "COMMANDS", "parse_part", "compute", "run_part", "load_parts", "merged"]

FORMAT = "gradinspect.partial/1"
COMMANDS = ("norms", "check", "diff", "trend")
MAX_PARTS = 100_000
_MAX_FILE = 4 << 30  # a larger partial file is not read

Key = tuple[str, int]  # a tensor: its store key (an absolute path) and its index in its source


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"``: part I (counted from 0) of N; ValueError saying what is wrong."""
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise ValueError(f"{text!r} is not I/N (part I of N, counted from 0: 0/4 ... 3/4)")
    index, count = int(i), int(n)
    if not 1 <= count <= MAX_PARTS:
        raise ValueError(f"{text!r}: N must be from 1 to {MAX_PARTS:,}")
    if index >= count:
        raise ValueError(f"{text!r}: I counts from 0, so it must be < N (0 to {count - 1})")
    return index, count


# --- the computation of each command ---------------------------------------------------------------


def compute(command: str, o: Mapping[str, Any], jobs: int | None = None, progress: Any = None,
            on_step: Callable[[Any, Any], None] | None = None) -> Any:
    """The report of ``command`` with options ``o`` (as the CLI passes them to the library)."""
    if command == "norms":
        from .api import inspect

        return inspect(list(o["paths"]), norm_type=o["norm_type"], max_norm=o["max_norm"], eps=o["eps"],
                       include=o["include"], exclude=o["exclude"], group_by=o["group_by"], group_sep=o["group_sep"],
                       sort=o["sort"], top=o["top"], shards=o["shards"], jobs=jobs, progress=progress,
                       dedup=o["dedup"], loss_scale=o["loss_scale"], allow_outside_index=o["allow_outside_index"],
                       void_as=o.get("void_as"))
    if command == "check":
        from .api import check
        from .check import rules_from

        return check(list(o["paths"]), rules_from(dict(o)), norm_type=o["norm_type"], max_norm=o["max_norm"],
                     eps=o["eps"], include=o["include"], exclude=o["exclude"], shards=o["shards"], jobs=jobs,
                     progress=progress, dedup=o["dedup"], loss_scale=o["loss_scale"],
                     allow_outside_index=o["allow_outside_index"], void_as=o.get("void_as"))
    if command == "diff":
        from .api import diff

        return diff(o["a"], o["b"], rtol=o["rtol"], atol=o["atol"], min_cosine=o["min_cosine"],
                    allow_missing=o["allow_missing"], include=o["include"], exclude=o["exclude"],
                    strip_prefix=o["strip_prefix"], strip_prefix_a=o["strip_prefix_a"],
                    strip_prefix_b=o["strip_prefix_b"], allow_outside_index=o["allow_outside_index"],
                    shards=o["shards"], shards_a=o["shards_a"], shards_b=o["shards_b"], void_as=o.get("void_as"))
    if command == "trend":
        from .runs import trend
        from .trend import evaluate

        report = trend(list(o["paths"]), norm_type=o["norm_type"], max_norm=o["max_norm"], eps=o["eps"],
                       include=o["include"], exclude=o["exclude"], group_by=o["group_by"], group_sep=o["group_sep"],
                       shards=o["shards"], jobs=jobs, dedup=o["dedup"], loss_scale=o["loss_scale"],
                       allow_outside_index=o["allow_outside_index"], step_pattern=o["step_pattern"],
                       window=o["window"], spike_factor=o["spike_factor"], clip_target=o["clip_target"],
                       on_step=on_step, progress=progress, cache=None, void_as=o.get("void_as"))
        return evaluate(report, o["fail_on"], o["max_clip_fraction"])
    raise ValueError(f"unknown command {command!r}")


# --- plain-data encodings ------------------------------------------------------------------------------


def _enc(v: Any) -> Any:
    """Options as JSON: floats exact (``{"f": hex}``), tuples as lists."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return {"f": v.hex()}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    raise TypeError(f"cannot record option value {v!r}")


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        return float.fromhex(v["f"])
    if isinstance(v, list):
        return tuple(_dec(x) for x in v)
    return v


def _stats(s: Stats) -> list[Any]:
    return [*stats_row(s), s.p.hex()]


def _stats_back(row: Any) -> Stats:
    if type(row) is not list or len(row) != 9 or type(row[8]) is not str:
        raise ValueError("not a stats row")
    return stats_of(row[:8], float.fromhex(row[8]))


def _pair(ps: Any) -> list[Any]:
    return [_stats(ps.a), _stats(ps.b), _stats(ps.d), ps.dot.exp, ps.dot.s.hex()]


def _pair_back(row: Any) -> Any:
    from .diff import Dot, PairStats

    a, b, d, exp, s = row
    if type(exp) is not int:
        raise ValueError("not a pair row")
    return PairStats(_stats_back(a), _stats_back(b), _stats_back(d), Dot(exp, float.fromhex(s)))


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _tensor_row(t: Any, path: str) -> list[Any]:
    ext = None if t.extent is None else list(t.extent)
    dt = None if t.np_dtype is None else t.np_dtype.str
    return [t.name, t.dtype, list(t.shape), t.numel, t.nbytes, t.skip_reason, dt, ext, t.order,
            None if t.source == path else t.source, None if t.strides is None else list(t.strides)]


def _source_record(src: Any) -> dict[str, Any]:
    rows = [_tensor_row(t, src.path) for t in src.tensors]
    header = hashlib.sha256(_canonical([rows, src.metadata, src.kind])).hexdigest()
    store = src.store
    ident = store.identity() if store is not None else None
    # a local file's (device, inode, size, mtime_ns, ctime_ns): device and inode differ between nodes
    size, mtime = (ident[2], ident[3]) if isinstance(ident, tuple) and len(ident) == 5 else (src.size, None)
    if mtime is None and src.store is not None and os.path.isdir(src.path):  # a directory that is one container
        from .sources.paths import member_files

        files = [(os.path.basename(f), st.st_size, st.st_mtime_ns)
                 for f in member_files(src.path) for st in (os.stat(f),)]
        size, mtime = sum(f[1] for f in files), max((f[2] for f in files), default=None)
        header = hashlib.sha256(_canonical([header, files])).hexdigest()  # every file's size and mtime
    version = store.cache_key() if store is not None and ident is None else None
    if version is not None:  # a remote object: its version (ETag, version id) and modification time, not its URL
        header = hashlib.sha256(_canonical([header, {k: v for k, v in version.items()
                                                     if k not in ("path", "endpoint")}])).hexdigest()
    elif store is not None and ident is None and not os.path.isdir(src.path):
        # a URL with no version token (file://, a plain HTTP server): what its listing says (size, mtime)
        spec = store.reopen_spec()
        if spec is not None:
            header = hashlib.sha256(_canonical([header, repr(spec[2])])).hexdigest()
    return {"path": src.path, "key": store.key if store is not None else src.path, "kind": src.kind,
            "size": src.size, "metadata": [[k, v] for k, v in src.metadata.items()], "tensors": rows,
            "identity": {"size": size, "mtime_ns": mtime, "header": header}}


def _virtual_source(rec: Mapping[str, Any]) -> Any:
    """A source with the recorded headers and no bytes (any read fails)."""
    from .sources import Extent, Source, TensorDesc

    tensors = []
    for name, dtype, shape, numel, nbytes, skip, dt, ext, order, source, strides in rec["tensors"]:
        tensors.append(TensorDesc(name=name, source=source if source is not None else rec["path"], dtype=dtype,
                                  shape=tuple(shape), numel=numel, nbytes=nbytes, skip_reason=skip,
                                  np_dtype=None if dt is None else np.dtype(dt),
                                  extent=None if ext is None else Extent(*ext), order=order,
                                  strides=None if strides is None else tuple(strides)))
    return Source(path=rec["path"], kind=rec["kind"], tensors=tensors, metadata={k: v for k, v in rec["metadata"]},
                  size=rec["size"])


def _strip(name: str, prefixes: Sequence[str]) -> str:
    for pre in prefixes:
        if pre and name.startswith(pre):
            return name[len(pre):]
    return name


def _unit(u: Any) -> list[Any]:
    return [u.kind, u.store, u.offset, u.size, u.encoding, list(u.tensors), u.part, u.nbytes]


def _unit_back(row: Sequence[Any]) -> Any:
    from .engine import WorkUnit

    kind, store, offset, size, encoding, tensors, part, nbytes = row
    return WorkUnit(kind, store, offset, size, encoding, tuple(tensors), part, nbytes)


def _placeholder(numel: int, p: float, k: int = 0) -> Stats:
    """Statistics standing for data not read: finite, non-zero, and told apart by ``k`` (a largest magnitude
    of its own, so that copy detection compares nothing)."""
    n = float(max(numel, 1))
    return Stats(numel=numel, nan=0, inf=0, linf=1.0 + k, exp=0, s1=n, s2=n, sp=n, p=p)


def _placeholder_pair(a: Sequence[Any], b: Sequence[Any]) -> Any:
    from .diff import Dot, PairStats

    na, nb = sum(t.numel for _, t in a), sum(t.numel for _, t in b)
    zero = Stats(numel=na, p=2.0)
    return PairStats(_placeholder(na, 2.0), _placeholder(nb, 2.0), zero, Dot(0, float(max(na, 1))))


# --- part runs ---------------------------------------------------------------------------------------------


@dataclass
class _Request:
    key: tuple[str, tuple[int, ...]]  # store key, indices of the tensors in the source
    set_no: int
    entries: list[Any]
    units: list[Any] = field(default_factory=list)
    first: int = 0  # global index of its first unit


class _Recorder:
    """What every part-run hook shares: the sets opened, in order, and which set a tensor is in."""

    def __init__(self, command: str, options: Mapping[str, Any]) -> None:
        self.command = command
        self.options = options
        self.sets: list[dict[str, Any]] = []
        self.set_of: dict[int, int] = {}  # id(source) -> set number
        self.index: dict[int, Key] = {}  # id(tensor) -> its key
        self.steps: list[Any] | None = None
        self.counter = itertools.count()

    def placeholders(self, entries: Sequence[Any], p: float) -> list[Stats]:
        return [_placeholder(t.numel, p, next(self.counter)) for t in entries]

    def open_paths(self, paths: Sequence[Any], allow_repeats: bool = False, notes: list[str] | None = None,
                   allow_outside_index: bool = False, void_as: str | None = None) -> list[Any]:
        from .sources import open_paths

        got = open_paths(paths, allow_repeats=allow_repeats, notes=notes, allow_outside_index=allow_outside_index,
                         void_as=void_as)
        n = len(self.sets)
        self.sets.append({"paths": [os.fspath(p) for p in paths], "allow_repeats": allow_repeats,
                          "allow_outside_index": allow_outside_index, "void_as": void_as, "notes": list(notes or ()),
                          "sources": [_source_record(s) for s in got]})
        for s in got:
            self.set_of[id(s)] = n
            key = s.store.key if s.store is not None else s.path
            for i, t in enumerate(s.tensors):
                self.index[id(t)] = (key, i)
        return got

    def find_steps(self, paths: Any, step_pattern: str | None, allow_outside_index: bool,
                   void_as: str | None = None) -> list[Any]:
        from .runs import StepPath, find_steps

        if self.steps is None:
            with hooks.suspended():
                self.steps = find_steps(paths, step_pattern, allow_outside_index, void_as)
            return self.steps
        return [StepPath(s.step, s.path, s.files) for s in self.steps]

    def request_key(self, src: Any, entries: Sequence[Any]) -> tuple[str, tuple[int, ...]]:
        ids = [self.index[id(t)] for t in entries]
        return ids[0][0], tuple(i for _, i in ids)

    def owner(self, a: Sequence[Any], b: Sequence[Any]) -> tuple[Any, ...]:
        """Whose work a comparison is: all comparisons of one name (of one set, except diff) together."""
        src, t = a[0]
        n = self.set_of.get(id(src), 0)
        if self.command == "diff":
            o = self.options
            prefixes = (*o["strip_prefix_a"], *o["strip_prefix"]) if n == 0 else (*o["strip_prefix_b"],
                                                                                   *o["strip_prefix"])
            return ("", _strip(t.name, prefixes))
        return (self.sets[n]["paths"][0] if self.sets else "", n, t.name)

    def pair_key(self, a: Sequence[Any], b: Sequence[Any]) -> str:
        return json.dumps([[list(self.index[id(t)]) for _, t in a], [list(self.index[id(t)]) for _, t in b]])


class _Planner(_Recorder):
    """The plan run: headers only; records reads and comparisons."""

    def __init__(self, command: str, options: Mapping[str, Any]) -> None:
        super().__init__(command, options)
        self.requests: dict[tuple[str, tuple[int, ...]], _Request] = {}
        self.owners: dict[tuple[Any, ...], int] = {}  # owner key -> bytes, in first-seen order

    def reduce(self, src: Any, entries: Sequence[Any], p: float, jobs: Any = None, progress: Any = None
               ) -> list[Stats]:
        key = self.request_key(src, entries)
        if key not in self.requests:
            self.requests[key] = _Request(key, self.set_of.get(id(src), 0), list(entries))
        return self.placeholders(entries, p)

    def pair_stats(self, a: Sequence[Any], b: Sequence[Any], tools: Any) -> Any:
        k = self.owner(a, b)
        self.owners[k] = self.owners.get(k, 0) + sum(t.nbytes for _, t in (*a, *b))
        return _placeholder_pair(a, b)

    def same_bytes(self, *args: Any) -> bool:
        return False


def _cut(weights: Sequence[int], n: int) -> list[int]:
    """The part of each item: contiguous runs of about equal total weight (an item of weight 0 counts 1)."""
    w = [max(x, 1) for x in weights]
    total = sum(w)
    out, before = [], 0
    for x in w:
        out.append(min(n - 1, before * n // total) if total else 0)
        before += x
    return out


@dataclass
class _Plan:
    requests: list[_Request]
    units: list[tuple[int, Any]]  # (request number, unit) in plan order
    unit_part: list[int]
    owner_part: dict[tuple[Any, ...], int]
    candidates: dict[int, set[int]]  # request number -> indices into its entries fingerprinted
    digest: str


def _make_plan(planner: _Planner, n: int, describe: Any) -> _Plan:
    from .engine import plan

    requests = list(planner.requests.values())
    units: list[tuple[int, Any]] = []
    for r_no, req in enumerate(requests):
        req.units = plan(req.entries, CHUNK)
        req.first = len(units)
        units.extend((r_no, u) for u in req.units)
    unit_part = _cut([u.nbytes for _, u in units], n)
    owners = list(planner.owners.items())
    owner_part = dict(zip((k for k, _ in owners), _cut([b for _, b in owners], n), strict=True))
    # tensors that may be exact copies: the same dtype, byte order, shape and order as another in their set
    shapes: dict[tuple[Any, ...], int] = {}

    def look(req: _Request, t: Any) -> tuple[Any, ...]:
        return (req.set_no, t.dtype, t.shape, t.order)

    for req in requests:
        for t in req.entries:
            shapes[look(req, t)] = shapes.get(look(req, t), 0) + 1
    candidates = {r_no: {i for i, t in enumerate(req.entries) if shapes[look(req, t)] > 1 and t.numel}
                  for r_no, req in enumerate(requests)}
    body = {"describe": describe, "requests": [[list(r.key), r.set_no] for r in requests],
            "units": [[r, _unit(u)] for r, u in units], "owners": [[list(k), b] for k, b in owners]}
    return _Plan(requests, units, unit_part, owner_part, candidates, hashlib.sha256(_canonical(body)).hexdigest())


class _Worker(_Recorder):
    """The compute run: the part's own units, comparisons and fingerprints."""

    def __init__(self, command: str, options: Mapping[str, Any], plan: _Plan, part: int, jobs: int | None,
                 executor: Any = None) -> None:
        super().__init__(command, options)
        self.plan = plan
        self.part = part
        self.jobs = jobs
        self.executor = executor
        self.by_key = {r.key: (r_no, r) for r_no, r in enumerate(plan.requests)}
        self.done: set[int] = set()
        self.results: dict[int, list[Any]] = {}  # global unit index -> [[tensor, chunk, stats row, crc]]
        self.pairs: dict[str, list[Any]] = {}
        self.digests: dict[int, list[Any]] = {}  # global unit index -> [[tensor, [sha256 of each piece]]]

    def reduce(self, src: Any, entries: Sequence[Any], p: float, jobs: Any = None, progress: Any = None
               ) -> list[Stats]:
        from .engine import default_jobs
        from .executors import ThreadExecutor

        key = self.request_key(src, entries)
        if key not in self.by_key:
            raise InputError(src.path, "its tensors changed since this part's plan was made")
        r_no, req = self.by_key[key]
        if r_no not in self.done:
            self.done.add(r_no)
            mine = [k for k in range(len(req.units)) if self.plan.unit_part[req.first + k] == self.part]
            if mine:
                assert src.store is not None
                executor = self.executor or ThreadExecutor(default_jobs() if self.jobs is None else self.jobs)
                units = [req.units[k] for k in mine]
                got = executor.run(units, list(entries), {src.store.key: src.store}, p, CHUNK, progress)
                for k, parts in zip(mine, got, strict=True):
                    self.results[req.first + k] = [[i, c, _stats(st), crc] for i, c, st, crc in parts]
                want = self.plan.candidates.get(r_no, set())
                todo = [k for k in mine if want.intersection(req.units[k].tensors)]
                if todo:
                    from concurrent.futures import ThreadPoolExecutor

                    threads = max(1, min(default_jobs() if self.jobs is None else self.jobs, len(todo)))
                    local = threading.local()
                    listed = list(entries)

                    def run(k: int) -> list[Any]:
                        if not hasattr(local, "buf"):
                            from .sources import ChunkBuffer

                            local.buf = ChunkBuffer(CHUNK)
                        return _fingerprints(src.store, req.units[k], listed, want, local.buf)

                    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL
                        for k, sums in zip(todo, pool.map(run, todo), strict=True):
                            self.digests[req.first + k] = sums
        return self.placeholders(entries, p)

    def pair_stats(self, a: Sequence[Any], b: Sequence[Any], tools: Any) -> Any:
        from .pipeline import pair_stats

        if self.plan.owner_part.get(self.owner(a, b), 0) != self.part:
            return _placeholder_pair(a, b)
        with hooks.suspended():
            ps = pair_stats(a, b, tools)
        self.pairs[self.pair_key(a, b)] = _pair(ps)
        return ps

    def same_bytes(self, *args: Any) -> bool:
        return False


def _fingerprints(store: Any, u: Any, entries: list[Any], want: set[int], buf: Any) -> list[Any]:
    """SHA-256 of each CHUNK-element piece of the wanted tensors of unit ``u``, in native byte order
    (what the byte comparison of copies compares); ``store`` is open, ``buf`` a ChunkBuffer of CHUNK."""
    from .sources.base import inflate_pieces

    t = entries[u.tensors[0]]
    dtype = t.np_dtype

    def sha(x: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(x).view(np.uint8).data).hexdigest()

    if u.kind == "raw":
        store.read_into(buf.view[: u.size], u.offset)
        return [[u.tensors[0], u.part, [sha(buf.array(dtype, u.size // dtype.itemsize))]]]
    if u.kind == "stream":
        sums = [sha(buf.array(dtype, n // dtype.itemsize)) for n in inflate_pieces(store, t, buf)]
        return [[u.tensors[0], 0, sums]]
    if u.kind == "strided":  # units in storage order, copies compare logical order: the first unit hashes it all
        from .sources.views import view_chunks

        if u.part:
            return []
        return [[u.tensors[0], 0, [sha(x) for x in view_chunks(store, t.extent.offset, dtype, t.shape, t.strides,
                                                                buf)]]]
    span = buf.view[: u.size]
    store.read_into(span, u.offset)
    out = []
    for i in u.tensors:
        if i in want:
            e = entries[i]
            rel = e.extent.offset - u.offset
            x = np.frombuffer(span[rel : rel + e.nbytes], dtype=e.np_dtype)
            out.append([i, 0, [sha(x if e.np_dtype.isnative else x.astype(e.np_dtype.newbyteorder("=")))]])
    return out


def _identities(sets: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sets:
        for src in s["sources"]:
            out.setdefault(src["key"], {"path": src["path"], **src["identity"]})
    return out


def run_part(command: str, options: Mapping[str, Any], part: tuple[int, int], out: str,
             jobs: int | None = None, fmt: str | None = None, executor: Any = None) -> None:
    """Compute part ``part`` = (I, N) of ``command`` and write it to ``out`` (atomically).

    ``executor``: what runs the part's work units (an :class:`~gradinspect.executors.Executor`; default
    ``jobs`` threads); the units are the same whatever runs them."""
    from . import __version__

    i, n = part
    recorded = {k: _enc(v) for k, v in sorted(options.items())}
    planner = _Planner(command, options)
    with hooks.using(planner):
        compute(command, options, jobs)
    describe = {"command": command, "options": recorded,
                "sets": [{**s, "sources": [{k: v for k, v in src.items() if k != "identity"} for src in s["sources"]]}
                         for s in planner.sets],
                "steps": None if planner.steps is None else [[s.step, s.path, list(s.files)] for s in planner.steps]}
    plan = _make_plan(planner, n, describe)
    worker = _Worker(command, options, plan, i, jobs, executor)
    worker.steps = planner.steps
    with hooks.using(worker):
        compute(command, options, jobs)
    before, after = _identities(planner.sets), _identities(worker.sets)
    for key, ident in after.items():
        if before.get(key) != ident:
            raise InputError(ident["path"], "changed while this part was computed")
    units = {g: [plan.units[g][0], _unit(plan.units[g][1]), self_res]
             for g, self_res in sorted(worker.results.items())}
    body = {
        "format": FORMAT, "version": __version__, "command": command, "options": recorded, "format_default": fmt,
        "part": [i, n], "plan": plan.digest, "units": len(plan.units),
        "files": before, "sets": planner.sets,
        "steps": describe["steps"],
        "requests": [[list(r.key), len(r.units), r.first] for r in plan.requests],
        "results": [[g, *v] for g, v in units.items()],
        "pairs": sorted(worker.pairs.items()),
        "digests": sorted(worker.digests.items()),
    }
    data = _canonical({**body, "checksum": hashlib.sha256(_canonical(body)).hexdigest()})
    _write(out, data)


def _write(path: str, data: bytes) -> None:
    from .atomic import ordinary_mode, write_bytes_atomically

    try:  # as an ordinary new file: a merge may run as another user
        write_bytes_atomically(path, data, prefix=".partial-", mode=ordinary_mode())
    except OSError as e:
        raise InputError(path, f"cannot write the partial result ({e.strerror or e})") from None


# --- merge -------------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """Checked parts of one run, ready to be merged."""

    command: str
    options: dict[str, Any]
    fmt: str | None
    docs: list[dict[str, Any]]
    paths: list[str] = field(default_factory=list)  # of docs


def _load(path: str) -> dict[str, Any]:
    def bad(what: str) -> InputError:
        return InputError(path, f"not a usable partial result: {what}")

    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror or e})") from None
    if len(raw) > _MAX_FILE:
        raise bad("larger than 4 GiB")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise bad("not JSON (truncated or another file?)") from None
    if type(doc) is not dict or doc.get("format") != FORMAT:
        found = doc.get("format") if type(doc) is dict else None
        raise bad(f"its format is {found!r}, not {FORMAT}" if isinstance(found, str) else f"no {FORMAT} format field")
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if doc.get("checksum") != hashlib.sha256(_canonical(body)).hexdigest():
        raise bad("its checksum does not match (the file was changed or damaged)")
    for key, kind in _FIELDS.items():
        if type(doc.get(key)) is not kind:
            raise bad(f"field {key!r} is missing or not a {kind.__name__}")
    part = doc["part"]
    if (doc["command"] not in COMMANDS or len(part) != 2 or not all(type(x) is int for x in part)
            or not 0 <= part[0] < part[1] <= MAX_PARTS):
        raise bad("its command or part number is not one gradinspect writes")
    return doc


_FIELDS: dict[str, type] = {"version": str, "command": str, "options": dict, "part": list, "plan": str, "units": int,
                            "files": dict, "sets": list, "requests": list, "results": list, "pairs": list,
                            "digests": list}


def load_parts(paths: Sequence[str]) -> Parts:
    """Read and check the partial results of one run: exit-2 errors name the part that is wrong."""
    from . import __version__

    if not paths:
        raise InputError("merge", "no partial results given")
    docs = [(p, _load(p)) for p in paths]
    p0, d0 = docs[0]
    for p, d in docs:
        if d["version"] != __version__:
            raise InputError(p, f"written by gradinspect {d['version']}, not {__version__}")
        for what, field_ in (("the command", "command"), ("the options", "options")):
            if d[field_] != d0[field_]:
                diff = ""
                if field_ == "options":
                    names = sorted(k for k in {*d["options"], *d0["options"]}
                                   if d["options"].get(k) != d0["options"].get(k))
                    diff = f" ({', '.join(names)})"
                raise InputError(p, f"{what} differ from those of {p0}{diff}: parts of another run")
        if d["part"][1] != d0["part"][1]:
            raise InputError(p, f"is part {d['part'][0]}/{d['part'][1]}, but {p0} is one of {d0['part'][1]}")
    n = d0["part"][1]
    seen: dict[int, str] = {}
    for p, d in docs:
        i = d["part"][0]
        if i in seen:
            raise InputError(p, f"part {i}/{n} twice (also {seen[i]})")
        seen[i] = p
    missing = [i for i in range(n) if i not in seen]
    if missing:
        listed = ", ".join(f"{i}/{n}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError("merge", f"{len(missing)} of {n} parts missing: {listed}")
    ident: dict[str, tuple[str, Any]] = {}
    for p, d in sorted(docs, key=lambda x: x[1]["part"][0]):
        for key, rec in d["files"].items():
            first = ident.setdefault(key, (p, rec))
            if first[1] != rec:
                changed = [f for f in ("size", "mtime_ns", "header") if first[1].get(f) != rec.get(f)]
                raise InputError(rec["path"], f"changed between parts: its {', '.join(changed)} in {p} differ from "
                                 f"those in {first[0]}")
    for p, d in docs:
        if d["plan"] != d0["plan"]:
            raise InputError(p, f"its plan differs from that of {p0} (other inputs or options): parts of another run")
    ordered = sorted(docs, key=lambda x: x[1]["part"][0])
    return Parts(d0["command"], {k: _dec(v) for k, v in d0["options"].items()}, d0["format_default"],
                 [d for _, d in ordered], [p for p, _ in ordered])


class _Replay:
    """merge's hook: every read answered from the parts."""

    def __init__(self, parts: Parts) -> None:
        from .engine import Part, WorkUnit

        d0 = parts.docs[0]
        self.where = "merge"
        self.sets: dict[str, tuple[list[Any], list[str]]] = {}
        self.key_of: dict[int, str] = {}
        self.index: dict[int, Key] = {}
        for s in d0["sets"]:
            k = json.dumps([s["paths"], s["allow_repeats"], s["allow_outside_index"], s.get("void_as")])
            if k not in self.sets:
                sources = [_virtual_source(r) for r in s["sources"]]
                for src, r in zip(sources, s["sources"], strict=True):
                    self.key_of[id(src)] = r["key"]
                    for i, t in enumerate(src.tensors):
                        self.index[id(t)] = (r["key"], i)
                self.sets[k] = (sources, list(s["notes"]))
        self.steps = d0["steps"]
        results: dict[int, tuple[WorkUnit, list[Part]]] = {}
        self.pairs: dict[str, Any] = {}
        self.digests: dict[tuple[int, int], dict[int, list[str]]] = {}
        for n, d in enumerate(parts.docs):
            try:  # decoded now: a part that is not what gradinspect writes is named
                for g, _, unit, res in d["results"]:
                    results[g] = (_unit_back(unit), [(i, c, _stats_back(st), crc) for i, c, st, crc in res])
                for k, row in d["pairs"]:
                    self.pairs[k] = _pair_back(row)
                for g, rows in d["digests"]:
                    for i, piece, sums in rows:
                        self.digests.setdefault((g, i), {})[piece] = sums
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                where = parts.paths[n] if n < len(parts.paths) else "merge"
                raise InputError(where, f"not a usable partial result: {type(e).__name__}: {e}") from None
        if len(results) != d0["units"]:
            raise InputError("merge", f"the parts hold {len(results)} of the plan's {d0['units']} work units")
        self.requests: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {
            (k[0], tuple(k[1])): (count, first) for k, count, first in d0["requests"]}
        self.results = results

    def open_paths(self, paths: Sequence[Any], allow_repeats: bool = False, notes: list[str] | None = None,
                   allow_outside_index: bool = False, void_as: str | None = None) -> list[Any]:
        k = json.dumps([[os.fspath(p) for p in paths], allow_repeats, allow_outside_index, void_as])
        if k not in self.sets:
            raise InputError(self.where, f"the parts hold no record of the files {', '.join(map(os.fspath, paths))}")
        sources, said = self.sets[k]
        if notes is not None:
            notes.extend(said)
        return list(sources)

    def find_steps(self, paths: Any, step_pattern: str | None, allow_outside_index: bool,
                   void_as: str | None = None) -> list[Any]:
        from .runs import StepPath

        if self.steps is None:
            raise InputError(self.where, "the parts hold no steps")
        return [StepPath(s, p, tuple(f)) for s, p, f in self.steps]

    def _request(self, src: Any, entries: Sequence[Any]) -> tuple[tuple[str, tuple[int, ...]], int, int]:
        ids = [self.index[id(t)] for t in entries]
        key = (ids[0][0], tuple(i for _, i in ids))
        if key not in self.requests:
            raise InputError(src.path, "the parts hold no statistics of these tensors")
        return (key, *self.requests[key])

    def reduce(self, src: Any, entries: Sequence[Any], p: float, jobs: Any = None, progress: Any = None
               ) -> list[Stats]:
        from .engine import merge

        _, count, first = self._request(src, entries)
        units, results = [], []
        for g in range(first, first + count):
            u, res = self.results[g]
            units.append(u)
            results.append(res)
        return merge(list(entries), units, results, p)

    def pair_stats(self, a: Sequence[Any], b: Sequence[Any], tools: Any) -> Any:
        k = json.dumps([[list(self.index[id(t)]) for _, t in a], [list(self.index[id(t)]) for _, t in b]])
        if k not in self.pairs:
            raise InputError(a[0][0].path, f"the parts hold no comparison of {a[0][1].name!r} with "
                             f"{b[0][1].name!r}")
        return self.pairs[k]

    def _fingerprint(self, src: Any, t: Any) -> list[str]:
        key, i = self.index[id(t)]
        for (k, idxs), (count, first) in self.requests.items():
            if k == key and i in idxs:
                local = idxs.index(i)
                pieces: dict[int, list[str]] = {}
                for g in range(first, first + count):
                    pieces.update(self.digests.get((g, local), {}))
                if pieces:
                    return [s for _, sums in sorted(pieces.items()) for s in sums]
        raise InputError(src.path, f"the parts hold no fingerprint of tensor {t.name!r}")

    def same_bytes(self, sa: Any, ta: Any, sb: Any, tb: Any, tools: Any) -> bool:
        return self._fingerprint(sa, ta) == self._fingerprint(sb, tb)


def merged(parts: Parts, on_step: Callable[[Any, Any], None] | None = None) -> Any:
    """The report of the run the parts come from, computed from them alone."""
    try:
        replay = _Replay(parts)
        with hooks.using(replay):
            return compute(parts.command, parts.options, 1, on_step=on_step)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # passed its checksum, not ours
        raise InputError("merge", f"the partial results do not fit together ({type(e).__name__}: {e})") from None
