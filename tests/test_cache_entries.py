"""Step entries made by hand, with a valid checksum: never a crash, never a broken JSON document."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import gradinspect.cache as cache_mod
from gradinspect.cli import cli
from gradinspect.formats import json as json_format
from gradinspect.runs import trend
from gradinspect.trend import SPELLING_WIDTH

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, rng: np.random.Generator, steps: int = 3, tensors: int = 4) -> str:
    run = tmp_path / "run"
    run.mkdir()
    for k in range(steps):
        grads = {f"m.{i}.w": rng.standard_normal(3 + i).astype(np.float32) for i in range(tensors)}
        save_file(grads, str(run / f"step_{k}.safetensors"))
    return str(run / "step_*.safetensors")


def _plain_then_cached(tmp_path: Path, path: str, *options: str) -> tuple[list[str], list[str], str]:
    """``trend PATH OPTIONS`` without the cache, then once with ``tmp_path/c`` (filled, the same output): the
    arguments, the cache's arguments and the plain output."""
    runner = CliRunner()
    args = ["trend", path, *options]
    plain = runner.invoke(cli, [*args, "--no-cache"], catch_exceptions=False).stdout
    cached = ["--cache-dir", str(tmp_path / "c")]
    assert runner.invoke(cli, [*args, *cached], catch_exceptions=False).stdout == plain
    return args, cached, plain


def _rewrite(entry: Path, change: bytes, at_end: int) -> None:
    """``entry`` with ``change`` written ``at_end`` bytes before its end, its SHA-256 recomputed (valid)."""
    body = bytearray(entry.read_bytes()[65:])
    body[len(body) - at_end:len(body) - at_end + len(change)] = change
    entry.write_bytes(hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + bytes(body))


@pytest.mark.parametrize("cell", [b"\xff" * 3, b"1,2]", b"", b"1\0-1", b"NaN", b'"NaN', b"1e\"", b"0 1.5", b"[1.0]",
                                  b"\xc3\xa9", b'"Infinity', b"1\n", b"1}", b"\x7f"])
def test_a_step_entry_with_cells_that_are_not_json_numbers_prints_the_plain_json(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, cell: bytes) -> None:
    """The norms' spellings of a step entry are laid out as JSON text on a warm ``-f json`` run: a cell that is not
    number text (digits, '.', 'e', '+', '-') nor a quoted name, NUL-padded at its end (made by hand: the checksum is
    valid), made a traceback (non-ASCII) or a broken document; its floats are then spelled as a plain run spells
    them."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)  # one line: laid out from the cells
    pattern = _run(tmp_path, rng)
    runner = CliRunner()
    args, cached, plain = _plain_then_cached(tmp_path, pattern, "-f", "json", "-q")
    entries = sorted((tmp_path / "c").glob("*.step"))
    assert len(entries) == 3
    for entry in entries:  # the last cell: the last row's share; the first of the shares' column
        _rewrite(entry, cell.ljust(SPELLING_WIDTH, b"\0"), SPELLING_WIDTH)
        _rewrite(entry, cell.ljust(SPELLING_WIDTH, b"\0"), 5 * SPELLING_WIDTH)
    warm = runner.invoke(cli, [*args, *cached])
    assert warm.exception is None and warm.exit_code == 0, warm.stderr
    assert warm.stdout == plain
    json.loads(warm.stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))


def test_a_step_entry_with_other_well_formed_cells_is_served_as_it_says(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-made entry (valid checksum) whose cells are valid JSON numbers other than its floats: served as it
    says (documented), still strict JSON."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)
    pattern = _run(tmp_path, rng)
    runner = CliRunner()
    args = ["trend", pattern, "-f", "json", "-q", "--cache-dir", str(tmp_path / "c")]
    runner.invoke(cli, args, catch_exceptions=False)
    for entry in (tmp_path / "c").glob("*.step"):
        _rewrite(entry, b"0.25".ljust(SPELLING_WIDTH, b"\0"), SPELLING_WIDTH)
    warm = runner.invoke(cli, args, catch_exceptions=False)
    doc = json.loads(warm.stdout)
    assert doc["series"]["share"][-1] == [0.25, 0.25, 0.25]


@pytest.mark.parametrize("step", [2**63, 10**30])
def test_a_step_entry_with_a_step_number_beyond_int64_is_a_miss(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Steps are numbers from 0 to 2**63 - 1 (a larger one in a name is refused): an entry saying more (made by
    hand, valid checksum) ended the run in an OverflowError traceback; it is a miss, the step read again."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    pattern = _run(tmp_path, rng)
    runner = CliRunner()
    args, cached, plain = _plain_then_cached(tmp_path, pattern, "-f", "csv", "-q")
    entry = sorted((tmp_path / "c").glob("*.step"))[0]
    head, rest = entry.read_bytes()[65:].split(b"\n", 1)
    doc = json.loads(head)
    doc["step"] = step
    body = json.dumps(doc, separators=(",", ":")).encode("ascii") + b"\n" + rest
    entry.write_bytes(hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body)
    cache = cache_mod.Cache(tmp_path / "c")
    assert [s.step for s in trend(pattern, cache=cache).steps] == [0, 1, 2] and cache.step_misses == 1
    entry.write_bytes(hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body)
    warm = runner.invoke(cli, [*args, *cached])
    assert warm.exception is None and warm.exit_code == 0 and warm.stdout == plain


def _file_checksum(key: object, stats: object) -> str:
    """A file entry's checksum, as the cache makes it (written here independently)."""
    body = json.dumps({"key": key, "stats": stats}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


@pytest.mark.parametrize(("p", "field"), [("2", 6), ("3", 7), ("1", 5), ("inf", 3)])
def test_a_file_entry_with_a_negative_sum_is_a_miss(tmp_path: Path, rng: np.random.Generator,
                                                    monkeypatch: pytest.MonkeyPatch, p: str, field: int) -> None:
    """A file entry's sums (linf, s1, s2, sp: magnitudes) made negative by hand, checksum valid: a square root
    (-p 2) or a power (-p 3: a complex number) of it ended the run in a traceback; it is a miss, the file read again."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    pattern = _run(tmp_path, rng)
    runner = CliRunner()
    args, cached, plain = _plain_then_cached(tmp_path, pattern, "-f", "csv", "-q", "-p", p)
    for entry in (tmp_path / "c").glob("*.step"):
        entry.unlink()  # else the step entries answer, the file entries unread
    entries = sorted((tmp_path / "c").glob("*.json"))
    assert len(entries) == 3

    def negative() -> None:
        for entry in entries:
            doc = json.loads(entry.read_bytes())
            for row in doc["stats"].values():
                row[field] = (-1.0).hex()
            doc["checksum"] = _file_checksum(doc["key"], doc["stats"])
            entry.write_text(json.dumps(doc))

    negative()
    warm = runner.invoke(cli, [*args, *cached])
    assert warm.exception is None and warm.exit_code == 0 and warm.stdout == plain
    negative()
    for entry in (tmp_path / "c").glob("*.step"):
        entry.unlink()
    cache = cache_mod.Cache(tmp_path / "c")
    report = trend(pattern, cache=cache, norm_type=p)
    assert cache.misses == 3 and cache.hits == 0 and [s.step for s in report.steps] == [0, 1, 2]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_fifo_in_place_of_an_entry_is_a_miss_not_a_hang(tmp_path: Path, rng: np.random.Generator) -> None:
    """Opening a named pipe with no writer waits forever: a FIFO put where a step entry and the file entries are
    hung trend; they are misses now (in a subprocess, so that a hang fails the test instead of stopping it)."""
    pattern = _run(tmp_path, rng)
    time.sleep(2.1)  # files written just now are not stored
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "gradinspect", "trend", pattern, "-f", "csv", "-q"]
    plain = subprocess.run([*args, "--no-cache"], capture_output=True, env=env, timeout=120, check=True)
    cached = ["--cache-dir", str(tmp_path / "c")]
    subprocess.run([*args, *cached], capture_output=True, env=env, timeout=120, check=True)
    entries = sorted((tmp_path / "c").glob("*.step")) + sorted((tmp_path / "c").glob("*.json"))
    assert len(entries) == 6
    for entry in entries[:1] + entries[3:]:  # step 0's step entry, every file entry
        entry.unlink()
        os.mkfifo(entry)
    warm = subprocess.run([*args, *cached], capture_output=True, env=env, timeout=60, check=False)
    assert (warm.returncode, warm.stdout, warm.stderr) == (0, plain.stdout, b"")


@pytest.mark.parametrize("layout", ["pattern", "dumper"])
def test_a_step_entry_saying_another_number_than_the_name_is_a_miss(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """With --step-pattern, or in a GradDumper directory, a step's number is its name's: an entry saying another
    (made by hand, valid checksum) was served under the name's number, two results had one number and the analysis
    ended in a ValueError traceback. It is a miss: the step read again."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    run = tmp_path / "run"
    run.mkdir()
    for k in range(3):
        grads = {f"m.{i}.w": rng.standard_normal(3).astype(np.float32) for i in range(3)}
        name = f"step_{k:08d}_rank0.safetensors" if layout == "dumper" else f"ckpt_{k}.safetensors"
        save_file(grads, str(run / name))
    path, extra = (str(run), []) if layout == "dumper" else (str(run / "ckpt_*.safetensors"), ["--step-pattern",
                                                                                                 r"ckpt_(\d+)"])
    runner = CliRunner()
    args, cached, plain = _plain_then_cached(tmp_path, path, "-f", "csv", "-q", *extra)
    entries = sorted((tmp_path / "c").glob("*.step"))
    assert len(entries) == 3
    for entry in entries:  # every entry says step 0
        head, rest = entry.read_bytes()[65:].split(b"\n", 1)
        doc = json.loads(head)
        doc["step"] = 0
        body = json.dumps(doc, separators=(",", ":")).encode("ascii") + b"\n" + rest
        entry.write_bytes(hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body)
    warm = runner.invoke(cli, [*args, *cached])
    assert warm.exception is None and warm.exit_code == 0 and warm.stdout == plain


def test_a_file_entry_whose_sum_of_squares_exceeds_the_square_of_its_sum_is_a_miss(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """s1 made the smallest subnormal by hand (checksum valid), s2 left: Σx² > (Σ|x|)², impossible for real sums;
    combine() took its shared exponent from s1 and overflowed rescaling s2 (found by benchmarks/fuzz_cache.py,
    seed 11): a miss now, the file read again."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    pattern = _run(tmp_path, rng)
    runner = CliRunner()
    args, cached, plain = _plain_then_cached(tmp_path, pattern, "-f", "csv", "-q")
    for entry in (tmp_path / "c").glob("*.step"):
        entry.unlink()
    entries = sorted((tmp_path / "c").glob("*.json"))
    for entry in entries:
        doc = json.loads(entry.read_bytes())
        for row in doc["stats"].values():
            row[5] = (5e-324).hex()
        doc["checksum"] = _file_checksum(doc["key"], doc["stats"])
        entry.write_text(json.dumps(doc))
    cache = cache_mod.Cache(tmp_path / "c")
    assert _csv(trend(pattern, cache=cache)) == _csv(trend(pattern))
    assert cache.misses == 3 and cache.hits == 0
    warm = runner.invoke(cli, [*args, *cached])
    assert warm.exception is None and warm.exit_code == 0 and warm.stdout == plain


def _csv(report: object) -> list[tuple[object, ...]]:
    return list(report.csv_rows())  # type: ignore[attr-defined]
