"""diff with --shards: each side one gradient set with its own mode; several sets in one run (pipeline)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import load_file, save_file

import gradinspect
from gradinspect import pipeline
from gradinspect.api import diff
from gradinspect.cli import cli
from gradinspect.errors import InputError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
KEEP = ("blocks.0.*", "head.*")  # what sample_data/ddp and fsdp hold of healthy.safetensors


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "100", "NO_COLOR": "1"})


def exact(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """l2 of A, B, A − B, cosine and max |A − B| of two flat sequences, with math.fsum (float32 → float64 is exact)."""
    x = [float(v) for v in np.asarray(a, np.float64).ravel()]
    y = [float(v) for v in np.asarray(b, np.float64).ravel()]
    assert len(x) == len(y)
    d = [Fraction(u) - Fraction(v) for u, v in zip(x, y, strict=True)]  # exact differences
    la, lb = math.sqrt(math.fsum(u * u for u in x)), math.sqrt(math.fsum(v * v for v in y))
    ld = math.sqrt(float(sum(e * e for e in d)))
    cosine = math.fsum(u * v for u, v in zip(x, y, strict=True)) / (la * lb)
    return {"l2_a": la, "l2_b": lb, "l2_diff": ld, "cosine": cosine, "linf_diff": float(max(abs(e) for e in d))}


def assert_close(row: object, want: dict[str, float]) -> None:
    for k, v in want.items():
        assert getattr(row, k) == pytest.approx(v, rel=1e-12, abs=1e-300), k


@pytest.fixture
def full() -> dict[str, np.ndarray]:
    g = load_file(str(SAMPLES / "healthy.safetensors"))
    return {k: v for k, v in sorted(g.items()) if k.startswith(("blocks.0.", "head."))}


@pytest.fixture
def changed(tmp_path: Path, full: dict[str, np.ndarray]) -> tuple[Path, dict[str, np.ndarray]]:
    """One file: the sample gradients with two tensors changed."""
    other = {k: v.copy() for k, v in full.items()}
    other["blocks.0.fc1.weight"][3, 5] += np.float32(0.25)
    other["head.bias"] *= np.float32(-2.0)
    path = tmp_path / "changed.safetensors"
    save_file(other, str(path))
    return path, other


def test_fsdp_slices_against_one_file_is_zero(full: dict[str, np.ndarray]) -> None:
    single = SAMPLES / "healthy.safetensors"
    r = diff(SAMPLES / "fsdp", single, shards_a="slices", include=KEEP, rtol=0.0)
    assert len(r.tensors) == len(full) and r.ok and not r.mismatched and not r.only_a and not r.only_b
    assert r.total.l2_diff == 0.0 and r.total.linf_diff == 0.0 and r.total.cosine == 1.0
    assert {t.name: t.shape for t in r.tensors} == {k: v.shape for k, v in full.items()}  # the unsliced side's
    assert r.total.l2_a == pytest.approx(gradinspect.inspect(SAMPLES / "fsdp", shards="slices").total.l2, rel=1e-15)
    # --shards applies to both sides (B has no repeated name); same slicing on both sides too
    assert diff(SAMPLES / "fsdp", single, shards="slices", include=KEEP).total.l2_diff == 0.0
    same = diff(SAMPLES / "fsdp", SAMPLES / "fsdp", shards="slices")
    assert same.total.l2_diff == 0.0 and len(same.tensors) == len(full)
    assert {t.shape for t in same.tensors} == {(v.size,) for v in full.values()}  # both sliced: the element count


def test_fsdp_slices_against_a_modified_copy(full: dict[str, np.ndarray],
                                             changed: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, other = changed
    r = diff(SAMPLES / "fsdp", path, shards="slices", rtol=1e-9)
    rows = {t.name: t for t in r.tensors}
    for name in full:
        assert_close(rows[name], exact(full[name], other[name]))
    assert_close(r.total, exact(np.concatenate([v.ravel() for v in full.values()]),
                                np.concatenate([v.ravel() for v in other.values()])))
    assert rows["blocks.0.fc1.weight"].linf_diff == pytest.approx(0.25, rel=1e-6)
    assert rows["head.bias"].cosine == pytest.approx(-1.0, rel=1e-12)
    assert {t.name for t in r.failed} == {"blocks.0.fc1.weight", "head.bias"} and not r.ok
    # the same numbers whichever side is sliced, and through the CLI
    swapped = diff(path, SAMPLES / "fsdp", shards_b="slices")
    assert swapped.total.l2_diff == r.total.l2_diff
    cli = run("diff", SAMPLES / "fsdp", path, "--shards-a", "slices", "--rtol", "1e-9", "--json")
    assert cli.exit_code == 1 and '"l2_diff": ' + repr(r.total.l2_diff) in cli.stdout


def test_replicas_on_both_sides(tmp_path: Path, full: dict[str, np.ndarray],
                                changed: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, other = changed
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    for i in range(3):
        save_file(other, str(ranks / f"rank{i}.safetensors"))
    r = diff(SAMPLES / "ddp", ranks, shards="replicas")
    one = diff(SAMPLES / "ddp" / "rank0.safetensors", ranks / "rank0.safetensors")
    assert r.to_dict()["tensors"] == one.to_dict()["tensors"] and r.total == one.total
    assert r.warnings() == []  # the copies agree
    assert_close(one.total, exact(np.concatenate([v.ravel() for v in full.values()]),
                                  np.concatenate([v.ravel() for v in other.values()])))
    assert run("diff", SAMPLES / "ddp", ranks, "--shards", "replicas").exit_code == 0
    assert run("diff", SAMPLES / "ddp", ranks).exit_code == 2  # a repeated name still needs --shards


def test_replicas_that_differ_compare_the_copy_norms_shows(tmp_path: Path) -> None:
    w = np.array([1.0, 2.0, 3.0], np.float32)
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    side = tmp_path / "b"
    side.mkdir()
    save_file({"w": w + np.float32(0.5)}, str(side / "r0.safetensors"))
    save_file({"w": w}, str(side / "r1.safetensors"))
    r = diff(tmp_path / "a.safetensors", side, shards_b="replicas")
    assert r.tensors[0].linf_diff == 0.5  # the first copy, as norms shows it
    assert r.warnings() == ["B: the 2 copies of w differ: max |difference| 0.5"]
    save_file({"w": np.array([1.0, np.nan, 3.0], np.float32)}, str(side / "r1.safetensors"))
    r = diff(tmp_path / "a.safetensors", side, shards_b="replicas")
    assert math.isnan(r.tensors[0].l2_b)  # NaN in any copy shows, as in norms
    assert r.warnings() == ["B: copies of w hold NaN/inf values: their difference is undefined"]
    save_file({"w": np.ones(4, np.float32)}, str(side / "r1.safetensors"))
    with pytest.raises(InputError, match=r"replica of 'w' has shape \[4\], but \[3\]"):
        diff(tmp_path / "a.safetensors", side, shards_b="replicas")


def _split(path: Path, name: str, parts: list[np.ndarray]) -> Path:
    path.mkdir()
    for i, p in enumerate(parts):
        save_file({name: np.ascontiguousarray(p)}, str(path / f"r{i}.safetensors"))
    return path


def test_slicings(tmp_path: Path, rng: np.random.Generator) -> None:
    w = rng.standard_normal((6, 5)).astype(np.float32)
    v = (w + rng.standard_normal((6, 5)).astype(np.float32)).astype(np.float32)
    save_file({"w": v}, str(tmp_path / "v.safetensors"))
    rows = _split(tmp_path / "rows", "w", [w[:2], w[2:]])  # along the first dimension
    flat3 = _split(tmp_path / "flat3", "w", np.array_split(w.ravel(), 3))
    flat2 = _split(tmp_path / "flat2", "w", np.array_split(v.ravel(), 2))
    cols = _split(tmp_path / "cols", "w", [w[:, :2], w[:, 2:]])  # a column split: not the concatenation
    want = exact(w, v)
    for side in (rows, flat3):
        r = diff(side, tmp_path / "v.safetensors", shards="slices")
        assert_close(r.tensors[0], want)
        assert r.tensors[0].shape == (6, 5)
    assert_close(diff(flat3, flat2, shards="slices").tensors[0], want)  # two flat slicings
    r = diff(cols, tmp_path / "v.safetensors", shards="slices", rtol=1.0)
    assert not r.tensors and [(m.name, m.reason) for m in r.mismatched] == [("w", "sliced differently")]
    assert r.mismatched[0].shape_a == (30,) and r.mismatched[0].shape_b == (6, 5) and not r.ok
    out = run("diff", cols, tmp_path / "v.safetensors", "--shards-a", "slices")
    assert "not compared  w: sliced differently (float32 vs float32)" in out.stdout
    assert "shape differs" not in out.stdout
    short = _split(tmp_path / "short", "w", [w[:2], w[2:5]])
    m = diff(short, tmp_path / "v.safetensors", shards="slices").mismatched
    assert [(x.reason, x.shape_a) for x in m] == [("shapes differ", (25,))]


def test_bad_shards_values() -> None:
    with pytest.raises(ValueError, match="shards_b must be one of slices, replicas, not 'rows'"):
        diff(SAMPLES / "fsdp", SAMPLES / "fsdp", shards_b="rows")
    assert run("diff", SAMPLES / "fsdp", SAMPLES / "fsdp", "--shards-a", "rows").exit_code == 2


def test_several_gradient_sets_in_one_run(tmp_path: Path, rng: np.random.Generator) -> None:
    """A trend is a loop over sets: each set's records equal what inspect computes for it alone."""
    paths = []
    for step in range(3):
        p = tmp_path / f"step{step}.safetensors"
        save_file({"a": rng.standard_normal(50 + step), "b": rng.standard_normal(7)}, str(p))
        paths.append(p)
    told: list[int] = []

    class Progress:
        def __call__(self, n: int) -> None:
            pass

        def set_total(self, n: int) -> None:
            told.append(n)

    with pipeline.open_set(paths[0]) as s0, pipeline.open_set(paths[1]) as s1, pipeline.open_set(paths[2]) as s2:
        sets = pipeline.records_of_sets([s0, s1, s2], 2.0, progress=Progress())
        reports = [pipeline.norms_report(sr, 2.0, 1.0, 1e-6) for sr in sets]
    assert told == [8 * (50 + 51 + 52 + 3 * 7)]  # one total for every set
    for p, rep in zip(paths, reports, strict=True):
        assert rep.to_dict() == gradinspect.inspect(p).to_dict()


def test_strip_prefix_with_slices(tmp_path: Path, rng: np.random.Generator) -> None:
    w = rng.standard_normal(10).astype(np.float32)
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    save_file({"module.w": w[:4], "module.x": w[:1]}, str(wrapped / "r0.safetensors"))
    save_file({"module.w": w[4:], "module.x": w[1:2]}, str(wrapped / "r1.safetensors"))
    save_file({"w": w, "x": w[:2]}, str(tmp_path / "plain.safetensors"))
    r = diff(wrapped, tmp_path / "plain.safetensors", shards_a="slices", strip_prefix_a=["module."])
    assert [(t.name, t.numel, t.l2_diff) for t in sorted(r.tensors, key=lambda t: t.name)] == [("w", 10, 0.0),
                                                                                              ("x", 2, 0.0)]
    save_file({"module.w": w[4:], "w": w[:1]}, str(wrapped / "r1.safetensors"))  # two names that become one
    with pytest.raises(InputError, match=r"--strip-prefix turns both 'module\.w' and 'w' into 'w'"):
        diff(wrapped, tmp_path / "plain.safetensors", shards_a="slices", strip_prefix_a=["module."])
