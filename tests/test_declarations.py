"""One declaration per concept: shared options and their ranges, check rules, output formats, --output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from safetensors.numpy import save_file

from conftest import ROOT, run
from gradinspect import api, formats
from gradinspect import options as o
from gradinspect.check import RULES, Rules, evaluate, rules_from
from gradinspect.cli import cli
from gradinspect.config import CHECK_KEYS, ConfigError, load_check_config


@pytest.fixture
def grads(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "g.safetensors"
    path.parent.mkdir()
    save_file({"a.weight": np.array([3.0, 0.0], np.float32), "b.weight": np.array([4.0], np.float32)}, str(path))
    return path


def _one_error(r: Result, fragment: str) -> None:
    assert r.exit_code == 2 and r.stdout == "", (r.exit_code, r.stdout)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], r.stderr


# --- --output -----------------------------------------------------------------


@pytest.mark.parametrize("cmd,suffix,fmt", [
    ("norms", ".json", "json"), ("norms", ".csv", "csv"), ("norms", ".md", "markdown"), ("norms", ".txt", "table"),
    ("info", ".json", "json"), ("info", ".csv", "csv"), ("info", ".txt", "table"),
    ("check", ".json", "json"), ("check", ".xml", "junit"), ("check", ".txt", "text"),
])
def test_output_format_follows_the_suffix(grads: Path, tmp_path: Path, cmd: str, suffix: str, fmt: str) -> None:
    out = tmp_path / ("report" + suffix)
    r = run(cmd, grads, "--output", out)
    assert r.exit_code == 0 and r.stdout == "", r.output
    assert out.read_text("utf-8") == run(cmd, grads, "--format", fmt).stdout
    assert "\x1b[" not in out.read_text("utf-8")


def test_output_for_diff_and_format_wins_over_suffix(grads: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.txt"
    r = run("diff", grads, grads, "-o", out, "--format", "json")
    assert r.exit_code == 0 and r.stdout == ""
    assert json.loads(out.read_text())["schema"] == "gradinspect.diff/1"
    assert run("diff", grads, grads, "-o", tmp_path / "d.csv").exit_code == 0
    assert (tmp_path / "d.csv").read_text().startswith("name,shape,dtype_a")
    r = run("norms", grads, "-o", tmp_path / "n.md", "--json")
    assert json.loads((tmp_path / "n.md").read_text())["schema"] == "gradinspect.norms/1"


def test_output_keeps_exit_1_for_findings(grads: Path, tmp_path: Path) -> None:
    out = tmp_path / "junit.xml"
    r = run("check", grads, "--max-total", "1", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    assert "<failure" in out.read_text() and 'name="max_total"' in out.read_text()
    r = run("diff", grads, grads, "--rtol", "0", "-o", tmp_path / "d.json")
    assert r.exit_code == 0 and json.loads((tmp_path / "d.json").read_text())["ok"] is True


def test_output_unknown_suffix_is_a_usage_error(grads: Path, tmp_path: Path) -> None:
    r = run("norms", grads, "-o", tmp_path / "report.pdf")
    assert r.exit_code == 2 and r.stdout == ""
    assert ".json, .csv" in r.stderr and ".md" in r.stderr and "--format" in r.stderr
    r = run("norms", grads, "-o", tmp_path / "report.xml")  # junit renders check reports only
    assert r.exit_code == 2 and ".xml" not in r.stderr.split("known:")[1]
    assert sorted(os.listdir(tmp_path)) == ["in"]
    assert run("norms", grads, "-o", tmp_path / "report.pdf", "-f", "csv").exit_code == 0


def test_output_to_a_directory_or_nowhere_is_one_error_line(grads: Path, tmp_path: Path) -> None:
    _one_error(run("norms", grads, "-o", tmp_path), "is a directory")
    _one_error(run("check", grads, "-o", tmp_path / "missing" / "r.json"), "no such directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # root writes anywhere but in /proc
        target = ro / "r.json" if not os.access(ro, os.W_OK) else Path("/proc/gradinspect-report.json")
        _one_error(run("info", grads, "-o", target), "cannot write the report")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_output_replaces_a_file_whole(grads: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("x" * 100_000)
    out.chmod(0o640)
    assert run("norms", grads, "-o", out).exit_code == 0
    assert json.loads(out.read_text())["schema"] == "gradinspect.norms/1"
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["in", "r.json"]


def test_a_render_error_leaves_no_file_and_no_temp_file(grads: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, report: object, options: object) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(type(formats.get("csv")), "render", broken)
    r = run("norms", grads, "-o", tmp_path / "r.csv")
    assert isinstance(r.exception, RuntimeError)
    assert sorted(os.listdir(tmp_path)) == ["in"]


def test_a_write_error_leaves_the_old_file_and_no_temp_file(grads: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.json"
    out.write_text("old")

    def replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    _one_error(run("norms", grads, "-o", out), "No space left on device")
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["in", "r.json"]


# --- formats: one contract --------------------------------------------------------


def test_every_format_implements_the_contract() -> None:
    kinds = {"norms", "check", "diff", "info", "trend"}
    for name in formats.MODULES:
        f = formats.get(name)
        assert isinstance(f, formats.Format) and f.name == name and f.help
        assert set(f.kinds) <= kinds and all(s.startswith(".") for s in f.suffixes)
    for kind, name in formats.DEFAULT.items():
        assert kind in formats.get(name).kinds
    assert formats.DEFAULT == {"norms": "table", "diff": "table", "info": "table", "check": "text", "trend": "table"}


def test_render_returns_the_whole_document() -> None:
    report = api.compute_norms({"w": np.array([3.0, 4.0])})
    doc = formats.get("json").render(report, formats.RenderOptions())
    assert isinstance(doc, str) and json.loads(doc)["total"]["l2"] == 5.0
    with pytest.raises(ValueError, match="cannot write norms reports"):
        formats.render("junit", "norms", report, __import__("io").StringIO())


# --- options: one declaration, one range validator ------------------------------------


@pytest.mark.parametrize("opt,bad", [(o.MAX_NORM, 0), (o.EPS, -1), (o.JOBS, 0), (o.JOBS, 65)])
def test_one_range_in_every_layer(grads: Path, tmp_path: Path, opt: o.Option, bad: float) -> None:
    assert opt.range is not None and not opt.range.contains(bad)
    flag = opt.flags[0]
    r = run("check", grads, flag, bad)
    assert r.exit_code == 2 and r.stdout == "" and f"Invalid value for '{flag}'" in r.stderr
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f"[tool.gradinspect.check]\n{opt.name} = {bad}\n")
    with pytest.raises(ConfigError, match=f"{opt.name} must be {opt.range.describe()}"):
        load_check_config(cfg)
    with pytest.raises(ValueError, match=f"{opt.name} must be {opt.range.describe()}, not {bad}"):
        opt.range.check(opt.name, bad)


def test_library_and_cli_share_the_limits(grads: Path) -> None:
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0, not inf"):
        api.inspect(grads, max_norm=float("inf"))
    with pytest.raises(ValueError, match="min_cosine must be a number from -1 to 1, not 2"):
        api.diff(grads, grads, min_cosine=2)
    r = run("norms", grads, "--max-norm", "inf")
    assert r.exit_code == 2 and "must be finite" in r.stderr
    r = run("diff", grads, grads, "--min-cosine", "2")
    assert r.exit_code == 2 and "-1<=x<=1" in r.stderr


def test_shared_options_are_declared_once_for_every_command() -> None:
    shared = {"norms": (*o.NORM_OPTIONS, *o.SELECTION_OPTIONS, o.SHARDS, o.DEDUP, o.LOSS_SCALE, o.JOBS, o.QUIET,
                        o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.JSON, o.OUTPUT),
              "check": (*o.NORM_OPTIONS, *o.SELECTION_OPTIONS, o.SHARDS, o.DEDUP, o.LOSS_SCALE, o.JOBS, o.QUIET,
                        o.ALLOW_OUTSIDE_INDEX, o.JSON, o.OUTPUT),
              "diff": (*o.SELECTION_OPTIONS, o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.JSON, o.OUTPUT),
              "info": (o.WIDTH, o.ALLOW_OUTSIDE_INDEX, o.JSON, o.OUTPUT)}
    for cmd, opts in shared.items():
        params = {p.name: p for p in cli.commands[cmd].params}  # type: ignore[attr-defined]
        for opt in opts:
            p = params[opt.name]
            assert p.help == opt.help and set(opt.flags[0].split("/")[0:1]) <= set(p.opts), (cmd, opt.name)
        assert params["format"].default == formats.DEFAULT[cmd]


# --- check rules: one table -----------------------------------------------------------


def test_every_rule_is_an_option_a_config_key_and_a_rules_field() -> None:
    params = {p.name for p in cli.commands["check"].params}  # type: ignore[attr-defined]
    for rule in RULES:
        assert rule.option.name in params and rule.option.name in CHECK_KEYS
        assert getattr(Rules(), rule.key) == rule.default
    assert list(Rules().enabled()) == ["nonfinite"]
    assert list(Rules().enabled("replicas")) == ["nonfinite", "replicas_differ"]
    on = rules_from({"max_total": 1.0, "fail_on_clip": True, "allow_nonfinite": True})
    assert on.enabled() == ("max_total", "clip")
    report = api.compute_norms({"w": np.array([3.0, 4.0])})
    found = evaluate(report, on)
    assert [(f.rule, f.message) for f in found.findings] == [
        ("max_total", "global L2 5 > 1"), ("clip", "clipping at max_norm 1 scales gradients by 0.2 (global L2 5)")]


# --- statistics: keywords, and CSV columns from the report's fields ---------------------------


def test_statistics_are_built_with_keywords() -> None:
    from gradinspect.norms import Stats, stats_of
    from gradinspect.report import DiffRow, TensorNorms, Totals

    for cls in (Stats, TensorNorms, Totals, DiffRow):
        with pytest.raises(TypeError, match="positional"):
            cls(1, 2, 3, 4, 5, 6, 7, 8, 9)  # type: ignore[misc]
    report = api.compute_norms({"w": np.array([3.0, -4.0])})
    st = stats_of(np.array([3.0, -4.0]))
    assert report.total == Totals.from_stats(st, tensors=1)
    assert report.tensors[0] == TensorNorms.from_stats(st, name="w", source="<memory>", shape=(2,), dtype="float64",
                                                       share=1.0)


def test_csv_columns_are_the_json_fields(grads: Path) -> None:
    from gradinspect.formats.csv import columns
    from gradinspect.report import DiffRow, InfoTensor, TensorNorms

    norms = json.loads(run("norms", grads, "--json").stdout)["tensors"][0]
    assert list(norms) == list(TensorNorms.FIELDS)
    header = run("norms", grads, "-f", "csv").stdout.splitlines()[0].split(",")
    assert header == list(columns(TensorNorms.FIELDS))
    assert header == ["name", "source", "shape", "dtype", "numel", "l1", "l2", "linf", "norm", "sq", "share",
                      "nonfinite", "nan", "inf", "members", "pieces", "replica_max_diff"]
    diff = json.loads(run("diff", grads, grads, "--json").stdout)
    assert list(diff["tensors"][0]) == list(DiffRow.FIELDS) == run("diff", grads, grads, "-f", "csv").stdout.split(
        "\n")[0].split(",")
    assert list(diff["total"]) == list(DiffRow.TOTAL_FIELDS)
    info = json.loads(run("info", grads, "--json").stdout)["tensors"][0]
    assert list(info) == list(InfoTensor.FIELDS) == run("info", grads, "-f", "csv").stdout.split("\n")[0].split(",")


def test_help_imports_no_numpy_rich_or_extras() -> None:
    """`gradinspect --help` and `COMMAND --help` stay instant: the formats import their heavy modules in render."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys\nfrom gradinspect.cli import main\n"
            "for argv in (['--help'], ['trend', '--help'], ['norms', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('numpy', 'rich', 'matplotlib', 'torch', 'multiprocessing') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == "[]", r.stderr


@pytest.mark.parametrize("command", ["norms", "check", "info", "trend"])
def test_output_never_replaces_an_input(tmp_path: Path, command: str) -> None:
    """Found in review: `norms h.safetensors -f json -o h.safetensors` replaced the dump with its report."""
    path = tmp_path / "h.safetensors"
    path.write_bytes((ROOT / "sample_data/healthy.safetensors").read_bytes())
    before = path.read_bytes()
    r = run(command, path, "-f", "json", "-o", path)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"Error: {path}: --output names an input file; refusing to overwrite it\n"
    assert path.read_bytes() == before
