"""Hostile input within every limit: config files, --jobs, huge safetensors headers, index.json files.

Each case ends as exit 2 with one ``Error:`` line (or a graceful result), never a
traceback, a hang or a memory blow-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from safetensors.numpy import save_file

import gradinspect
from conftest import ROOT, run, run_process, write_raw_safetensors
from gradinspect import api
from gradinspect.errors import InputError
from gradinspect.sources import limits, open_source


def one_error_line(r: Result, fragment: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.stdout == ""
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert fragment in r.stderr, r.stderr


def cli_after_a_swap(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with the first "is it a regular file?" check passing whatever the
    path is: as if a FIFO were swapped in between that stat and the open."""
    script = ("import sys, gradinspect.sources.store as S\n"
              "S.regular_file = lambda p: None\n"
              "from gradinspect.cli import main\n"
              "main(sys.argv[1:])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=30, cwd=cwd, check=False)


@pytest.fixture
def grads(tmp_path: Path) -> Path:
    path = tmp_path / "grads.safetensors"
    save_file({"a": np.full(4, 0.5, np.float32), "b": np.arange(3, dtype=np.float32)}, str(path))
    return path


# --- 1. config files ---------------------------------------------------------------


@pytest.mark.parametrize("body, fragment", [
    ("[tool.gradinspect.check]\nmax_total = " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    ("[tool.gradinspect.check]\nmax_total = 1" + "0" * 5000 + "\n", "not valid TOML"),
    ("[tool.gradinspect.check]\nmax_total = 1\n# \xff\n", "not valid TOML"),
])
def test_pyproject_found_upward_that_cannot_be_parsed(grads: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      body: str, fragment: str) -> None:
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "pyproject.toml").write_bytes(body.encode("latin-1"))
    monkeypatch.chdir(proj / "sub")
    one_error_line(run("check", grads), fragment)
    assert f"{proj / 'pyproject.toml'}: " in run("check", grads).stderr


def test_config_from_a_device_is_refused(grads: Path) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    one_error_line(run("check", grads, "--config", "/dev/zero"), "/dev/zero: not a regular file")


def test_config_larger_than_the_limit(grads: Path, tmp_path: Path) -> None:
    from gradinspect.config import MAX_CONFIG_BYTES

    cfg = tmp_path / "big.toml"
    cfg.write_text("[tool.gradinspect.check]\nmax_total = 1.0\n" + "#" * MAX_CONFIG_BYTES + "\n")
    one_error_line(run("check", grads, "--config", cfg), "larger than the")
    cfg.write_text("[tool.gradinspect.check]\nmax_total = 100.0\n" + "#" * (MAX_CONFIG_BYTES // 2) + "\n")
    assert run("check", grads, "--config", cfg).exit_code == 0


def test_config_fifo_does_not_hang(grads: Path, tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "cfg.toml"
    os.mkfifo(fifo)
    r = run_process("check", grads, "--config", fifo, cwd=tmp_path, timeout=30)
    assert r.returncode == 2 and r.stdout == b"" and r.stderr.decode() == f"Error: {fifo}: not a regular file\n"


def test_config_fifo_swapped_in_after_the_stat_does_not_hang(grads: Path, tmp_path: Path) -> None:
    """The open itself (O_NONBLOCK) and an fstat refuse a FIFO that passed the first check."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "cfg.toml"
    os.mkfifo(fifo)
    r = cli_after_a_swap("check", grads, "--config", fifo, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == f"Error: {fifo}: not a regular file\n", r.stderr


def test_config_jobs_has_the_same_bound_as_the_option(grads: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[tool.gradinspect.check]\njobs = 1000\n")
    one_error_line(run("check", grads, "--config", cfg), "jobs must be a whole number from 1 to 64")


# --- 2. --jobs -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["norms", "check"])
def test_jobs_is_capped(grads: Path, command: str) -> None:
    r = run(command, grads, "--jobs", 1000)
    assert r.exit_code == 2 and r.stdout == "" and "--jobs" in r.stderr and "1<=x<=64" in r.stderr
    assert run(command, grads, "--jobs", 64).exit_code == 0
    assert "at most 64" in " ".join(run(command, "--help").stdout.split())


@pytest.mark.parametrize("started", [0, 1, 2])
def test_threads_that_cannot_start_degrade_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      started: int) -> None:
    rng = np.random.default_rng(7)
    path = tmp_path / "g.safetensors"
    save_file({"big": rng.standard_normal(700_000).astype(np.float32),
               "other": rng.standard_normal(300_000).astype(np.float32)}, str(path))
    expected = gradinspect.inspect(path, jobs=1).to_dict()
    real_start = threading.Thread.start
    calls = []

    def start(self: threading.Thread) -> None:
        calls.append(self)
        if len(calls) > started:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    got = gradinspect.inspect(path, jobs=8).to_dict()
    assert len(calls) == started + 1  # it stops asking once a start failed
    assert got == expected


@pytest.mark.parametrize("buffers", [0, 1, 2])
def test_threads_that_cannot_get_buffers_leave_the_work_to_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  buffers: int) -> None:
    from gradinspect import executors

    rng = np.random.default_rng(8)
    path = tmp_path / "g.safetensors"
    save_file({"big": rng.standard_normal(600_000).astype(np.float32)}, str(path))
    expected = gradinspect.inspect(path, jobs=1).to_dict()
    real = executors.Worker
    made = []

    def worker(p: float, chunk: int) -> object:
        made.append(threading.current_thread())
        if len(made) > buffers and threading.current_thread() is not threading.main_thread():
            raise OSError(12, "Cannot allocate memory")
        return real(p, chunk)

    monkeypatch.setattr(executors, "Worker", worker)
    assert gradinspect.inspect(path, jobs=4).to_dict() == expected
    assert (threading.main_thread() in made) == (buffers == 0)


# --- 3. safetensors header limits and memory -----------------------------------------------


def _tensors(n: int) -> dict:
    return {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}


def test_too_many_tensors_in_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TENSORS", 3)
    ok = write_raw_safetensors(tmp_path / "ok.safetensors", _tensors(3), b"\0" * 12)
    assert run("info", ok).exit_code == 0
    path = write_raw_safetensors(tmp_path / "x.safetensors", _tensors(4), b"\0" * 16)
    one_error_line(run("norms", path), f"{path}: the header lists more than 3 tensors (the limit per file)")


def test_too_many_tensors_in_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TOTAL_TENSORS", 5)
    for k in range(3):
        hdr = {f"s{k}.{name}": v for name, v in _tensors(2).items()}
        write_raw_safetensors(tmp_path / f"s{k}.safetensors", hdr, b"\0" * 8)
    one_error_line(run("norms", tmp_path), "more than 5 tensors in all (the limit for one call)")
    assert gradinspect.inspect([tmp_path / "s0.safetensors", tmp_path / "s1.safetensors"]).total.tensors == 4


def test_too_many_metadata_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_METADATA_KEYS", 2)
    hdr = {"__metadata__": {"a": "1", "b": "2"}, **_tensors(1)}
    assert run("info", write_raw_safetensors(tmp_path / "ok.safetensors", hdr, b"\0" * 4)).exit_code == 0
    hdr = {"__metadata__": {"a": "1", "b": "2", "c": "3"}, **_tensors(1)}
    one_error_line(run("info", write_raw_safetensors(tmp_path / "m.safetensors", hdr, b"\0" * 4)),
                   "__metadata__ holds more than 2 keys")


def test_metadata_value_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_METADATA_VALUE", 10)
    hdr = {"__metadata__": {"a": "x" * 10}, **_tensors(1)}
    assert run("info", write_raw_safetensors(tmp_path / "ok.safetensors", hdr, b"\0" * 4)).exit_code == 0
    hdr = {"__metadata__": {"a": "x" * 11}, **_tensors(1)}
    one_error_line(run("info", write_raw_safetensors(tmp_path / "m.safetensors", hdr, b"\0" * 4)),
                   "__metadata__ value of 'a' is longer than 10 characters")


def test_the_header_is_still_strict_json(tmp_path: Path) -> None:
    """The incremental header reader refuses what json.loads refused."""
    cases = [
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},}', "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} x', "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate key 'a'"),
        (b'{"__metadata__": {"k": "1", "k": "2"}}', "duplicate key 'k'"),
        (b'{"__metadata__": {"k": 1}}', "__metadata__ is not an object of strings"),
        (b'{"__metadata__": {"k": "1"}, "__metadata__": null}', "duplicate key '__metadata__'"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "dtype": "F16"}}', "duplicate key"),
        (b'{"a" {}}', "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} "b": 1}', "not valid JSON"),
        (b'"just a string"', "not a JSON object"),
        (b'{"a": nul}', "not valid JSON"),
        (b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "not valid Unicode"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\x00', "not valid JSON"),
        (b'\xff{}', "not valid JSON"),
    ]
    for k, (header, fragment) in enumerate(cases):
        path = tmp_path / f"h{k}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        one_error_line(run("info", path), fragment)
    ok = b' \n{ "__metadata__" : null , "a" : {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} }  '
    path = tmp_path / "ok.safetensors"
    path.write_bytes(len(ok).to_bytes(8, "little") + ok + b"\0" * 4)
    assert api.info(path).tensors[0].name == "a"


def test_memory_per_tensor_of_a_large_header(tmp_path: Path) -> None:
    """Opening a file of 50,000 tensors peaks at a few hundred bytes per tensor (it was ~1 KiB):
    the figures per tensor are the same for 1,000,000 (about 400 bytes at the peak, 273 kept)."""
    n = 50_000
    hdr = {"__metadata__": {"format": "pt"}}
    for i in range(n):
        hdr[f"layers.{i // 10}.experts.{i % 10}.w"] = {"dtype": "F32", "shape": [1 + i % 4, 2],
                                                        "data_offsets": [8 * (i // 4 * 10 + [0, 1, 3, 6][i % 4]),
                                                                         8 * (i // 4 * 10 + [1, 3, 6, 10][i % 4])]}
    path = write_raw_safetensors(tmp_path / "many.safetensors", hdr, b"")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 8 * (n // 4 * 10))
    del hdr
    tracemalloc.start()
    try:
        src = open_source(str(path))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(src.tensors) == n and src.tensors[5].shape == (2, 2) and src.tensors[5].numel == 4
    assert peak / n < 600, f"peak {peak / n:.0f} bytes per tensor"  # TensorEntry, name, offset; header text
    assert current / n < 400, f"retained {current / n:.0f} bytes per tensor"


# --- 4. index.json ----------------------------------------------------------------------


def _index(tmp_path: Path, weight_map: dict[str, str], name: str = "m.safetensors.index.json") -> Path:
    idx = tmp_path / name
    idx.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return idx


def test_index_larger_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "s.safetensors"))
    idx = _index(tmp_path, {"a": "s.safetensors"})
    monkeypatch.setattr(limits, "MAX_INDEX_BYTES", idx.stat().st_size)
    assert run("norms", idx).exit_code == 0
    monkeypatch.setattr(limits, "MAX_INDEX_BYTES", idx.stat().st_size - 1)
    one_error_line(run("norms", idx), f"larger than the {idx.stat().st_size - 1}-byte limit")


def test_index_weight_map_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, str(tmp_path / "s.safetensors"))
    idx = _index(tmp_path, {"a": "s.safetensors", "b": "s.safetensors"})
    monkeypatch.setattr(limits, "MAX_TOTAL_TENSORS", 1)
    one_error_line(run("norms", idx), "weight_map names more than 1 tensors")


@pytest.mark.parametrize("body, fragment", [
    (b'{"metadata": {"total_size": 1' + b"0" * 5000 + b'}, "weight_map": {"a": "s.safetensors"}}', "not valid JSON"),
    (b'{"weight_map": {"a": "s.safetensors"}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"weight_map": {"a": "s\xff.safetensors"}}', "not valid JSON"),
    (b'{"weight_map": {"a": "s.safetensors", "a": "t.safetensors"}}', "duplicate key 'a'"),
    (b'{"weight_map": {"a": 1}}', "weight_map"),
    (b'[]', "weight_map"),
])
def test_index_parse_errors(tmp_path: Path, body: bytes, fragment: str) -> None:
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_bytes(body)
    one_error_line(run("info", idx), fragment)


def test_index_fifo_swapped_in_after_the_stat_does_not_hang(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "m.safetensors.index.json"
    os.mkfifo(fifo)
    r = cli_after_a_swap("info", fifo, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == f"Error: {fifo}: not a regular file\n", r.stderr


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABS"])
def test_index_shards_outside_its_directory_are_refused(tmp_path: Path, shard: str) -> None:
    (tmp_path / "d").mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    if shard == "ABS":
        shard = str(tmp_path / "outside.safetensors")
    idx = _index(tmp_path / "d", {"a": shard})
    msg = (f"Error: {idx}: weight_map names shard {shard!r} outside the index's directory "
           "(use --allow-outside-index to allow)\n")
    for args in (["norms", idx], ["check", idx], ["info", idx], ["diff", idx, idx]):
        r = run(*args)
        assert r.exit_code == 2 and r.stdout == "" and r.stderr == msg, (args, r.stderr)
        assert run(*args, "--allow-outside-index").exit_code == 0, args
    with pytest.raises(InputError, match="outside the index's directory"):
        gradinspect.inspect(idx)
    assert gradinspect.inspect(idx, allow_outside_index=True).total.numel == 2
    assert api.check(idx, allow_outside_index=True).ok
    assert api.info(idx, allow_outside_index=True).tensors[0].name == "a"
    assert api.diff(idx, idx, allow_outside_index=True).total.l2_diff == 0.0


def test_index_shard_paths_that_stay_inside_are_fine(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "d" / "sub" / "s.safetensors"))
    idx = _index(tmp_path / "d", {"a": "sub/../sub/./s.safetensors"})
    assert gradinspect.inspect(idx).total.numel == 2


def test_index_symlinked_shard_is_followed(tmp_path: Path) -> None:
    """Symlinks in the index's directory are the directory owner's choice, not the index's: they are
    followed (the Hugging Face cache links every shard to ../../blobs/<hash>)."""
    (tmp_path / "blobs").mkdir()
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "blobs" / "abc123"))
    try:
        os.symlink("../../blobs/abc123", snap / "model-00001-of-00001.safetensors")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    idx = _index(snap, {"a": "model-00001-of-00001.safetensors"}, "model.safetensors.index.json")
    assert gradinspect.inspect(idx).total.numel == 3


# --- 5. absurd shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("shape, offsets, fragment", [
    ([2**62, 2**62], [0, 8], "more than 2**64 elements"),
    ([10**4000, 10**4000], [0, 8], "invalid shape"),
    ([2**64], [0, 8], "invalid shape"),
    ([2**63] * 100, [0, 8], "more than 2**64 elements"),
    ([1], [0, 10**4000], "invalid data_offsets"),
    ([1] * 100_000, [0, 8], "needs 4 bytes"),
])
def test_absurd_shapes_and_offsets(tmp_path: Path, shape: list[int], offsets: list[int], fragment: str) -> None:
    hdr = {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    path = write_raw_safetensors(tmp_path / "x.safetensors", hdr, b"\0" * 8)
    r = run("info", path)
    one_error_line(r, fragment)
    assert len(r.stderr) < 500, r.stderr
