"""The README's training-loop round trip is real: its `train.py` block is run with torch (when installed), then the
session block after it (`$ python train.py`, `$ ls run`, `$ gradinspect ...`) is run and compared as
tests/test_readme.py compares its blocks (a line `...` stands for any number of lines)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, lines_match, readme_blocks, run_process


def _round_trip() -> tuple[str, list[str]]:
    """The `# train.py` block and the session block right after it."""
    blocks = readme_blocks()
    i = next(i for i, b in enumerate(blocks) if b and b[0].startswith("# train.py"))
    return "\n".join(blocks[i]) + "\n", blocks[i + 1]


def test_the_readme_shows_the_round_trip() -> None:
    script, session = _round_trip()
    assert "GradDumper(" in script and "dumper.step(step)" in script
    commands = [line[2:] for line in session if line.startswith("$ ")]
    assert commands[0] == "python train.py" and any(c.startswith("gradinspect trend") for c in commands)


def _run(command: str, cwd: Path) -> str:
    if command == "python train.py":
        proc = subprocess.run([sys.executable, "train.py"], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, timeout=120, check=False)
    elif command.startswith("ls "):
        return "".join(f"{n}\n" for n in sorted(os.listdir(cwd / command[3:])))
    else:
        args = shlex.split(command)
        assert args[0] == "gradinspect"
        proc = run_process(*args[1:], cwd=cwd)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stderr.decode() + proc.stdout.decode()


def test_the_round_trip_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the README's training loop needs torch: it is not installed")
    script, session = _round_trip()
    (tmp_path / "train.py").write_text(script, encoding="utf-8")
    i = 0
    while i < len(session):
        command = session[i][2:]
        j = i + 1
        while j < len(session) and not session[j].startswith("$ "):
            j += 1
        expected = [line.rstrip() for line in session[i + 1 : j]]
        out = _run(command, tmp_path)
        actual = [line.rstrip() for line in out.rstrip("\n").split("\n")] if out.strip() else []
        shown = f"{command}\n--- README\n" + "\n".join(expected) + "\n--- actual\n" + "\n".join(actual)
        assert lines_match(expected, actual), shown
        i = j
