"""What the dump writers rely on without torch: the lazy import, the error naming the extra, and `trend` reading a
directory of GradDumper's files (one file per step and rank, step in the metadata) as a run (issue 10 §5)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from conftest import ROOT, exact_sums, rel_sqrt, run_process


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)


def test_import_gradinspect_does_not_import_torch() -> None:
    proc = _python("import sys, gradinspect, gradinspect.torch\nassert 'torch' not in sys.modules, 'torch imported'")
    assert proc.returncode == 0, proc.stderr


def test_without_torch_the_error_says_what_to_install() -> None:
    proc = _python("import sys; sys.modules['torch'] = None\n"  # an absent torch, whether or not it is installed
                   "from gradinspect.torch import GradDumper, save_grads\n"
                   "for call in (lambda: save_grads({}, 'x.safetensors'), lambda: GradDumper(None, 'd')):\n"
                   "    try:\n        call()\n"
                   "    except ImportError as e:\n        print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n") == ["gradinspect.torch needs PyTorch: pip install 'gradinspect[torch]'"] * 2 + [""]
    assert not os.path.exists("d") and not os.path.exists("x.safetensors")


def _trend(*args: object) -> dict:
    proc = run_process("trend", *map(str, args), "--format", "json")
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_trend_reads_a_directory_of_steps_and_ranks_as_a_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    full = {s: {"w": rng.standard_normal((6, 4)).astype(np.float32) * (1 + s), "b": rng.standard_normal(4)}
            for s in (0, 3, 10)}
    run = tmp_path / "run"
    run.mkdir()
    for s, grads in full.items():
        for r in (0, 1):  # FSDP: each rank holds half of the rows of w; b whole on rank 0
            part = {"w": np.ascontiguousarray(grads["w"][3 * r: 3 * r + 3])}
            if r == 0:
                part["b"] = grads["b"]
            save_file(part, str(run / f"step_{s:08d}_rank{r}.safetensors"),
                      metadata={"step": str(s), "rank": str(r), "world_size": "2"})
    trend = _trend(run, "--shards", "slices")
    assert [st["step"] for st in trend["steps"]] == [0, 3, 10]
    for st in trend["steps"]:
        assert [os.path.basename(p) for p in st["sources"]] == [f"step_{st['step']:08d}_rank{r}.safetensors"
                                                                 for r in (0, 1)]
        grads = full[st["step"]]
        exact = exact_sums(grads["w"])[1] + sum(Fraction(float(x)) ** 2 for x in grads["b"])
        assert rel_sqrt(st["total"]["l2"], exact) <= 1e-12
    # without --shards, a step's two files hold the same name: refused as for norms
    proc = run_process("trend", str(run))
    assert proc.returncode == 2 and b"--shards" in proc.stderr and not proc.stdout
    # a file whose metadata step is not the one in its name
    save_file({"w": np.ones(2, dtype=np.float32)}, str(run / "step_00000011.safetensors"), metadata={"step": "12"})
    proc = run_process("trend", str(run), "--shards", "slices")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.decode() == (f"Error: {run / 'step_00000011.safetensors'}: metadata step 12 differs from "
                                    "step 11 in its name\n")


def test_other_directories_are_still_one_step(tmp_path: Path) -> None:
    step = tmp_path / "ckpt_12"
    step.mkdir()
    for r in (0, 1):
        save_file({f"t{r}": np.ones(3, dtype=np.float32)}, str(step / f"rank{r}.safetensors"), metadata={"step": "7"})
    trend = _trend(step)
    assert [s["step"] for s in trend["steps"]] == [7]
    assert math.isclose(trend["steps"][0]["total"]["l2"], math.sqrt(6), rel_tol=1e-15)
    # a file without a metadata step among files with one: the error of before
    save_file({"t9": np.ones(3, dtype=np.float32)}, str(step / "rank9.safetensors"))
    proc = run_process("trend", str(step))
    assert proc.returncode == 2 and b"has no metadata step" in proc.stderr
    # GradDumper's names, but one step only: one step, numbered as before (metadata, else the directory's name)
    one = tmp_path / "one_5"
    one.mkdir()
    for r in (0, 1):
        save_file({f"t{r}": np.ones(2, dtype=np.float32)}, str(one / f"step_00000004_rank{r}.safetensors"))
    assert [s["step"] for s in _trend(one)["steps"]] == [5]
