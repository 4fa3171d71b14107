"""Interactions between features built separately (torch distributed checkpoints and URLs, ...)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run

DCP = Path(__file__).parent / "data" / "dcp" / "ranks3" / "step_0000"


def test_a_distributed_checkpoint_given_as_a_url_is_refused_saying_why(tmp_path: Path) -> None:
    """A checkpoint directory is read from local paths only: a URL of it (or a glob of step directories) is one
    line saying so, not a refusal of its first .distcp file telling the user to give the directory they gave."""
    pytest.importorskip("fsspec", reason="the remote extra (fsspec) is not installed")
    shutil.copytree(DCP, tmp_path / "step_0007")
    url = (tmp_path / "step_0007").as_uri()
    assert run("norms", str(tmp_path / "step_0007"), "-q").exit_code == 0  # the same directory, by its path
    for args in [("norms", url), ("norms", url + "/"), ("trend", f"file://{tmp_path}/step_*/")]:
        r = run(*args)
        assert (r.exit_code, r.stdout) == (2, ""), args
        assert r.stderr == (f"Error: {url}/: a torch distributed checkpoint (.metadata and .distcp files) is read "
                            "from a local directory only, not from a URL: give its local path\n"), args
