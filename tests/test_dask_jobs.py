"""--jobs with --scheduler: the Dask cluster's workers do the reading, so --jobs steers nothing; one warning line on
stderr says so (stdout stays the report, bit for bit that of a local run).  Real local clusters (``local:1``),
started and stopped by gradinspect itself; without dask[distributed] these tests skip."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run

NEEDS_DASK = "the Dask tests need dask[distributed]: pip install 'gradinspect[dask]'"
IGNORED = ("Warning: --jobs is ignored with --scheduler: the Dask cluster's workers do the reading "
           "(local:N starts N of them)\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("jobs")
    for step in range(3):
        r = np.random.default_rng(step)
        save_file({"w": r.standard_normal((64, 33)).astype(np.float32), "b": r.standard_normal(64).astype(np.float32)},
                  str(d / f"step_{step}.safetensors"))
    return d


def test_norms_jobs_with_scheduler_is_one_warning_line(data: Path) -> None:
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    f = data / "step_0.safetensors"
    local = run("norms", f, "--json", "--jobs", "3")
    assert local.exit_code == 0 and local.stderr == ""
    got = run("norms", f, "--json", "--jobs", "3", "--scheduler", "local:1")
    assert (got.exit_code, got.stdout_bytes, got.stderr) == (0, local.stdout_bytes, IGNORED)
    quiet = run("norms", f, "--json", "--jobs", "3", "--scheduler", "local:1", "-q")
    assert (quiet.exit_code, quiet.stdout_bytes, quiet.stderr) == (0, local.stdout_bytes, "")
    plain = run("norms", f, "--json", "--scheduler", "local:1")  # no --jobs: nothing to say
    assert (plain.exit_code, plain.stdout_bytes, plain.stderr) == (0, local.stdout_bytes, "")


def test_check_with_the_scheduler_from_the_environment(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    f = data / "step_1.safetensors"
    local = run("check", f, "--json", "--max-total", "1")
    assert local.exit_code == 1
    env = {"GRADINSPECT_SCHEDULER": "local:1"}
    got = run("check", f, "--json", "--max-total", "1", "--jobs", "2", env=env)
    assert (got.exit_code, got.stdout_bytes) == (1, local.stdout_bytes)
    assert got.stderr == ("Warning: --jobs is ignored with --scheduler ($GRADINSPECT_SCHEDULER): the Dask cluster's "
                          "workers do the reading (local:N starts N of them)\n")
    config = tmp_path / "pyproject.toml"
    config.write_text("[tool.gradinspect.check]\njobs = 2\nmax_total = 1.0\n")
    got = run("check", f, "--json", "--config", config, "--scheduler", "local:1")
    assert (got.exit_code, got.stdout_bytes) == (1, local.stdout_bytes)
    assert got.stderr == (f"Warning: jobs in {config} is ignored with --scheduler: the Dask cluster's workers do the "
                          "reading (local:N starts N of them)\n")


def test_trend_jobs_with_scheduler(data: Path) -> None:
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    steps = data / "step_*.safetensors"
    local = run("trend", steps, "--json", "--no-cache")
    got = run("trend", steps, "--json", "--no-cache", "-j", "2", "--scheduler", "local:1")
    assert (got.exit_code, got.stdout_bytes, got.stderr) == (0, local.stdout_bytes, IGNORED)


def test_a_part_run_says_what_jobs_still_does(data: Path, tmp_path: Path) -> None:
    """A part run hashes tensors of equal shapes (possible copies) on this machine, on --jobs threads."""
    pytest.importorskip("distributed", reason=NEEDS_DASK)
    out = tmp_path / "p0.json"
    got = run("norms", data / "step_2.safetensors", "--part", "0/2", "--partial", out, "--jobs", "2",
              "--scheduler", "local:1")
    assert (got.exit_code, got.stdout) == (0, "") and out.is_file()
    assert got.stderr == ("Warning: --jobs with --scheduler only sets how many threads of this part run hash tensors "
                          "of equal shapes (possible exact copies) on this machine; the Dask cluster's workers "
                          "compute the statistics\n")


def test_no_warning_without_a_cluster_and_none_before_an_error(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No dask needed: --jobs alone says nothing; without Dask the one Error line stays alone."""
    f = data / "step_0.safetensors"
    monkeypatch.delenv("GRADINSPECT_SCHEDULER", raising=False)
    r = run("norms", f, "--json", "--jobs", "2")
    assert r.exit_code == 0 and r.stderr == ""
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask[distributed] were not installed
    r = run("norms", f, "--json", "--jobs", "2", "--scheduler", "local:1")
    assert (r.exit_code, r.stdout) == (2, "")
    assert r.stderr == "Error: dask: --scheduler needs Dask: pip install 'gradinspect[dask]'\n"
