"""The README's examples are real: every `$ gradinspect ...` block is run and compared.

A line `...` in a block stands for any number of output lines; `| jq .a.b` (or `| jq -c .a.b`,
compact) is done in Python (jq need not be installed; when it is, the README's jq lines are also
run through it); `echo $?` prints the previous exit code.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT, lines_match, readme_blocks, run_process


def _blocks() -> list[list[str]]:
    return [b for b in readme_blocks() if b and b[0].startswith("$ gradinspect")]


def _run(command: str, last_code: int) -> tuple[str, int]:
    if command == "echo $?":
        return f"{last_code}\n", 0
    jq = None
    if " | jq " in command:
        command, jq = command.split(" | jq ", 1)
        jq = jq.split("#")[0].strip()
    command = command.split("  #")[0].strip()
    args = shlex.split(command)
    assert args[0] == "gradinspect"
    proc = run_process(*args[1:])
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    out = stderr + stdout  # warnings are written before the report
    if jq is not None and proc.returncode == 0:
        compact = jq.startswith("-c ")
        value = json.loads(stdout)
        for key in jq.removeprefix("-c ").strip().strip(".").split("."):
            value = value[key]
        if compact:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, indent=2, ensure_ascii=False)
        else:
            text = json.dumps(value)
        out = stderr + text + "\n"
    return out, proc.returncode


BLOCKS = _blocks()


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[b[0][2:60] for b in BLOCKS])
def test_readme_block(block: list[str]) -> None:
    code = 0
    i = 0
    while i < len(block):
        command = block[i][2:]
        j = i + 1
        while j < len(block) and not block[j].startswith("$ "):
            j += 1
        expected = [line.rstrip() for line in block[i + 1 : j]]
        out, code = _run(command, code)
        actual = [line.rstrip() for line in out.rstrip("\n").split("\n")] if out.strip() else []
        shown = f"{command}\n--- README\n" + "\n".join(expected) + "\n--- actual\n" + "\n".join(actual)
        assert lines_match(expected, actual), shown
        i = j


JQ_COMMANDS = [line[2:] for b in BLOCKS for line in b if line.startswith("$ gradinspect") and " | jq " in line]


def test_the_readme_has_jq_examples() -> None:
    assert len(JQ_COMMANDS) >= 4  # the parametrized test below is not empty


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed (Debian: apt-get install jq)")
@pytest.mark.parametrize("command", JQ_COMMANDS)
def test_readme_jq_lines_are_what_jq_prints(command: str) -> None:
    """The README shows what a user's jq prints (jq pretty-prints an object over many lines unless -c)."""
    ours, _ = _run(command, 0)
    gradinspect, jq = command.split(" | jq ", 1)
    proc = run_process(*shlex.split(gradinspect.split("  #")[0].strip())[1:])
    if proc.returncode != 0:
        assert ours == proc.stderr.decode() + proc.stdout.decode()
        return
    real = subprocess.run(["jq", *shlex.split(jq.split("#")[0])], input=proc.stdout, capture_output=True, check=True)
    assert ours == proc.stderr.decode() + real.stdout.decode(), command


def test_a_non_editable_install_has_every_subpackage() -> None:
    """The Quick start installs with `pip install .`: every package directory must be one the
    [tool.setuptools.packages.find] patterns include (a sources/ left out once broke it)."""
    import fnmatch
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                for p in (ROOT / "gradinspect").rglob("__init__.py")}
    assert {"gradinspect", "gradinspect.sources", "gradinspect.formats"} <= packages
    missing = [p for p in packages if not any(fnmatch.fnmatchcase(p, pat) for pat in find["include"])]
    assert not missing, missing
