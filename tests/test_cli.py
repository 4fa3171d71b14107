"""The command line, through click's CliRunner: stdout and stderr asserted apart."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run, strict_json, write_raw_safetensors


@pytest.fixture
def grads(tmp_path: Path) -> Path:
    path = tmp_path / "grads.safetensors"
    save_file(
        {
            "model.layers.0.mlp.weight": np.full((4, 4), 0.5, np.float32),  # sq 4
            "model.layers.1.mlp.weight": np.full((3,), 2.0, np.float32),  # sq 12
            "model.norm.weight": np.zeros(8, np.float32),
            "step": np.array(100, np.int64),
        },
        str(path),
        metadata={"step": "100"},
    )
    return path


@pytest.fixture
def nan_grads(tmp_path: Path) -> Path:
    path = tmp_path / "nan.safetensors"
    save_file({"ok": np.ones(4, np.float32), "bad": np.array([1.0, np.nan, np.inf], np.float32)}, str(path))
    return path


def test_table_default(grads: Path) -> None:
    r = run("norms", grads)
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["1", "model.layers.1.mlp.weight"] and lines[1].endswith("75.0%")
    assert lines[2].split()[:2] == ["2", "model.layers.0.mlp.weight"] and lines[2].endswith("25.0%")
    assert "global L2        4" in lines
    assert "clipped          yes" in lines
    assert "norm after clip  " + format(4 / (4 + 1e-6) , ".8g") in lines
    assert "\x1b[" not in out  # no colour when not a terminal
    assert r.stderr == f"Warning: skipped step ({grads}): not a floating-point dtype (int64)\n"
    assert max(len(line) for line in out.splitlines()) <= 80


def test_json_is_strict_and_alone_on_stdout(grads: Path, nan_grads: Path, tmp_path: Path) -> None:
    r = run("norms", grads, "--format", "json")
    assert r.exit_code == 0
    doc = strict_json(r.stdout)
    assert doc["schema"] == "gradinspect.norms/1"
    assert doc["sources"] == [str(grads)]
    assert doc["total"]["l2"] == 4.0 and doc["total"]["sq"] == 16.0 and doc["total"]["tensors"] == 3
    assert doc["clip"] == {"max_norm": 1.0, "eps": 1e-6, "coef": 1.0 / (4.0 + 1e-6), "clipped": True,
                           "norm_after": 4.0 / (4.0 + 1e-6)}
    assert doc["skipped"] == [{"name": "step", "source": str(grads), "dtype": "int64",
                               "reason": "not a floating-point dtype (int64)"}]
    assert doc["metadata"] == {str(grads): {"step": "100"}}
    assert "Warning" in r.stderr  # warnings go to stderr ...
    assert "Warning" not in r.stdout  # ... never into the document
    # non-finite numbers are strings, so strict parsers accept the document
    r = run("norms", nan_grads, "--json")
    assert r.exit_code == 0
    doc = strict_json(r.stdout)
    assert doc["total"]["l2"] == "NaN" and doc["clip"]["coef"] == "NaN"
    bad = next(t for t in doc["tensors"] if t["name"] == "bad")
    assert (bad["nonfinite"], bad["nan"], bad["inf"], bad["share"]) == (2, 1, 1, "NaN")
    assert "NaN" in r.stderr


def test_json_infinity_spelling(tmp_path: Path) -> None:
    path = tmp_path / "inf.safetensors"
    save_file({"w": np.array([np.inf, 1.0], np.float32)}, str(path))
    doc = strict_json(run("norms", path, "--json").stdout)
    assert doc["total"]["l2"] == "Infinity" and doc["clip"]["coef"] == 0.0 and doc["clip"]["clipped"] is True


def test_json_sq_overflow_keeps_share(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"a": np.full(3, 1e300), "b": np.full(1, 1e300)}, str(path))
    doc = strict_json(run("norms", path, "--json").stdout)
    assert doc["total"]["sq"] == "Infinity"
    assert doc["total"]["l2"] == pytest.approx(2e300, rel=1e-15)
    assert [t["share"] for t in doc["tensors"]] == pytest.approx([0.75, 0.25], rel=1e-15)


def test_csv(grads: Path) -> None:
    r = run("norms", grads, "-f", "csv")
    assert r.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["name"] for row in rows] == ["model.layers.1.mlp.weight", "model.layers.0.mlp.weight",
                                             "model.norm.weight"]
    assert rows[0]["shape"] == "3" and rows[1]["shape"] == "4x4"
    assert float(rows[0]["sq"]) == 12.0 and float(rows[0]["share"]) == 0.75
    assert "Warning" not in r.stdout and "Warning" in r.stderr


def test_markdown(grads: Path) -> None:
    r = run("norms", grads, "-f", "markdown")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| # | tensor |")
    assert lines[1].startswith("|---:|---|")
    assert "`model.layers.1.mlp.weight`" in lines[2]
    assert "- **global L2**: 4" in r.stdout


@pytest.mark.parametrize(
    "p,expected", [("1", 4 * 0.5 * 4 + 6.0), ("inf", 2.0), ("2", 4.0), ("3", (16 * 0.125 + 3 * 8) ** (1 / 3))]
)
def test_norm_type(grads: Path, p: str, expected: float) -> None:
    doc = strict_json(run("norms", grads, "--json", "--norm-type", p).stdout)
    assert doc["total"]["norm"] == pytest.approx(expected, rel=1e-15)
    assert doc["norm_type"] == {"1": 1, "2": 2, "inf": "inf", "3": 3.0}[p]


def test_max_norm_and_eps(grads: Path) -> None:
    doc = strict_json(run("norms", grads, "--json", "-c", "8", "--eps", "0").stdout)
    assert doc["clip"] == {"max_norm": 8.0, "eps": 0.0, "coef": 1.0, "clipped": False, "norm_after": 4.0}
    doc = strict_json(run("norms", grads, "--json", "--max-norm", "2", "--eps", "0").stdout)
    assert doc["clip"]["coef"] == 0.5 and doc["clip"]["norm_after"] == 2.0


def test_sort_top_include_exclude_group_by(grads: Path) -> None:
    names = lambda *a: [t["name"] for t in strict_json(run("norms", grads, "--json", *a).stdout)["tensors"]]
    assert names("--sort", "name") == ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight"]
    assert names("--sort", "numel") == ["model.layers.0.mlp.weight", "model.norm.weight", "model.layers.1.mlp.weight"]
    assert names("--sort", "none") == ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight"]
    assert names("--top", "1") == ["model.layers.1.mlp.weight"]
    assert names("--include", "*.layers.*", "--exclude", "*.1.*") == ["model.layers.0.mlp.weight"]
    assert names("--group-by", "1") == ["model"]
    doc = strict_json(run("norms", grads, "--json", "--group-by", "2", "--top", "1").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["model.layers"] and doc["omitted"] == 1
    assert doc["tensors"][0]["members"] == 2 and doc["tensors"][0]["shape"] is None
    assert doc["total"]["tensors"] == 3



def test_group_by_regex_and_sep(grads: Path) -> None:
    doc = strict_json(run("norms", grads, "--json", "--group-by", r"layers\.(\d+)", "--sort", "name").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["0", "1", "model.norm.weight"]
    assert doc["group_by"] == r"layers\.(\d+)" and doc["group_sep"] == "."
    r = run("norms", grads, "--group-by", "2", "--sep", "layers")
    assert r.exit_code == 0 and "(--group-by 2 --sep layers)" in r.stdout
    for args, match in ((("--group-by", "("), "not a valid regular expression"),
                        (("--group-by", "0"), "group_by must be"),
                        (("--sep", ""), "must not be empty")):
        r = run("norms", grads, *args)
        assert r.exit_code == 2 and match in r.stderr and r.stdout == ""

def test_several_paths_are_one_gradient_set(tmp_path: Path) -> None:
    save_file({"a": np.array([3.0])}, str(tmp_path / "r0.safetensors"))
    np.savez(tmp_path / "r1.npz", b=np.array([4.0]))
    doc = strict_json(run("norms", tmp_path / "r0.safetensors", tmp_path / "r1.npz", "--json").stdout)
    assert doc["total"]["l2"] == 5.0 and len(doc["sources"]) == 2


def test_nan_table_marks_tensor_and_warns(nan_grads: Path) -> None:
    r = run("norms", nan_grads)
    assert r.exit_code == 0
    bad_line = next(line for line in r.stdout.splitlines() if " bad " in line)
    assert bad_line.rstrip().endswith("1/1")  # NaN/inf counts
    assert "WARNING: NaN/Inf gradients in bad" in r.stdout
    assert "NaN" in r.stderr


def test_colour_can_be_forced_in_the_renderer() -> None:
    from gradinspect import formats
    from gradinspect.api import compute_norms

    report = compute_norms({"bad": np.array([np.nan])})
    buf = io.StringIO()
    formats.render("table", "norms", report, buf, formats.RenderOptions(width=80, color=True))
    assert "\x1b[" in buf.getvalue()
    buf = io.StringIO()
    formats.render("table", "norms", report, buf, formats.RenderOptions(width=80, color=False))
    assert "\x1b[" not in buf.getvalue()


def _in_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """stdout of ``gradinspect ARGS`` run in a pseudo-terminal."""
    import os
    import subprocess
    import sys

    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    full_env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    full_env.update({"TERM": "xterm-256color", "COLUMNS": "100"}, **env)
    proc = subprocess.Popen([sys.executable, "-m", "gradinspect", *args], stdout=slave, stderr=subprocess.DEVNULL,
                            env=full_env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return b"".join(chunks).decode()


def test_colour_in_a_terminal_and_no_color(nan_grads: Path) -> None:
    coloured = _in_a_terminal(["norms", str(nan_grads)], {})
    assert "\x1b[" in coloured and "WARNING" in coloured
    plain = _in_a_terminal(["norms", str(nan_grads)], {"NO_COLOR": "1"})
    assert "\x1b[" not in plain and "WARNING" in plain


def test_tensor_names_are_not_markup(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"x[/]": np.ones(2, np.float32), "enc[red]w": np.ones(2, np.float32)}, str(path))
    for fmt in ("table", "markdown"):
        r = run("norms", path, "-f", fmt)
        assert r.exit_code == 0 and "x[/]" in r.stdout and "enc[red]w" in r.stdout.replace("\\", "")


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: d / "missing.safetensors", "no such file"),
        (lambda d: _touch(d / "empty.npz", b""), "empty file"),
        (lambda d: _touch(d / "x.txt", b"hello"), "unsupported file type"),
        (lambda d: _touch(d / "model.bin", b"\x80\x02"), "not a torch.save zip archive"),
        (lambda d: _touch(d / "model.ckpt", b"\x80\x02"), "never loaded"),
        (lambda d: _touch(d / "t.safetensors", (10**6).to_bytes(8, "little") + b"{}"), "runs past the end"),
        (lambda d: _touch(d / "j.safetensors", (4).to_bytes(8, "little") + b"{{{{"), "not valid JSON"),
        (lambda d: write_raw_safetensors(d / "o.safetensors", {"w": _f32([4], [0, 16])}, b"\0" * 8),
         "past the end of the file"),
        (lambda d: write_raw_safetensors(d / "v.safetensors", {"a": _f32([2], [0, 8]), "b": _f32([2], [4, 12])},
                                         b"\0" * 12), "overlap"),
        (lambda d: _touch(d / "z.npz", b"PK\x03\x04garbage"), "not a zip file"),
        (lambda d: _npz_object(d / "p.npz"), "refusing to unpickle"),
        (lambda d: _mkdir(d / "nothing"), "holds no .safetensors"),
    ],
    ids=["missing", "empty", "extension", "torch-not-zip", "pickle", "header-length", "header-json", "offsets",
         "overlap", "zip", "object", "empty-dir"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, make, fragment: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    for fmt in ("table", "json"):
        r = run("norms", path, "-f", fmt)
        assert r.exit_code == 2
        assert r.stdout == ""
        assert r.stderr.startswith(f"Error: {path}: ") and fragment in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_duplicate_names_across_files_is_an_error(tmp_path: Path) -> None:
    for n in ("a", "b"):
        save_file({"w": np.ones(2)}, str(tmp_path / f"{n}.safetensors"))
    r = run("norms", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"Error: {tmp_path / 'b.safetensors'}: tensor 'w' is also in {tmp_path / 'a.safetensors'} "
                        "(the same name in two files: use --shards slices or --shards replicas (shards= in Python) "
                        "to say what that means)\n")


@pytest.mark.parametrize(
    "args",
    [["norms"], ["norms", "x", "-p", "0"], ["norms", "x", "-p", "abc"], ["norms", "x", "--max-norm", "0"],
     ["norms", "x", "--max-norm", "inf"], ["norms", "x", "--eps", "-1"], ["norms", "x", "--sort", "size"],
     ["norms", "x", "--top", "0"], ["norms", "x", "-f", "xml"], ["frobnicate"]],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = run(*args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert "Error" in r.stderr or "Usage" in r.stderr


def test_help_has_examples() -> None:
    r = run("norms", "--help")
    assert r.exit_code == 0 and "Examples:" in r.stdout and "gradinspect norms grads.safetensors" in r.stdout
    assert "--group-by" in r.stdout and "markdown" in r.stdout
    r = run("--help")
    assert r.exit_code == 0 and "norms" in r.stdout
    r = run("--version")
    assert r.exit_code == 0 and "gradinspect" in r.stdout


def _touch(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _f32(shape: list[int], offsets: list[int]) -> dict[str, object]:
    """A float32 entry of a safetensors header."""
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "readme.txt").write_text("no gradients here")
    return path


def _npz_object(path: Path) -> Path:
    np.savez(path, w=np.array([object()], dtype=object))
    return path


def test_main_leaves_the_collector_as_it_found_it() -> None:
    """main() raises the cyclic collector's threshold for its run (a run makes many objects without cycles)
    and puts it back, for a program that calls it."""
    import gc

    from gradinspect.cli import main

    before = gc.get_threshold()
    seen = []
    real = gc.set_threshold
    try:
        gc.set_threshold = lambda *t: (seen.append(t), real(*t))[1]  # type: ignore[assignment]
        with pytest.raises(SystemExit, match="0"):
            main(["--version"])
    finally:
        gc.set_threshold = real  # type: ignore[assignment]
    assert seen == [(100_000, 20, 100), before] and gc.get_threshold() == before


@pytest.mark.parametrize("given", [None, "3"])
def test_main_leaves_the_environment_as_it_found_it(monkeypatch: pytest.MonkeyPatch, given: str | None) -> None:
    """main() holds OpenBLAS to one thread for its run (OPENBLAS_NUM_THREADS=1, unless the caller set it), and
    takes the variable out again when it set it, for a program that calls it."""
    import os

    from gradinspect import cli

    if given is None:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", given)
    during = []
    monkeypatch.setattr(cli.cli, "main", lambda **kw: during.append(os.environ.get("OPENBLAS_NUM_THREADS")))
    cli.main(["--version"])
    assert during == [given or "1"]
    assert os.environ.get("OPENBLAS_NUM_THREADS") == given
