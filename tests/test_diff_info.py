"""gradinspect diff (against a numpy float64 oracle) and gradinspect info."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import run, strict_json
from gradinspect.api import diff, info
from gradinspect.diff import PairReducer, combine_pairs


def oracle(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(a - b)
    big = max(na, nb)
    cos = 1.0 if na == nb == 0 else (0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
    return {"l2_a": na, "l2_b": nb, "l2_diff": nd, "rel": nd / big if big else 0.0, "cosine": cos,
            "linf_diff": float(np.abs(a - b).max()) if a.size else 0.0}


def assert_row(row: object, expected: dict[str, float]) -> None:
    for k, v in expected.items():
        assert getattr(row, k) == pytest.approx(v, rel=1e-12, abs=1e-15), k


@pytest.fixture
def pair(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, dict, dict]:
    a = {"w1": rng.standard_normal((30, 20)), "w2": rng.standard_normal(50).astype(np.float32),
         "z": np.zeros(4), "same": np.arange(6.0), "only_a": np.ones(2), "shape": np.ones((2, 3))}
    b = {"w1": a["w1"] + 1e-3 * rng.standard_normal((30, 20)), "w2": (a["w2"] * 1.5).astype(ml_dtypes.bfloat16),
         "z": np.ones(4), "same": np.arange(6.0), "only_b": np.ones(3), "shape": np.ones((3, 2))}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb, a, b


def test_diff_against_numpy_oracle(pair: tuple[Path, Path, dict, dict]) -> None:
    pa, pb, a, b = pair
    r = diff(pa, pb)
    rows = {t.name: t for t in r.tensors}
    assert set(rows) == {"w1", "w2", "z", "same"}
    for name in rows:
        assert_row(rows[name], oracle(a[name], b[name]))
    assert rows["z"].cosine == 0.0 and rows["same"].cosine == 1.0 and rows["same"].l2_diff == 0.0
    assert rows["w2"].dtype_a == "float32" and rows["w2"].dtype_b == "bfloat16"
    names = ["w1", "w2", "z", "same"]
    assert_row(r.total, oracle(np.concatenate([a[n].ravel() for n in names]),
                               np.concatenate([b[n].astype(np.float64).ravel() for n in names])))
    assert r.only_a == ("only_a",) and r.only_b == ("only_b",)
    assert [(m.name, m.shape_a, m.shape_b) for m in r.mismatched] == [("shape", (2, 3), (3, 2))]
    assert [t.name for t in r.tensors][:2] == ["z", "w2"]  # worst relative difference first
    assert r.ok  # no tolerance: diff only reports


def test_both_zero_and_one_zero() -> None:
    red = PairReducer()
    both = red.reduce(np.zeros(3), np.zeros(3))
    one = red.reduce(np.zeros(3), np.ones(3))
    assert (both.cosine, both.rel) == (1.0, 0.0)
    assert (one.cosine, one.rel) == (0.0, 1.0)


def test_diff_overflow_safe() -> None:
    red = PairReducer()
    p = red.reduce(np.array([1e300, -1e300, 1e-300]), np.array([-1e300, 1e300, 0.0]))
    assert p.rel == pytest.approx(2.0, rel=1e-15)
    assert p.cosine == pytest.approx(-1.0, rel=1e-15)
    p = red.reduce(np.full(3, 1.5e308), np.full(3, -1.5e308))
    assert p.rel == pytest.approx(2.0, rel=1e-15) and p.d.l2 == math.inf and p.d.linf == math.inf


def test_diff_chunks_combine_exactly(rng: np.random.Generator) -> None:
    a, b = rng.standard_normal(1000), rng.standard_normal(1000)
    whole = PairReducer().reduce(a, b)
    red = PairReducer(chunk=64)
    parts = combine_pairs(red.reduce(a[i : i + 64], b[i : i + 64]) for i in range(0, 1000, 64))
    assert parts.cosine == pytest.approx(whole.cosine, rel=1e-14)
    assert parts.rel == pytest.approx(whole.rel, rel=1e-14)


def test_diff_nonfinite_is_nan_and_fails_tolerance(tmp_path: Path) -> None:
    save_file({"w": np.array([1.0, np.nan])}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.array([1.0, 2.0])}, str(tmp_path / "b.safetensors"))
    r = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors", rtol=1.0)
    assert math.isnan(r.tensors[0].rel) and math.isnan(r.tensors[0].cosine) and r.tensors[0].ok is False and not r.ok


@pytest.mark.parametrize(
    "args,code",
    [
        ([], 0),
        (["--rtol", "1e-2"], 1),  # z fails, and the sets differ
        (["--rtol", "10", "--allow-missing"], 0),
        (["--rtol", "10"], 1),  # all tensors pass, but only_a/only_b/shape make it fail
        (["--atol", "100", "--allow-missing"], 0),
        (["--min-cosine", "0.5", "--allow-missing"], 1),  # z has cosine 0
        (["--min-cosine", "0.5", "--allow-missing", "--exclude", "z"], 0),
    ],
)
def test_diff_tolerances_and_exit_codes(pair: tuple[Path, Path, dict, dict], args: list[str], code: int) -> None:
    pa, pb, _, _ = pair
    r = run("diff", pa, pb, "-f", "json", *args)
    assert r.exit_code == code, r.stdout + r.stderr
    doc = strict_json(r.stdout)
    assert doc["ok"] is (code == 0)


def test_diff_rtol_atol_rule() -> None:
    a = {"t": np.array([1.0, 0.0])}
    b = {"t": np.array([1.0, 0.1])}
    # l2_diff = 0.1, max(l2) = sqrt(1.01)
    with_tol = lambda **kw: diff_mem(a, b, **kw).tensors[0].ok
    assert with_tol(atol=0.1) is True and with_tol(atol=0.099) is False
    assert with_tol(rtol=0.1) is True and with_tol(rtol=0.09) is False
    assert with_tol(rtol=0.05, atol=0.05) is True
    assert with_tol() is None


def diff_mem(a: dict, b: dict, **kw: object) -> gradinspect.report.DiffReport:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_file(a, f"{d}/a.safetensors")
        save_file(b, f"{d}/b.safetensors")
        return diff(f"{d}/a.safetensors", f"{d}/b.safetensors", **kw)  # type: ignore[arg-type]


def test_diff_sharded_sides(tmp_path: Path, rng: np.random.Generator) -> None:
    g = {f"t{i}": rng.standard_normal(10) for i in range(4)}
    (tmp_path / "a").mkdir()
    save_file({k: g[k] for k in ("t0", "t1")}, str(tmp_path / "a" / "1.safetensors"))
    save_file({k: g[k] for k in ("t2", "t3")}, str(tmp_path / "a" / "2.safetensors"))
    np.savez_compressed(tmp_path / "b.npz", **g)
    r = diff(tmp_path / "a", tmp_path / "b.npz", rtol=0.0)
    assert r.ok and r.total.l2_diff == 0.0 and len(r.tensors) == 4


def test_diff_formats(pair: tuple[Path, Path, dict, dict]) -> None:
    pa, pb, _, _ = pair
    r = run("diff", pa, pb, "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["name"] for row in rows][:2] == ["z", "w2"] and rows[0]["cosine"] == "0.0"
    r = run("diff", pa, pb, "-f", "markdown")
    assert r.stdout.startswith("| # | tensor |") and "only in A" in r.stdout
    r = run("diff", pa, pb, "--rtol", "1e-2")
    assert r.exit_code == 1
    assert "only in A" in r.stdout and "shape differs" in r.stdout and "FAIL" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_diff_bad_input(tmp_path: Path, pair: tuple[Path, Path, dict, dict]) -> None:
    pa, _, _, _ = pair
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    r = run("diff", pa, tmp_path / "bad.npz", "--rtol", "0")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith(f"Error: {tmp_path / 'bad.npz'}: ")


# --- info ------------------------------------------------------------------


def test_info_from_headers(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_file({"w": np.ones((3, 4), np.float32), "b": np.ones(2, ml_dtypes.bfloat16), "step": np.array(1)},
              str(path), metadata={"step": "1"})
    doc = strict_json(run("info", path, "-f", "json").stdout)
    assert doc["schema"] == "gradinspect.info/1"
    assert {t["name"]: (t["dtype"], t["shape"], t["numel"], t["bytes"]) for t in doc["tensors"]} == {
        "w": ("float32", [3, 4], 12, 48), "b": ("bfloat16", [2], 2, 4), "step": ("int64", [], 1, 8)}
    assert doc["metadata"] == {str(path): {"step": "1"}}
    assert doc["total"] == {"tensors": 3, "numel": 15, "bytes": 60, "by_dtype": {
        "bfloat16": {"tensors": 1, "numel": 2, "bytes": 4}, "float32": {"tensors": 1, "numel": 12, "bytes": 48},
        "int64": {"tensors": 1, "numel": 1, "bytes": 8}}}
    r = run("info", path)
    assert r.exit_code == 0 and "bfloat16" in r.stdout and "step=1" in r.stdout
    rows = list(csv.DictReader(io.StringIO(run("info", path, "-f", "csv").stdout)))
    assert {row["name"] for row in rows} == {"w", "b", "step"}


def test_info_on_a_huge_sparse_file_reads_only_the_header(tmp_path: Path) -> None:
    """A 1 TiB (sparse) file: header-only, so instant."""
    numel = (1 << 40) // 4
    entry = {"dtype": "F32", "shape": [1 << 20, numel >> 20], "data_offsets": [0, 4 * numel]}
    header = json.dumps({"g": entry}).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * numel)
    r = info(path)
    assert r.tensors[0].bytes == 1 << 40 and r.tensors[0].numel == numel


def test_info_bad_input(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 4)
    r = run("info", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and r.stdout == "" and "too short" in r.stderr


def test_corrupt_b_side_is_an_error(tmp_path: Path, rng: np.random.Generator) -> None:
    g = {"w": rng.standard_normal(1000), "v": rng.standard_normal(10)}
    np.savez(tmp_path / "a.npz", **g)
    np.savez(tmp_path / "b.npz", **g)
    data = bytearray((tmp_path / "b.npz").read_bytes())
    at = data.find(g["w"].tobytes())
    data[at + 100] ^= 0x01
    (tmp_path / "b.npz").write_bytes(bytes(data))
    for a, b in (("a.npz", "b.npz"), ("b.npz", "a.npz")):
        r = run("diff", tmp_path / a, tmp_path / b)
        assert r.exit_code == 2 and "CRC-32 mismatch" in r.stderr and r.stdout == ""


def test_memory_order_and_dtype_class_mismatches_are_listed(tmp_path: Path) -> None:
    x = np.arange(6.0).reshape(2, 3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "a" / "m.npy", x)
    np.save(tmp_path / "b" / "m.npy", np.asfortranarray(x))
    np.save(tmp_path / "a" / "i.npy", np.arange(4))
    np.save(tmp_path / "b" / "i.npy", np.arange(4.0))
    np.save(tmp_path / "a" / "c.npy", np.asfortranarray(x))
    np.save(tmp_path / "b" / "c.npy", np.asfortranarray(x * 2))
    r = diff(tmp_path / "a", tmp_path / "b", rtol=10.0)
    assert {m.name: m.reason for m in r.mismatched} == {
        "m": "A is in C (row-major) order, B in Fortran (column-major) order",
        "i": "one side is not a floating-point tensor"}
    assert [t.name for t in r.tensors] == ["c"] and r.tensors[0].cosine == pytest.approx(1.0, abs=1e-15)
    assert not r.ok  # what could not be compared fails a gate ...
    assert diff(tmp_path / "a", tmp_path / "b", rtol=10.0, allow_missing=True).ok  # ... unless allowed
    out = run("diff", tmp_path / "a", tmp_path / "b", "--rtol", "10")
    assert out.exit_code == 1 and "not compared" in out.stdout


@pytest.mark.parametrize("opt", ["--rtol", "--atol", "--min-cosine"])
def test_nan_tolerances_are_usage_errors(pair: tuple[Path, Path, dict, dict], opt: str) -> None:
    pa, pb, _, _ = pair
    r = run("diff", pa, pb, opt, "nan")
    assert r.exit_code == 2 and "Traceback" not in r.stderr and r.stdout == ""


def test_nonfinite_differences_survive_the_totals(tmp_path: Path) -> None:
    """Found in review: a NaN difference was lost in the total (max() skips NaN) and inf − finite gave NaN."""
    from safetensors.numpy import save_file

    from conftest import run, strict_json

    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    save_file({"w": np.array([1.0, np.nan, 3.0], np.float32), "v": np.ones(3, np.float32)}, str(a))
    save_file({"w": np.array([1.0, 2.0, 3.0], np.float32), "v": np.ones(3, np.float32)}, str(b))
    save_file({"w": np.array([1.0, np.inf, 3.0], np.float32), "v": np.ones(3, np.float32)}, str(c))
    doc = strict_json(run("diff", a, b, "--json").stdout)
    assert doc["total"]["linf_diff"] == "NaN" and doc["total"]["l2_diff"] == "NaN"
    doc = strict_json(run("diff", c, b, "--json").stdout)
    w = next(t for t in doc["tensors"] if t["name"] == "w")
    # numpy agrees: norm(c − b) and max|c − b| are inf
    assert w["l2_diff"] == w["linf_diff"] == "Infinity"
    assert doc["total"]["l2_diff"] == doc["total"]["linf_diff"] == "Infinity"


def test_diff_says_when_a_side_is_loss_scaled(tmp_path: Path) -> None:
    """diff compares stored values: a side whose metadata holds loss_scale is named in a warning (norms
    would divide it out), and the numbers are those of the stored values."""
    g = np.arange(1.0, 7.0, dtype=np.float32)
    save_file({"w": g * 1024}, str(tmp_path / "a.safetensors"), metadata={"loss_scale": "1024.0"})
    save_file({"w": g}, str(tmp_path / "b.safetensors"))
    r = run("diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--format", "json")
    assert r.exit_code == 0, r.output
    assert r.stderr == (f"Warning: A ({tmp_path / 'a.safetensors'}) holds metadata loss_scale 1024.0: diff compares "
                        "the stored (scaled) values; norms, check and trend divide it out\n")
    doc = strict_json(r.stdout)
    assert doc["total"]["l2_a"] == float(np.sqrt(np.sum((g.astype(np.float64) * 1024) ** 2)))
    plain = run("diff", str(tmp_path / "b.safetensors"), str(tmp_path / "b.safetensors"), "--format", "json")
    assert plain.stderr == ""
    save_file({"w": g}, str(tmp_path / "c.safetensors"), metadata={"loss_scale": "1.0"})  # not scaled: no warning
    assert run("diff", str(tmp_path / "c.safetensors"), str(tmp_path / "b.safetensors")).stderr == ""
