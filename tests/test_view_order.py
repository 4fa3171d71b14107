"""Strided torch views in logical C order (diff and copy detection read them through ``Source.chunks``;
sources/views.py puts them in that order box by box, tile-wise): the elements, the chunks, diff's numbers and
copy detection's decisions are exactly those of the same tensors saved contiguous, and of a numpy oracle (the
views as numpy strides them, which is what torch.load gives).  Files are written by tests/ptwriter.py (no
torch); tests/test_view_order_torch.py does the same with real torch files."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from ptwriter import Storage, T, save
from safetensors.numpy import save_file

from conftest import check_diff_row, exact_sums, rel, run, strict_json
from gradinspect.sources.store import ChunkBuffer, MemoryStore
from gradinspect.sources.views import view_chunks


def _views(w: np.ndarray, x: np.ndarray, v: np.ndarray, d: np.ndarray) -> dict[str, T]:
    """Transposed, sliced, expanded and permuted 3-D views of w (300x500), x (6x40x50), v (40) and d (30x40,
    float64), as torch makes them (offsets and strides in elements)."""
    sw, sx, sv, sd = (Storage(np.ascontiguousarray(a).reshape(-1)) for a in (w, x, v, d))
    return {
        "t": T(sw, 0, (500, 300), (1, 500)),  # w.t()
        "sliced_t": T(sw, 3 * 500 + 5, (165, 297), (3, 500)),  # w[3:, 5::3].t()
        "col": T(sw, 7, (300,), (500,)),  # w[:, 7]
        "expand": T(sv, 0, (200, 40), (0, 1)),  # v.expand(200, 40)
        "expand_inner": T(sv, 0, (40, 200), (1, 0)),  # v[:, None].expand(40, 200)
        "perm": T(sx, 0, (50, 6, 40), (1, 2000, 50)),  # x.permute(2, 0, 1)
        "perm_sliced": T(sx, 50, (25, 39, 6), (2, 50, 2000)),  # x[:, 1:, ::2].permute(2, 1, 0)
        "f64_t": T(sd, 0, (40, 30), (1, 40)),  # d.t()
    }


def _data(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    return (rng.standard_normal((300, 500)).astype(np.float32), rng.standard_normal((6, 40, 50)).astype(np.float32),
            rng.standard_normal(40).astype(np.float32), rng.standard_normal((30, 40)))


def _contiguous(views: dict[str, T]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(t.view()) for k, t in views.items()}


# --- the reader: every element in C order, in chunks at the same boundaries as a contiguous tensor's ---

_STRIDES = [0, 1, 2, 3, 7, 50, 64, 500, 5000]


@st.composite
def _strided(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(draw(st.lists(st.integers(0, 8) if draw(st.booleans()) else st.integers(1, 8), max_size=4)))
    if draw(st.booleans()):  # a permuted dense view
        dense = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            dense[i] = dense[i + 1] * shape[i + 1]
        perm = draw(st.permutations(range(len(shape))))
        return tuple(shape[p] for p in perm), tuple(dense[p] for p in perm)
    return shape, tuple(draw(st.sampled_from(_STRIDES)) for _ in shape)  # slices, repeats, overlaps


@settings(max_examples=300, deadline=None)
@given(view=_strided(), offset=st.integers(0, 4), dtype=st.sampled_from(["<f4", "<f8", "<f2", ">f4", "bf16"]),
       chunk=st.integers(1, 70), band=st.sampled_from([1, 8, 24, 64, 300, 1 << 24]), seed=st.integers(0, 99))
def test_view_chunks_are_the_numpy_view_in_c_order(view: tuple[tuple[int, ...], tuple[int, ...]], offset: int,
                                                   dtype: str, chunk: int, band: int, seed: int) -> None:
    """Any view (offset, slices, transposes, stride 0, overlapping windows, >2-D permutes), any chunk, any box
    size (``band`` elements: several boxes, boxes that cut a chunk) and read buffer (``chunk`` * 8 bytes: reads
    split): the chunks are the view's elements in C order, cut at multiples of the chunk."""
    shape, strides = view
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(dtype)
    span = max(0, 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)))
    storage = np.random.default_rng(seed).standard_normal(offset + span + 2).astype(dt)
    oracle = np.lib.stride_tricks.as_strided(storage[offset:], shape, tuple(s * dt.itemsize for s in strides))
    store = MemoryStore([storage])
    got = [c.copy() for c in view_chunks(store, offset * dt.itemsize, dt, shape, strides, ChunkBuffer(chunk),
                                         band=band * dt.itemsize)]
    numel = oracle.size
    assert [len(c) for c in got] == [min(chunk, numel - a) for a in range(0, numel, chunk)]
    flat = np.concatenate(got) if got else np.empty(0, dt.newbyteorder("="))
    assert flat.dtype.isnative and flat.dtype == dt.newbyteorder("=")
    assert flat.tobytes() == oracle.astype(dt.newbyteorder("=")).tobytes()


# --- diff ---


def _pair(tmp_path: Path, rng: np.random.Generator) -> tuple[dict[str, T], dict[str, T]]:
    a = _data(rng)
    b = tuple((x + 1e-3 * rng.standard_normal(x.shape)).astype(x.dtype) for x in a)
    va, vb = _views(*a), _views(*b)
    save(va, tmp_path / "a.pt")
    save(vb, tmp_path / "b.pt")
    save_file(_contiguous(va), str(tmp_path / "a.safetensors"))
    save_file(_contiguous(vb), str(tmp_path / "b.safetensors"))
    return va, vb


def _diff(a: Path, b: Path) -> dict[str, Any]:
    res = run("diff", a, b, "--format", "json")
    assert res.exit_code == 0, res.output
    return strict_json(res.stdout)


def test_diff_of_views_is_that_of_contiguous_copies_and_the_oracle(tmp_path: Path, rng: np.random.Generator) -> None:
    va, vb = _pair(tmp_path, rng)
    ours = _diff(tmp_path / "a.pt", tmp_path / "b.pt")
    ref = _diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert ours["tensors"] == ref["tensors"] and ours["total"] == ref["total"]  # bit for bit
    assert {t["name"] for t in ours["tensors"]} == set(va) and not ours["mismatched"]
    for row in ours["tensors"]:
        a, b = va[row["name"]].view(), vb[row["name"]].view()
        assert row["shape"] == list(a.shape) and row["numel"] == a.size
        check_diff_row(row, a, b)


def test_diff_finds_one_changed_element_of_each_view(tmp_path: Path, rng: np.random.Generator) -> None:
    va, _ = _pair(tmp_path, rng)
    ref = _contiguous(va)
    for name, arr in ref.items():
        changed = dict(ref)
        changed[name] = arr.copy()
        at = tuple(n - 2 if n > 2 else 0 for n in arr.shape)
        changed[name][at] += 0.5
        save_file(changed, str(tmp_path / "c.safetensors"))
        rows = {t["name"]: t for t in _diff(tmp_path / "a.pt", tmp_path / "c.safetensors")["tensors"]}
        assert rows[name]["linf_diff"] == abs(float(changed[name][at]) - float(arr[at])), name
        assert all(r["linf_diff"] == 0 for k, r in rows.items() if k != name), name


# --- copy detection (norms' duplicate_of, --dedup) ---


def _copies_file(rng: np.random.Generator) -> dict[str, Any]:
    """Each view, a copy of it in another storage (the same view of a copy, or its contiguous values), and a near
    miss with the same shape and values in another order (the same statistics: only the bytes tell)."""
    w, x, v, d = _data(rng)
    out: dict[str, Any] = {}
    views = _views(w, x, v, d)
    same = _views(w.copy(), x.copy(), v.copy(), d.copy())
    other = _views(w[::-1], x[:, ::-1], v[::-1], d[::-1])
    for k, t in views.items():
        out[k] = t
    for k, t in same.items():
        out[k + "_copy"] = t if k in ("t", "expand", "perm") else T.of(np.ascontiguousarray(t.view()))
    for k, t in other.items():
        out[k + "_other"] = t
    out["t_tied"] = views["t"]  # the very same view twice
    return out


def _oracle_copies(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    out: dict[str, str] = {}
    firsts: list[str] = []
    for name, arr in tensors.items():
        for f in firsts:
            g = tensors[f]
            if g.dtype == arr.dtype and g.shape == arr.shape and g.tobytes() == arr.tobytes():
                out[name] = f
                break
        else:
            firsts.append(name)
    return out


def _norms(path: Path, *args: str) -> dict[str, Any]:
    res = run("norms", path, "--format", "json", *args)
    assert res.exit_code == 0, res.output
    return strict_json(res.stdout)


def test_copies_of_views_found_as_for_contiguous_copies_and_the_oracle(tmp_path: Path,
                                                                      rng: np.random.Generator) -> None:
    obj = _copies_file(rng)
    save(obj, tmp_path / "c.pt")
    arrays = {k: np.ascontiguousarray(t.view()) for k, t in obj.items()}
    save_file({k: a for k, a in arrays.items() if k != "t_tied"}, str(tmp_path / "c.safetensors"))
    expected = _oracle_copies(arrays)
    assert set(expected) == {k for k in obj if k.endswith("_copy")} | {"t_tied"}  # no near miss is a copy
    dup = {t["name"]: t["duplicate_of"] for t in _norms(tmp_path / "c.pt")["tensors"] if t.get("duplicate_of")}
    assert dup == expected
    ref = {t["name"]: t["duplicate_of"] for t in _norms(tmp_path / "c.safetensors")["tensors"]
           if t.get("duplicate_of")}
    assert ref == {k: v for k, v in expected.items() if k != "t_tied"}
    once = _norms(tmp_path / "c.pt", "--dedup")
    kept = [k for k in obj if k not in expected]
    assert sorted(t["name"] for t in once["tensors"]) == sorted(kept)
    assert once["total"]["numel"] == sum(arrays[k].size for k in kept)
    l1 = sum(exact_sums(arrays[k])[0] if arrays[k].dtype == np.float32 else Fraction(math.fsum(
        np.abs(arrays[k]).reshape(-1).tolist())) for k in kept)
    assert rel(once["total"]["l1"], l1) <= 1e-12


def test_copies_of_views_computed_in_parts_are_those_of_one_run(tmp_path: Path, rng: np.random.Generator) -> None:
    """--part/merge fingerprints a strided view's logical bytes (its units, in storage order, hashed nothing:
    every view of a shape and statistics was a copy of the first, a near miss included)."""
    obj = _copies_file(rng)
    save(obj, tmp_path / "c.pt")
    expected = _oracle_copies({k: np.ascontiguousarray(t.view()) for k, t in obj.items()})
    assert "t_other" not in expected and expected["t_copy"] == "t"
    for extra in ((), ("--dedup",)):
        plain = _norms(tmp_path / "c.pt", *extra)
        parts = []
        for i in range(3):
            out = tmp_path / f"p{i}.json"
            res = run("norms", tmp_path / "c.pt", *extra, "--part", f"{i}/3", "--partial", out)
            assert res.exit_code == 0, res.output
            parts.append(out)
        res = run("merge", *parts, "--format", "json")
        assert res.exit_code == 0, res.output
        assert strict_json(res.stdout) == plain
        dup = {t["name"]: t["duplicate_of"] for t in plain["tensors"] if t.get("duplicate_of")}
        assert dup == ({} if extra else expected)
