"""--shards slices / replicas, --jobs and the progress bar through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import run
from gradinspect.errors import InputError


@pytest.fixture
def full(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"a.weight": rng.standard_normal((7, 5)).astype(np.float32),
            "b.bias": rng.standard_normal(9).astype(np.float32)}


def _exact_l2(arrays: list[np.ndarray]) -> float:
    return math.sqrt(math.fsum(float(v) * float(v) for a in arrays for v in a.reshape(-1).astype(np.float64)))


def test_slices_merge_exactly(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    for rank in range(3):  # uneven thirds of every flattened tensor
        shard = {k: np.array_split(v.reshape(-1), 3)[rank] for k, v in full.items()}
        save_file(shard, str(tmp_path / f"rank{rank}.safetensors"))
    r = gradinspect.inspect(str(tmp_path / "rank*.safetensors"), shards="slices", sort="name")
    assert r.total.tensors == 2 and r.total.numel == 44
    assert r.total.l2 == pytest.approx(_exact_l2(list(full.values())), rel=1e-15)
    a = r.tensors[0]
    assert (a.name, a.pieces, a.members, a.numel, a.shape) == ("a.weight", 3, 1, 35, None)
    assert a.l2 == pytest.approx(_exact_l2([full["a.weight"]]), rel=1e-15)
    assert r.to_dict()["shards"] == "slices"


def test_replicas_counted_once(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    for rank in range(4):
        save_file(full, str(tmp_path / f"rank{rank}.safetensors"))
    r = gradinspect.inspect(tmp_path, shards="replicas", sort="name")
    assert r.total.tensors == 2 and r.total.numel == 44
    assert r.total.l2 == pytest.approx(_exact_l2(list(full.values())), rel=1e-15)
    assert [(t.pieces, t.replica_max_diff, t.shape) for t in r.tensors] == [(4, 0.0, (7, 5)), (4, 0.0, (9,))]
    assert r.warnings() == []


def test_replicas_that_differ_warn(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    save_file(full, str(tmp_path / "rank0.safetensors"))
    other = dict(full)
    other["b.bias"] = full["b.bias"].copy()
    other["b.bias"][3] += 0.5
    save_file(other, str(tmp_path / "rank1.safetensors"))
    r = run("norms", tmp_path, "--shards", "replicas", "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["b.bias"]["replica_max_diff"] == pytest.approx(0.5, rel=1e-6)
    assert rows["a.weight"]["replica_max_diff"] == 0.0
    assert "Warning: the 2 copies of b.bias differ: max |difference| 0.5" in r.stderr
    assert "Warning" not in r.stdout


def test_replica_shapes_must_match(tmp_path: Path) -> None:
    save_file({"w": np.ones(3)}, str(tmp_path / "r0.safetensors"))
    save_file({"w": np.ones(4)}, str(tmp_path / "r1.safetensors"))
    with pytest.raises(InputError, match="replica of 'w' has shape"):
        gradinspect.inspect(tmp_path, shards="replicas")
    assert run("norms", tmp_path, "--shards", "replicas").exit_code == 2


def test_without_shards_a_repeated_name_is_an_error(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    for rank in range(2):
        save_file(full, str(tmp_path / f"rank{rank}.safetensors"))
    r = run("norms", str(tmp_path / "rank*.safetensors"))
    assert r.exit_code == 2 and "--shards" in r.stderr and r.stdout == ""


def test_sample_data_ddp_and_fsdp() -> None:
    root = Path(__file__).parent.parent / "sample_data"
    single = gradinspect.inspect(root / "healthy.safetensors", include=["blocks.0.*", "head.*"])
    ddp = gradinspect.inspect(root / "ddp", shards="replicas")
    fsdp = gradinspect.inspect(root / "fsdp", shards="slices")
    for r in (ddp, fsdp):
        assert r.total.numel == single.total.numel and r.total.tensors == single.total.tensors
        assert r.total.l2 == pytest.approx(single.total.l2, rel=1e-15)
    wrong = gradinspect.inspect(root / "ddp", shards="slices")  # replicas counted once per rank
    assert wrong.total.l2 == pytest.approx(math.sqrt(2) * single.total.l2, rel=1e-14)


def test_jobs_option_gives_identical_output(tmp_path: Path, rng: np.random.Generator) -> None:
    save_file({f"t{i}": rng.standard_normal(rng.integers(1, 300_000)).astype(np.float32) for i in range(6)},
              str(tmp_path / "g.safetensors"))
    outs = {run("norms", tmp_path / "g.safetensors", "--json", "--jobs", j).stdout for j in (1, 2, 4)}
    assert len(outs) == 1
    assert run("norms", tmp_path / "g.safetensors", "--jobs", "0").exit_code == 2


def test_quiet_silences_warnings(tmp_path: Path) -> None:
    save_file({"w": np.ones(2, np.float32), "step": np.array(1)}, str(tmp_path / "g.safetensors"))
    assert "Warning" in run("norms", tmp_path / "g.safetensors").stderr
    assert run("norms", tmp_path / "g.safetensors", "--quiet").stderr == ""


_BAR = r"""
import sys
from gradinspect import cli
cli._ProgressBar.DELAY = 0.0
sys.argv = ["gradinspect", *sys.argv[1:]]
cli.main()
"""


def _with_terminal_stderr(args: list[str]) -> tuple[str, str]:
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-c", _BAR, *args], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    err = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        err.append(data)
    out = proc.communicate(timeout=120)[0].decode()
    os.close(master)
    return out, b"".join(err).decode(errors="replace")


def test_progress_bar_on_a_terminal_stderr_never_in_json(tmp_path: Path, rng: np.random.Generator) -> None:
    tensors = {f"t{i}": rng.standard_normal(400_000).astype(np.float32) for i in range(8)}
    save_file(tensors, str(tmp_path / "g.safetensors"))
    out, err = _with_terminal_stderr(["norms", str(tmp_path / "g.safetensors"), "--json"])
    assert "reading" in err  # the bar was drawn on stderr ...
    assert json.loads(out)["total"]["tensors"] == 8  # ... and stdout is the document alone
    out, err = _with_terminal_stderr(["norms", str(tmp_path / "g.safetensors"), "--json", "--quiet"])
    assert "reading" not in err and json.loads(out)["total"]["tensors"] == 8


def test_replica_with_nan_in_any_copy_fails_the_nonfinite_rule(tmp_path: Path) -> None:
    for i, v in enumerate(([1.0, 2.0], [1.0, 2.0], [1.0, np.nan])):
        save_file({"w": np.array(v)}, str(tmp_path / f"r{i}.safetensors"))
    for order in (["r0", "r1", "r2"], ["r2", "r0", "r1"], ["r0", "r2", "r1"]):
        r = run("check", *[tmp_path / f"{n}.safetensors" for n in order], "--shards", "replicas", "-f", "json")
        assert r.exit_code == 1, order
        assert [f["rule"] for f in json.loads(r.stdout)["findings"]] == ["nonfinite"]
        assert "hold NaN/inf" in r.stderr


def test_shard_columns_in_the_table(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    for rank in range(2):
        save_file(full, str(tmp_path / f"rank{rank}.safetensors"))
    out = run("norms", tmp_path, "--shards", "replicas").stdout
    assert out.splitlines()[0].endswith("copies  max Δ")
    assert out.splitlines()[1].split()[-2:] == ["2", "0"]
    out = run("norms", tmp_path, "--shards", "slices", "-f", "markdown").stdout
    assert "| pieces |" in out.splitlines()[0]


def test_info_lists_repeated_names(tmp_path: Path, full: dict[str, np.ndarray]) -> None:
    for rank in range(2):
        save_file(full, str(tmp_path / f"rank{rank}.safetensors"))
    r = run("info", str(tmp_path / "rank*.safetensors"), "-f", "json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["tensors"]) == 4


def test_replicas_in_different_memory_order_are_refused(tmp_path: Path) -> None:
    x = np.arange(6.0).reshape(2, 3)
    d1, d2 = tmp_path / "r0", tmp_path / "r1"
    d1.mkdir()
    d2.mkdir()
    np.save(d1 / "w.npy", x)
    np.save(d2 / "w.npy", np.asfortranarray(x))
    with pytest.raises(InputError, match="order"):
        gradinspect.inspect([d1, d2], shards="replicas")
