"""torch.save files read without torch: archives written by tests/ptwriter.py (no torch needed).

The oracle is the same tensors made contiguous and saved as safetensors (bit-identical
statistics) and the exact sums of tests/conftest.py.  Tests with real torch files are in
tests/test_torchzip_torch.py.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from ptwriter import Storage, T, archive, dumps, global_, save, unicode
from safetensors.numpy import save_file

import gradinspect
from conftest import exact_sums, rel, rel_sqrt, run, strict_json
from gradinspect.errors import InputError
from gradinspect.sources import open_source

REFUSED = "(only tensors and plain containers are read)"


def _views(rng: np.random.Generator) -> dict[str, T]:
    """Every kind of view: contiguous, offset, column, transposed, stride 0, larger storage, several dtypes."""
    big = T.of(rng.standard_normal((300, 500)).astype(np.float32))
    st = big.storage
    row = T.of(rng.standard_normal(40).astype(np.float32))
    large = T.of(rng.standard_normal((700, 400)).astype(np.float32))  # > 2 chunks when transposed
    return {
        "w": big,
        "col": T(st, 7, (300,), (500,)),  # w[:, 7]
        "tr": T(st, 0, (500, 300), (1, 500)),  # w.t()
        "off": T(st, 5 * 500, (295, 500), (500, 1)),  # w[5:], contiguous with an offset
        "sub": T(st, 3, (100, 7), (500, 2)),  # w[:100, 3:17:2]
        "exp": T(row.storage, 0, (1000, 40), (0, 1)),  # expand: stride 0
        "rep": T(row.storage, 5, (3,), (0,)),  # one element three times
        "big_t": T(large.storage, 0, (400, 700), (1, 400)),
        "half": T.of(rng.standard_normal((64, 3)).astype(np.float16)),
        "bf": T(T.of(rng.standard_normal((64, 3)).astype(ml_dtypes.bfloat16)).storage, 0, (3, 64), (1, 3)),
        "f8": T.of(rng.standard_normal(10).astype(ml_dtypes.float8_e4m3fn)),
        "f64": T(T.of(rng.standard_normal((9, 9))).storage, 10, (4, 4), (9, 1)),
        "empty": T(st, 0, (0, 5), (5, 1)),
        "i": T.of(np.arange(4, dtype=np.int64)),
    }


def _in_storage_order(v: T) -> T:
    """The view's elements as its storage holds them: dimensions by descending stride (``w.t()`` -> ``w``)."""
    dims = sorted(range(len(v.shape)), key=lambda d: -v.stride[d])
    return T(v.storage, v.offset, tuple(v.shape[d] for d in dims), tuple(v.stride[d] for d in dims))


def _write_pair(tmp_path: Path, views: dict[str, Any], protocol: int = 2, name: str = "g",
                step: int | None = None, storage_order: bool = False) -> tuple[Path, Path]:
    """The views as .pt and made contiguous as .safetensors: in logical C order, or in their storage's order
    (what norms/check/trend read them in: the statistics are bit-for-bit those of that copy)."""
    obj: dict[str, Any] = dict(views)
    if step is not None:
        obj["step"] = step
    pt = tmp_path / f"{name}.pt"
    save(obj, pt, protocol)
    flat = {k: np.ascontiguousarray((_in_storage_order(v) if storage_order else v).view()) for k, v in views.items()}
    st = tmp_path / f"{name}.safetensors"
    save_file(flat, str(st), metadata=None if step is None else {"step": str(step)})
    return pt, st


def _rows(report: Any) -> dict[str, Any]:
    return {t.name: {k: v for k, v in vars(t).items() if k != "source"} for t in report.tensors}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_norms_bit_identical_to_safetensors_of_the_views(tmp_path: Path, rng: np.random.Generator,
                                                         protocol: int) -> None:
    views = _views(rng)
    assert np.array_equal(_in_storage_order(views["tr"]).view(), views["w"].view())  # w.t() in storage order is w
    pt, st = _write_pair(tmp_path, views, protocol, storage_order=True)
    a, b = gradinspect.inspect(pt), gradinspect.inspect(st)
    rows_a, rows_b = _rows(a), _rows(b)
    # a permuted view's shape is its own, not its storage-order copy's (so the copy of w.t() is a duplicate of w)
    for k in ("shape", "source", "duplicate_of"):
        for r in (*rows_a.values(), *rows_b.values()):
            r.pop(k, None)
    assert rows_a == rows_b
    assert a.total == b.total
    assert {t.name for t in a.tensors} == set(views) - {"i"}
    # and the exact oracle, from the views as numpy gives them (what torch.load gives)
    for t in a.tensors:
        arr = views[t.name].view()
        if arr.size and arr.dtype != np.float64:
            s1, s2 = exact_sums(arr)
            assert rel(t.l1, s1) <= 1e-12 and rel_sqrt(t.l2, s2) <= 1e-12, t.name
        assert t.numel == arr.size and t.shape == arr.shape


@pytest.mark.parametrize("jobs", [1, 3])
def test_chunks_and_jobs_do_not_change_bits(tmp_path: Path, rng: np.random.Generator, jobs: int) -> None:
    pt, st = _write_pair(tmp_path, _views(rng), storage_order=True)
    a, b = _rows(gradinspect.inspect(pt, jobs=jobs)), _rows(gradinspect.inspect(st, jobs=1))
    assert {k: r["l2"] for k, r in a.items()} == {k: r["l2"] for k, r in b.items()}
    assert a == _rows(gradinspect.inspect(pt, jobs=1))


def test_every_command_reads_pt(tmp_path: Path, rng: np.random.Generator) -> None:
    views = _views(rng)
    pt, st = _write_pair(tmp_path, views, step=7)
    norms = run("norms", pt, "--format", "json")
    assert norms.exit_code == 0, norms.output
    data = strict_json(norms.stdout)
    assert data["metadata"] == {str(pt): {"step": "7"}}
    _, st_storage = _write_pair(tmp_path, views, name="s", step=7, storage_order=True)
    ref = strict_json(run("norms", st_storage, "--format", "json").stdout)
    assert data["total"] == ref["total"]
    check = run("check", pt)
    assert check.exit_code == 0 and "rules hold" in check.stdout, check.output
    diff = run("diff", pt, st, "--format", "json")
    assert diff.exit_code == 0, diff.output
    d = strict_json(diff.stdout)
    assert d["ok"] and len(d["tensors"]) == len(views) - 1  # not the int64 tensor
    assert all(t["linf_diff"] == 0 and t["l2_a"] == t["l2_b"] for t in d["tensors"]), d["tensors"][:2]
    info = run("info", pt, "--format", "json")
    assert info.exit_code == 0, info.output
    shapes = {t["name"]: t["shape"] for t in strict_json(info.stdout)["tensors"]}
    assert shapes["tr"] == [500, 300] and shapes["exp"] == [1000, 40] and shapes["i"] == [4]


def test_diff_finds_a_changed_element_of_a_strided_view(tmp_path: Path, rng: np.random.Generator) -> None:
    views = _views(rng)
    pt, _ = _write_pair(tmp_path, views)
    changed = {k: np.ascontiguousarray(v.view()) for k, v in views.items()}
    changed["tr"][123, 45] += 1.0  # logical element (123, 45) of w.t() is storage element 45 * 500 + 123
    save_file(changed, str(tmp_path / "c.safetensors"))
    res = run("diff", pt, tmp_path / "c.safetensors", "--format", "json", "--atol", "0.5")
    assert res.exit_code == 1, res.output
    rows = {t["name"]: t for t in strict_json(res.stdout)["tensors"]}
    assert [n for n, t in rows.items() if t["linf_diff"]] == ["tr"] and rows["tr"]["linf_diff"] > 0.9
    assert rows["tr"]["ok"] is False


def test_trend_over_pt_steps(tmp_path: Path, rng: np.random.Generator) -> None:
    for step in (30, 10, 20):
        save({"w": T.of(rng.standard_normal(50).astype(np.float32) * step), "step": step}, tmp_path / f"x{step}a.pt")
    res = run("trend", str(tmp_path / "*.pt"), "--format", "json")
    assert res.exit_code == 0, res.output
    steps = [s["step"] for s in strict_json(res.stdout)["steps"]]
    assert steps == [10, 20, 30]


def test_tied_weights_are_duplicates(tmp_path: Path, rng: np.random.Generator) -> None:
    w = T.of(rng.standard_normal((30, 20)).astype(np.float32))
    same_view = T(w.storage, 0, (30, 20), (20, 1))  # another tensor object over the same bytes
    col = T(w.storage, 2, (30,), (20,))
    save({"emb": w, "head": w, "head2": same_view, "col": col, "col2": T(w.storage, 2, (30,), (20,))},
         tmp_path / "t.pt")
    res = run("norms", tmp_path / "t.pt", "--format", "json")
    assert res.exit_code == 0
    dup = {t["name"]: t["duplicate_of"] for t in strict_json(res.stdout)["tensors"]}
    assert dup == {"emb": None, "head": "emb", "head2": "emb", "col": None, "col2": "col"}
    once = gradinspect.inspect(tmp_path / "t.pt", dedup=True)
    assert {t.name for t in once.tensors} == {"emb", "col"}
    single = gradinspect.inspect(tmp_path / "t.pt", include=["emb", "col"])
    assert once.total.l2 == single.total.l2


def test_identical_descriptions_are_not_read_twice_to_compare(tmp_path: Path, rng: np.random.Generator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gradinspect.sources.base import Source
    w = T.of(rng.standard_normal((30, 20)).astype(np.float32))
    save({"emb": w, "head": w}, tmp_path / "t.pt")
    calls: list[str] = []
    real = Source.chunks

    def spy(self: Source, entry: Any, buf: Any) -> Any:
        calls.append(entry.name)
        return real(self, entry, buf)
    monkeypatch.setattr(Source, "chunks", spy)
    rep = gradinspect.inspect(tmp_path / "t.pt")
    assert [t.duplicate_of for t in rep.tensors] == [None, "emb"]
    assert calls == []  # the copy was found from the descriptions


def test_nested_names_step_and_loss_scale(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.standard_normal(8).astype(np.float32)
    obj = {"grads": {"w": T.of(a), "layers": [T.of(a * 2), {"b": T.of(a * 3)}]}, "step": 4, "loss_scale": 1024.0,
           "note": "hello", "lr": 0.1, "flags": [True, None]}
    save(obj, tmp_path / "n.pt")
    src = open_source(str(tmp_path / "n.pt"))
    try:
        assert [t.name for t in src.tensors] == ["grads.w", "grads.layers.0", "grads.layers.1.b"]
        assert src.metadata == {"step": "4", "loss_scale": "1024.0"}
    finally:
        src.close()
    scaled = gradinspect.inspect(tmp_path / "n.pt")
    plain = gradinspect.compute_norms({"w": a, "x": a * 2, "y": a * 3})
    assert scaled.total.l2 == pytest.approx(plain.total.l2 / 1024, rel=1e-15)


def test_a_single_tensor_and_ordered_dicts(tmp_path: Path) -> None:
    save(T.of(np.ones(3, np.float32)), tmp_path / "one.pt")
    assert [t.name for t in gradinspect.inspect(tmp_path / "one.pt").tensors] == ["tensor"]
    save(OrderedDict(a=T.of(np.ones(3, np.float32))), tmp_path / "od.pt")
    assert gradinspect.inspect(tmp_path / "od.pt").total.l2 == pytest.approx(3 ** 0.5)


def test_pt_and_npz_matched_by_one_glob_keep_their_containers(tmp_path: Path) -> None:
    save({"a": T.of(np.ones(3, np.float32))}, tmp_path / "x.pt")
    np.savez(tmp_path / "y.npz", b=np.ones(2, np.float32))
    rep = gradinspect.inspect(str(tmp_path / "*"))
    assert sorted(t.name for t in rep.tensors) == ["a", "b"]
    assert [t.name for t in gradinspect.inspect(tmp_path).tensors] == ["b"]  # a directory: not its torch files


def _hf_checkpoint(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    """A Hugging Face-like checkpoint folder: model weights, optimizer state (tensors!), pickled training args."""
    d = tmp_path / "checkpoint-500"
    d.mkdir()
    w = rng.standard_normal((8, 4)).astype(np.float32)
    save_file({"w": w}, str(d / "model.safetensors"))
    save({"state": {0: {"exp_avg": T.of(w * 3), "exp_avg_sq": T.of(w * w)}}, "param_groups": [{"lr": 0.1}]},
         d / "optimizer.pt")
    (d / "training_args.bin").write_bytes(archive(
        b"\x80\x02" + global_("transformers.training_args", "TrainingArguments", 2) + b")\x81.", {}))
    return d, w


def test_a_directory_reads_no_torch_file_and_names_them(tmp_path: Path, rng: np.random.Generator) -> None:
    d, w = _hf_checkpoint(tmp_path, rng)
    warning = (f"{d}{os.sep}: skipped 2 torch files (optimizer.pt, training_args.bin): .bin/.pt files are not read "
               "from a directory (a checkpoint's optimizer state and training arguments are not gradients): name them "
               f"or use a glob ('{d}{os.sep}*.pt')")
    res = run("norms", d, "--format", "json")
    assert res.exit_code == 0, res.output
    assert [t["name"] for t in strict_json(res.stdout)["tensors"]] == ["w"]
    assert res.stderr == f"Warning: {warning}\n"
    rep = gradinspect.inspect(d)
    assert rep.input_warnings() == [warning]
    assert rep.total == gradinspect.compute_norms({"w": w}).total
    (d / "notes.txt").write_text("hello")
    assert gradinspect.inspect(d).input_warnings() == [
        f"{d}{os.sep}: skipped 1 file that is not .safetensors/.npz/.npy (notes.txt); " + warning.split(": ", 1)[1]]
    (d / "model.safetensors").unlink()
    (d / "notes.txt").unlink()
    _cli_refuses(d, "directory holds no .safetensors, .npz or .npy file; " + warning.split(": ", 1)[1])


def test_torch_files_named_or_globbed_are_read(tmp_path: Path, rng: np.random.Generator) -> None:
    d, w = _hf_checkpoint(tmp_path, rng)
    named = gradinspect.inspect(d / "optimizer.pt")
    assert [t.name for t in named.tensors] == ["state.0.exp_avg", "state.0.exp_avg_sq"]
    assert named.input_warnings() == []
    globbed = gradinspect.inspect(str(d / "*.pt"))
    assert globbed.total == named.total
    both = gradinspect.inspect([d / "model.safetensors", d / "optimizer.pt"])
    assert both.total == gradinspect.compute_norms({"w": w, "a": w * 3, "b": w * w}).total
    _cli_refuses(d / "training_args.bin", "refused: the pickle references transformers.training_args."
                 "TrainingArguments (only tensors and plain containers are read)")
    res = run("norms", str(d / "*.bin"))  # a glob reads what it matches: the pickle is refused, not skipped
    assert res.exit_code == 2 and "TrainingArguments" in res.stderr, res.output


def test_trend_over_a_glob_of_step_files_beside_optimizer_state(tmp_path: Path, rng: np.random.Generator) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in (2, 1):
        save({"w": T.of(np.full(4, step, np.float32))}, run_dir / f"step_{step}.pt")
    save({"state": {0: {"exp_avg": T.of(np.ones(4, np.float32))}}}, run_dir / "optimizer.pt")
    res = run("trend", str(run_dir / "step_*.pt"), "--format", "json")
    assert res.exit_code == 0, res.output
    steps = strict_json(res.stdout)["steps"]
    assert [(s["step"], s["total"]["l2"], s["sources"]) for s in steps] == [
        (1, 2.0, [str(run_dir / "step_1.pt")]), (2, 4.0, [str(run_dir / "step_2.pt")])]


# --- refusals --------------------------------------------------------------------------------------

def _cli_refuses(path: Path, message: str) -> None:
    res = run("norms", path)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert res.stderr.strip() == f"Error: {path}: {message}"


def test_hostile_pickle_inside_a_pt_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = b"\x80\x02" + global_("os", "system", 2) + unicode(f"touch {marker}") + b"\x85R."
    (tmp_path / "e.pt").write_bytes(archive(evil, {}))
    _cli_refuses(tmp_path / "e.pt", f"refused: the pickle references os.system {REFUSED}")
    assert not marker.exists()


def test_legacy_format_refused(tmp_path: Path) -> None:
    legacy = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03."
    (tmp_path / "old.pt").write_bytes(legacy)
    _cli_refuses(tmp_path / "old.pt", "the legacy torch.save format (torch < 1.6, or _use_new_zipfile_serialization"
                 "=False) is not read: save it again with a current torch.save")
    (tmp_path / "raw.bin").write_bytes(b"\x00" * 64)
    _cli_refuses(tmp_path / "raw.bin", "not a torch.save zip archive")


def _archive(tmp_path: Path, name: str = "x.pt", **kw: Any) -> tuple[Path, bytes, dict[str, bytes]]:
    pkl, storages = dumps({"w": T.of(np.arange(6, dtype=np.float32))})
    data = {s.key or "": s.data.tobytes() for s in storages}
    return tmp_path / name, pkl, data


def test_big_endian_refused(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    path.write_bytes(archive(pkl, data, byteorder="big"))
    _cli_refuses(path, "a big-endian archive (byteorder 'big'): not read")


def test_no_byteorder_member_is_little_endian(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    path.write_bytes(archive(pkl, data, byteorder=None))
    assert gradinspect.inspect(path).total.l1 == 15


def test_missing_and_short_storages_refused(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    path.write_bytes(archive(pkl, {}))
    _cli_refuses(path, "tensor 'w': storage '0' is missing from the archive")
    path.write_bytes(archive(pkl, {"0": data["0"][:-1]}))
    _cli_refuses(path, "tensor 'w': storage '0' holds 23 bytes, the pickle says 24: truncated")


def test_compressed_members_refused(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    path.write_bytes(archive(pkl, data, compress=True))
    _cli_refuses(path, "the byte order (member 'archive/byteorder') is compressed: torch.save stores members "
                 "uncompressed; this archive was rewritten and is not read")


def test_views_outside_their_storage_refused(tmp_path: Path) -> None:
    s = Storage(np.zeros(6, np.float32))
    save({"w": T(s, 0, (6,), (1,))}, tmp_path / "ok.pt")
    pkl = (tmp_path / "ok.pt").read_bytes()
    bad, _ = dumps({"w": T(Storage(np.zeros(6, np.float32)), 4, (3,), (1,))})
    (tmp_path / "bad.pt").write_bytes(archive(bad, {"0": np.zeros(6, np.float32).tobytes()}))
    _cli_refuses(tmp_path / "bad.pt", "refused: a tensor view (offset 4, size [3], strides [1]) reaches element 6 of "
                 f"a storage of 6 float32 elements {REFUSED}")
    assert pkl  # the writer itself is fine


def test_sizes_that_overflow_refused(tmp_path: Path) -> None:
    huge, _ = dumps({"w": T(Storage(np.zeros(1, np.float32)), 0, (1 << 40, 1 << 40), (0, 0))})
    (tmp_path / "h.pt").write_bytes(archive(huge, {"0": np.zeros(1, np.float32).tobytes()}))
    with pytest.raises(InputError, match="overflows"):
        gradinspect.inspect(tmp_path / "h.pt")


def test_duplicate_dotted_names_refused(tmp_path: Path) -> None:
    a = T.of(np.ones(2, np.float32))
    save({"a.b": a, "a": {"b": T.of(np.ones(2, np.float32))}}, tmp_path / "d.pt")
    _cli_refuses(tmp_path / "d.pt", "tensor name 'a.b' appears twice (dotted names of nested containers collide)")


def test_members_outside_the_prefix_and_two_pickles_refused(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    path.write_bytes(archive(pkl, data))
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("zzz/notes.txt", b"x")
    _cli_refuses(path, "member 'zzz/notes.txt' is outside the archive's directory 'archive/'")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("other/data.pkl", pkl)
    _cli_refuses(path, "not a torch.save archive: 2 data.pkl members")


def test_corrupt_pickle_crc_refused(tmp_path: Path) -> None:
    path, pkl, data = _archive(tmp_path)
    blob = bytearray(archive(pkl, data))
    at = blob.index(pkl)
    blob[at + len(pkl) - 2] ^= 0x01
    path.write_bytes(bytes(blob))
    _cli_refuses(path, "member 'archive/data.pkl': CRC-32 mismatch (the data is corrupt)")


def test_json_metadata_like_safetensors(tmp_path: Path, rng: np.random.Generator) -> None:
    pt, st = _write_pair(tmp_path, {"w": T.of(rng.standard_normal(5).astype(np.float32))}, step=3)
    a = json.loads(run("info", pt, "--format", "json").stdout)
    b = json.loads(run("info", st, "--format", "json").stdout)
    assert list(a["metadata"].values()) == list(b["metadata"].values()) == [{"step": "3"}]


def test_process_executor_gives_the_same_bits(tmp_path: Path, rng: np.random.Generator) -> None:
    from gradinspect.executors import ProcessExecutor

    pt, _ = _write_pair(tmp_path, _views(rng))
    with ProcessExecutor(2) as pool:
        assert _rows(gradinspect.inspect(pt, jobs=pool)) == _rows(gradinspect.inspect(pt, jobs=1))


@pytest.mark.parametrize("permuted", ["t", "permute"])
def test_a_permuted_view_reads_its_storage_once(tmp_path: Path, rng: np.random.Generator, permuted: str) -> None:
    """w.t() of 1024x1024 and x.permute(2, 0, 1) of 64x128x128: read in storage order, each byte once, in
    reads of at most the buffer (1 MiB); the statistics are bit-for-bit those of the storage saved contiguously."""
    from gradinspect.sources import views
    from gradinspect.sources.store import ByteStore

    if permuted == "t":
        w = T.of(rng.standard_normal((1024, 1024)).astype(np.float32))
        v = T(w.storage, 0, (1024, 1024), (1, 1024))
    else:
        w = T.of(rng.standard_normal((64, 128, 128)).astype(np.float32))
        v = T(w.storage, 0, (128, 64, 128), (1, 128 * 128, 128))
    save({"t": v}, tmp_path / "t.pt")
    calls: list[int] = []
    real = views.gather

    def counting(store: ByteStore, *args: Any) -> Any:
        class Counting:
            def read_into(self, view: memoryview, offset: int) -> None:
                calls.append(len(view))
                store.read_into(view, offset)
        return real(Counting(), *args)  # type: ignore[arg-type]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(views, "gather", counting)
        rep = gradinspect.inspect(tmp_path / "t.pt", jobs=1)
    assert rep.total == gradinspect.compute_norms({"t": w.view()}).total
    assert rep.tensors[0].shape == v.shape
    s1, s2 = exact_sums(v.view())
    assert rel(rep.tensors[0].l1, s1) <= 1e-12 and rel_sqrt(rep.tensors[0].l2, s2) <= 1e-12
    assert max(calls) <= 1 << 20 and sum(calls) == 4 << 20, (len(calls), sum(calls))


@pytest.mark.parametrize("case", ["t", "permute", "rows_apart"])
def test_a_permuted_view_in_logical_order_reads_each_byte_once(tmp_path: Path, rng: np.random.Generator,
                                                               case: str) -> None:
    """In logical order (diff, copy detection: Source.chunks) a permuted view is read tile-wise: each byte of it
    once, in reads of at most the buffer (1 MiB): w.t() of 1024x1024 and x.permute(2, 0, 1) of 64x128x128 in
    4 reads; w[:, :512].t() of 512x8192 (storage rows 32 KiB apart) in one read per storage row.  (Gathered
    chunk by chunk, the first two read their storage once per chunk, 32 MiB, the last two reads per row.)"""
    from gradinspect.sources.store import ChunkBuffer

    if case == "t":
        w = T.of(rng.standard_normal((1024, 1024)).astype(np.float32))
        v, most = T(w.storage, 0, (1024, 1024), (1, 1024)), 4
    elif case == "permute":
        w = T.of(rng.standard_normal((64, 128, 128)).astype(np.float32))
        v, most = T(w.storage, 0, (128, 64, 128), (1, 128 * 128, 128)), 4
    else:
        w = T.of(rng.standard_normal((512, 8192)).astype(np.float32))
        v, most = T(w.storage, 0, (512, 512), (1, 8192)), 512
    save({"t": v}, tmp_path / "t.pt")
    calls: list[int] = []
    src = open_source(str(tmp_path / "t.pt"))
    assert src.store is not None
    real = src.store.read_into

    def counting(view: memoryview, offset: int) -> None:
        calls.append(len(view))
        real(view, offset)

    try:
        with src, pytest.MonkeyPatch.context() as mp:
            mp.setattr(src.store, "read_into", counting)
            chunks = [c.copy() for c in src.chunks(src.tensors[0], ChunkBuffer())]
    finally:
        src.close()
    assert [len(c) for c in chunks] == [1 << 17] * (v.view().size >> 17)
    assert np.array_equal(np.concatenate(chunks), v.view().reshape(-1))
    assert sum(calls) == v.view().nbytes and max(calls) <= 1 << 20 and len(calls) <= most, (len(calls), sum(calls))


def test_tied_views_are_read_once(tmp_path: Path, rng: np.random.Generator) -> None:
    from gradinspect.engine import plan, reduce_entries

    w = T.of(rng.standard_normal((300, 500)).astype(np.float32))
    tr = (500, 300), (1, 500)
    save({"emb": w, "head": w, "t1": T(w.storage, 0, *tr), "t2": T(w.storage, 0, *tr)}, tmp_path / "t.pt")
    src = open_source(str(tmp_path / "t.pt"))
    seen: list[int] = []
    try:
        with src:
            stats = reduce_entries(src, src.tensors, 2.0, 1, progress=seen.append)
    finally:
        src.close()
    assert stats[0] == stats[1] and stats[2] == stats[3] and stats[0].s2 == stats[2].s2
    assert sum(seen) == sum(t.nbytes for t in src.tensors)  # the progress bar still reaches its total
    assert len(plan(src.tensors[::2])) < len(plan(src.tensors))


def test_loss_scale_as_safetensors_metadata(tmp_path: Path, rng: np.random.Generator) -> None:
    a = rng.standard_normal((40, 30)).astype(np.float32)
    save({"w": T.of(a), "loss_scale": 65536}, tmp_path / "s.pt")
    save_file({"w": a}, str(tmp_path / "s.safetensors"), metadata={"loss_scale": "65536"})
    ours, ref = gradinspect.inspect(tmp_path / "s.pt"), gradinspect.inspect(tmp_path / "s.safetensors")
    assert ours.total == ref.total and ours.loss_scale == ref.loss_scale == 65536.0
    res = run("norms", tmp_path / "s.pt", "--format", "json")
    assert strict_json(res.stdout)["loss_scale"] == 65536.0
