"""bfloat16 and float8 saved through numpy (issue 10 §3): raw void arrays (``<V2``, ``<V1``) and ``<f1``.

Every number is checked twice: equal (==) to the same arrays saved as safetensors (BF16, F8_E4M3,
F8_E5M2) and within 1e-12 of an independent oracle (exact decoding from the bits, or math.fsum of
exactly widened squares).
"""

from __future__ import annotations

import io
import json
import math
import struct
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gradinspect
from conftest import Exact, decode, rel, rel_sqrt, run, strict_json, write_raw_safetensors
from gradinspect.errors import InputError

ST = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
NOTE = "read as bfloat16; --void-as DTYPE to choose"


def _values(dtype: str, n: int, seed: int) -> np.ndarray:
    """``n`` finite values of ``dtype`` spread over its range (negative, subnormal and zero ones included)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(n) * np.exp2(g.integers(-6, 2, n))  # within every float8's range
    x[:3] = [0.0, -1.5, 2.0**-9]
    arr = x.astype(getattr(ml_dtypes, dtype))
    assert np.all(np.isfinite(arr.astype(np.float64)))
    return arr


def _safetensors(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """The same arrays as a safetensors file, written byte for byte (safetensors.numpy has no float8)."""
    header: dict = {}
    data = b""
    for name, a in arrays.items():
        st = ST.get(a.dtype.name) or {"float32": "F32", "float16": "F16"}[a.dtype.name]
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return write_raw_safetensors(path, header, data)


def _fsum_l2(arrays: list[np.ndarray]) -> float:
    """The oracle: math.fsum of exactly widened squares (every float8/bfloat16 square is exact in float64)."""
    return math.sqrt(math.fsum(v * v for a in arrays for v in a.astype(np.float64).reshape(-1).tolist()))


def _rows(r: gradinspect.NormsReport, *names: str) -> dict[str, tuple]:
    return {t.name: (t.dtype, t.numel, t.l1, t.sq, t.linf) for t in r.tensors if t.name in names}


def _same_numbers(a: gradinspect.NormsReport, b: gradinspect.NormsReport) -> None:
    assert _rows(a, *(t.name for t in a.tensors)) == _rows(b, *(t.name for t in b.tensors))
    assert (a.total.l1, a.total.l2, a.total.sq, a.total.linf, a.clip.coef) == \
        (b.total.l1, b.total.l2, b.total.sq, b.total.linf, b.clip.coef)


# --- reading: numbers equal to safetensors and to the oracle --------------------------------------


@pytest.mark.parametrize("save", ["savez", "savez_compressed"])
@pytest.mark.parametrize("dtype,void_as", [("bfloat16", None), ("bfloat16", "bfloat16"),
                                           ("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", None)])
def test_npz_reads_what_safetensors_reads(tmp_path: Path, save: str, dtype: str, void_as: str | None) -> None:
    arrays = {"a": _values(dtype, 5000, 1).reshape(50, 100), "b": _values(dtype, 7, 2),
              "f": np.random.default_rng(3).standard_normal(300).astype(np.float32)}
    getattr(np, save)(tmp_path / "g.npz", **arrays)
    ours = gradinspect.inspect(tmp_path / "g.npz", sort="name", void_as=void_as)
    ref = gradinspect.inspect(_safetensors(tmp_path / "g.safetensors", arrays), sort="name")
    if save == "savez":
        _same_numbers(ours, ref)
    else:  # a deflated float32 member may differ from safetensors in the last bit (not a void matter): the rows
        assert _rows(ours, "a", "b") == _rows(ref, "a", "b")
    assert [t.dtype for t in ours.tensors] == [dtype, dtype, "float32"] and not ours.skipped
    assert rel(ours.total.l2, Fraction(_fsum_l2(list(arrays.values())))) <= 1e-12
    for name in ("a", "b"):  # and exactly, from the bits
        ex = Exact(decode(arrays[name]))
        row = next(t for t in ours.tensors if t.name == name)
        assert rel(row.l1, ex.s1) <= 1e-12 and rel_sqrt(row.l2, ex.s2) <= 1e-12 and row.linf == float(ex.linf)


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz", "float8_e4m3"])
def test_other_float8_types_by_name(tmp_path: Path, dtype: str) -> None:
    """float8 types safetensors has no name for: compared with the in-memory arrays and the fsum oracle."""
    arrays = {"w": _values(dtype, 3000, 4), "v": _values(dtype, 11, 5)}
    np.savez(tmp_path / "g.npz", **arrays)
    ours = gradinspect.inspect(tmp_path / "g.npz", sort="name", void_as=dtype)
    _same_numbers(ours, gradinspect.compute_norms(arrays, sort="name"))
    assert {t.dtype for t in ours.tensors} == {dtype}
    assert rel(ours.total.l2, Fraction(_fsum_l2(list(arrays.values())))) <= 1e-12


def test_npy_files_and_float16_as_void(tmp_path: Path) -> None:
    bf, e5 = _values("bfloat16", 999, 6), _values("float8_e5m2", 64, 7)
    np.save(tmp_path / "b.npy", bf)
    np.save(tmp_path / "e5.npy", e5)  # written as <f1, which numpy itself cannot read back
    assert (tmp_path / "e5.npy").read_bytes()[10:30].startswith(b"{'descr': '<f1'")
    r = gradinspect.inspect([tmp_path / "b.npy", tmp_path / "e5.npy"], sort="name")
    assert [(t.name, t.dtype) for t in r.tensors] == [("b", "bfloat16"), ("e5", "float8_e5m2")]
    _same_numbers(r, gradinspect.inspect(_safetensors(tmp_path / "g.safetensors", {"b": bf, "e5": e5}), sort="name"))
    assert rel(r.total.l2, Fraction(_fsum_l2([bf, e5]))) <= 1e-12
    # the same bits read as float16 when --void-as float16 says so
    f16 = gradinspect.inspect(tmp_path / "b.npy", void_as="float16")
    assert f16.tensors[0].dtype == "float16"
    assert f16.total.sq == gradinspect.compute_norms({"b": bf.view(np.float16)}).total.sq


def test_big_endian_raw_values(tmp_path: Path) -> None:
    """A header that says >V2 holds big-endian values: read byte-swapped, as numpy would read >f2."""
    bf = _values("bfloat16", 100, 8)
    head = "{'descr': '>V2', 'fortran_order': False, 'shape': (100,), }"
    head += " " * (-(10 + len(head) + 1) % 64) + "\n"
    (tmp_path / "be.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode()
                                      + bf.byteswap().tobytes())
    r = gradinspect.inspect(tmp_path / "be.npy")
    assert r.total.sq == gradinspect.compute_norms({"x": bf}).total.sq and r.tensors[0].dtype == "bfloat16"


def test_in_memory_void_arrays(tmp_path: Path) -> None:
    """np.load of a bfloat16 .npy gives a void array: compute_norms reads it as inspect reads the file."""
    bf = _values("bfloat16", 500, 9)
    np.save(tmp_path / "b.npy", bf)
    loaded = np.load(tmp_path / "b.npy")
    assert loaded.dtype.kind == "V"
    r = gradinspect.compute_norms({"b": loaded, "f": np.ones(3, np.float32)}, sort="name")
    ref = gradinspect.compute_norms({"b": bf, "f": np.ones(3, np.float32)}, sort="name")
    _same_numbers(r, ref)
    assert any(NOTE in n for n in r.notes)
    with pytest.raises(InputError, match=r"array 'x': raw 1-byte values \(\|V1\): which float8"):
        gradinspect.compute_norms({"x": np.zeros(3, "V1")})


# --- the note, the refusals, skip --------------------------------------------------------------------


def test_one_note_per_run_never_on_stdout(tmp_path: Path) -> None:
    for i in range(3):
        np.savez(tmp_path / f"r{i}.npz", **{f"w{i}": _values("bfloat16", 10, i), f"v{i}": _values("bfloat16", 3, i)})
    r = run("norms", tmp_path, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)  # stdout is the JSON document alone
    assert {t["dtype"] for t in doc["tensors"]} == {"bfloat16"} and len(doc["tensors"]) == 6
    notes = [line for line in r.stderr.splitlines() if NOTE in line]
    assert notes == [f"Warning: {tmp_path / 'r0.npz'} (and 2 more files): 6 arrays of raw 2-byte values (<V2) "
                     f"{NOTE}"], r.stderr
    assert run("norms", tmp_path, "-q").stderr == ""  # -q hides it, as every input warning
    explicit = run("norms", tmp_path, "--void-as", "bfloat16")  # chosen: nothing to say
    assert explicit.exit_code == 0 and NOTE not in explicit.stderr


def test_trend_says_it_once(tmp_path: Path) -> None:
    for step in range(4):
        np.savez(tmp_path / f"step_{step}.npz", w=_values("bfloat16", 20, step), b=np.ones(2, np.float32))
    r = run("trend", str(tmp_path / "step_*.npz"), "-f", "json", "--no-cache")
    assert r.exit_code == 0, r.output
    assert r.stderr.count(NOTE) == 1, r.stderr
    assert [s["step"] for s in strict_json(r.stdout)["steps"]] == [0, 1, 2, 3]


def test_v1_without_void_as_is_exit_2_with_a_hint(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "g_1.npz", w=np.ones(3, np.float32), f=_values("float8_e4m3fn", 5, 1))
    for cmd in ("norms", "check", "info", "trend"):
        r = run(cmd, tmp_path / "g_1.npz")
        assert r.exit_code == 2 and r.stdout == "", (cmd, r.output)
        assert r.stderr == (f"Error: {tmp_path / 'g_1.npz'}: member 'f.npy': raw 1-byte values (<V1): which float8 "
                            "they hold is not recorded (np.save writes ml_dtypes' float8 types this way); give "
                            "--void-as DTYPE (e.g. float8_e4m3fn; void_as= in Python) or --void-as skip\n"), cmd
    r = run("diff", tmp_path / "g_1.npz", tmp_path / "g_1.npz")
    assert r.exit_code == 2 and "--void-as" in r.stderr
    ok = run("info", tmp_path / "g_1.npz", "--void-as", "float8_e4m3fn", "--json")
    assert ok.exit_code == 0 and [t["dtype"] for t in strict_json(ok.stdout)["tensors"]] == ["float32", "float8_e4m3fn"]


def test_width_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", f=_values("float8_e4m3fn", 5, 1))
    r = run("norms", tmp_path / "g.npz", "--void-as", "bfloat16")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {tmp_path / 'g.npz'}: member 'f.npy': raw 1-byte values (<V1) do not match "
                               "--void-as bfloat16: --void-as bfloat16 is 2 bytes wide"), r.stderr
    np.save(tmp_path / "v4.npy", np.zeros(3, "V4"))
    r = run("norms", tmp_path / "v4.npy", "--void-as", "float16")
    assert r.exit_code == 2 and "raw 4-byte values (|V4) do not match --void-as float16" in r.stderr
    # a float8 name applies to 1-byte arrays only: 2-byte ones keep the bfloat16 default (with the note)
    np.savez(tmp_path / "mixed.npz", f=_values("float8_e4m3fn", 5, 1), b=_values("bfloat16", 5, 2))
    r = run("norms", tmp_path / "mixed.npz", "--void-as", "float8_e4m3fn", "--json")
    assert r.exit_code == 0 and NOTE in r.stderr
    assert {t["name"]: t["dtype"] for t in strict_json(r.stdout)["tensors"]} == {"f": "float8_e4m3fn", "b": "bfloat16"}


def test_library_refuses_unknown_names(tmp_path: Path) -> None:
    np.save(tmp_path / "b.npy", _values("bfloat16", 5, 1))
    with pytest.raises(ValueError, match="void_as must be one of bfloat16, float16, float8_e4m3fn"):
        gradinspect.inspect(tmp_path / "b.npy", void_as="float32")
    r = run("norms", tmp_path / "b.npy", "--void-as", "float32")
    assert r.exit_code == 2 and "Invalid value for '--void-as'" in r.stderr


def test_skip_lists_them_as_skipped(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", w=np.array([3.0, 4.0], np.float32), b=_values("bfloat16", 5, 1),
             f=_values("float8_e4m3fn", 5, 2))
    r = run("norms", tmp_path / "g.npz", "--void-as", "skip", "--json")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)
    assert [t["name"] for t in doc["tensors"]] == ["w"] and doc["total"]["l2"] == 5.0
    assert sorted((s["name"], s["dtype"]) for s in doc["skipped"]) == [("b", "<V2"), ("f", "<V1")]
    assert "skipped 2 tensors (b, f)" in r.stderr and NOTE not in r.stderr


@pytest.mark.parametrize("cmd", ["norms", "check", "trend"])
def test_nothing_floating_read_is_exit_2(tmp_path: Path, cmd: str) -> None:
    """Whatever the cause (here: every array skipped), a run that read no floating-point value is exit 2."""
    for step in range(2):
        np.savez(tmp_path / f"step_{step}.npz", b=_values("bfloat16", 5, step), n=np.arange(3))
    paths = [str(tmp_path / "step_*.npz")] if cmd == "trend" else [tmp_path / "step_0.npz"]
    r = run(cmd, *paths, "--void-as", "skip", "--json", *(["--no-cache"] if cmd == "trend" else []))
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr == (f"Error: {tmp_path / 'step_0.npz'}: no floating-point tensor: every tensor was skipped "
                        "(dtypes seen: <V2 x1, int64 x1)\n")


def test_trend_with_one_step_without_floats_is_exit_2(tmp_path: Path) -> None:
    """Chosen for trend: every step must hold floating-point values (a step of zeros would read as a vanishing
    gradient); the run stops at the first such step, exit 2, naming it."""
    np.savez(tmp_path / "step_0.npz", w=np.ones(3, np.float32))
    np.savez(tmp_path / "step_1.npz", b=_values("bfloat16", 5, 1))
    np.savez(tmp_path / "step_2.npz", w=np.ones(3, np.float32))
    r = run("trend", str(tmp_path / "step_*.npz"), "--void-as", "skip", "--no-cache")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {tmp_path / 'step_1.npz'}: no floating-point tensor"), r.stderr
    assert run("trend", str(tmp_path / "step_*.npz"), "--no-cache", "-q").exit_code == 0  # read as bfloat16


def test_check_config_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", f=_values("float8_e4m3fn", 5, 1))
    (tmp_path / "pyproject.toml").write_text('[tool.gradinspect.check]\nvoid_as = "float8_e4m3fn"\n')
    r = run("check", tmp_path / "g.npz", "--json", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["report"]["tensors"][0]["dtype"] == "float8_e4m3fn"


def test_diff_of_npz_and_safetensors_is_zero(tmp_path: Path) -> None:
    arrays = {"w": _values("bfloat16", 300, 1), "f": _values("float8_e4m3fn", 30, 2)}
    np.savez(tmp_path / "g.npz", **arrays)
    _safetensors(tmp_path / "g.safetensors", arrays)
    r = gradinspect.api.diff(tmp_path / "g.npz", tmp_path / "g.safetensors", void_as="float8_e4m3fn", rtol=0.0)
    assert r.ok and r.total.l2_diff == 0.0 and len(r.tensors) == 2


def test_structured_void_stays_skipped(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros(2, [("a", "<V2")]))
    (tmp_path / "s.npy").write_bytes(buf.getvalue())
    np.save(tmp_path / "w.npy", np.ones(2))
    r = gradinspect.inspect([tmp_path / "s.npy", tmp_path / "w.npy"])
    assert [s.name for s in r.skipped] == ["s"] and r.skipped[0].reason == "structured dtype is not a gradient"


def test_trend_cache_keeps_dtypes_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics cache never serves the bfloat16 reading of a file to a run that reads it as float16."""
    import gradinspect.cache as cache_mod
    from gradinspect.cache import Cache
    from gradinspect.runs import trend

    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)  # store files written just now
    bf = {step: _values("bfloat16", 50, step) for step in range(3)}
    for step, a in bf.items():
        np.savez(tmp_path / f"step_{step}.npz", w=a)
    cache = Cache(tmp_path / "cache")
    glob = str(tmp_path / "step_*.npz")
    first = trend(glob, cache=cache)
    assert cache.stored  # the bfloat16 reading is cached
    as_f16 = trend(glob, cache=Cache(tmp_path / "cache"), void_as="float16")
    again = trend(glob, cache=Cache(tmp_path / "cache"), void_as="bfloat16")
    for step, a in bf.items():
        assert first.steps[step].total.sq == again.steps[step].total.sq == \
            gradinspect.compute_norms({"w": a}).total.sq
        assert as_f16.steps[step].total.sq == gradinspect.compute_norms({"w": a.view(np.float16)}).total.sq
