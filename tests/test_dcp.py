"""torch distributed checkpoints (DCP directories), read without torch and without running any pickle.

The directories under tests/data/dcp were written by ``torch.distributed.checkpoint.save`` (tests/dcp_writer.py:
3 ranks with uneven row shards, column shards, an empty shard and a replicated tensor; one process; 2 ranks
with DCP's safetensors serialization), each next to ``<step>.full.safetensors``, the full tensors.  Corrupt
checkpoints are those directories with a ``.metadata`` rewritten by :func:`metadata_pickle` (the pickle DCP
writes, emitted without torch).  With torch installed, fresh checkpoints are written by more ranks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from ptwriter import T, archive, dumps, global_, integer, unicode

import gradinspect
from conftest import ROOT, exact_sums, rel_sqrt, run, strict_json
from gradinspect import api, runs
from gradinspect.errors import InputError
from gradinspect.sources import dcp

DATA = Path(__file__).parent / "data" / "dcp"
CASES = {"ranks3": DATA / "ranks3" / "step_0000", "single": DATA / "single" / "step_0000",
         "safetensors2": DATA / "st2" / "step_0000"}
LOSS_SCALE = 1024.0  # tests/dcp_writer.py


def full(d: Path) -> Path:
    return d.with_name(d.name + ".full.safetensors")


def arrays(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors, read here (an oracle independent of gradinspect)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    types = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"),
             "BF16": np.dtype(ml_dtypes.bfloat16)}
    out = {}
    for name, h in header.items():
        if name != "__metadata__":
            a, b = h["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], types[h["dtype"]]).reshape(h["shape"])
    return out


def _rows(report: Any) -> dict[str, tuple[Any, ...]]:
    return {t.name: (t.shape, t.dtype, t.numel, t.l1, t.l2, t.linf, t.norm, t.sq, t.nan, t.inf) for t in report.tensors}


# --- read exactly ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_norms_bit_identical_to_the_full_tensors(case: str, p: float) -> None:
    d = CASES[case]
    a, b = gradinspect.inspect(d, norm_type=p), gradinspect.inspect(full(d), norm_type=p)
    assert _rows(a) == _rows(b) and a.total == b.total and a.clip == b.clip
    assert a.loss_scale == b.loss_scale == LOSS_SCALE and a.loss_scale_from == "metadata"
    assert a.metadata == {str(d): {"step": "0", "loss_scale": str(LOSS_SCALE)}}


@pytest.mark.parametrize("case", CASES)
def test_norms_match_the_exact_oracle(case: str) -> None:
    d = CASES[case]
    grads = arrays(full(d))
    r = gradinspect.inspect(d)
    total = Fraction(0)
    for t in r.tensors:
        s1, s2 = exact_sums(grads[t.name])
        total += s2
        assert rel_sqrt(t.l2, s2 / Fraction(LOSS_SCALE) ** 2) <= 1e-12
        assert t.l1 == pytest.approx(float(s1) / LOSS_SCALE, rel=1e-12)
        assert t.shape == grads[t.name].shape
    assert {t.name for t in r.tensors} == set(grads)
    assert rel_sqrt(r.total.l2, total / Fraction(LOSS_SCALE) ** 2) <= 1e-12


def test_loss_scale_option_overrides_the_checkpoint() -> None:
    d = CASES["ranks3"]
    a, b = gradinspect.inspect(d, loss_scale=2.0), gradinspect.inspect(full(d), loss_scale=2.0)
    assert _rows(a) == _rows(b) and a.total == b.total and a.loss_scale == 2.0 and a.loss_scale_from == "option"


def test_process_executor_gives_the_same_bits() -> None:
    from gradinspect.executors import ProcessExecutor

    d = CASES["ranks3"]
    with ProcessExecutor(2) as ex:
        a = gradinspect.inspect(d, jobs=ex)
    assert _rows(a) == _rows(gradinspect.inspect(d, jobs=1))


# --- every command ----------------------------------------------------------------------------------------


def test_info_lists_global_shapes_and_chunk_counts() -> None:
    d = CASES["ranks3"]
    r = run("info", d, "--format", "json")
    assert r.exit_code == 0, r.stderr
    doc = strict_json(r.stdout)
    got = {t["name"]: (t["shape"], t["dtype"], t["chunks"], t["bytes"]) for t in doc["tensors"]}
    assert got == {"layers.0.w": ([7, 5], "float32", 3, 140), "layers.1.w": ([4, 6], "bfloat16", 3, 48),
                   "layers.1.v": ([3, 8], "float32", 3, 96), "norm": ([5], "float32", 1, 20)}
    assert doc["sources"] == [str(d)] and doc["metadata"] == {str(d): {"step": "0", "loss_scale": "1024.0"}}
    plain = strict_json(run("info", full(d), "--format", "json").stdout)
    assert {t["chunks"] for t in plain["tensors"]} == {1}
    table = run("info", d)
    assert table.exit_code == 0 and "chunks" in table.stdout.splitlines()[0]
    assert "chunks" not in run("info", full(d)).stdout


def test_check_as_on_the_full_tensors() -> None:
    d = CASES["ranks3"]
    a, b = run("check", d, "--format", "json"), run("check", full(d), "--format", "json")
    assert a.exit_code == b.exit_code and a.exit_code in (0, 1)
    da = strict_json(a.stdout.replace(json.dumps(str(d))[1:-1], "X"))
    db = strict_json(b.stdout.replace(json.dumps(str(full(d)))[1:-1], "X"))
    for doc in (da, db):  # in file order: the checkpoint's state-dict order, the safetensors file's sorted names
        doc["report"]["tensors"].sort(key=lambda t: t["name"])
    assert da == db


@pytest.mark.parametrize("case", CASES)
def test_diff_against_the_full_tensors(case: str) -> None:
    d = CASES[case]
    r = run("diff", d, full(d), "--rtol", "0", "--atol", "0", "--format", "json")
    assert r.exit_code == 0, r.stderr + r.stdout
    doc = strict_json(r.stdout)
    assert doc["mismatched"] == [] and doc["only_a"] == [] and doc["only_b"] == []
    assert {t["name"] for t in doc["tensors"]} == set(arrays(full(d)))
    assert all(t["l2_diff"] == 0.0 and t["linf_diff"] == 0.0 for t in doc["tensors"])


def test_diff_of_checkpoints_sharded_differently() -> None:
    r = api.diff(CASES["ranks3"], CASES["safetensors2"])  # 3 ranks against 2 ranks: the same full tensors
    assert r.mismatched == () and len(r.tensors) == 4
    assert all(t.l2_diff == 0.0 and t.l2_a == t.l2_b > 0 for t in r.tensors)


def test_diff_of_two_steps_as_of_their_full_tensors() -> None:
    a, b = DATA / "ranks3" / "step_0000", DATA / "ranks3" / "step_0001"
    x = api.diff(a, b)
    y = api.diff(full(a), full(b))
    assert x.tensors == y.tensors and x.total == y.total
    assert {t.name for t in x.tensors} == {"layers.0.w", "layers.1.w", "layers.1.v", "norm"}
    assert all(t.l2_diff > 0 for t in x.tensors)


def test_trend_over_a_glob_of_step_directories() -> None:
    r = run("trend", str(DATA / "ranks3") + "/step_*/", "--format", "json")
    assert r.exit_code == 0, r.stderr
    s = run("trend", str(DATA / "ranks3" / "step_*.full.safetensors"), "--format", "json")
    a, b = strict_json(r.stdout), strict_json(s.stdout)
    assert [x["step"] for x in a["steps"]] == [0, 10]  # the checkpoints' integer "step" entries
    assert [x["total"] for x in a["steps"]] == [x["total"] for x in b["steps"]]


def test_trend_progress_total_counts_the_checkpoints_files() -> None:
    class Bar:
        def __init__(self) -> None:
            self.totals: list[int] = []
            self.done = 0

        def set_total(self, n: int) -> None:
            self.totals.append(n)

        def __call__(self, n: int) -> None:
            self.done += n

    bar = Bar()
    steps = [DATA / "ranks3" / "step_0000", DATA / "ranks3" / "step_0001"]
    runs.trend(steps, progress=bar)
    assert bar.totals == [sum(f.stat().st_size for d in steps for f in d.iterdir())]
    assert bar.done == 2 * (140 + 48 + 96 + 20) < bar.totals[0]  # the tensors' bytes; archives are the rest


def test_directory_of_step_directories_is_listed_step_by_step() -> None:
    r = runs.trend([str(DATA / "ranks3" / "step_0000"), str(DATA / "ranks3" / "step_0001")])
    assert [s.step for s in r.steps] == [0, 10]


# --- refused -----------------------------------------------------------------------------------------------


def metadata_pickle(meta: dcp.Meta, sizes: dict[str, int] | None = None) -> bytes:
    """The ``.metadata`` pickle torch writes (protocol 4, the same globals and layout), from a :class:`dcp.Meta`."""
    M = "torch.distributed.checkpoint.metadata"

    def g(module: str, name: str) -> bytes:
        return global_(module, name, 4)

    def w(v: Any) -> bytes:
        if v is None:
            return b"N"
        if isinstance(v, bool):
            return b"\x88" if v else b"\x89"
        if isinstance(v, int):
            return integer(v)
        if isinstance(v, str):
            return unicode(v)
        if isinstance(v, tuple):
            return b"(" + b"".join(w(x) for x in v) + b"t"
        if isinstance(v, list):
            return b"](" + b"".join(w(x) for x in v) + b"e"
        if isinstance(v, dict):
            return b"}(" + b"".join(w(k) + w(x) for k, x in v.items()) + b"u"
        if isinstance(v, bytes):  # already emitted
            return v
        raise TypeError(type(v))

    def obj(name: str, state: dict[str, Any] | bytes | None, module: str = M) -> bytes:
        return g(module, name) + b")\x81" + (b"" if state is None else w(state) + b"b")

    def size(dims: tuple[int, ...]) -> bytes:
        return g("torch", "Size") + w(dims) + b"\x85R"

    sd: dict[str, Any] = {}
    for name, tm in meta.tensors.items():
        props = (g(M, "TensorProperties") + b")\x81" + b"(" + g("torch", tm.dtype)
                 + g("torch.serialization", "_get_layout") + unicode("torch.strided") + b"\x85R" + b"\x89"
                 + g(M, "_MEM_FORMAT_ENCODING") + integer(0) + b"\x85R" + b"\x89" + b"tb")
        chunks = b"](" + b"".join(obj("ChunkStorageMetadata", {"offsets": size(c.offsets), "sizes": size(c.sizes)})
                                  for c in tm.chunks) + b"e"
        sd[name] = obj("TensorStorageMetadata", {"properties": props, "size": size(tm.size), "chunks": chunks})
    for name in meta.objects:
        sd[name] = obj("BytesStorageMetadata", None)
    storage = b"}("
    for (fqn, offsets), info in meta.storage.items():
        index = obj("MetadataIndex", {"fqn": fqn, "index": 0, "offset": None if offsets is None else size(offsets)})
        st: dict[str, Any] = {"relative_path": info.relative_path, "offset": info.offset, "length": info.length}
        if info.transforms:
            st["transform_descriptors"] = list(info.transforms)
        storage += index + obj("_StorageInfo", st, "torch.distributed.checkpoint.filesystem")
    storage += b"u"
    meta_state = {"state_dict_metadata": sd, "planner_data": None, "storage_data": storage,
                  "storage_meta": obj("StorageMeta", {"checkpoint_id": g("pathlib", "PosixPath") + w(("ckpt",)) + b"R",
                                                      "save_id": "x", "load_id": None, "modules": []}),
                  "version": "1.0.0"}
    return b"\x80\x04" + obj("Metadata", meta_state) + b"."


def _copy(tmp_path: Path, case: str = "ranks3") -> tuple[Path, dcp.Meta]:
    d = tmp_path / "ckpt"
    shutil.copytree(CASES[case], d)
    return d, dcp.parse_metadata((d / ".metadata").read_bytes(), "x")


def _error(d: Path) -> str:
    r = run("norms", d)
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), (
        r.exit_code, r.stdout, r.stderr)
    return r.stderr


def test_rewritten_metadata_reads_as_the_original(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _rows(gradinspect.inspect(d)) == _rows(gradinspect.inspect(CASES["ranks3"]))


def _move(meta: dcp.Meta, name: str, old: tuple[int, ...], new: dcp.Chunk) -> None:
    tm = meta.tensors[name]
    tm.chunks = [new if c.offsets == old else c for c in tm.chunks]
    meta.storage[(name, new.offsets)] = meta.storage.pop((name, old))


def test_overlapping_chunks_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    _move(meta, "layers.0.w", (3, 0), dcp.Chunk((2, 0), (3, 5)))
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / '.metadata'}: tensor 'layers.0.w': chunk at [0, 0] of sizes [3, 5] and chunk "
                         "at [2, 0] of sizes [3, 5] overlap\n")


def test_gap_between_chunks_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    tm = meta.tensors["layers.1.v"]
    tm.chunks = [c for c in tm.chunks if c.offsets != (0, 3)]  # the middle column shard
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / '.metadata'}: tensor 'layers.1.v': element [0, 3] is in no chunk "
                         "(its chunks leave a gap in its shape [3, 8])\n")


@pytest.mark.parametrize(("shape", "message"), [
    ((6, 5), "chunk at [6, 0] of sizes [1, 5] lies outside its shape [6, 5]"),
    ((8, 5), "element [7, 0] is in no chunk (its chunks leave a gap in its shape [8, 5])"),
    ((7, 5, 1), "chunk at [0, 0] of sizes [3, 5] does not have the 3 dimensions of its shape [7, 5, 1]"),
])
def test_chunks_that_do_not_add_up_to_the_shape_refused(tmp_path: Path, shape: tuple[int, ...], message: str) -> None:
    d, meta = _copy(tmp_path)
    meta.tensors["layers.0.w"].size = shape
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == f"Error: {d / '.metadata'}: tensor 'layers.0.w': {message}\n"


def test_chunk_whose_data_has_another_shape_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    _move(meta, "layers.0.w", (0, 0), dcp.Chunk((0, 0), (4, 5)))
    _move(meta, "layers.0.w", (3, 0), dcp.Chunk((4, 0), (2, 5)))
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / '__0_0.distcp'}: tensor 'layers.0.w': chunk at [0, 0]: holds a tensor of "
                         "shape [3, 5], but .metadata says [4, 5]\n")


def test_missing_distcp_file_refused(tmp_path: Path) -> None:
    d, _ = _copy(tmp_path)
    (d / "__1_0.distcp").unlink()
    assert _error(d) == f"Error: {d / '__1_0.distcp'}: missing: .metadata says chunks are stored in it\n"


def test_chunk_past_the_end_of_its_file_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    info = meta.storage[("layers.1.v", (0, 3))]
    meta.storage[("layers.1.v", (0, 3))] = replace(info, length=info.length + 10_000)
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    size = (d / info.relative_path).stat().st_size
    assert _error(d) == (f"Error: {d / info.relative_path}: bytes {info.offset} to {info.offset + info.length + 10_000}"
                         f" lie past the end of the file ({size} bytes): truncated?\n")


def test_truncated_distcp_file_refused(tmp_path: Path) -> None:
    d, _ = _copy(tmp_path)
    f = d / "__2_0.distcp"
    f.write_bytes(f.read_bytes()[:-100])
    assert "lie past the end of the file" in _error(d)


def test_compressed_chunks_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    info = meta.storage[("norm", (0,))]
    meta.storage[("norm", (0,))] = replace(info, transforms=("stream.zstd/1",))
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / '.metadata'}: tensor 'norm': chunk at [0] is stored with the transform "
                         "stream.zstd/1 (compressed chunks are not read: save without _extensions)\n")


@pytest.mark.parametrize("rel", ["../outside.distcp", "/etc/passwd", "sub/__0_0.distcp", ".."])
def test_data_file_outside_the_directory_refused(tmp_path: Path, rel: str) -> None:
    d, meta = _copy(tmp_path)
    info = meta.storage[("norm", (0,))]
    meta.storage[("norm", (0,))] = replace(info, relative_path=rel)
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == f"Error: {d / '.metadata'}: names a data file {rel!r} outside the checkpoint's directory\n"


def test_chunk_without_storage_entry_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    del meta.storage[("layers.1.w", (2, 0))]
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / '.metadata'}: tensor 'layers.1.w': chunk at [2, 0] has no storage entry "
                         "(where its bytes are)\n")


def test_distcp_file_alone_refused_with_a_hint() -> None:
    f = CASES["ranks3"] / "__0_0.distcp"
    r = run("norms", f)
    assert r.exit_code == 2 and r.stderr == (f"Error: {f}: a .distcp file is one piece of a torch distributed "
                                             "checkpoint: give the directory that holds it and its .metadata file\n")


HOSTILE = {
    "os.system": global_("os", "system", 4) + unicode("touch {marker}") + b"\x85R.",
    "posix.system": b"cposix\nsystem\n" + unicode("touch {marker}") + b"\x85R.",
    "builtins.eval": global_("builtins", "eval", 4) + unicode("open({marker!r}, 'w')") + b"\x85R.",
    "inside Metadata": None,  # filled below: a Metadata whose state calls os.system
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_metadata_runs_nothing(tmp_path: Path, kind: str) -> None:
    d, meta = _copy(tmp_path)
    marker = tmp_path / "marker"
    if HOSTILE[kind] is None:
        good = metadata_pickle(meta)
        evil = global_("os", "system", 4) + unicode(f"touch {marker}") + b"\x85R"
        body = good[2:].replace(unicode("1.0.0"), evil, 1)
        data = b"\x80\x04" + body
        who = "os.system"
    else:
        data = b"\x80\x04" + HOSTILE[kind].replace(b"{marker}", str(marker).encode()).replace(  # type: ignore[union-attr]
            b"{marker!r}", repr(str(marker)).encode())
        who = kind
    (d / ".metadata").write_bytes(data)
    for cmd in ("norms", "info", "check"):
        r = run(cmd, d)
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr == (f"Error: {d / '.metadata'}: refused: the pickle references {who} (only tensors, plain "
                            "containers and distributed checkpoint metadata are read)\n")
    assert not marker.exists()


def test_hostile_build_on_a_checkpoint_class_refused(tmp_path: Path) -> None:
    d, _ = _copy(tmp_path)
    bad = global_("torch.distributed.checkpoint.metadata", "Metadata", 4) + b")\x81" + unicode("state") + b"b."
    (d / ".metadata").write_bytes(b"\x80\x04" + bad)
    assert "refused: the state of a Metadata must be a dict of attributes" in _error(d)


def test_parse_metadata_is_plain_records() -> None:
    meta = dcp.parse_metadata((CASES["ranks3"] / ".metadata").read_bytes(), "m")
    assert meta.tensors["layers.1.v"] == dcp.TensorMeta("float32", (3, 8), [
        dcp.Chunk((0, 0), (3, 3)), dcp.Chunk((0, 3), (3, 3)), dcp.Chunk((0, 6), (3, 2))])
    assert meta.objects == ["step", "loss_scale", "extra.lr"]
    with pytest.raises(InputError, match="not a torch distributed checkpoint's Metadata"):
        dcp.parse_metadata(b"\x80\x04}.", "m")


# --- tiling, on its own ---------------------------------------------------------------------------------------


def test_tile_orders_column_shards_row_by_row() -> None:
    chunks = [dcp.Chunk((0, 2), (2, 1)), dcp.Chunk((0, 0), (2, 2))]
    start, length, which, local = dcp.tile("p", "t", (2, 3), chunks, 100)
    assert start.tolist() == [0, 2, 3, 5] and length.tolist() == [2, 1, 2, 1]
    assert which.tolist() == [1, 0, 1, 0] and local.tolist() == [0, 0, 2, 1]
    with pytest.raises(InputError, match=r"split it into 4 pieces, more than the 3 read here"):
        dcp.tile("p", "t", (2, 3), chunks, 3)


def test_tile_of_blocks_on_a_grid() -> None:
    rng = np.random.default_rng(0)
    shape = (6, 4, 5)
    cuts = [(0, 2, 6), (0, 1, 4), (0, 5)]
    chunks = [dcp.Chunk((a0, b0, c0), (a1 - a0, b1 - b0, c1 - c0))
              for a0, a1 in itertools.pairwise(cuts[0]) for b0, b1 in itertools.pairwise(cuts[1])
              for c0, c1 in itertools.pairwise(cuts[2])]
    rng.shuffle(chunks)  # type: ignore[arg-type]
    _, length, which, local = dcp.tile("p", "t", shape, chunks, 1000)
    full_ = np.arange(np.prod(shape)).reshape(shape)
    pieces = [full_[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))].reshape(-1)
              for c in chunks]
    order = np.concatenate([pieces[k][lo : lo + n] for k, lo, n in zip(which, local, length, strict=True)])
    assert order.tolist() == list(range(full_.size))


# --- written by torch itself, with more ranks ------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="writing distributed checkpoints needs torch")
    out = tmp_path_factory.mktemp("dcp")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["ranks4", "--world", "4", "--big", "--steps", "2"], ["single", "--big"],
                 ["st", "--big", "--safetensors"]):
        subprocess.run([sys.executable, str(ROOT / "tests" / "dcp_writer.py"), str(out / args[0]), *args[1:]],
                       check=True, env=env, timeout=300, capture_output=True)
    return out


@pytest.mark.parametrize("case", ["ranks4/step_0000", "ranks4/step_0001", "single/step_0000", "st/step_0000"])
def test_written_by_torch_bit_identical(written: Path, case: str) -> None:
    d = written / case
    for p in (2.0, math.inf, 1.5):
        a, b = gradinspect.inspect(d, norm_type=p), gradinspect.inspect(full(d), norm_type=p)
        assert _rows(a) == _rows(b) and a.total == b.total
    info = api.info(d)
    chunks = {t.name: t.chunks for t in info.tensors}
    assert chunks["big.rows"] == (4 if case.startswith("ranks4") else 1) and chunks["norm"] == 1
    r = api.diff(d, full(d))
    assert r.mismatched == () and all(t.l2_diff == 0.0 for t in r.tensors)
    assert len(r.tensors) == len(arrays(full(d)))


def test_written_by_torch_matches_the_oracle(written: Path) -> None:
    d = written / "ranks4" / "step_0001"
    grads = arrays(full(d))
    r = gradinspect.inspect(d, loss_scale=1.0)
    for t in r.tensors:
        if grads[t.name].dtype != np.float64:
            assert rel_sqrt(t.l2, exact_sums(grads[t.name])[1]) <= 1e-12
        else:
            assert t.l2 == pytest.approx(math.sqrt(math.fsum(x * x for x in grads[t.name].reshape(-1).tolist())),
                                         rel=1e-12)
    trend = runs.trend(str(written / "ranks4") + "/step_*/")
    assert [s.step for s in trend.steps] == [0, 10]


# --- hostile or wrong chunk archives (torch.save zips written by tests/ptwriter.py, appended to a .distcp) ------


def _append(d: Path, meta: dcp.Meta, key: tuple[str, tuple[int, ...] | None], data: bytes) -> None:
    """Append ``data`` to the file of entry ``key`` and point the entry at it."""
    info = meta.storage[key]
    f = d / info.relative_path
    at = f.stat().st_size
    with open(f, "ab") as out:
        out.write(data)
    meta.storage[key] = replace(info, offset=at, length=len(data))
    (d / ".metadata").write_bytes(metadata_pickle(meta))


def test_appended_chunk_archive_is_read(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    values = np.arange(1, 6, dtype=np.float32)
    pkl, storages = dumps(T.of(values), 2)
    _append(d, meta, ("norm", (0,)), archive(pkl, {s.key or "": s.data.tobytes() for s in storages}))
    r = gradinspect.inspect(d, loss_scale=1.0)
    (row,) = [t for t in r.tensors if t.name == "norm"]
    assert row.l2 == math.sqrt(55.0) and row.l1 == 15.0


@pytest.mark.parametrize("entry", [("norm", (0,)), ("step", None)])
def test_hostile_chunk_or_object_archive_runs_nothing(tmp_path: Path, entry: tuple[str, Any]) -> None:
    d, meta = _copy(tmp_path)
    marker = tmp_path / "marker"
    evil = b"\x80\x02" + global_("os", "system", 2) + unicode(f"touch {marker}") + b"\x85R."
    _append(d, meta, entry, archive(evil, {}))
    err = _error(d)
    assert err.startswith(f"Error: {d / meta.storage[entry].relative_path}") and "refused: the pickle references " \
        "os.system" in err
    assert not marker.exists()


def test_chunk_archive_of_another_dtype_refused(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    pkl, storages = dumps(T.of(np.arange(5, dtype=np.float64)), 2)
    _append(d, meta, ("norm", (0,)), archive(pkl, {s.key or "": s.data.tobytes() for s in storages}))
    f = d / meta.storage[("norm", (0,))].relative_path
    assert _error(d) == (f"Error: {f}: tensor 'norm': chunk at [0]: holds float64 data, but .metadata says "
                         "float32\n")


def test_chunk_archive_must_end_where_the_chunk_ends(tmp_path: Path) -> None:
    d, meta = _copy(tmp_path)
    info = meta.storage[("layers.0.w", (0, 0))]
    meta.storage[("layers.0.w", (0, 0))] = replace(info, length=info.length + 1)  # one byte of the next chunk
    (d / ".metadata").write_bytes(metadata_pickle(meta))
    assert _error(d) == (f"Error: {d / info.relative_path}: tensor 'layers.0.w': chunk at [0, 0]: not a zip file "
                         "(no end-of-central-directory record): corrupt or truncated\n")


def test_mutated_checkpoints_are_read_or_refused(tmp_path: Path) -> None:
    """Random byte changes in .metadata and in the chunk archives: an InputError or numbers, never a crash."""
    rng = np.random.default_rng(2026)
    d, _ = _copy(tmp_path)
    files = [d / ".metadata", d / "__0_0.distcp", d / "__2_0.distcp"]
    originals = {f: f.read_bytes() for f in files}
    outcomes = {"read": 0, "refused": 0}
    for _ in range(120):
        f = files[int(rng.integers(len(files)))]
        data = bytearray(originals[f])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        f.write_bytes(bytes(data))
        try:
            r = gradinspect.inspect(d)
        except InputError:
            outcomes["refused"] += 1
        else:
            outcomes["read"] += 1
            assert r.total.numel == 35 + 24 + 24 + 5
        f.write_bytes(originals[f])
    assert outcomes["refused"] > 20 and outcomes["read"] > 20, outcomes


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc/self/fd")
def test_many_files_are_not_held_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past limits.MAX_DCP_OPEN files, each read opens the files it needs: the same bits, no descriptor held."""
    from gradinspect.sources import limits, open_source

    d = CASES["ranks3"]  # .metadata and 3 .distcp files
    before = _open_fds()
    held = open_source(str(d))
    assert _open_fds() == before + 4
    held.close()
    monkeypatch.setattr(limits, "MAX_DCP_OPEN", 2)
    src = open_source(str(d))
    assert _open_fds() == before
    with src:
        assert _open_fds() == before
    src.close()
    assert _rows(gradinspect.inspect(d)) == _rows(gradinspect.inspect(full(d)))
    assert all(t.l2_diff == 0.0 for t in api.diff(d, full(d)).tensors)
    assert _open_fds() == before
