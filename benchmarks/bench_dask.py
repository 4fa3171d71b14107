"""Benchmark the Dask path (``--scheduler``) against local threads (issue 11 §3).

    python benchmarks/bench_dask.py                  # data in /tmp/dask/bench, 3 runs each, a Markdown table
    python benchmarks/bench_dask.py --runs 5 --data DIR

Needs dask[distributed].  Data (made once, about 2.6 GB): ``f32.safetensors``, the float32
transformer-shaped gradients of ``bench.py`` (218 tensors, 296 M elements, 1.18 GB); a run of 20
steps of 16 float32 tensors of 2**20 elements (64 MiB each, 1.25 GiB in all); and ``tiny``: 4,000
tensors of 4,100 float32 elements (16 KiB each, one work unit each: 64 MiB).

Timed in this process with a warm page cache (median of ``--runs``): ``gradinspect.inspect`` and
``runs.trend`` (no statistics cache) with threads (``jobs=N``) and with a ``DaskExecutor`` on a local
cluster of 1 and 2 single-threaded worker processes (started before the timing; its start-up is
given apart).  The overhead per task: ``tiny`` with one unit per task (4,000 tasks) against the same
units on one thread, in wall time and in CPU time of every process (the machine may be shared).  Also the
client's cost per unit (plan, merge) and the reduce throughput of one core on an array in memory (no reading).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STEPS, STEP_TENSORS, STEP_NUMEL = 20, 16, 1 << 20
TINY_TENSORS, TINY_NUMEL = 4000, 4100


def make_data(data: Path) -> None:
    from bench import make_grads
    from safetensors.numpy import save_file

    data.mkdir(parents=True, exist_ok=True)
    if not (data / "f32.safetensors").exists():
        print("making f32.safetensors ...", file=sys.stderr)
        save_file(make_grads(), str(data / "f32.safetensors"))
    run = data / "run"
    if not (run / f"step_{STEPS - 1}.safetensors").exists():
        print("making the run ...", file=sys.stderr)
        run.mkdir(exist_ok=True)
        rng = np.random.default_rng(2)
        for s in range(STEPS):
            save_file({f"layers.{i}.w": rng.standard_normal(STEP_NUMEL, dtype=np.float32)
                       for i in range(STEP_TENSORS)}, str(run / f"step_{s}.safetensors"))
    if not (data / "tiny.safetensors").exists():
        rng = np.random.default_rng(3)
        save_file({f"t{i}": rng.standard_normal(TINY_NUMEL, dtype=np.float32) for i in range(TINY_TENSORS)},
                  str(data / "tiny.safetensors"))


def cpu_seconds() -> float:
    """User + system CPU time of this process (client and, for a local cluster, scheduler) and its live children
    (the workers)."""
    import psutil

    me = psutil.Process()
    return sum(sum(p.cpu_times()[:2]) for p in (me, *me.children(recursive=True)))


def timed(f: Callable[[], object], runs: int) -> tuple[float, object]:
    f()  # warm: page cache, imports, worker start-up effects
    times = []
    out: object = None
    for _ in range(runs):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/dask/bench"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    make_data(args.data)

    from gradinspect import api
    from gradinspect.executors_dask import DaskExecutor
    from gradinspect.runs import trend

    f32 = args.data / "f32.safetensors"
    tiny = args.data / "tiny.safetensors"
    glob = str(args.data / "run" / "step_*.safetensors")
    f32_bytes = f32.stat().st_size
    run_bytes = sum(p.stat().st_size for p in (args.data / "run").iterdir())
    rows: list[tuple[str, str, str, float, float]] = []
    print(f"machine: {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)

    # One core reducing an array in memory (float32, 2**26 elements): no reading at all.
    x = np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32)
    t_reduce, _ = timed(lambda: api.compute_norms({"x": x}), args.runs)
    reduce_gbs = x.nbytes / t_reduce / 1e9

    for jobs in (1, 2):
        t, ref = timed(lambda jobs=jobs: api.inspect(f32, jobs=jobs), args.runs)
        rows.append(("norms f32.safetensors", f"threads, --jobs {jobs}", "-", t, f32_bytes / t / 1e9))
        t, tref = timed(lambda jobs=jobs: trend(glob, jobs=jobs), args.runs)
        rows.append(("trend 20 steps", f"threads, --jobs {jobs}", "-", t, run_bytes / t / 1e9))
    t_tiny_local, _ = timed(lambda: api.inspect(tiny, jobs=1), args.runs)
    c0 = cpu_seconds()
    api.inspect(tiny, jobs=1)
    cpu_tiny_local = cpu_seconds() - c0

    overhead = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        with DaskExecutor(f"local:{workers}") as ex:
            ex.connect()
            startup = time.perf_counter() - t0
            n0 = ex.tasks
            t, got = timed(lambda ex=ex: api.inspect(f32, jobs=ex), args.runs)
            assert repr(got) == repr(ref), "the Dask result differs from the threads' result"
            tasks = (ex.tasks - n0) // (args.runs + 1)
            rows.append(("norms f32.safetensors", f"Dask, {workers} worker(s)", str(tasks), t, f32_bytes / t / 1e9))
            n0 = ex.tasks
            t, got = timed(lambda ex=ex: trend(glob, jobs=ex), args.runs)
            assert repr(got) == repr(tref), "the Dask trend differs from the threads' trend"
            tasks = (ex.tasks - n0) // (args.runs + 1)
            rows.append(("trend 20 steps", f"Dask, {workers} worker(s)", str(tasks), t, run_bytes / t / 1e9))
            ex.task_bytes = 1  # one unit per task, timed once (4,000 tasks)
            n0, c0, t0 = ex.tasks, cpu_seconds(), time.perf_counter()
            api.inspect(tiny, jobs=ex)
            t, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            overhead[workers] = (t, ex.tasks - n0, startup, cpu)

    print(f"| run | executor | tasks | wall s (median of {args.runs}) | GB/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for what, how, tasks_s, t, gbs in rows:
        print(f"| {what} | {how} | {tasks_s} | {t:.3f} | {gbs:.2f} |")
    print()
    print(f"reduce, one core, float32 in memory: {reduce_gbs:.2f} GB/s")
    print(f"tiny ({TINY_TENSORS} units of {TINY_NUMEL * 4} bytes) on one thread: {t_tiny_local:.3f} s")
    print(f"tiny on one thread: {cpu_tiny_local:.2f} s of CPU")
    for workers, (t, tasks, startup, cpu) in overhead.items():
        print(f"Dask {workers} worker(s): tiny as {tasks} tasks: {t:.3f} s, {t / tasks * 1e3:.2f} ms of wall per task; "
              f"{(cpu - cpu_tiny_local) / tasks * 1e3:.2f} ms of CPU per task more than one thread (client, scheduler "
              f"and workers); cluster start-up {startup:.2f} s")
    per_unit, units_n = merge_cost(f32, args.runs)
    print(f"client: planning and merging the {units_n} units of f32.safetensors in plan order: "
          f"{per_unit * 1e6:.1f} µs per unit")
    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)


def merge_cost(path: Path, runs: int) -> tuple[float, int]:
    """What the client does per unit besides waiting: plan, and merge the results in plan order."""
    from gradinspect.engine import merge, plan
    from gradinspect.executors import ThreadExecutor
    from gradinspect.sources import open_source

    src = open_source(str(path))
    try:
        floats = [t for t in src.tensors if t.is_float]
        assert src.store is not None
        units = plan(floats)
        results = ThreadExecutor(2).run(units, floats, {src.store.key: src.store}, 2.0, 1 << 17)
        t, _ = timed(lambda: merge(floats, plan(floats), results, 2.0), runs)
    finally:
        src.close()
    return t / len(units), len(units)


if __name__ == "__main__":
    main()
