"""Gates that must not give confident wrong answers: nothing checked, tied weights,
replicas that disagree, a diff with nothing in common."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect
from conftest import run
from gradinspect import api
from gradinspect.errors import InputError


def _save(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path))
    return path


# --- 1. a gate that checked nothing ----------------------------------------------


@pytest.fixture
def nan_file(tmp_path: Path) -> Path:
    return _save(tmp_path / "nan.safetensors", {"enc.weight": np.full(4, np.nan, np.float32),
                                                "enc.bias": np.full(2, np.nan, np.float32)})


@pytest.fixture
def ints_file(tmp_path: Path) -> Path:
    return _save(tmp_path / "ints.safetensors", {"a": np.ones(2, np.int64), "b": np.ones(3, np.int64),
                                                 "c": np.ones(1, np.int64), "m": np.ones(2, bool)})


@pytest.mark.parametrize("command", ["norms", "check"])
def test_selection_of_nothing_is_an_input_error(command: str, nan_file: Path) -> None:
    r = run(command, nan_file, "--include", "layer*")
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert r.stderr == f"Error: {nan_file}: --include/--exclude matched none of the 2 tensors\n"
    r = run(command, nan_file, "--exclude", "enc.*")
    assert r.exit_code == 2 and "matched none of the 2 tensors" in r.stderr


@pytest.mark.parametrize("command", ["norms", "check"])
def test_no_floating_tensor_is_an_input_error(command: str, ints_file: Path) -> None:
    r = run(command, ints_file)
    assert r.exit_code == 2, r.output
    assert r.stdout == ""
    assert r.stderr == (f"Error: {ints_file}: no floating-point tensor: every tensor was skipped "
                        "(dtypes seen: int64 x3, bool x1)\n")
    r = run(command, ints_file, "--include", "a", "--include", "m")
    assert r.exit_code == 2
    assert "every selected tensor was skipped (dtypes seen: int64 x1, bool x1)" in r.stderr


def test_diff_each_side_must_select_a_float_tensor(nan_file: Path, ints_file: Path, tmp_path: Path) -> None:
    good = _save(tmp_path / "good.safetensors", {"enc.weight": np.ones(4, np.float32)})
    r = run("diff", good, ints_file)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {ints_file}: no floating-point tensor: every tensor was skipped")
    r = run("diff", ints_file, good)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {ints_file}: no floating-point tensor")
    r = run("diff", good, nan_file, "--include", "layer*")
    assert r.exit_code == 2
    assert r.stderr == f"Error: {good}: --include/--exclude matched none of the 1 tensors\n"


def test_library_raises_the_same(nan_file: Path, ints_file: Path) -> None:
    with pytest.raises(InputError, match="matched none of the 2 tensors"):
        gradinspect.inspect(nan_file, include=["layer*"])
    with pytest.raises(InputError, match="matched none of the 2 tensors"):
        api.check(nan_file, include=["layer*"])
    with pytest.raises(InputError, match=r"every tensor was skipped \(dtypes seen: int64 x3, bool x1\)"):
        api.check(ints_file)
    with pytest.raises(InputError, match="no floating-point tensor"):
        api.diff(ints_file, nan_file)
    with pytest.raises(InputError, match=r"^<memory>: no tensors$"):
        gradinspect.compute_norms({})
    with pytest.raises(InputError, match=r"^<memory>: --include/--exclude matched none of the 1 tensors$"):
        gradinspect.compute_norms({"w": np.ones(3)}, include=["x*"])
    with pytest.raises(InputError, match=r"^<memory>: no floating-point tensor: every tensor was skipped"):
        gradinspect.compute_norms({"step": np.int64(3)})


def test_several_files_name_the_first_and_count_the_rest(tmp_path: Path, ints_file: Path) -> None:
    other = _save(tmp_path / "more.safetensors", {"n": np.ones(2, np.int32)})
    with pytest.raises(InputError, match=r"ints.safetensors \(and 1 more file\): no floating-point tensor: "
                                         r"every tensor was skipped \(dtypes seen: int64 x3, bool x1, int32 x1\)"):
        gradinspect.inspect([ints_file, other])


def test_a_selection_that_matches_still_works(nan_file: Path) -> None:
    r = gradinspect.inspect(nan_file, include=["enc.w*"])
    assert [t.name for t in r.tensors] == ["enc.weight"]


# --- 4. diff with no tensor in common ------------------------------------------------


@pytest.fixture
def ddp_pair(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, Path, dict[str, np.ndarray]]:
    """A plain dump, the same with a ``module.`` prefix (DDP's wrapper), and a perturbed plain one."""
    g = {"enc.weight": rng.standard_normal((6, 5)).astype(np.float32),
         "enc.bias": rng.standard_normal(5).astype(np.float32)}
    plain = _save(tmp_path / "plain.safetensors", g)
    wrapped = _save(tmp_path / "wrapped.safetensors", {"module." + k: v for k, v in g.items()})
    other = _save(tmp_path / "other.safetensors", {k: v * np.float32(1.5) for k, v in g.items()})
    return plain, wrapped, other, g


def test_diff_with_nothing_in_common_fails_with_a_tolerance(ddp_pair: tuple) -> None:
    plain, wrapped, _, _ = ddp_pair
    for tol in (["--rtol", "1e-6"], ["--atol", "1"], ["--min-cosine", "0.9"], ["--rtol", "1", "--allow-missing"]):
        r = run("diff", wrapped, plain, *tol)
        assert r.exit_code == 1, (tol, r.output)
        assert "cosine            1" not in r.stdout
        assert "nothing compared" in r.stdout and "FAIL: nothing was compared" in r.stdout
        assert "Warning: no tensor is in both A and B: nothing was compared" in r.stderr


def test_diff_with_nothing_in_common_warns_without_a_tolerance(ddp_pair: tuple) -> None:
    plain, wrapped, _, _ = ddp_pair
    r = run("diff", wrapped, plain)
    assert r.exit_code == 0
    assert r.stderr.startswith("Warning: no tensor is in both A and B: nothing was compared")
    assert "cosine" not in r.stdout and "nothing compared" in r.stdout
    doc = json.loads(run("diff", wrapped, plain, "--format", "json").stdout)
    assert doc["tensors"] == [] and doc["ok"] is True
    total = doc["total"]
    assert total["numel"] == 0
    assert all(total[k] is None for k in ("l2_a", "l2_b", "l2_diff", "rel", "cosine", "linf_diff"))
    assert api.diff(wrapped, plain).total.cosine != 1.0
    assert api.diff(wrapped, plain, rtol=0.1).ok is False


def test_diff_shapes_all_differ_is_nothing_compared(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"w": np.ones(3, np.float32)})
    b = _save(tmp_path / "b.safetensors", {"w": np.ones(4, np.float32)})
    r = run("diff", a, b, "--rtol", "0", "--allow-missing")
    assert r.exit_code == 1 and "FAIL: nothing was compared" in r.stdout
    assert "nothing was compared" in r.stderr


def test_strip_prefix_makes_the_names_meet(ddp_pair: tuple) -> None:
    plain, wrapped, other, g = ddp_pair
    r = run("diff", wrapped, plain, "--rtol", "0", "--strip-prefix-a", "module.")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""
    want = api.diff(other, plain).to_dict()
    got = api.diff(other, wrapped, strip_prefix_b=["module."]).to_dict()
    assert got["tensors"] == want["tensors"] and got["total"] == want["total"]
    assert got["total"]["numel"] == sum(v.size for v in g.values()) and got["total"]["rel"] > 0
    # --strip-prefix applies to both sides; the first matching prefix is removed, once
    both = api.diff(wrapped, wrapped, strip_prefix=["x.", "module."])
    assert {t.name for t in both.tensors} == {"enc.weight", "enc.bias"}
    r = run("diff", other, wrapped, "--strip-prefix", "module.", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["total"] == want["total"]
    # selection globs see the stripped names
    sel = api.diff(wrapped, plain, strip_prefix_a=["module."], include=["enc.b*"])
    assert [t.name for t in sel.tensors] == ["enc.bias"]


def test_strip_prefix_collision_is_an_input_error(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", {"module.w": np.ones(3, np.float32), "w": np.ones(3, np.float32)})
    b = _save(tmp_path / "b.safetensors", {"w": np.ones(3, np.float32)})
    r = run("diff", a, b, "--strip-prefix-a", "module.")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"Error: {a}: --strip-prefix turns both 'module.w' and 'w' into 'w'\n"
    with pytest.raises(InputError, match=r"turns both 'module\.w' and 'w' into 'w'"):
        api.diff(b, a, strip_prefix=["module."])


# --- 3. replicas that disagree ---------------------------------------------------------


@pytest.fixture
def ranks(tmp_path: Path, rng: np.random.Generator) -> Path:
    """rank0/rank1 whose copies of ``w`` differ by exactly 0.3 somewhere (|Δ| <= 0.3 everywhere)."""
    w = rng.standard_normal(50).astype(np.float64)
    bias = rng.standard_normal(4)
    w1 = w.copy()
    w1[7] += 0.3
    d = tmp_path / "ranks"
    d.mkdir()
    _save(d / "rank0.safetensors", {"w": w, "bias": bias})
    _save(d / "rank1.safetensors", {"w": w1, "bias": bias})
    return d


def test_replicas_that_differ_fail_check(ranks: Path) -> None:
    glob = str(ranks / "rank*.safetensors")
    r = run("check", glob, "--shards", "replicas", "--format", "json")
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert "replicas_differ" in doc["rules"]
    [f] = doc["findings"]
    assert f["rule"] == "replicas_differ" and f["tensor"] == "w" and f["limit"] == 0.0
    assert f["value"] == pytest.approx(0.3, rel=1e-12)
    assert run("check", glob, "--shards", "replicas", "--max-replica-diff", "0.5").exit_code == 0
    assert run("check", glob, "--shards", "replicas", "--max-replica-diff", "0.2").exit_code == 1
    text = run("check", glob, "--shards", "replicas").stdout
    assert "FAIL  w: the 2 copies differ by up to 0.3 > 0" in text
    junit = run("check", glob, "--shards", "replicas", "--format", "junit").stdout
    assert 'name="replicas_differ"' in junit and 'type="replicas_differ"' in junit
    gh = run("check", glob, "--shards", "replicas", "--format", "github").stdout
    assert gh.startswith("::error title=gradinspect replicas_differ w::")


def test_identical_replicas_pass_and_the_rule_is_on_only_with_replicas(ranks: Path) -> None:
    assert run("check", "sample_data/ddp/rank0.safetensors", "sample_data/ddp/rank1.safetensors",
               "--shards", "replicas").exit_code == 0
    r = api.check(str(ranks / "rank*.safetensors"), include=["bias"], shards="replicas")
    assert r.ok and "replicas_differ" in r.rules
    assert "replicas_differ" not in api.check(ranks / "rank0.safetensors").rules
    assert "replicas_differ" not in api.check(str(ranks / "rank*.safetensors"), shards="slices").rules


def test_replicas_with_nan_fail_even_with_a_tolerance(tmp_path: Path) -> None:
    _save(tmp_path / "r0.safetensors", {"w": np.array([1.0, np.nan])})
    _save(tmp_path / "r1.safetensors", {"w": np.array([1.0, np.nan])})
    r = api.check(str(tmp_path / "r*.safetensors"), gradinspect_rules(allow_nonfinite=True, max_replica_diff=1e9),
                  shards="replicas")
    assert [f.rule for f in r.findings] == ["replicas_differ"]
    assert "undefined" in r.findings[0].message


def gradinspect_rules(**values: object):  # type: ignore[no-untyped-def]
    from gradinspect.check import rules_from

    return rules_from(values)


def test_max_replica_diff_from_the_config(ranks: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[tool.gradinspect.check]\nmax_replica_diff = 0.5\nshards = \"replicas\"\n")
    glob = str(ranks / "rank*.safetensors")
    assert run("check", glob, "--config", cfg).exit_code == 0
    assert run("check", glob, "--config", cfg, "--max-replica-diff", "0.1").exit_code == 1
    cfg.write_text("[tool.gradinspect.check]\nmax_replica_diff = -1\n")
    r = run("check", glob, "--config", cfg)
    assert r.exit_code == 2 and "max_replica_diff must be a finite number >= 0" in r.stderr
    assert "--max-replica-diff" in run("check", "--help").stdout


def test_nan_replicas_are_one_nonfinite_finding_with_the_rule_on(tmp_path: Path) -> None:
    _save(tmp_path / "r0.safetensors", {"w": np.array([1.0, 2.0])})
    _save(tmp_path / "r1.safetensors", {"w": np.array([1.0, np.nan])})
    r = api.check(str(tmp_path / "r*.safetensors"), shards="replicas")
    assert [f.rule for f in r.findings] == ["nonfinite"]
    r = api.check(str(tmp_path / "r*.safetensors"), gradinspect_rules(allow_nonfinite=True), shards="replicas")
    assert [f.rule for f in r.findings] == ["replicas_differ"]


# --- 2. tied weights saved twice ---------------------------------------------------------


def _gpt2ish(rng: np.random.Generator) -> dict[str, np.ndarray]:
    wte = rng.standard_normal((64, 16)).astype(np.float32)
    return {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "transformer.h.0.attn.c_attn.weight": rng.standard_normal((16, 48)).astype(np.float32),
        "transformer.ln_f.weight": np.zeros(16, np.float32),
        "transformer.ln_f.bias": np.zeros(16, np.float32),  # all-zero and equal to ln_f.weight: not a copy
        "lm_head.weight": wte.copy(),  # what a .clone() before saving gives
    }


def _oracle_l2(arrays: list[np.ndarray]) -> float:
    return math.sqrt(math.fsum(float(v) ** 2 for a in arrays for v in a.reshape(-1).astype(np.float64)))


@pytest.mark.parametrize("kind", ["safetensors", "npz"])
def test_tied_weights_are_found_and_dedup_counts_them_once(tmp_path: Path, rng: np.random.Generator, kind: str) -> None:
    g = _gpt2ish(rng)
    if kind == "npz":
        path = tmp_path / "g.npz"
        np.savez(path, **g)
    else:
        path = _save(tmp_path / "g.safetensors", g)
    # the copy is the later one in file order; safetensors writes tensors sorted by name
    first, copy = ("transformer.wte.weight", "lm_head.weight")[::-1 if kind == "safetensors" else 1]
    unique = [v for k, v in g.items() if k != copy]
    r = run("norms", path, "--json")
    assert r.exit_code == 0
    assert r.stderr == (f"Warning: {copy} is an exact copy of {first} (tied weights?): "
                        "counted twice; --dedup counts it once\n")
    doc = json.loads(r.stdout)
    dup = {t["name"]: t["duplicate_of"] for t in doc["tensors"]}
    assert dup == {k: (first if k == copy else None) for k in g}
    assert doc["total"]["l2"] == pytest.approx(_oracle_l2(list(g.values())), rel=1e-12)
    assert doc["total"]["l2"] / _oracle_l2(unique) > 1.1  # the confident wrong answer, without --dedup
    r = run("norms", path, "--json", "--dedup")
    assert r.exit_code == 0
    assert f"{copy} is an exact copy of {first} (tied weights?): counted once (--dedup)" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["dedup"] is True
    assert {t["name"] for t in doc["tensors"]} == set(g) - {copy}  # left out, as model.parameters() does
    assert doc["total"]["tensors"] == len(g) - 1
    assert doc["total"]["l2"] == pytest.approx(_oracle_l2(unique), rel=1e-12)
    assert math.fsum(t["share"] for t in doc["tensors"]) == pytest.approx(1.0, rel=1e-12)
    lib = gradinspect.compute_norms(g, dedup=True)
    assert lib.total.l2 == pytest.approx(_oracle_l2(unique), rel=1e-12) and lib.dedup
    assert gradinspect.inspect(path).total.tensors == len(g)


def test_check_dedup(tmp_path: Path, rng: np.random.Generator) -> None:
    g = _gpt2ish(rng)
    path = _save(tmp_path / "g.safetensors", g)
    unique = _oracle_l2([v for k, v in g.items() if k != "lm_head.weight"])
    limit = unique * 1.05  # between the deduplicated norm and the double-counted one
    assert run("check", path, "--max-total", limit).exit_code == 1
    r = run("check", path, "--max-total", limit, "--dedup")
    assert r.exit_code == 0, r.output
    assert "counted once (--dedup)" in r.stderr
    assert api.check(path, gradinspect_rules(max_total=limit), dedup=True).ok
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"[tool.gradinspect.check]\ndedup = true\nmax_total = {limit}\n")
    assert run("check", path, "--config", cfg).exit_code == 0
    assert run("check", path, "--config", cfg, "--no-dedup").exit_code == 1


def test_equal_statistics_are_not_enough(tmp_path: Path) -> None:
    a = np.arange(1, 65, dtype=np.float32).reshape(8, 8)  # small integers: every sum is exact in any order
    b = a.reshape(-1)[::-1].reshape(8, 8).copy()  # a permutation: the same statistics, other bytes
    r = gradinspect.compute_norms({"a": a, "b": b}, sort="none")
    ta, tb = r.tensors
    assert (ta.l1, ta.sq, ta.linf) == (tb.l1, tb.sq, tb.linf)
    assert [t.duplicate_of for t in r.tensors] == [None, None] and r.notes == ()
    assert gradinspect.compute_norms({"a": a, "b": b}, dedup=True).total.tensors == 2
    # -0.0 and 0.0, NaN at other places: other bytes, the same statistics
    x, y = np.array([1.0, -0.0, 2.0]), np.array([1.0, 0.0, 2.0])
    assert gradinspect.compute_norms({"x": x, "y": y}).notes == ()
    n1, n2 = np.array([np.nan, 1.0, 3.0]), np.array([1.0, np.nan, 3.0])
    assert [t.duplicate_of for t in gradinspect.compute_norms({"n1": n1, "n2": n2}).tensors] == [None, None]
    # the same bytes, NaN included, are a copy; three copies all name the first
    r = gradinspect.compute_norms({"n1": n1, "n2": n1.copy(), "n3": n1.copy()}, sort="none")
    assert [t.duplicate_of for t in r.tensors] == [None, "n1", "n1"]
    # other dtype or shape: not a copy
    r = gradinspect.compute_norms({"a": a, "a2": a.reshape(4, 16).copy(), "a3": a.astype(np.float64)})
    assert r.notes == ()


def test_all_zero_copies_are_not_reported(tmp_path: Path) -> None:
    path = _save(tmp_path / "z.safetensors", {"a": np.zeros(5, np.float32), "b": np.zeros(5, np.float32),
                                              "c": np.ones(3, np.float32)})
    r = run("norms", path, "--json")
    assert r.stderr == ""
    assert [t["duplicate_of"] for t in json.loads(r.stdout)["tensors"]] == [None, None, None]


def test_dedup_with_replicas_and_grouping(tmp_path: Path, rng: np.random.Generator) -> None:
    g = _gpt2ish(rng)
    for rank in range(2):
        _save(tmp_path / f"rank{rank}.safetensors", g)
    unique = _oracle_l2([v for k, v in g.items() if k != "lm_head.weight"])
    r = gradinspect.inspect(str(tmp_path / "rank*.safetensors"), shards="replicas", dedup=True)
    assert r.total.l2 == pytest.approx(unique, rel=1e-12)
    r = gradinspect.inspect(str(tmp_path / "rank*.safetensors"), shards="replicas")
    assert {t.name: t.duplicate_of for t in r.tensors}["transformer.wte.weight"] == "lm_head.weight"
    r = gradinspect.inspect(tmp_path / "rank0.safetensors", group_by=1, dedup=True)
    assert r.total.l2 == pytest.approx(unique, rel=1e-12)
    assert all(t.duplicate_of is None for t in gradinspect.inspect(tmp_path / "rank0.safetensors", group_by=1).tensors)


def test_a_gate_over_empty_tensors_only_checked_nothing(tmp_path: Path) -> None:
    """Found in review: a file whose only float tensor has 0 elements passed check with 'OK 1 tensors'."""
    path = tmp_path / "e.safetensors"
    save_file({"w": np.zeros((0, 4), np.float32), "step": np.array(3)}, str(path))
    r = run("check", path)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"Error: {path}: every selected floating-point tensor is empty (0 elements)\n"
