"""Reading every supported layout, and refusing every broken one."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import FLOAT_DTYPES, Exact, decode, rel_sqrt, write_raw_safetensors
from gradinspect.errors import InputError
from gradinspect.sources import open_paths, resolve_paths


def _l2(arrays: dict[str, np.ndarray]) -> float:
    """Oracle global L2 over float arrays, exact to 60 digits then rounded."""
    values = [v for a in arrays.values() for v in decode(a)]
    return Exact(values).s2


def _grads(rng: np.random.Generator, dtype: object = np.float32) -> dict[str, np.ndarray]:
    return {
        "layers.0.weight": rng.standard_normal((40, 30)).astype(dtype),
        "layers.0.bias": rng.standard_normal(30).astype(dtype),
        "layers.1.weight": (rng.standard_normal((30, 7)) * 5).astype(dtype),
        "scalar": np.array(0.5, dtype=dtype),
    }


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_safetensors_every_float_dtype(tmp_path: Path, rng: np.random.Generator, dtype: np.dtype) -> None:
    g = _grads(rng, dtype)
    path = tmp_path / "g.safetensors"
    save_file(g, str(path), metadata={"step": "7"})
    report = gradinspect.inspect(path)
    assert rel_sqrt(report.total.l2, _l2(g)) <= 1e-12
    assert {t.name for t in report.tensors} == set(g)
    assert {t.dtype for t in report.tensors} == {dtype.name}
    assert report.metadata == {str(path): {"step": "7"}}
    shapes = {t.name: t.shape for t in report.tensors}
    assert shapes["scalar"] == () and shapes["layers.0.weight"] == (40, 30)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz(tmp_path: Path, rng: np.random.Generator, compressed: bool) -> None:
    g = _grads(rng, np.float64)
    g["step"] = np.array(3, np.int64)
    path = tmp_path / "g.npz"
    (np.savez_compressed if compressed else np.savez)(path, **g)
    report = gradinspect.inspect(path)
    floats = {k: v for k, v in g.items() if k != "step"}
    assert rel_sqrt(report.total.l2, _l2(floats)) <= 1e-12
    assert [s.name for s in report.skipped] == ["step"]
    assert "int64" in report.skipped[0].reason


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_large_member_streams_across_chunks(tmp_path: Path, rng: np.random.Generator, compressed: bool) -> None:
    """A member of several chunks and several inflate blocks."""
    x = rng.standard_normal(700_001).astype(np.float32)
    path = tmp_path / "big.npz"
    (np.savez_compressed if compressed else np.savez)(path, w=x)
    report = gradinspect.inspect(path)
    x64 = x.astype(np.float64)
    exact = math.fsum((x64 * x64).tolist())
    assert abs(report.total.sq - exact) / exact <= 1e-12
    assert report.total.numel == x.size


def test_npy_fortran_order_and_big_endian(tmp_path: Path, rng: np.random.Generator) -> None:
    x = np.asfortranarray(rng.standard_normal((50, 20)))
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "b.npy", x.astype(">f4"))
    r = gradinspect.inspect([tmp_path / "f.npy"])
    assert r.tensors[0].name == "f" and r.tensors[0].shape == (50, 20)
    assert r.total.l1 == pytest.approx(float(np.abs(x).sum()), rel=1e-13)
    rb = gradinspect.inspect([tmp_path / "b.npy"])
    x32 = x.astype(np.float32).astype(np.float64)
    assert rb.tensors[0].dtype == "float32"
    assert rb.total.l2 == pytest.approx(float(np.sqrt(np.sum(x32 * x32))), rel=1e-13)


def test_directory_is_every_supported_file_sorted(tmp_path: Path, rng: np.random.Generator) -> None:
    save_file({"b": rng.standard_normal(3)}, str(tmp_path / "2.safetensors"))
    save_file({"a": rng.standard_normal(3)}, str(tmp_path / "1.safetensors"))
    np.savez(tmp_path / "3.npz", c=np.ones(2))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [Path(p).name for p in resolve_paths([tmp_path])] == ["1.safetensors", "2.safetensors", "3.npz"]
    r = gradinspect.inspect(tmp_path, sort="none")
    assert [t.name for t in r.tensors] == ["a", "b", "c"]


def test_index_json_lists_shards(tmp_path: Path, rng: np.random.Generator) -> None:
    g = _grads(rng)
    names = sorted(g)
    save_file({k: g[k] for k in names[:2]}, str(tmp_path / "m-1.safetensors"))
    save_file({k: g[k] for k in names[2:]}, str(tmp_path / "m-2.safetensors"))
    weight_map = {k: ("m-1.safetensors" if k in names[:2] else "m-2.safetensors") for k in names}
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    r = gradinspect.inspect(tmp_path / "m.safetensors.index.json")
    assert r.total.tensors == len(g)
    assert rel_sqrt(r.total.l2, _l2(g)) <= 1e-12
    whole = tmp_path / "whole"
    whole.mkdir()
    save_file(g, str(whole / "g.safetensors"))
    assert gradinspect.inspect(whole).total.l2 == pytest.approx(r.total.l2, rel=1e-15)


def test_quoted_glob(tmp_path: Path) -> None:
    for i in range(3):
        save_file({f"t{i}": np.full(4, float(i))}, str(tmp_path / f"rank{i}.safetensors"))
    r = gradinspect.inspect(str(tmp_path / "rank*.safetensors"))
    assert r.total.tensors == 3 and len(r.sources) == 3


def test_non_float_tensors_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_file({"w": np.ones(4, np.float32), "step": np.array(9, np.int64), "mask": np.ones(2, bool)}, str(path))
    r = gradinspect.inspect(path)
    assert [t.name for t in r.tensors] == ["w"]
    assert sorted(s.name for s in r.skipped) == ["mask", "step"]
    assert r.total.numel == 4


# --- refusals --------------------------------------------------------------


def _refused(path: Path | str, fragment: str) -> InputError:
    with pytest.raises(InputError) as err:
        gradinspect.inspect(path)
    assert fragment in str(err.value), str(err.value)
    return err.value


def test_missing_and_empty_and_unsupported(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _refused(tmp_path / "empty.safetensors", "empty file")
    (tmp_path / "g.txt").write_text("x")
    _refused(tmp_path / "g.txt", "unsupported file type")
    (tmp_path / "g.pkl").write_bytes(b"\x80\x04K\x01.")
    _refused(tmp_path / "g.pkl", "never loaded")
    (tmp_path / "d").mkdir()
    _refused(tmp_path / "d", "holds no .safetensors")
    _refused(str(tmp_path / "x*.npz"), "no file matches")


def test_safetensors_corruptions(tmp_path: Path) -> None:
    hdr = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _refused(write_raw_safetensors(tmp_path / "a.safetensors", hdr, b"\0" * 8, header_len=10**9), "runs past the end")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    _refused(tmp_path / "short.safetensors", "too short")
    bad = tmp_path / "b.safetensors"
    bad.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\0" * 8)
    _refused(bad, "not valid JSON")
    _refused(write_raw_safetensors(tmp_path / "c.safetensors", [1, 2], b""), "not a JSON object")  # type: ignore[arg-type]
    _refused(write_raw_safetensors(tmp_path / "d.safetensors", hdr, b"\0" * 4), "past the end of the file")
    overlap = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _refused(write_raw_safetensors(tmp_path / "e.safetensors", overlap, b"\0" * 12), "overlap")
    wrong = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    _refused(write_raw_safetensors(tmp_path / "f.safetensors", wrong, b"\0" * 8), "needs 12 bytes")
    neg = {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}
    _refused(write_raw_safetensors(tmp_path / "g.safetensors", neg, b"\0" * 8), "invalid shape")
    meta = {"__metadata__": {"a": 1}, **hdr}
    _refused(write_raw_safetensors(tmp_path / "h.safetensors", meta, b"\0" * 8), "__metadata__")


def test_safetensors_truncated_real_file(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "g.safetensors"
    save_file(_grads(rng), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    _refused(path, "past the end of the file")


def test_npz_corruptions(tmp_path: Path, rng: np.random.Generator) -> None:
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file" * 10)
    _refused(tmp_path / "junk.npz", "not a zip file")
    good = tmp_path / "good.npz"
    np.savez(good, w=rng.standard_normal(1000))
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "trunc.npz", "not a zip file")


def _member_data_at(path: Path, name: str) -> int:
    """Where a zip member's (stored or compressed) data starts: after its 30-byte local header, name and extra."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)


def test_npz_corrupt_compressed_data_is_detected(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=rng.standard_normal(5000))
    data = bytearray(path.read_bytes())
    start = _member_data_at(path, "w.npy") + 2000
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt"):
        gradinspect.inspect(path)


def test_npz_object_member_is_refused_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.ones(3), evil=np.array([{"a": 1}, None], dtype=object))
    err = _refused(path, "refusing to unpickle")
    assert "evil.npy" in str(err)


def test_npy_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.ones(100))
    path.write_bytes(path.read_bytes()[:-80])
    _refused(path, "truncated")


def test_same_name_in_two_files(tmp_path: Path) -> None:
    save_file({"w": np.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.ones(2)}, str(tmp_path / "b.safetensors"))
    err = _refused(tmp_path, "also in")
    assert str(tmp_path / "a.safetensors") in str(err) and str(tmp_path / "b.safetensors") in str(err)


def test_index_problems(tmp_path: Path) -> None:
    save_file({"a": np.ones(2)}, str(tmp_path / "s1.safetensors"))
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    _refused(idx, "does not hold it")
    idx.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    _refused(idx, "no such file")
    idx.write_text("{broken")
    _refused(idx, "not valid JSON")
    idx.write_text(json.dumps({"metadata": {}}))
    _refused(idx, "weight_map")


def test_packed_dtypes_are_refused_unless_excluded_and_unknown_ones_refused(tmp_path: Path) -> None:
    hdr = {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "q": {"dtype": "F4", "shape": [4], "data_offsets": [8, 10]},
    }
    path = write_raw_safetensors(tmp_path / "u.safetensors", hdr, np.ones(2, np.float32).tobytes() + b"\0" * 2)
    with pytest.raises(InputError, match=r"tensor 'q': unsupported dtype F4: its values would be left out"):
        gradinspect.inspect(path)  # sub-byte floats may be gradients: not left out silently
    r = gradinspect.inspect(path, exclude=["q"])
    assert [t.name for t in r.tensors] == ["w"] and not r.skipped
    # A dtype the format does not have says nothing about the bytes it covers: refused, as safetensors does.
    hdr["z"] = {"dtype": "ZZ9", "shape": [1], "data_offsets": [10, 13]}
    path = write_raw_safetensors(tmp_path / "z.safetensors", hdr, np.ones(2, np.float32).tobytes() + b"\0" * 5)
    with pytest.raises(InputError, match=r"tensor 'z': unknown dtype 'ZZ9' \(not a safetensors dtype\)"):
        gradinspect.inspect(path)


@pytest.mark.parametrize(("offsets", "tail", "message"), [
    # a tensor entry taken out of the header: its bytes would silently leave the totals
    ([[0, 8], [16, 24]], 0, r"bytes 8 to 16 of the data belong to no tensor"),
    ([[8, 16], [16, 24]], 0, r"bytes 0 to 8 of the data belong to no tensor"),
    ([[0, 8], [8, 16]], 8, r"the last 8 bytes of the data belong to no tensor"),
])
def test_safetensors_data_must_be_covered_exactly(tmp_path: Path, offsets: list[list[int]], tail: int,
                                                   message: str) -> None:
    hdr = {n: {"dtype": "F32", "shape": [2], "data_offsets": o} for n, o in zip("ab", offsets, strict=True)}
    size = max(o[1] for o in offsets) + tail
    path = write_raw_safetensors(tmp_path / "g.safetensors", hdr, np.full(size // 4, np.nan, np.float32).tobytes())
    with pytest.raises(InputError, match=message):
        gradinspect.inspect(path)


def test_open_paths_requires_paths() -> None:
    with pytest.raises(ValueError, match="no paths given"):
        open_paths([])


def test_npz_stored_member_crc_is_verified(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, w=rng.standard_normal(5000))
    data = bytearray(path.read_bytes())
    data[_member_data_at(path, "w.npy") + 500] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(path, "CRC-32 mismatch")


def test_deeply_nested_json_is_refused(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(deep).to_bytes(8, "little") + deep)
    _refused(path, "nested too deeply")
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_bytes(deep)
    _refused(idx, "nested too deeply")


def test_bad_shard_names_and_normalised_shard_paths(tmp_path: Path) -> None:
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "s\u0000.safetensors"}}))
    _refused(idx, "invalid shard file")
    save_file({"a": np.ones(2), "b": np.ones(3)}, str(tmp_path / "s1.safetensors"))
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "./s1.safetensors"}}))
    assert gradinspect.inspect(idx).total.numel == 5


def test_the_same_file_twice_is_an_error(tmp_path: Path) -> None:
    save_file({"a": np.ones(2)}, str(tmp_path / "s.safetensors"))
    with pytest.raises(InputError, match="the same file is given twice"):
        gradinspect.inspect([tmp_path, tmp_path / "s.safetensors"])


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "f.npy")
    _refused(tmp_path / "f.npy", "not a regular file")


@pytest.mark.parametrize("meta", [False, [], 0, "", {"a": 1}])
def test_metadata_must_be_an_object_of_strings(tmp_path: Path, meta: object) -> None:
    hdr = {"__metadata__": meta, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _refused(write_raw_safetensors(tmp_path / "m.safetensors", hdr, b"\0" * 4), "__metadata__")


def test_member_names_with_newlines_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "n.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a\nb.npy", b"not an npy file")
    err = _refused(path, "bad magic")
    assert "\n" not in str(err)


def test_corrupt_zip64_extra_field(tmp_path: Path, rng: np.random.Generator) -> None:
    """A central directory entry that points to a zip64 extra field that is not there."""
    path = tmp_path / "z.npz"
    np.savez(path, w=rng.standard_normal(10))
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 20 : cd + 24] = b"\xff\xff\xff\xff"  # compressed size: "see the zip64 extra field"
    data[cd + 30 : cd + 32] = b"\x00\x00"  # ... which has length 0
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"corrupt zip64 extra field$"):
        gradinspect.inspect(path)


def test_bfloat16_through_np_save_explains_itself(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", w=np.ones(3, ml_dtypes.bfloat16), v=np.ones(2, np.float32))
    err = _refused(tmp_path / "b.npz", "member 'w.npy': raw void dtype |V2 (numpy writes bfloat16")
    assert "save bfloat16/float8 gradients with safetensors" in str(err)


def test_tensor_names_must_be_valid_unicode(tmp_path: Path) -> None:
    header = b'{"ok\\ud800bad":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "s.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    _refused(path, "not valid Unicode")


def test_tiny_p_gives_inf_not_a_traceback() -> None:
    r = gradinspect.compute_norms({"w": np.array([1.0, 2.0])}, norm_type=1e-310)
    assert r.total.norm == math.inf
    assert gradinspect.compute_norms({"w": np.array([3.0])}, norm_type=1e-310).total.norm == 3.0
