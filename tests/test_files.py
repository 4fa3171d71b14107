"""Files as they are on disk: changed while being read, skipped files, warnings, --json, --loss-scale."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import run
from gradinspect import api, engine, pipeline
from gradinspect.errors import InputError
from gradinspect.sources import store as byte_store


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- 1. a file changed between its header and its data ------------------------------


def _save(path: Path, value: float, meta: str = "", name: str = "w") -> Path:
    """One float32 tensor; ``meta`` lengthens the header, moving the data."""
    save_file({name: np.full(64, value, np.float32)}, str(path), metadata={"pad": meta} if meta else None)
    return path


def _replace(path: Path) -> None:
    """Another file renamed over ``path``: a longer header, so old offsets land in its header text."""
    new = path.with_suffix(".new")
    _save(new, 3.0, meta="x" * 200)
    os.replace(new, path)


def _rewrite_in_place(path: Path) -> None:
    """Same size, other bytes, a later mtime (set explicitly: no sleep, no clock granularity)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(1e30).tobytes()
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 64)


def _truncate(path: Path) -> None:
    os.truncate(path, os.stat(path).st_size - 100)


CHANGES = {"replaced": _replace, "rewritten": _rewrite_in_place, "appended": _append, "truncated": _truncate}


def _before_reading(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run ``change`` once, after the headers are parsed, before the first data byte is read."""
    original = engine.reduce_entries
    done: list[bool] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        if not done:
            done.append(True)
            change()
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "reduce_entries", hooked)


@pytest.fixture(params=["held", "parked"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """held: each file read through the descriptor its header came from; parked: past the
    descriptor budget, closed after the header and reopened (verified) to read."""
    if request.param == "parked":
        monkeypatch.setattr(byte_store, "hold_budget", lambda: 0)
    return request.param


@pytest.mark.parametrize("how", CHANGES)
def test_file_changed_between_header_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                              how: str) -> None:
    a = _save(tmp_path / "a.safetensors", 0.5)
    b = _save(tmp_path / "b.safetensors", 0.25, name="v")
    _before_reading(monkeypatch, lambda: CHANGES[how](a))
    r = run("norms", a, b)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert r.stderr == f"Error: {a}: changed while being read\n"


def test_file_replaced_during_replica_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _save(tmp_path / "rank0.safetensors", 0.5)
    b = _save(tmp_path / "rank1.safetensors", 0.5)
    original = pipeline.pair_stats

    def hooked(*args: Any) -> Any:
        _replace(b)
        return original(*args)

    monkeypatch.setattr(pipeline, "pair_stats", hooked)
    r = run("norms", a, b, "--shards", "replicas")
    assert r.exit_code == 2, r.output
    assert r.stderr == f"Error: {b}: changed while being read\n"


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_diff_file_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    a = _save(tmp_path / "a.safetensors", 0.5)
    b = _save(tmp_path / "b.safetensors", 0.5)
    original = pipeline.pair_stats

    def hooked(*args: Any) -> Any:
        CHANGES[how](b)
        return original(*args)

    monkeypatch.setattr(pipeline, "pair_stats", hooked)
    r = run("diff", a, b)
    assert r.exit_code == 2, r.output
    assert r.stderr == f"Error: {b}: changed while being read\n"


def test_unchanged_files_open_once_and_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One open per file (never reopened by path), stat calls per file that do not grow with
    its tensor count, and no descriptor left open, also after an error."""
    calls = {"open": 0, "stat": 0}
    real_open, real_fstat, real_stat = byte_store.open_fd, os.fstat, os.stat

    def counting_open(path: str) -> int:
        calls["open"] += 1
        return real_open(path)

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            calls["stat"] += 1
            return fn(*args, **kwargs)
        return inner

    monkeypatch.setattr(byte_store, "open_fd", counting_open)
    monkeypatch.setattr(os, "fstat", counting(real_fstat))
    monkeypatch.setattr(os, "stat", counting(real_stat))
    before = _fds()
    per_file = []
    for n in (1, 50):
        paths = []
        for i in range(3):
            p = tmp_path / f"n{n}s{i}.safetensors"
            save_file({f"t{i}.{k}": np.full(10 + k, 1.0, np.float32) for k in range(n)}, str(p))
            paths.append(p)
        calls.update(open=0, stat=0)
        report = gradinspect.inspect(paths)
        assert report.total.numel == 3 * sum(10 + k for k in range(n))
        assert calls["open"] == 3
        per_file.append(calls["stat"] / 3)
    # resolve + header 4, and 3 checks: fstat at the header, fstat + stat at the end
    assert per_file[0] == per_file[1] <= 7
    assert _fds() == before
    api.info(paths)
    api.diff(paths, paths)
    assert _fds() == before
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 4)
    for call in (lambda: gradinspect.inspect([*paths, bad]), lambda: api.diff(paths, [bad])):
        with pytest.raises(InputError, match=r"bad\.safetensors"):
            call()
        assert _fds() == before


def test_many_files_do_not_exhaust_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the budget, sources are parked: at most the budget is open at once."""
    monkeypatch.setattr(byte_store, "hold_budget", lambda: 4)
    paths = [_save(tmp_path / f"r{i:02d}.safetensors", float(i), name=f"w{i}") for i in range(20)]
    before = _fds()
    peak = [0]
    original = engine.reduce_entries

    def watching(*args: Any, **kwargs: Any) -> Any:
        peak[0] = max(peak[0], _fds() - before)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "reduce_entries", watching)
    report = gradinspect.inspect(paths)
    assert report.total.sq == sum(64 * float(i) ** 2 for i in range(20))
    assert 1 <= peak[0] <= 5
    assert _fds() == before


# --- 2. files a directory holds that are not read -------------------------------------


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": np.ones(4, np.float32)}, str(d / "grads.safetensors"))
    (d / "grads.ckpt").write_bytes(b"\x80\x04pickle")
    (d / "notes.txt").write_text("hello")
    (d / "sub").mkdir()
    return d


SKIPPED_FILES = ("skipped 2 files that are not .safetensors/.npz/.npy (grads.ckpt, notes.txt); "
                 ".ckpt files are pickles, never loaded (they can run code): save with safetensors")


@pytest.mark.parametrize("command", ["norms", "check", "info", "diff"])
def test_directory_files_not_read_are_named(ckpt: Path, command: str) -> None:
    args = [ckpt, ckpt] if command == "diff" else [ckpt]
    r = run(command, *args)
    assert r.exit_code == 0, r.output
    expected = f"Warning: {ckpt}{os.sep}: {SKIPPED_FILES}\n"
    assert r.stderr == expected * (2 if command == "diff" else 1)
    assert "grads.ckpt" not in r.stdout


def test_directory_files_not_read_reach_the_api(ckpt: Path) -> None:
    assert gradinspect.inspect(ckpt).input_warnings() == [f"{ckpt}{os.sep}: {SKIPPED_FILES}"]
    assert api.info(ckpt).notes == (f"{ckpt}{os.sep}: {SKIPPED_FILES}",)
    assert api.diff(ckpt, ckpt).warnings() == [f"{ckpt}{os.sep}: {SKIPPED_FILES}"] * 2


def test_directory_with_only_readable_files_warns_nothing(ckpt: Path) -> None:
    (ckpt / "grads.ckpt").unlink()
    (ckpt / "notes.txt").unlink()
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"w": "grads.safetensors"}}')
    r = run("norms", ckpt)
    assert r.exit_code == 0 and r.stderr == ""


# --- 3. warnings: skipped tensors summarised; -q keeps NaN/Inf warnings, -qq hides them ----


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.safetensors"
    tensors: dict[str, np.ndarray] = {"w": np.array([1.0, np.nan, 2.0], np.float32)}
    tensors.update({f"step{i}": np.array(i, np.int64) for i in range(10)})
    tensors.update({"mask0": np.ones(3, bool), "mask1": np.zeros(3, bool)})
    save_file(tensors, str(path))
    return path


def test_skipped_tensors_are_summarised(mixed: Path) -> None:
    r = run("norms", mixed)
    assert r.exit_code == 0, r.output
    doc = json.loads(run("norms", mixed, "--json").stdout)
    expected = ["mask0", "mask1", *(f"step{i}" for i in range(10))]
    assert sorted(s["name"] for s in doc["skipped"]) == sorted(expected)
    ints = [s["name"] for s in doc["skipped"]]  # in file order
    skipped = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert skipped == [
        ("Warning: skipped 12 tensors that are not floating point: 10 int64, 2 bool "
         f"({', '.join(ints[:3])}, ...; --format json lists them)"),
    ]


def test_values_that_are_not_read_are_refused_unless_excluded(tmp_path: Path) -> None:
    """Complex, float128 or an npz member that is not .npy may hold NaN: a gate must not pass them unread."""
    path = tmp_path / "cx.npz"
    np.savez(path, w=np.ones(3, np.float32), c=np.array([1 + 1j, np.nan], np.complex64))
    r = run("check", path)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"Error: {path}: tensor 'c': complex dtype (complex64) is not supported: its values would be "
                        "left out of every total (--exclude 'c' leaves it out knowingly)\n")
    r = run("check", path, "--exclude", "c")
    assert r.exit_code == 0 and "OK" in r.stdout
    q = tmp_path / "q.npz"
    np.savez(q, w=np.ones(3, np.float32), q=np.array([np.inf], np.longdouble))
    assert run("norms", q).exit_code == 2


def test_skipped_tensors_with_one_other_reason_share_a_line() -> None:
    rec = np.zeros(2, dtype=[("x", "<f4")])
    r = gradinspect.compute_norms({"a": rec, "b": rec.copy(), "w": np.ones(2)})
    assert r.input_warnings() == ["skipped 2 tensors (a, b): structured dtype is not a gradient"]


@pytest.mark.parametrize(("flags", "skips", "nans"), [((), True, True), (("-q",), False, True),
                                                      (("--quiet",), False, True), (("-qq",), False, False),
                                                      (("-q", "-q"), False, False)])
def test_quiet_levels(mixed: Path, flags: tuple[str, ...], skips: bool, nans: bool) -> None:
    r = run("norms", mixed, *flags)
    assert r.exit_code == 0, r.output
    assert ("skipped" in r.stderr) is skips
    assert ("1 NaN and 0 infinite gradient values: the global norm is NaN" in r.stderr) is nans
    assert ("the clip coefficient is NaN" in r.stderr) is nans
    assert "Error" not in r.stderr and r.stdout


def test_quiet_help() -> None:
    for command in ("norms", "check"):
        out = " ".join(run(command, "--help").stdout.split())
        assert "-qq: none of those either (only Error lines)" in out
        assert "except those about NaN/Inf values" in out


# --- 4. --json on every command ----------------------------------------------------------


@pytest.mark.parametrize("command", ["norms", "check", "diff", "info"])
def test_json_flag_on_every_command(tmp_path: Path, command: str) -> None:
    path = _save(tmp_path / "g.safetensors", 0.5)
    args = [path, path] if command == "diff" else [path]
    r = run(command, *args, "--json")
    assert r.exit_code == 0, r.output
    assert r.stdout == run(command, *args, "--format", "json").stdout
    assert json.loads(r.stdout)["schema"] == f"gradinspect.{command}/1"
    assert "Short for --format json." in run(command, "--help").stdout


def test_json_flag_wins_over_the_config_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "g.safetensors", 0.5)
    (tmp_path / "pyproject.toml").write_text('[tool.gradinspect.check]\nformat = "github"\n')
    monkeypatch.chdir(tmp_path)
    assert json.loads(run("check", path, "--json").stdout)["ok"] is True


# --- 6. --loss-scale: AMP gradients saved before unscaling -------------------------------------

_NUMBERS = ("l1", "l2", "linf", "norm", "sq", "share")


def _numbers(doc: dict) -> tuple:
    rows = sorted((t["name"], *(t[k] for k in _NUMBERS)) for t in doc["tensors"])
    return rows, doc["total"], doc["clip"]


@pytest.fixture
def amp(tmp_path: Path, rng: np.random.Generator) -> dict[str, Path]:
    t = {"a": (rng.standard_normal(1000) * 0.3).astype(np.float32),
         "b": (rng.standard_normal((7, 5)) * 0.01).astype(np.float32),
         "c": np.float32(1e-3) * rng.standard_normal(100_000).astype(np.float32)}
    scaled = {k: v * np.float32(2.0**16) for k, v in t.items()}  # exact: a power of two
    paths = {"plain": tmp_path / "plain.safetensors", "meta": tmp_path / "meta.safetensors",
             "scaled": tmp_path / "scaled.safetensors"}
    save_file(t, str(paths["plain"]))
    save_file(scaled, str(paths["meta"]), metadata={"loss_scale": "65536"})
    save_file(scaled, str(paths["scaled"]))
    return paths


@pytest.mark.parametrize("p", ["2", "1", "inf", "3"])
def test_loss_scale_power_of_two_gives_the_unscaled_numbers_exactly(amp: dict[str, Path], p: str) -> None:
    args = ("-p", p, "--max-norm", "1000", "--json")
    plain = json.loads(run("norms", amp["plain"], *args).stdout)
    meta = json.loads(run("norms", amp["meta"], *args).stdout)
    given = json.loads(run("norms", amp["scaled"], *args, "--loss-scale", "65536").stdout)
    wins = json.loads(run("norms", amp["meta"], *args, "--loss-scale", "65536.0").stdout)
    assert _numbers(meta) == _numbers(given) == _numbers(wins) == _numbers(plain)
    assert plain["loss_scale"] is None and meta["loss_scale"] == given["loss_scale"] == 65536
    scaled = json.loads(run("norms", amp["scaled"], *args).stdout)
    assert scaled["total"]["norm"] > 1000 and scaled["clip"]["clipped"]  # what the scaled dump would say
    assert plain["total"]["norm"] < 1000 and not meta["clip"]["clipped"] and meta["clip"]["coef"] == 1.0


def test_loss_scale_on_check_and_in_the_table(amp: dict[str, Path]) -> None:
    assert run("check", amp["scaled"], "--fail-on-clip", "--max-norm", "10").exit_code == 1
    assert run("check", amp["meta"], "--fail-on-clip", "--max-norm", "10").exit_code == 0
    r = run("check", amp["scaled"], "--fail-on-clip", "--max-norm", "10", "--loss-scale", "65536", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["report"]["loss_scale"] == 65536
    assert re.search(r"\nloss scale +65536 removed \(from metadata\)\n", run("norms", amp["meta"]).stdout)
    out = run("norms", amp["scaled"], "--loss-scale", "1024.5").stdout
    assert re.search(r"\nloss scale +1024.5 removed \(--loss-scale\)\n", out)
    assert "loss scale" not in run("norms", amp["plain"]).stdout
    assert "--loss-scale S" in run("norms", "--help").stdout and "--loss-scale S" in run("check", "--help").stdout


@pytest.mark.parametrize("scale", [1000.0, 3.7, 1e-3, 2.0**-20 * 3])
def test_loss_scale_any_number_against_an_fsum_oracle(tmp_path: Path, rng: np.random.Generator,
                                                      scale: float) -> None:
    t = {"x": rng.standard_normal(3000) * scale, "y": rng.standard_normal(50) * 1e-3 * scale}
    path = tmp_path / "g.safetensors"
    save_file(t, str(path))
    doc = json.loads(run("norms", path, "--loss-scale", repr(scale), "--max-norm", "0.5", "--json").stdout)
    values = [float(v) / scale for v in np.concatenate([t["x"], t["y"]]).tolist()]
    l2 = math.sqrt(math.fsum(v * v for v in values))
    oracle = {"l1": math.fsum(abs(v) for v in values), "l2": l2, "linf": max(abs(v) for v in values),
              "sq": math.fsum(v * v for v in values)}
    for key, expected in oracle.items():
        assert doc["total"][key] == pytest.approx(expected, rel=1e-12), key
    for row in doc["tensors"]:
        vs = [float(v) / scale for v in t[row["name"]].tolist()]
        assert row["l2"] == pytest.approx(math.sqrt(math.fsum(v * v for v in vs)), rel=1e-12)
    assert doc["clip"]["coef"] == pytest.approx(0.5 / (l2 + 1e-6), rel=1e-12)
    assert doc["loss_scale"] == scale


def test_loss_scale_in_memory_and_general_p() -> None:
    x = np.array([3.0, -4.0, 12.0]) * 3.0
    r = gradinspect.compute_norms({"x": x}, norm_type=3, loss_scale=3.0)
    assert r.total.norm == pytest.approx((27 + 64 + 1728) ** (1 / 3), rel=1e-14)
    assert r.total.linf == 12.0 and r.loss_scale == 3.0
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0, not 0"):
        gradinspect.compute_norms({"x": x}, loss_scale=0)


def test_loss_scale_replica_difference_is_unscaled(tmp_path: Path) -> None:
    save_file({"w": np.array([1.0, 2.0]) * 256}, str(tmp_path / "r0.safetensors"), metadata={"loss_scale": "256"})
    save_file({"w": np.array([1.0, 2.5]) * 256}, str(tmp_path / "r1.safetensors"), metadata={"loss_scale": "256"})
    r = gradinspect.inspect([tmp_path / "r0.safetensors", tmp_path / "r1.safetensors"], shards="replicas")
    assert r.tensors[0].replica_max_diff == 0.5 and r.total.l2 == math.sqrt(5.0)
    assert "max |difference| 0.5" in " ".join(r.notes)


@pytest.mark.parametrize(("metas", "message"), [
    (["65536", "1024"], ("metadata loss_scale '1024' differs from '65536' in {a} (--loss-scale, loss_scale= in "
                         "Python, overrides it)")),
    (["65536", None], "metadata loss_scale none differs from '65536' in {a}"),
    (["abc", "abc"], "metadata loss_scale 'abc' is not a finite number > 0"),
    (["0", "0"], "metadata loss_scale '0' is not a finite number > 0"),
    (["inf", "inf"], "metadata loss_scale 'inf' is not a finite number > 0"),
])
def test_loss_scale_metadata_problems(tmp_path: Path, metas: list[str | None], message: str) -> None:
    paths = []
    for i, m in enumerate(metas):
        p = tmp_path / f"s{i}.safetensors"
        save_file({f"w{i}": np.ones(2, np.float32)}, str(p), metadata=None if m is None else {"loss_scale": m})
        paths.append(p)
    r = run("norms", *paths)
    assert r.exit_code == 2 and r.stdout == ""
    bad = paths[1] if "differs" in message else paths[0]
    assert r.stderr.startswith(f"Error: {bad}: " + message.format(a=paths[0])), r.stderr
    assert run("norms", *paths, "--loss-scale", "2").exit_code == 0  # the option wins


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_loss_scale_option_must_be_a_finite_positive_number(tmp_path: Path, value: str) -> None:
    path = _save(tmp_path / "g.safetensors", 0.5)
    r = run("norms", path, "--loss-scale", value)
    assert r.exit_code == 2 and "--loss-scale" in r.stderr and r.stdout == ""


def test_urls_name_what_is_missing(tmp_path: Path) -> None:
    """A URL is not a missing local file: the error says no byte store reads its scheme."""
    r = run("norms", "s3://bucket/grads.safetensors")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == "Error: s3://bucket/grads.safetensors: s3:// URLs are not supported yet (local files only)\n"


def test_byte_stores_are_registered_by_scheme() -> None:
    from gradinspect.sources.store import STORES, LocalFile, store_class

    assert store_class("/tmp/x.safetensors") is LocalFile and LocalFile in STORES
    with pytest.raises(gradinspect.InputError, match=r"gs:// URLs are not supported yet"):
        store_class("gs://b/x.safetensors")


@pytest.mark.parametrize("command", ["diff", "info"])
def test_quiet_on_diff_and_info(ckpt: Path, command: str) -> None:
    """Found in review: diff and info printed their warnings with no -q to hide them."""
    args = [ckpt, ckpt] if command == "diff" else [ckpt]
    assert "Warning:" in run(command, *args).stderr
    r = run(command, *args, "-q")
    assert r.exit_code == 0 and r.stderr == "" and r.stdout
