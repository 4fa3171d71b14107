"""Running the work units on a Dask cluster (``--scheduler``; the optional extra ``gradinspect[dask]``).

:class:`DaskExecutor` implements the :class:`~gradinspect.executors.Executor`
protocol.  The client plans as for a local run; consecutive work units
(plain data: which bytes of which store, which tensors) are batched into
tasks of about ``TASK_BYTES`` of reading, so that scheduling costs a few
percent of the work; each task goes with the descriptions it needs and, per
file, a :data:`Spec`: the store's class, the path as given, its key (a local
file's absolute path, resolved by the client, so a relative path means the
same file on every worker) and the :data:`Fingerprint` taken at planning
(size, mtime and a hash of the file's first and last ``HEAD`` bytes, where
the containers' headers and zip directories are).

A worker opens each file itself (a path every node sees, or a remote URL),
checks the fingerprint before its first read and again after its last, and
sends back only statistics; a file that changed since planning fails the
run (``InputError``: exit 2), never a mixed result.  The client merges the
results in plan order, so they are bit for bit those of a local run, with
any number of workers.  Tasks are pure: a task whose worker dies is run
again elsewhere, with the same result.

``diff`` sends pairs of tensors (:meth:`DaskExecutor.run_pairs`): a task runs
:func:`gradinspect.pipeline.pair_stats_of` on its pairs, as a local run does.

dask is imported only when a :class:`DaskExecutor` connects.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .engine import Part, Progress, Worker, WorkUnit, plan, run_unit
from .errors import InputError
from .norms import CHUNK
from .sources.base import Source, TensorDesc
from .sources.store import ByteStore, LocalFile

__all__ = ["DaskExecutor", "Fingerprint", "Spec", "fingerprint", "parse_scheduler", "ENV", "TASK_BYTES"]

#: The environment variable ``--scheduler`` defaults to.
ENV = "GRADINSPECT_SCHEDULER"
#: Bytes read per task: at ~1 GB/s per worker a task lasts ~0.25 s against a few ms of scheduling.
TASK_BYTES = 256 << 20
#: Bytes hashed at each end of a file (its header, or a zip's central directory).
HEAD = 64 << 10
CONNECT_TIMEOUT = 5.0  # seconds to reach a scheduler
WORKER_TIMEOUT = 60.0  # seconds a scheduler may have no worker
RETRIES = 2  # reruns of a task that raised something other than InputError (a worker's transient failure)

Fingerprint = tuple[int, int | None, str]  # size, mtime in ns (None: the store has none), hash of the ends
Spec = tuple[type[ByteStore], str, str, Any, Fingerprint]  # class, path as given, key, identity, fingerprint

_ADDRESS = re.compile(r"(tcp|tls|ucx|inproc|ws|wss)://\S+\Z")
_LOCAL = re.compile(r"local:([0-9]+)\Z")
#: A local cluster's scheduler: no dashboard, its HTTP server on any free port (not 8787, maybe taken).
NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
_LOGGERS = ("distributed", "dask", "tornado", "asyncio", "bokeh")


def parse_scheduler(text: str) -> tuple[str, int]:
    """``("address", 0)`` for ``tcp://HOST:PORT``, ``("local", N)`` for ``local:N``; ValueError otherwise."""
    m = _LOCAL.match(text)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 256:
            raise ValueError(f"local:N needs N from 1 to 256, not {n}")
        return "local", n
    if _ADDRESS.match(text):
        return "address", 0
    raise ValueError(f"expected tcp://HOST:PORT or local:N, not {text!r}")


def fingerprint(store: ByteStore) -> Fingerprint:
    """What identifies the bytes of an open store on any node: size, mtime, a hash of both ends."""
    size = store.size
    head = min(HEAD, size)
    h = hashlib.blake2b(store.read(head, 0), digest_size=16)
    tail = min(HEAD, size - head)
    if tail:
        h.update(store.read(tail, size - tail))
    ident = store.identity()
    mtime = ident[3] if isinstance(store, LocalFile) and ident is not None else None
    return size, mtime, h.hexdigest()


def _changed(path: str) -> InputError:
    return InputError(path, "changed while being read")


def _open(spec: Spec) -> ByteStore:
    """On a worker: open a planned file and check it is the same bytes (before any read)."""
    cls, path, key, ident, fp = spec
    if cls is LocalFile:
        try:
            store: ByteStore = LocalFile.open(key)  # the client's absolute path, not this worker's cwd
        except InputError as e:
            raise InputError(path, e.problem) from None
        store.path = path
    else:
        store = cls.reopen(path, ident, key)
    try:
        if fingerprint(store) != fp:
            raise _changed(path)
    except BaseException:
        store.close()
        raise
    return store


def _verify(store: ByteStore, spec: Spec) -> None:
    """On a worker, after the last read: the file is still what was planned."""
    _, path, key, _, fp = spec
    if isinstance(store, LocalFile):
        try:
            st = os.stat(key)
        except OSError:
            raise InputError(path, "changed while being read (it is gone)") from None
        if (st.st_size, st.st_mtime_ns) != fp[:2]:
            raise _changed(path)
        if store.fd is not None:
            fst = os.fstat(store.fd)
            if (fst.st_size, fst.st_mtime_ns) != fp[:2]:
                raise _changed(path)
    else:
        store.verify()
    if fingerprint(store) != fp:
        raise _changed(path)


def _with_stores(specs: Mapping[str, Spec], work: Any) -> tuple[str, Any]:
    """Open ``specs``, run ``work(stores)``, verify them; an InputError comes back as a value (no retry)."""
    stores: dict[str, ByteStore] = {}
    try:
        try:
            for key, spec in specs.items():
                stores[key] = _open(spec)
            out = work(stores)
            for key, store in stores.items():
                _verify(store, specs[key])
        finally:
            for store in stores.values():
                store.close()
    except InputError as e:
        return "error", e
    return "ok", out


def _unit_task(units: list[WorkUnit], descs: dict[int, TensorDesc], specs: dict[str, Spec], p: float,
               chunk: int) -> tuple[str, Any]:
    """A task: the results of consecutive units."""

    def work(stores: Mapping[str, ByteStore]) -> list[list[Part]]:
        w = Worker(p, chunk)
        return [run_unit(u, descs, stores, w) for u in units]

    return _with_stores(specs, work)


Piece = tuple[Source, TensorDesc]  # a tensor of an open source (the client's)
Pair = tuple[list[tuple[str, TensorDesc]], list[tuple[str, TensorDesc]]]


def _pair_task(pairs: list[Pair], specs: dict[str, Spec]) -> tuple[str, Any]:
    """A task: the PairStats of each pair of tensors (given as pieces: store key, description)."""
    from .pipeline import pair_stats_of

    def work(stores: Mapping[str, ByteStore]) -> list[Any]:
        srcs = {k: Source(path=s.path, kind="", tensors=[], store=s) for k, s in stores.items()}
        return pair_stats_of([([(srcs[k], t) for k, t in a], [(srcs[k], t) for k, t in b]) for a, b in pairs])

    return _with_stores(specs, work)


def _batches(sizes: Sequence[int], target: int) -> list[tuple[int, int]]:
    """Cut consecutive items into runs of about ``target`` bytes: [(start, end)]."""
    cuts: list[tuple[int, int]] = []
    start = acc = 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= target:
            cuts.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        cuts.append((start, len(sizes)))
    return cuts


def _probe(address: str, timeout: float, shown: str) -> None:
    """Fail fast (a refused connection, no route) before Dask's client retries for ``timeout`` s."""
    parts = urllib.parse.urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None:
        return
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise InputError(shown, f"cannot reach the Dask scheduler ({why.lower()})") from None


def _work_key(units: Sequence[WorkUnit], descs: Sequence[TensorDesc], p: float, chunk: int) -> Any:
    """What identifies a source's work: its units, the very descriptions they index, p and the chunk."""
    return tuple(units), tuple(map(id, descs)), p, chunk


def _quiet() -> None:
    """No Dask log lines on stderr (stdout stays the report's)."""
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


class DaskExecutor:
    """Work units on a Dask cluster: ``DaskExecutor("tcp://host:8786")``, or ``DaskExecutor("local:4")``
    to start a local cluster of 4 single-threaded worker processes (stopped by :meth:`close`).

    Use it as a context manager, or :meth:`close` it.  ``task_bytes``: the reading per task.
    Connecting (on first use, or :meth:`connect`) raises ``InputError(address, ...)`` when the
    scheduler cannot be reached within ``connect_timeout`` s or has no worker for ``worker_timeout`` s,
    and ``InputError(dask, "pip install ...")`` without the extra.
    """

    def __init__(self, address: str, task_bytes: int = TASK_BYTES, connect_timeout: float = CONNECT_TIMEOUT,
                 worker_timeout: float = WORKER_TIMEOUT, retries: int = RETRIES) -> None:
        self.kind, self.local_workers = parse_scheduler(address)
        self.address = address
        self.task_bytes = task_bytes
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self.retries = retries
        self.client: Any = None
        self.cluster: Any = None
        self.tasks = 0  # tasks submitted (for benchmarks)
        self.prefetched: dict[Any, tuple[list[Any], list[int]]] = {}  # submitted by prefetch, not yet gathered

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> Any:
        """The Dask client, connected to a scheduler with at least one worker."""
        if self.client is not None:
            return self.client
        try:
            distributed: Any = importlib.import_module("distributed")  # typed Any: an optional extra
        except ImportError:
            raise InputError("dask", "--scheduler needs Dask: pip install 'gradinspect[dask]'") from None
        _quiet()
        if self.kind == "local":
            try:
                self.cluster = distributed.LocalCluster(
                    n_workers=self.local_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, scheduler_kwargs=NO_DASHBOARD, silence_logs=logging.CRITICAL + 1)
            except Exception as e:  # no processes left, no port, a worker that cannot start
                raise InputError(self.address, f"cannot start a local Dask cluster: {e}") from None
            address = self.cluster.scheduler_address
        else:
            address = self.address
        unreachable = InputError(self.address, f"cannot reach the Dask scheduler within {self.connect_timeout:g} s")
        if self.kind == "address":
            _probe(address, self.connect_timeout, self.address)
        client = distributed.Client.__new__(distributed.Client)  # held here, to close it if it fails to start
        try:
            client.__init__(address, timeout=self.connect_timeout, set_as_default=False)
        except Exception:  # refused, timed out, or something else answering there
            with contextlib.suppress(Exception):  # closed now, briefly, not for 10 s by its __del__ (and a traceback)
                client.close(timeout=1)
            client.status = "closed"
            self.close()
            raise unreachable from None
        self.client = client
        try:
            client.wait_for_workers(1, timeout=self.worker_timeout)
        except (OSError, TimeoutError):
            self.close()
            raise InputError(self.address, f"the Dask scheduler has had no worker for {self.worker_timeout:g} s"
                             ) from None
        return client

    def close(self) -> None:
        self.prefetched = {}
        client, self.client = self.client, None
        cluster, self.cluster = self.cluster, None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    # --- the Executor protocol -------------------------------------------------------------

    def specs(self, stores: Mapping[str, ByteStore]) -> dict[str, Spec] | None:
        """Each store's :data:`Spec` (its fingerprint read now, on the client), or None when one is in memory."""
        out: dict[str, Spec] = {}
        for key, store in stores.items():
            spec = store.reopen_spec()
            if spec is None:
                return None
            cls, path, ident = spec
            fresh = cls.reopen(path, ident, key)  # the planned file (identity checked), read from here
            try:
                out[key] = (cls, path, key, ident, fingerprint(fresh))
            finally:
                fresh.close()
        return out

    def run(self, units: Sequence[WorkUnit], descs: Sequence[TensorDesc], stores: Mapping[str, ByteStore],
            p: float, chunk: int, progress: Progress | None = None) -> list[list[Part]]:
        submitted = self.prefetched.pop(_work_key(units, descs, p, chunk), None)
        if submitted is None:
            submitted = self.submit(units, descs, stores, p, chunk)
        if submitted is None:  # arrays in memory: nothing a worker could read
            from .executors import ThreadExecutor

            return ThreadExecutor(1).run(units, descs, stores, p, chunk, progress)
        futures, weights = submitted
        results: list[list[Part]] = []
        for got in self.gather(futures, weights, progress):
            results.extend(got)
        return results

    def submit(self, units: Sequence[WorkUnit], descs: Sequence[TensorDesc], stores: Mapping[str, ByteStore],
               p: float, chunk: int) -> tuple[list[Any], list[int]] | None:
        """The tasks of ``units`` submitted, and the tensor bytes of each; None when a store is in memory."""
        specs = self.specs(stores)
        if specs is None or not units:
            return None
        client = self.connect()
        cuts = _batches([u.size or u.nbytes for u in units], self.task_bytes)
        parts = [list(units[a:b]) for a, b in cuts]
        needed = [{i: descs[i] for u in part for i in u.tensors} for part in parts]
        used = [{k: specs[k] for k in {u.store for u in part}} for part in parts]
        n = len(parts)
        futures = client.map(_unit_task, parts, needed, used, [p] * n, [chunk] * n, pure=False, retries=self.retries)
        self.tasks += n
        return futures, [sum(u.nbytes for u in units[a:b]) for a, b in cuts]

    def prefetch(self, work: Sequence[tuple[Source, Sequence[TensorDesc]]], p: float, chunk: int = CHUNK) -> None:
        """Submit the work of several sources at once (each source's floating tensors, in order), so
        that the cluster reads every file in parallel; :meth:`run` then gathers the source it is given."""
        for src, entries in work:
            if src.store is None or not entries:
                continue
            units = plan(entries, chunk)
            key = _work_key(units, entries, p, chunk)
            if key not in self.prefetched:
                submitted = self.submit(units, entries, {src.store.key: src.store}, p, chunk)
                if submitted is not None:
                    self.prefetched[key] = submitted

    def cancel(self) -> None:
        """Drop the work prefetched and not gathered (after an error)."""
        prefetched, self.prefetched = self.prefetched, {}
        for futures, _ in prefetched.values():
            for f in futures:
                f.cancel()

    def run_pairs(self, pairs: Sequence[tuple[Sequence[Piece], Sequence[Piece]]],
                  progress: Progress | None = None) -> list[Any]:
        """The :class:`~gradinspect.diff.PairStats` of each pair of tensors (each side: its pieces), in order."""
        from .pipeline import pair_stats_of

        stores: dict[str, ByteStore] = {}
        for a, b in pairs:
            for src, _ in (*a, *b):
                assert src.store is not None
                stores[src.store.key] = src.store
        specs = self.specs(stores)
        if specs is None or not pairs:
            out = []
            for a, b in pairs:
                out.extend(pair_stats_of([(a, b)]))
                if progress is not None:
                    progress(sum(t.nbytes for _, t in (*a, *b)))
            return out
        client = self.connect()
        plain: list[Pair] = [([(s.store.key, t) for s, t in a], [(s.store.key, t) for s, t in b])  # type: ignore[union-attr]
                             for a, b in pairs]
        sizes = [sum(t.nbytes for _, t in (*a, *b)) for a, b in plain]
        cuts = _batches(sizes, self.task_bytes)
        parts = [plain[lo:hi] for lo, hi in cuts]
        used = [{k: specs[k] for k in {k for x, y in part for k, _ in (*x, *y)}} for part in parts]
        futures = client.map(_pair_task, parts, used, pure=False, retries=self.retries)
        self.tasks += len(futures)
        done = self.gather(futures, [sum(sizes[lo:hi]) for lo, hi in cuts], progress)
        return [ps for got in done for ps in got]

    def gather(self, futures: list[Any], weights: list[int], progress: Progress | None) -> list[Any]:
        """Each task's result, in task order, as they complete (``progress`` told each one's bytes).

        The first error is raised (the other tasks cancelled); a cluster left without a worker for
        ``worker_timeout`` s fails the run."""
        distributed: Any = importlib.import_module("distributed")

        client = self.client
        index = {f.key: n for n, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        done = distributed.as_completed(futures, loop=client.loop, raise_errors=False)
        checked = time.monotonic()
        idle_since: float | None = None
        try:
            while not done.is_empty():
                batch = done.next_batch(block=False)
                if not batch:  # nothing new: look again shortly; every 5 s, whether the cluster has workers
                    time.sleep(0.002)
                    now = time.monotonic()
                    if now - checked < 5.0:
                        continue
                    checked = now
                    if client.scheduler_info().get("workers"):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = now
                    elif now - idle_since > self.worker_timeout:
                        raise InputError(self.address, f"the Dask scheduler has had no worker for "
                                                       f"{self.worker_timeout:g} s")
                    continue
                idle_since = None
                for f in batch:
                    try:
                        status, value = f.result()
                    except Exception as e:  # a task that failed its retries, or a worker lost too often
                        raise InputError(self.address, f"the Dask run failed: {type(e).__name__}: {e}") from None
                    if status == "error":
                        raise value
                    results[index[f.key]] = value
                    if progress is not None:
                        progress(weights[index[f.key]])
        except BaseException:
            for f in futures:
                f.cancel()
            self.cancel()
            raise
        return results
