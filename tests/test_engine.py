"""The parallel engine: the same bits for every --jobs, batches of small tensors, CRC combining."""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import Exact, decode, exact_sums, rel, rel_sqrt
from gradinspect import engine
from gradinspect.engine import crc32_combine
from gradinspect.executors import ProcessExecutor, ThreadExecutor
from gradinspect.norms import CHUNK, SMALL, Reducer, stats_of

_ORACLE: dict[tuple[str, bytes], Exact] = {}


class _LargeOracle:
    """For large finite float32/float16 arrays: the exact sums, vectorised (``Exact(decode(x))`` is too slow)."""

    nan = inf = 0

    def __init__(self, x: np.ndarray) -> None:
        self.s1, self.s2 = exact_sums(x)


def oracle(name: str, x: np.ndarray) -> Exact | _LargeOracle:
    key = (name, x.tobytes()[:64] + str(x.size).encode())
    if key not in _ORACLE:
        small_float = x.dtype in (np.float32, np.float16) and np.isfinite(x).all()
        _ORACLE[key] = _LargeOracle(x) if x.size > SMALL and small_float else Exact(decode(x))  # type: ignore[assignment]
    return _ORACLE[key]


def _mixed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Small and large tensors, several dtypes, NaN and extreme values in small ones."""
    g: dict[str, np.ndarray] = {}
    for i in range(300):
        g[f"small.{i}"] = rng.standard_normal(rng.integers(0, 50)).astype(np.float32)
    g["small.nan"] = np.array([1.0, np.nan, 3.0], np.float32)
    g["small.inf"] = np.array([np.inf, 2.0], np.float32)
    g["small.huge64"] = np.array([1e300, -1e300])
    g["small.tiny64"] = np.array([1e-300, 3e-310])
    g["small.bf16"] = rng.standard_normal(100).astype(ml_dtypes.bfloat16)
    g["edge.small"] = rng.standard_normal(SMALL).astype(np.float32)
    g["edge.big"] = rng.standard_normal(SMALL + 1).astype(np.float32)
    g["big.f32"] = rng.standard_normal(3 * CHUNK + 17).astype(np.float32)
    g["big.f64"] = rng.standard_normal(20_000)
    g["big.f16"] = rng.standard_normal(CHUNK + 3).astype(np.float16)
    return g


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "npz_compressed"])
def test_every_jobs_value_gives_the_same_bits(tmp_path: Path, rng: np.random.Generator, fmt: str) -> None:
    g = _mixed(rng)
    path = tmp_path / ("g.safetensors" if fmt == "safetensors" else "g.npz")
    if fmt == "safetensors":
        save_file(g, str(path))
    elif fmt == "npz":
        np.savez(path, **g)
    else:
        np.savez_compressed(path, **g)
    runs = [gradinspect.inspect(path, sort="none", jobs=j) for j in (1, 2, 3, 8)]
    runs.append(gradinspect.inspect(path, sort="none", jobs=ThreadExecutor(5)))
    for j in (2, 3):  # the process pool: other processes, the same bits
        with ProcessExecutor(j) as pool:
            runs.append(gradinspect.inspect(path, sort="none", jobs=pool))
            assert pool.pool is not None  # the work did go to processes
    first = runs[0]
    for r in runs[1:]:
        assert repr(r.tensors) == repr(first.tensors) and repr(r.total) == repr(first.total)  # NaN-safe, bit-exact
    # ... and the numbers are right: per tensor against the exact oracle
    rows = {t.name: t for t in first.tensors}
    assert set(rows) == set(g)
    for name, x in g.items():
        if name not in rows:
            continue
        ex = oracle(name, x)
        if ex.nan:
            assert math.isnan(rows[name].l2) and rows[name].nan == ex.nan
        elif ex.inf:
            assert rows[name].l2 == math.inf and rows[name].inf == ex.inf
        else:
            assert rel_sqrt(rows[name].l2, ex.s2) <= 1e-12, name
            assert rel(rows[name].l1, ex.s1) <= 1e-12, name


def test_in_memory_small_and_large_match_the_oracle(rng: np.random.Generator) -> None:
    g = {k: v for k, v in _mixed(rng).items() if "nan" not in k and "inf" not in k}
    r = gradinspect.compute_norms(g, norm_type=3)
    rows = {t.name: t for t in r.tensors}
    for name, x in g.items():
        ex = oracle(name, x)
        assert rel_sqrt(rows[name].l2, ex.s2) <= 1e-12, name
        if x.size <= SMALL:  # Decimal powers are slow: the large ones are covered in test_norms
            assert rel(rows[name].norm, ex.lp(3.0)) <= 1e-12, name


def test_segments_equal_one_at_a_time(rng: np.random.Generator) -> None:
    r = Reducer(2.5)
    xs = [rng.standard_normal(k) for k in (5, 0, 17, 1, 300)]
    batched = r.reduce_segments(np.concatenate(xs), [x.size for x in xs])
    for x, s in zip(xs, batched, strict=True):
        alone = r.reduce_segments(x.copy(), [x.size])[0]
        assert s == alone
        ref = stats_of(x, 2.5)
        assert s.numel == ref.numel and s.linf == ref.linf
        assert s.l2 == pytest.approx(ref.l2, rel=1e-14) and s.norm == pytest.approx(ref.norm, rel=1e-14)


def test_corrupt_small_member_detected_with_any_jobs(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s.npz"
    g = {f"t{i}": rng.standard_normal(10) for i in range(20)}
    np.savez(path, **g)
    data = bytearray(path.read_bytes())
    at = data.find(g["t7"].tobytes())
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))
    for jobs in (1, 2):
        with pytest.raises(gradinspect.InputError, match=r"t7\.npy.*CRC-32 mismatch"):
            gradinspect.inspect(path, jobs=jobs)


@pytest.mark.parametrize("split", [0, 1, 7, 1000, 4095])
def test_crc32_combine(split: int) -> None:
    data = np.random.default_rng(split).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    a, b = data[:split], data[split:]
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


def test_truncated_data_is_found_from_the_header(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "g.safetensors"
    save_file({"w": rng.standard_normal(4 * CHUNK)}, str(path))
    with open(path, "r+b") as f:  # truncate the data after the header was written
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(gradinspect.InputError,
                       match=r"g\.safetensors: tensor 'w': data_offsets .* past the end of the file"):
        gradinspect.inspect(path, jobs=2)


def test_errors_in_worker_threads_reach_the_caller(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read failing in a worker thread (say, an I/O error) is raised by the call, not lost or hung."""
    from gradinspect.sources import store

    path = tmp_path / "g.safetensors"
    save_file({"w": rng.standard_normal(8 * CHUNK)}, str(path))
    threads: set[str] = set()

    real = store.LocalFile.read_into

    def failing_read(self: store.LocalFile, view: memoryview, offset: int) -> None:
        if threading.current_thread() is threading.main_thread():  # the header, read before the work is planned
            return real(self, view, offset)
        threads.add(threading.current_thread().name)
        raise gradinspect.InputError(self.path, "simulated read error")

    monkeypatch.setattr(store.LocalFile, "read_into", failing_read)
    with pytest.raises(gradinspect.InputError, match=r"g\.safetensors: simulated read error$"):
        gradinspect.inspect(path, jobs=2)
    assert threads and threading.main_thread().name not in threads


def _after_planning(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run ``change`` once the work is planned (headers read), before any data is read."""
    real = engine.plan

    def plan_then_change(*args: Any, **kwargs: Any) -> Any:
        units = real(*args, **kwargs)
        change()
        return units

    monkeypatch.setattr(engine, "plan", plan_then_change)


def test_errors_in_worker_processes_reach_the_caller(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s.npz"
    g = {f"t{i}": rng.standard_normal(10) for i in range(20)}
    g.update(big=rng.standard_normal(3 * CHUNK))  # several units: the work goes to the processes
    np.savez(path, **g)
    data = bytearray(path.read_bytes())
    at = data.find(g["t7"].tobytes())
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with ProcessExecutor(2) as pool, pytest.raises(gradinspect.InputError, match=r"t7\.npy.*CRC-32 mismatch") as e:
        gradinspect.inspect(path, jobs=pool)
    assert type(e.value.__cause__).__name__ == "_RemoteTraceback"  # raised in a worker, re-raised here


def test_a_worker_process_refuses_a_file_changed_since_its_header(tmp_path: Path, rng: np.random.Generator,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A process reopens the file by its key: another file at that path is refused before a byte is read."""
    path = tmp_path / "g.safetensors"
    save_file({"w": rng.standard_normal(4 * CHUNK), "v": rng.standard_normal(3 * CHUNK)}, str(path))
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(4 * CHUNK), "v": np.zeros(3 * CHUNK)}, str(other))  # the same size
    _after_planning(monkeypatch, lambda: other.replace(path))
    with ProcessExecutor(2) as pool, pytest.raises(gradinspect.InputError,
                                                   match=r"g\.safetensors: changed while being read") as e:
        gradinspect.inspect(path, jobs=pool)
    # found by the worker before reading (the unlinked old file's ctime changed too: the exit check says so again)
    chain = [e.value, e.value.__context__]
    assert any(isinstance(x, gradinspect.InputError) and type(x.__cause__).__name__ == "_RemoteTraceback"
               for x in chain)


def test_the_process_pool_reads_every_file_of_a_set(tmp_path: Path, rng: np.random.Generator) -> None:
    """One pool across files: each task reopens the files its units name; the bits match threads."""
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.safetensors"
        save_file({f"w{i}": rng.standard_normal(2 * CHUNK + i), f"b{i}": rng.standard_normal(10)}, str(p))
        paths.append(p)
    expected = gradinspect.inspect(paths, jobs=1)
    with ProcessExecutor(2) as pool:
        got = gradinspect.inspect(paths, jobs=pool)
    assert repr(got.tensors) == repr(expected.tensors) and repr(got.total) == repr(expected.total)
