"""A GradDumper directory with 11 ranks or more: a step's files are read in rank order (``_rank10`` after
``_rank9``), whether the ranks in the names are padded (GradDumper now) or not (dumps written before), with the
numbers of naming the files explicitly in rank order; GradDumper pads the rank to the width of the largest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import exact_sums, rel_sqrt, run, strict_json
from gradinspect.runs import find_steps

RANKS = 12
STEPS = (0, 5, 10)


def _grads(step: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(step)
    return {"w": (r.standard_normal((RANKS * 2, 5)) * (1 + step)).astype(np.float32),
            "b": r.standard_normal(7).astype(np.float32)}


def _dump(run_dir: Path, step: int, name: str) -> list[Path]:
    """One step as GradDumper writes it under FSDP: rank r holds rows 2r, 2r+1 of w (and its own bias); the files in
    rank order.  ``name``: the file name of rank ``r`` as a format string."""
    grads = _grads(step)
    files = []
    for rank in range(RANKS):
        f = run_dir / name.format(step=step, r=rank)
        part = {"w": np.ascontiguousarray(grads["w"][2 * rank: 2 * rank + 2]), f"bias.{rank}": grads["b"] * rank}
        save_file(part, str(f), metadata={"step": str(step), "rank": str(rank), "world_size": str(RANKS)})
        files.append(f)
    return files


def _same_as_explicit(run_dir: Path, expected: dict[int, list[Path]]) -> None:
    """trend over the directory: each step's sources in rank order and its numbers, bit for bit, those of
    ``norms`` over the files named in rank order."""
    for st in find_steps([run_dir]):
        assert st.files == tuple(map(str, expected[st.step]))
    t = run("trend", run_dir, "--shards", "slices", "-f", "json", "--no-cache")
    assert t.exit_code == 0, t.output
    trend = strict_json(t.stdout)
    assert [s["step"] for s in trend["steps"]] == sorted(expected)
    names = None
    for k, s in enumerate(trend["steps"]):
        files = expected[s["step"]]
        assert s["sources"] == list(map(str, files))
        n = run("norms", *files, "--shards", "slices", "--sort", "none", "-f", "json")
        assert n.exit_code == 0, n.output
        norms = strict_json(n.stdout)
        assert norms["sources"] == s["sources"]
        assert {f: norms["total"][f] for f in s["total"]} == s["total"]
        rows = [(t["name"], t["norm"]) for t in norms["tensors"]]
        names = names or [name for name, _ in rows]
        assert names == trend["tensors"] and sorted(names) == sorted(["w", *(f"bias.{r}" for r in range(RANKS))])
        assert [x for x in names if x != "w"] == [f"bias.{r}" for r in range(RANKS)]  # first seen in rank order
        assert [trend["series"]["norm"][i][k] for i in range(len(rows))] == [v for _, v in rows]
        grads = _grads(s["step"])
        exact = exact_sums(grads["w"])[1] + sum(exact_sums(grads["b"] * r)[1] for r in range(RANKS))
        assert rel_sqrt(s["total"]["l2"], exact) <= 1e-12


def test_unpadded_rank_files_are_read_in_rank_order(tmp_path: Path) -> None:
    """The names GradDumper wrote before it padded ranks: name order puts _rank10 and _rank11 before _rank2."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    expected = {s: _dump(run_dir, s, "step_{step:08d}_rank{r}.safetensors") for s in STEPS}
    assert sorted(os.listdir(run_dir))[:3] == ["step_00000000_rank0.safetensors", "step_00000000_rank1.safetensors",
                                               "step_00000000_rank10.safetensors"]
    _same_as_explicit(run_dir, expected)


def test_padded_and_unpadded_steps_in_one_directory(tmp_path: Path) -> None:
    """A run resumed with a newer GradDumper: older steps unpadded, newer ones padded; each in rank order."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    expected = {0: _dump(run_dir, 0, "step_{step:08d}_rank{r}.safetensors"),
                5: _dump(run_dir, 5, "step_{step:08d}_rank{r:02d}.safetensors")}
    _same_as_explicit(run_dir, expected)


def test_grad_dumper_pads_the_rank_to_the_width_of_the_largest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    torch = pytest.importorskip("torch", reason="GradDumper needs torch: pip install 'gradinspect[torch]'")
    from gradinspect.torch import GradDumper

    dumper = GradDumper(torch.nn.Linear(2, 2), tmp_path / "run")
    assert os.path.basename(dumper.path(7)) == "step_00000007.safetensors"  # one process: no rank
    dist = torch.distributed
    names = {}
    for rank, world in ((3, 12), (11, 12), (0, 11), (10, 11), (3, 8), (1, 2), (7, 101)):
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda world=world: world)
        names[rank, world] = os.path.basename(dumper.path(7))
    assert names == {(3, 12): "step_00000007_rank03.safetensors", (11, 12): "step_00000007_rank11.safetensors",
                     (0, 11): "step_00000007_rank00.safetensors", (10, 11): "step_00000007_rank10.safetensors",
                     (3, 8): "step_00000007_rank3.safetensors", (1, 2): "step_00000007_rank1.safetensors",
                     (7, 101): "step_00000007_rank007.safetensors"}
    for world in (12, 101):  # name order is rank order
        paths = []
        for rank in range(world):
            monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
            monkeypatch.setattr(dist, "get_world_size", lambda world=world: world)
            paths.append(dumper.path(7))
        assert sorted(paths) == paths
