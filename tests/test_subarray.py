""".npy headers whose descr is a sub-array dtype (``('<f4', (3,))``) or a structured one.

numpy's arrays of a sub-array dtype are arrays of its base of shape (*shape, *subshape)
(``np.load(mmap_mode='r')`` gives that; numpy 2.4's plain ``np.load`` refuses these headers).  Such an
array in C order is read so; a Fortran-order one is not (whether each sub-array is contiguous
is not recorded).  No message about any of them talks about bfloat16.
"""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gradinspect
from conftest import Exact, decode, rel, rel_sqrt, run, strict_json
from gradinspect.errors import InputError


def _npy(descr: Any, shape: tuple[int, ...], data: bytes, fortran: bool = False) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return b.getvalue() + data


def _values(n: int, dtype: str = "<f4", seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


def test_sub_array_npy_is_read_as_its_base_of_the_full_shape(tmp_path: Path) -> None:
    x = _values(2 * 3 * 4 * 2, ">f8").reshape(2, 3, 4, 2)
    (tmp_path / "sub.npy").write_bytes(_npy((">f8", (4, 2)), (2, 3), x.tobytes()))
    np.save(tmp_path / "plain.npy", x)
    mm = np.load(tmp_path / "sub.npy", mmap_mode="r")  # numpy's own reading of the header
    assert mm.shape == (2, 3, 4, 2) and np.array_equal(mm, x)

    sub = gradinspect.inspect(tmp_path / "sub.npy", norm_type=1)
    plain = gradinspect.inspect(tmp_path / "plain.npy", norm_type=1)
    (t,) = sub.tensors
    assert (t.name, t.shape, t.dtype, t.numel) == ("sub", (2, 3, 4, 2), "float64", 48) and not sub.skipped
    (p,) = plain.tensors
    assert (t.l1, t.sq, t.linf, t.l2) == (p.l1, p.sq, p.linf, p.l2)
    ex = Exact(decode(x.astype("<f8")))
    assert rel(t.l1, ex.s1) <= 1e-12 and rel_sqrt(t.l2, ex.s2) <= 1e-12 and Fraction(t.linf) == ex.linf

    info = strict_json(run("info", "-f", "json", tmp_path / "sub.npy").stdout)
    assert [(e["shape"], e["dtype"], e["numel"], e["bytes"]) for e in info["tensors"]] == [
        ([2, 3, 4, 2], "float64", 48, 384)]
    # element order: the same elements at the same places as the array np.save wrote
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "sub.npy").rename(tmp_path / "a" / "x.npy")
    np.save(tmp_path / "b" / "x.npy", x)
    d = run("diff", tmp_path / "a", tmp_path / "b", "--rtol", "0", "-f", "json")
    assert d.exit_code == 0, d.output
    total = strict_json(d.stdout)["total"]
    assert (total["numel"], total["l2_diff"], total["linf_diff"]) == (48, 0.0, 0.0)
    flipped = x.copy()
    flipped[0, 0, 0, 0], flipped[0, 0, 0, 1] = x[0, 0, 0, 1], x[0, 0, 0, 0]  # two elements swapped: seen
    np.save(tmp_path / "b" / "x.npy", flipped)
    assert run("diff", tmp_path / "a", tmp_path / "b", "--rtol", "0").exit_code == 1


def test_sub_array_npz_member_is_read(tmp_path: Path) -> None:
    w, s = _values(5, seed=1), _values(6, seed=2)
    with zipfile.ZipFile(tmp_path / "g.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", _npy("<f4", (5,), w.tobytes()))
        z.writestr("s.npy", _npy(("<f4", (3,)), (2,), s.tobytes()))
    r = run("norms", "-f", "json", "--sort", "none", tmp_path / "g.npz")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    out = strict_json(r.stdout)
    assert [(t["name"], t["shape"], t["dtype"]) for t in out["tensors"]] == [("w", [5], "float32"),
                                                                            ("s", [2, 3], "float32")]
    assert out["skipped"] == []
    ex = Exact(decode(np.concatenate([w, s])))
    assert rel_sqrt(out["total"]["l2"], ex.s2) <= 1e-12


def test_fortran_sub_array_of_floats_is_refused_with_what_it_is(tmp_path: Path) -> None:
    """Fortran order over the outer shape: numpy's memmap reads the whole (*shape, *sub) array in Fortran order,
    the dtype says each sub-array is contiguous; the values are floats, so they are not silently left out."""
    path = tmp_path / "f.npy"
    path.write_bytes(_npy(("<f4", (3, 2)), (2, 2), _values(24).tobytes(), fortran=True))
    np.save(tmp_path / "w.npy", _values(4))
    r = run("norms", path, tmp_path / "w.npy")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: {path}: tensor 'f': Fortran-order array of sub-arrays (float32[3,2]): "
                               "whether each sub-array's values are contiguous is not recorded"), r.stderr
    assert "bfloat16" not in r.stderr
    ok = gradinspect.inspect([path, tmp_path / "w.npy"], exclude=["f"])
    assert [t.name for t in ok.tensors] == ["w"]
    info = run("info", path)
    assert info.exit_code == 0 and "float32[3,2]" in info.stdout and "void" not in info.stdout


def test_fortran_order_with_one_long_axis_is_read(tmp_path: Path) -> None:
    """shape (1,) and sub-shape (3,): one axis longer than 1, so Fortran and C order are the same order."""
    x = _values(3)
    (tmp_path / "f.npy").write_bytes(_npy(("<f4", (3,)), (1,), x.tobytes(), fortran=True))
    r = gradinspect.inspect(tmp_path / "f.npy")
    assert [(t.shape, t.dtype) for t in r.tensors] == [((1, 3), "float32")]
    assert rel_sqrt(r.total.l2, Exact(decode(x)).s2) <= 1e-12


def test_skipped_sub_arrays_and_records_say_what_they_are(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", _values(4))
    (tmp_path / "ints.npy").write_bytes(_npy(("<i4", (3,)), (2,), np.arange(6, dtype="<i4").tobytes()))
    (tmp_path / "fints.npy").write_bytes(_npy(("<i4", (3,)), (2, 2), np.arange(12, dtype="<i4").tobytes(), True))
    rec = np.zeros(2, [("a", "<f4"), ("b", "<f4", (2,))])
    np.save(tmp_path / "rec.npy", rec)
    r = run("norms", "-f", "json", tmp_path / "w.npy", tmp_path / "ints.npy", tmp_path / "fints.npy",
            tmp_path / "rec.npy")
    assert r.exit_code == 0, r.stderr
    skipped = {s["name"]: (s["dtype"], s["reason"]) for s in strict_json(r.stdout)["skipped"]}
    assert skipped == {
        "ints": ("int32", "not a floating-point dtype (int32)"),
        "fints": ("int32[3]", "Fortran-order array of sub-arrays (int32[3]): whether each sub-array's values "
                              "are contiguous is not recorded"),
        "rec": ("structured", "structured dtype is not a gradient"),
    }
    assert "bfloat16" not in r.stderr and "raw bytes" not in r.stderr
    info = strict_json(run("info", "-f", "json", tmp_path / "ints.npy").stdout)
    assert [(e["shape"], e["dtype"]) for e in info["tensors"]] == [([2, 3], "int32")]


def test_nothing_floating_is_still_exit_2(tmp_path: Path) -> None:
    (tmp_path / "ints.npy").write_bytes(_npy(("<i4", (3,)), (2,), np.arange(6, dtype="<i4").tobytes()))
    r = run("norms", tmp_path / "ints.npy")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"Error: {tmp_path / 'ints.npy'}: no floating-point tensor: every tensor was skipped "
                        "(dtypes seen: int32 x1)\n")
    with pytest.raises(InputError, match=r"no floating-point tensor: every tensor was skipped \(dtypes seen: "
                                         r"structured x1\)"):
        np.save(tmp_path / "rec.npy", np.zeros(2, [("a", "<f4"), ("b", "<f4", (2,))]))
        gradinspect.inspect(tmp_path / "rec.npy")


def test_skip_reason_of_records_and_sub_arrays_in_memory() -> None:
    """The one skip reason of kind-V dtypes names what they are; raw bytes alone get the bfloat16 hint."""
    from gradinspect.sources.base import skip_reason, sub_array_name

    sub = np.dtype(("<i2", (2, 3)))
    assert sub_array_name(sub) == "int16[2,3]"
    assert skip_reason("int16[2,3]", sub) == "sub-array dtype (int16[2,3]) is not read"
    assert skip_reason("structured", np.dtype([("a", "<f4")])) == "structured dtype is not a gradient"
    assert "bfloat16" in str(skip_reason("void16", np.dtype("V2")))
    r = gradinspect.compute_norms({"w": np.ones(2, np.float32), "rec": np.zeros(2, [("a", "<f4")])})
    assert [(s.name, s.reason) for s in r.skipped] == [("rec", "structured dtype is not a gradient")]
