"""--scheduler: the work units on a real local Dask cluster (started and stopped here), bit for bit the local result.

Needs dask[distributed] (``pip install 'gradinspect[dask]'``); without it these tests skip, except the one
checking the message a user without it gets.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import exact_sums, rel_sqrt, run
from gradinspect import api
from gradinspect.engine import plan
from gradinspect.errors import InputError
from gradinspect.executors import ThreadExecutor
from gradinspect.sources import open_source

NEEDS_DASK = "the Dask tests need dask[distributed]: pip install 'gradinspect[dask]'"


def _cluster(n: int) -> Any:
    distributed = pytest.importorskip("distributed", reason=NEEDS_DASK)
    from gradinspect.executors_dask import NO_DASHBOARD

    return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    scheduler_kwargs=NO_DASHBOARD, silence_logs=logging.CRITICAL + 1)


@pytest.fixture(scope="module", params=[1, 2], ids=["1worker", "2workers"])
def scheduler(request: pytest.FixtureRequest) -> Iterator[str]:
    """The address of a local cluster of 1 or 2 worker processes, started in another directory than the tests'."""
    cluster = _cluster(request.param)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """safetensors (large tensors over several work units, small ones batched, NaN in one file), npz stored and
    deflated, and a run of steps."""
    import ml_dtypes

    d = tmp_path_factory.mktemp("dask")
    rng = np.random.default_rng(11)

    def grads(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        out = {f"layers.{i}.w": (r.standard_normal((300, 1100)) * scale * 10.0 ** r.uniform(-4, 0)).astype(np.float32)
               for i in range(3)}
        out |= {f"layers.{i}.b": r.standard_normal(300).astype(np.float32) for i in range(40)}
        out["emb"] = r.standard_normal((70, 100)).astype(ml_dtypes.bfloat16)
        return out

    save_file(grads(1), str(d / "a.safetensors"))
    save_file(grads(1) | {"layers.0.b": grads(2)["layers.0.b"]}, str(d / "b.safetensors"))
    bad = grads(3)
    bad["layers.1.b"][5] = np.nan
    save_file(bad, str(d / "nan.safetensors"))
    g = {k: v for k, v in grads(4).items() if v.dtype == np.float32}
    np.savez(d / "a.npz", **g)
    np.savez_compressed(d / "z.npz", **g)
    (d / "shards").mkdir()
    for rank in range(4):
        save_file({f"r{rank}.{k}": v for k, v in grads(20 + rank).items()}, str(d / "shards" / f"r{rank}.safetensors"))
    (d / "run").mkdir()
    for step in range(6):
        save_file(grads(10 + step, 30.0 if step == 4 else 1.0), str(d / "run" / f"step_{step}.safetensors"))
    assert rng is not None
    return d


def _same(args: list[str], scheduler: str, expect: int) -> None:
    local = run(*args)
    dask = run(*args, "--scheduler", scheduler)
    assert local.exit_code == expect, local.output
    assert (dask.exit_code, dask.stdout_bytes, dask.stderr) == (local.exit_code, local.stdout_bytes, local.stderr)


@pytest.mark.parametrize("name", ["a.safetensors", "a.npz", "z.npz", "nan.safetensors"])
def test_norms_and_check_bit_for_bit(data: Path, scheduler: str, name: str) -> None:
    _same(["norms", str(data / name), "--json", "--top", "50"], scheduler, 0)
    _same(["norms", str(data / name), "--json", "-p", "3"], scheduler, 0)
    _same(["check", str(data / name), "--json", "--max-total", "1"], scheduler, 1)


def test_diff_and_trend_bit_for_bit(data: Path, scheduler: str) -> None:
    _same(["diff", str(data / "a.safetensors"), str(data / "b.safetensors"), "--json", "--rtol", "1e-3"],
          scheduler, 1)
    _same(["diff", str(data / "a.npz"), str(data / "z.npz"), "--json"], scheduler, 0)
    _same(["trend", str(data / "run" / "step_*.safetensors"), "--json", "--no-cache", "--fail-on", "spike"],
          scheduler, 1)


def test_many_tasks_exact_and_progress_per_task(data: Path, scheduler: str) -> None:
    """Tasks of ~1 MiB: every unit travels, the result is that of threads (and of the exact oracle)."""
    from gradinspect.executors_dask import DaskExecutor

    for name in ("a.safetensors", "z.npz", "a.npz"):
        told: list[int] = []
        with DaskExecutor(scheduler, task_bytes=1 << 20) as ex:
            got = api.inspect(data / name, jobs=ex, progress=told.append)
            assert ex.tasks >= 3
        assert got == api.inspect(data / name, jobs=ThreadExecutor(3)) == api.inspect(data / name, jobs=1)
        src = open_source(str(data / name))
        src.close()
        assert len(told) == ex.tasks  # the bar follows task completion
        assert sum(told) == sum(t.nbytes for t in src.tensors if t.is_float)
    arrays = np.load(data / "a.npz")
    s2 = sum(exact_sums(arrays[k])[1] for k in arrays.files)
    assert rel_sqrt(got.total.l2, s2) <= 1e-12
    with DaskExecutor(scheduler, task_bytes=1 << 20) as ex:
        d = api.diff(data / "a.safetensors", data / "b.safetensors", executor=ex)
        assert ex.tasks >= 2
    assert d == api.diff(data / "a.safetensors", data / "b.safetensors")


def test_every_file_of_a_set_is_submitted_at_once(data: Path, scheduler: str, tmp_path: Path) -> None:
    """Several files: all their tasks are on the cluster before the first result is gathered (read in parallel,
    not file after file); with the statistics cache too, for the files it lacks."""
    from gradinspect.cache import Cache
    from gradinspect.executors_dask import DaskExecutor

    for cache in (None, Cache(str(tmp_path / "cache"))):
        with DaskExecutor(scheduler, task_bytes=1 << 20) as ex:
            seen: list[int] = []  # tasks submitted when each task's result came in
            got = api.inspect(data / "shards", jobs=ex, cache=cache,
                              progress=lambda n, ex=ex, seen=seen: seen.append(ex.tasks))
            assert ex.tasks >= 8 and seen[0] == ex.tasks and not ex.prefetched
        assert got == api.inspect(data / "shards", jobs=2)
    _same(["trend", str(data / "run" / "step_*.safetensors"), "--json"], scheduler, 0)  # cached: the same bits


def test_a_file_changed_after_planning_is_exit_2(data: Path, scheduler: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Planned, then rewritten (same size) before the workers read: one Error line, exit 2, no report."""
    from gradinspect.executors_dask import DaskExecutor

    path = tmp_path / "g.safetensors"
    path.write_bytes((data / "a.safetensors").read_bytes())
    original = DaskExecutor.specs

    def specs_then_rewrite(self: DaskExecutor, stores: Any) -> Any:
        out = original(self, stores)
        raw = bytearray(path.read_bytes())
        raw[-8:] = bytes(8)
        path.write_bytes(bytes(raw))
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        return out

    monkeypatch.setattr(DaskExecutor, "specs", specs_then_rewrite)
    r = run("norms", path, "--json", "--scheduler", scheduler)
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == f"Error: {path}: changed while being read\n"


def test_same_size_and_mtime_but_other_bytes_are_seen(data: Path, scheduler: str, tmp_path: Path) -> None:
    """A rewrite that keeps size and mtime (restored) is caught by the hash of the file's ends, on the worker."""
    from gradinspect.executors_dask import DaskExecutor

    path = tmp_path / "g.safetensors"
    path.write_bytes((data / "a.safetensors").read_bytes())
    src = open_source(str(path))
    try:
        floats = [t for t in src.tensors if t.is_float]
        units = plan(floats)
        assert src.store is not None
        with DaskExecutor(scheduler) as ex:
            ok = ex.run(units, floats, {src.store.key: src.store}, 2.0, 1 << 17)
            assert len(ok) == len(units)
            st = path.stat()
            specs = ex.specs({src.store.key: src.store})
            with path.open("r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\x7f\x7f\x7f\x7f")
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size
            ex.specs = lambda stores: specs  # type: ignore[method-assign]  # the plan's fingerprint
            with pytest.raises(InputError, match=r"g\.safetensors: changed while being read"):
                ex.run(units, floats, {src.store.key: src.store}, 2.0, 1 << 17)
    finally:
        src.close()


def test_a_file_changed_while_a_worker_reads_it(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check after the last read: a rewrite (same size, mtime put back) during a task fails the run.
    (Workers as threads of this process, so that the rewrite can happen between two reads of a task.)"""
    distributed = pytest.importorskip("distributed", reason=NEEDS_DASK)
    from gradinspect import executors_dask
    from gradinspect.executors_dask import NO_DASHBOARD, DaskExecutor

    path = tmp_path / "g.safetensors"
    path.write_bytes((data / "a.safetensors").read_bytes())
    st = path.stat()
    real = executors_dask.run_unit
    done: list[int] = []

    def read_then_rewrite(*args: Any) -> Any:
        out = real(*args)
        if not done:
            done.append(1)
            raw = bytearray(path.read_bytes())
            raw[-4:] = b"\x7f\x7f\x7f\x7f"
            path.write_bytes(bytes(raw))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return out

    monkeypatch.setattr(executors_dask, "run_unit", read_then_rewrite)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, scheduler_kwargs=NO_DASHBOARD,
                                  silence_logs=logging.CRITICAL + 1) as cluster, \
            DaskExecutor(cluster.scheduler_address) as ex:
        src = open_source(str(path))
        try:
            floats = [t for t in src.tensors if t.is_float]
            assert src.store is not None
            with pytest.raises(InputError, match=r"g\.safetensors: changed while being read"):
                ex.run(plan(floats), floats, {src.store.key: src.store}, 2.0, 1 << 17)  # the worker's check, alone
        finally:
            src.close()
    assert done and ex.tasks == 1  # one task: its first check passed, its last one failed


def test_relative_paths_are_the_clients(data: Path, scheduler: str, tmp_path: Path) -> None:
    """The workers run in another directory: the client's cwd resolves a relative PATH."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "g.npz").write_bytes((data / "z.npz").read_bytes())
    assert os.getcwd() != str(here)
    local = run("norms", "g.npz", "--json", cwd=here)
    dask = run("norms", "g.npz", "--json", "--scheduler", scheduler, cwd=here)
    assert local.exit_code == 0 and dask.stdout_bytes == local.stdout_bytes and dask.stderr == ""
    d = run("diff", "g.npz", "g.npz", "--json", "--scheduler", scheduler, cwd=here)
    assert d.exit_code == 0 and d.stdout_bytes == run("diff", "g.npz", "g.npz", "--json", cwd=here).stdout_bytes


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"  # nothing listens there now


def test_unreachable_scheduler_is_one_error_line_fast(data: Path) -> None:
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    dead = _dead_address()
    for cmd in (["norms", data / "a.safetensors"], ["check", data / "a.safetensors"],
                ["diff", data / "a.safetensors", data / "b.safetensors"],
                ["trend", data / "run" / "step_*.safetensors"]):
        t = time.monotonic()
        r = run(*cmd, "--json", "--scheduler", dead)
        assert time.monotonic() - t < 8
        assert (r.exit_code, r.stdout) == (2, "")
        assert r.stderr == f"Error: {dead}: cannot reach the Dask scheduler (connection refused)\n"


def test_option_wins_over_env_and_info_needs_no_cluster(data: Path, scheduler: str) -> None:
    dead = _dead_address()
    env = {"GRADINSPECT_SCHEDULER": dead}
    r = run("norms", data / "a.safetensors", "--json", env=env)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {dead}: cannot reach")  # the variable is used
    r = run("norms", data / "a.safetensors", "--json", "--scheduler", scheduler, env=env)
    assert r.exit_code == 0 and r.stdout_bytes == run("norms", data / "a.safetensors", "--json").stdout_bytes
    r = run("norms", data / "a.safetensors", "--json", env={"GRADINSPECT_SCHEDULER": scheduler})
    assert r.exit_code == 0 and r.stdout_bytes == run("norms", data / "a.safetensors", "--json").stdout_bytes
    r = run("info", data / "a.safetensors", "--json", env=env)
    assert r.exit_code == 0 and r.stderr == ""
    r = run("info", data / "a.safetensors", "--scheduler", scheduler)
    assert r.exit_code == 2 and "No such option" in r.stderr
    r = run("norms", data / "a.safetensors", "--scheduler", "local:0")
    assert r.exit_code == 2 and "local:N needs N from 1" in r.stderr and r.stdout == ""
    r = run("norms", data / "a.safetensors", env={"GRADINSPECT_SCHEDULER": "somewhere"})
    assert r.exit_code == 2 and "$GRADINSPECT_SCHEDULER" in r.stderr and "tcp://HOST:PORT" in r.stderr


def test_local_cluster_started_and_stopped_for_the_run(data: Path) -> None:
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = run("trend", data / "run" / "step_*.safetensors", "--json", "--no-cache", "--scheduler", "local:2")
    assert r.exit_code == 0 and r.stderr == ""
    assert r.stdout_bytes == run("trend", data / "run" / "step_*.safetensors", "--json", "--no-cache").stdout_bytes
    deadline = time.monotonic() + 10
    while {p.pid for p in psutil.Process().children(recursive=True)} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()} - before


def test_no_worker_is_an_error() -> None:
    distributed = pytest.importorskip("distributed", reason=NEEDS_DASK)
    from gradinspect.executors_dask import NO_DASHBOARD, DaskExecutor

    with distributed.LocalCluster(n_workers=0, processes=False, scheduler_kwargs=NO_DASHBOARD,
                                  silence_logs=logging.CRITICAL + 1) as cluster:
        ex = DaskExecutor(cluster.scheduler_address, worker_timeout=1)
        with pytest.raises(InputError, match="the Dask scheduler has had no worker for 1 s"):
            ex.connect()
        assert ex.client is None


def test_a_worker_killed_mid_run_changes_nothing(data: Path, tmp_path: Path) -> None:
    """SIGKILL a worker process that holds a task: Dask runs its tasks again elsewhere; the result is exact."""
    from gradinspect.executors_dask import DaskExecutor

    big = tmp_path / "big.safetensors"
    r = np.random.default_rng(5)
    save_file({f"t{i}": r.standard_normal(1 << 20).astype(np.float32) for i in range(24)}, str(big))
    expected = api.inspect(big, jobs=1)
    cluster = _cluster(2)
    try:
        with DaskExecutor(cluster.scheduler_address, task_bytes=2 << 20) as ex:
            client = ex.connect()
            pids = client.run(os.getpid)
            killed: list[int] = []

            def kill_once(n: int) -> None:
                if killed:
                    return
                busy = [w for w, keys in client.processing().items() if keys] or list(pids)
                killed.append(pids[busy[0]])
                os.kill(pids[busy[0]], signal.SIGKILL)

            got = api.inspect(big, jobs=ex, progress=kill_once)
            assert ex.tasks >= 24
            assert killed and killed[0] not in client.run(os.getpid).values()
        assert got == expected
    finally:
        cluster.close()


def test_without_dask_one_error_line(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask[distributed] were not installed
    r = run("norms", data / "a.safetensors", "--scheduler", "local:2")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == "Error: dask: --scheduler needs Dask: pip install 'gradinspect[dask]'\n"


@pytest.mark.parametrize("command", ["norms", "check", "trend"])
def test_parts_on_the_cluster_merge_to_the_plain_run(data: Path, scheduler: str, tmp_path: Path,
                                                      command: str) -> None:
    """--part with --scheduler: each part's units run on the workers; merge gives the plain local run's bytes."""
    args = {"norms": ["norms", str(data / "z.npz"), "--top", "50"],
            "check": ["check", str(data / "nan.safetensors"), "--max-total", "1"],
            "trend": ["trend", str(data / "run" / "step_*.safetensors"), "--fail-on", "spike"]}[command]
    parts = []
    for i in range(3):
        out = tmp_path / f"p{i}.json"
        res = run(*args, "--part", f"{i}/3", "--partial", str(out), *(["--scheduler", scheduler] if i != 1 else []))
        assert res.exit_code == 0 and res.stdout == "", res.output
        parts.append(str(out))
        assert "scheduler" not in json.loads(out.read_text())["options"]
    plain = run(*args, "--json", *(["--no-cache"] if command == "trend" else []))
    merged = run("merge", *parts, "--json")
    assert (merged.exit_code, merged.stdout_bytes) == (plain.exit_code, plain.stdout_bytes)
