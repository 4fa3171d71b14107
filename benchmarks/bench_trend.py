"""Benchmark ``gradinspect trend`` on a long run: a cold run against a warm re-run (issue 9 §5).

    python benchmarks/bench_trend.py                    # 1,000 steps x 200 tensors in /tmp/gradinspect-bench-trend
    python benchmarks/bench_trend.py --steps 200 --runs 5 --data DIR
    python benchmarks/bench_trend.py --format table     # the default output instead of -f json

The data (made once; about 1,000 x 0.8 MB) is a run of ``--steps`` safetensors files of
``--tensors`` small float32 tensors each (64 to 2,048 elements, transformer-like names, a
``step`` metadata key).  Each timing is the wall time of a fresh ``python -m gradinspect trend
GLOB -f json -q`` process (min and median of ``--runs``; in brackets the CPU time, user + system,
which a busy shared machine inflates less): cold with an empty ``--cache-dir`` (every file
read and stored), warm with the cache the cold runs left.  The files are made at least 2 s
before the first run (a file changed less than 2 s before it is read is not cached), and each
run starts once the one before has been written to disk (``sync``).  gradinspect's
modules are compiled first, as an install compiles them.  Also
timed in-process (imports and Python startup left out): the per-step cost of a warm run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_run(data: Path, steps: int, tensors: int) -> None:
    from safetensors.numpy import save_file

    marker = data / f".done-{steps}x{tensors}"
    if marker.exists():
        return
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = rng.integers(64, 2049, tensors)
    names = [f"model.layers.{i // 8}.{('q', 'k', 'v', 'o', 'up', 'down', 'gate', 'norm')[i % 8]}.weight"
             for i in range(tensors)]
    for s in range(steps):
        scale = np.float32(1e-3 * (20.0 if s % 97 == 50 else 1.0))
        grads = {n: rng.standard_normal(int(k), dtype=np.float32) * scale for n, k in zip(names, sizes, strict=True)}
        save_file(grads, str(data / f"step_{s:06d}.safetensors"), metadata={"step": str(s)})
    marker.touch()


def wall(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """The wall time and the CPU time (user + system) of a process, started once what earlier runs wrote is on
    disk (``sync``): a run is not slowed by the write-back of the one before (a cold run writes ~80 MB of
    cache entries), as a re-run some time later is not."""
    import resource

    if hasattr(os, "sync"):
        os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    t = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def spread(times: list[tuple[float, float]]) -> str:
    walls, cpus = [w for w, _ in times], [c for _, c in times]
    return (f"min {min(walls):6.2f} s  median {statistics.median(walls):6.2f} s  "
            f"[cpu min {min(cpus):.2f} median {statistics.median(cpus):.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "gradinspect-bench-trend")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", choices=["json", "table", "csv"], default="json")
    a = ap.parse_args()

    make_run(a.data, a.steps, a.tensors)
    newest = max(p.stat().st_ctime for p in a.data.glob("step_*.safetensors"))
    time.sleep(max(0.0, newest + 2.1 - time.time()))
    pattern = str(a.data / "step_*.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # As installed (pip compiles every module on install): no run compiles gradinspect's sources, even where
    # PYTHONDONTWRITEBYTECODE is set.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "gradinspect")], check=True,
                   stdout=subprocess.DEVNULL)
    base = [sys.executable, "-m", "gradinspect", "trend", pattern, "-f", a.format, "-q"]
    with tempfile.TemporaryDirectory(prefix="bench-trend-cache-") as tmp:
        cache = Path(tmp) / "cache"
        cold = []
        for _ in range(a.runs):
            shutil.rmtree(cache, ignore_errors=True)
            cold.append(wall([*base, "--cache-dir", str(cache)], env))
        warm = [wall([*base, "--cache-dir", str(cache)], env) for _ in range(a.runs)]
        nocache = wall([*base, "--no-cache"], env)[0]
        startup = statistics.median(wall([sys.executable, "-m", "gradinspect", "--version"], env)[0]
                                    for _ in range(a.runs))

        sys.path.insert(0, str(ROOT))
        from gradinspect.cache import Cache
        from gradinspect.runs import trend

        inproc = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            trend(pattern, cache=Cache(cache))
            inproc.append(time.perf_counter() - t0)

    c, w = statistics.median(t for t, _ in cold), statistics.median(t for t, _ in warm)
    i = statistics.median(inproc)
    n = a.steps
    print(f"run: {n} steps x {a.tensors} tensors, {sum(p.stat().st_size for p in a.data.glob('step_*')) / 1e6:.0f} MB"
          f" in {a.data}; -f {a.format}; {os.cpu_count()} cores; {a.runs} runs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"cold (empty cache)   {spread(cold)}   (--no-cache: {nocache:.2f} s)")
    print(f"warm (all cached)    {spread(warm)}   {1e3 * w / n:.2f} ms/step")
    print(f"cold/warm            median {c / w:.1f}x   min {min(t for t, _ in cold) / min(t for t, _ in warm):.1f}x   "
          f"cpu {statistics.median(t for _, t in cold) / statistics.median(t for _, t in warm):.1f}x")
    print(f"warm, in-process     {i:6.2f} s   {1e3 * i / n:.2f} ms/step   (process start + imports of --version: "
          f"{startup:.2f} s)")


if __name__ == "__main__":
    main()
