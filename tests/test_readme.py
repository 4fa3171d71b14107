"""The README's examples are real: every `$ gradinspect ...` block is run and compared.

A line `...` in a block stands for any number of output lines; `| jq .a.b` is
done in Python (jq need not be installed); `echo $?` prints the previous exit code.
"""

from __future__ import annotations

import json
import shlex

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
        value = json.loads(stdout)
        for key in jq.strip(".").split("."):
            value = value[key]
        out = stderr + json.dumps(value) + "\n"
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
