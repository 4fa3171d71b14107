"""`gradinspect trend` end to end (issue 9 §1, §2, §4): steps from PATHs, numbers as norms, outputs, CI exit codes."""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import ROOT, run, run_process, strict_json
from gradinspect.formats.json import dumps

RUN = ROOT / "sample_data" / "run"
RUN_GLOB = str(RUN / "step_*.safetensors")


def _save(path: Path, tensors: dict, step: int | str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path),
              metadata=None if step is None else {"step": str(step)})
    return path


def _steps(out: str) -> list[int]:
    return [s["step"] for s in strict_json(out)["steps"]]


@pytest.fixture(scope="module")
def sample_json() -> dict:
    r = run("trend", RUN_GLOB, "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    return strict_json(r.stdout)


# --- §1 step numbers ----------------------------------------------------------------------------

def test_metadata_step_wins_over_the_name(tmp_path: Path) -> None:
    a = _save(tmp_path / "dump_1.safetensors", {"w": [1.0]}, step=7)
    b = _save(tmp_path / "dump_2.safetensors", {"w": [2.0]}, step=3)
    r = run("trend", a, b, "-f", "json")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)
    assert _steps(r.stdout) == [3, 7] and doc["steps"][0]["sources"] == [str(b)]


def test_last_integer_of_the_final_component(tmp_path: Path) -> None:
    for i in (10, 2, 33):
        _save(tmp_path / "v2_run" / f"gpt2_step{i}.safetensors", {"w": [float(i)]})
    r = run("trend", str(tmp_path / "v2_run" / "*.safetensors"), "-f", "json")
    assert r.exit_code == 0, r.output
    assert _steps(r.stdout) == [2, 10, 33]


def test_step_pattern_overrides_metadata_and_name(tmp_path: Path) -> None:
    a = _save(tmp_path / "it5_x9.safetensors", {"w": [1.0]}, step=100)
    b = _save(tmp_path / "it4_x8.safetensors", {"w": [1.0]}, step=50)
    r = run("trend", a, b, "--step-pattern", r"it(\d+)_", "-f", "json")
    assert r.exit_code == 0, r.output
    assert _steps(r.stdout) == [4, 5]


def test_step_pattern_that_does_not_match_is_exit_2(tmp_path: Path) -> None:
    a = _save(tmp_path / "it5.safetensors", {"w": [1.0]})
    b = _save(tmp_path / "final.safetensors", {"w": [1.0]})
    r = run("trend", a, b, "--step-pattern", r"it(\d+)")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {b}: --step-pattern it(\\d+) does not match 'final.safetensors'")


@pytest.mark.parametrize("pattern,why", [(r"\d+", "exactly one group"), (r"(\d+)_(\d+)", "exactly one group"),
                                         ("(", "not a valid regular expression")])
def test_step_pattern_needs_one_group(tmp_path: Path, pattern: str, why: str) -> None:
    a = _save(tmp_path / "it5.safetensors", {"w": [1.0]})
    r = run("trend", a, "--step-pattern", pattern)
    assert r.exit_code == 2 and r.stdout == "" and why in r.stderr


def test_no_step_number_is_exit_2(tmp_path: Path) -> None:
    a = _save(tmp_path / "final.safetensors", {"w": [1.0]})
    r = run("trend", a)
    assert r.exit_code == 2 and r.stdout == ""
    assert "no step number" in r.stderr and "--step-pattern" in r.stderr


def test_a_step_number_twice_is_exit_2_naming_both(tmp_path: Path) -> None:
    a = _save(tmp_path / "a" / "step_5.safetensors", {"w": [1.0]})
    b = _save(tmp_path / "b" / "run_005.safetensors", {"w": [1.0]})
    r = run("trend", a, b)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == f"Error: {b}: step 5 twice: also {a}"


def test_a_glob_that_matches_nothing_is_exit_2(tmp_path: Path) -> None:
    r = run("trend", str(tmp_path / "step_*.safetensors"))
    assert r.exit_code == 2 and "no file matches this pattern" in r.stderr


def _sharded_step(root: Path, step: int, meta: tuple[int, int], scale: float) -> Path:
    d = root / f"step_{step:03d}"
    _save(d / "rank0.safetensors", {"w": [1.0 * scale, 2.0], "b": [0.5]}, step=meta[0])
    _save(d / "rank1.safetensors", {"w": [3.0 * scale]}, step=meta[1])
    return d


def test_multi_file_steps_with_shards(tmp_path: Path) -> None:
    dirs = [_sharded_step(tmp_path, i, (i, i), 1.0 + i) for i in range(3)]
    r = run("trend", str(tmp_path / "step_*") + "/", "--shards", "slices", "-f", "json")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)
    assert _steps(r.stdout) == [0, 1, 2] and sorted(doc["tensors"]) == ["b", "w"]
    assert doc["steps"][1]["sources"] == [str(dirs[1] / "rank0.safetensors"), str(dirs[1] / "rank1.safetensors")]
    n = run("norms", dirs[1], "--shards", "slices", "--sort", "none", "-f", "json")
    assert strict_json(n.stdout)["total"] == doc["steps"][1]["total"]


def test_files_of_one_step_must_agree_on_step(tmp_path: Path) -> None:
    _sharded_step(tmp_path, 0, (0, 0), 1.0)
    d = _sharded_step(tmp_path, 1, (1, 2), 2.0)
    r = run("trend", str(tmp_path / "step_*") + "/", "--shards", "slices")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"Error: {d / 'rank1.safetensors'}: metadata step 2 differs from step 1 in "
                                f"{d / 'rank0.safetensors'} (the files of one step must agree)")


def test_a_tensor_in_some_steps_only_is_missing_not_an_error(tmp_path: Path) -> None:
    for i in range(4):
        t = {"a": [1.0 + i], "b": [2.0]}
        if i != 2:
            t["c"] = [3.0]
        _save(tmp_path / f"s{i}.safetensors", t)
    r = run("trend", str(tmp_path / "s*.safetensors"), "-f", "json")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)
    assert doc["missing"] == [{"name": "c", "steps": [2]}] and doc["series"]["norm"][2][2] is None


# --- sample_data/run --------------------------------------------------------------------------

def test_sample_run_facts(sample_json: dict) -> None:
    assert _steps(json.dumps(sample_json)) == list(range(40))
    spike = sample_json["spikes"][0]
    assert spike["step"] == 21 and spike["culprits"][0]["name"] == "head.weight"
    assert round(spike["culprits"][0]["part"], 3) == 0.886
    assert sample_json["first_nonfinite"] == {"step": 31, "tensors": [{"name": "head.weight", "nan": 0, "inf": 8}]}
    assert [s["step"] for s in sample_json["spikes"]] == [*range(21, 31), 32]


@pytest.mark.parametrize("step", [0, 21, 31])
def test_each_step_is_bit_for_bit_norms_on_that_step_alone(sample_json: dict, step: int) -> None:
    path = RUN / f"step_{step:06d}.safetensors"
    n = strict_json(run("norms", path, "--sort", "none", "-f", "json").stdout)
    s = sample_json["steps"][step]
    assert s["step"] == step and s["sources"] == n["sources"] == [str(path)]
    assert s["total"] == {k: n["total"][k] for k in s["total"]}
    assert s["clip"] == {k: n["clip"][k] for k in ("coef", "clipped")}
    names = sample_json["tensors"]
    for row in n["tensors"]:
        i = names.index(row["name"])
        assert sample_json["series"]["norm"][i][step] == row["norm"]
        assert sample_json["series"]["share"][i][step] == row["share"]


def test_group_by_steps_are_those_of_norms_group_by() -> None:
    paths = [str(RUN / f"step_{i:06d}.safetensors") for i in (20, 21)]
    t = strict_json(run("trend", *paths, "--group-by", "2", "-p", "3", "-f", "json", "-q").stdout)
    for j, p in enumerate(paths):
        n = strict_json(run("norms", p, "--group-by", "2", "-p", "3", "--sort", "none", "-f", "json").stdout)
        assert t["steps"][j]["total"] == {k: n["total"][k] for k in t["steps"][j]["total"]}
        assert [t["series"]["norm"][t["tensors"].index(r["name"])][j] for r in n["tensors"]] == \
            [r["norm"] for r in n["tensors"]]
    assert t["group_by"] == 2 and "blocks.0" in t["tensors"]


def test_csv_has_a_row_per_step_and_tensor_present(sample_json: dict) -> None:
    r = run("trend", RUN_GLOB, "-f", "csv", "-q")
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["step", "name", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite"]
    assert len(rows) - 1 == sum(t is not None for row in sample_json["series"]["norm"] for t in row)
    bad = [row for row in rows[1:] if row[0] == "31" and row[1] == "head.weight"]
    assert bad == [["31", "head.weight", "Infinity", "Infinity", "Infinity", "Infinity", "Infinity", "NaN", "8"]]


def test_json_is_strict_and_compact_when_large() -> None:
    r = run_process("trend", RUN_GLOB, "--json", "-q")
    text = r.stdout.decode()
    assert r.returncode == 0 and r.stderr == b""
    doc = strict_json(text)  # 'Infinity' spelled as a string for step 31
    assert doc["schema"] == "gradinspect.trend/1" and doc["steps"][31]["total"]["l2"] == "Infinity"
    assert text.count("\n") > 1  # 40 steps x 19 tensors: pretty
    big = {**doc, "steps": doc["steps"] * 3}  # 120 x 19 > 1000 numbers per series: one line
    assert dumps(big).count("\n") == 1


# --- the table ----------------------------------------------------------------------------------

def test_table_fits_80_columns_and_shows_the_run() -> None:
    r = run("trend", RUN_GLOB, "-q", "--width", "80")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    assert "step 31: head.weight (8 Inf)" in r.stdout
    assert re.search(r"^ +21 +27\.5 +2\.68 +10\.2× +head\.weight 88\.6%", r.stdout, re.M)
    marks = next(x for x in lines if "^" in x and "!" in x)
    axis = next(x for x in lines if "└" in x)
    col0 = axis.index("└") + 1
    assert marks[col0 + 21] == "^" and marks[col0 + 31] == "!" and marks[col0 + 20] == " "


def test_many_steps_are_bucketed_to_the_width(tmp_path: Path) -> None:
    for i in range(150):
        _save(tmp_path / f"step_{i}.safetensors", {"w": [1.0 + (50.0 if i == 120 else 0.0)], "v": [0.5]})
    r = run("trend", str(tmp_path / "step_*.safetensors"), "--width", "60")
    assert r.exit_code == 0, r.output
    assert max(len(x) for x in r.stdout.splitlines()) <= 60 and "4 steps per column" in r.stdout
    assert "1: step 120\n" in r.stdout


def test_no_escape_codes_in_pipes_and_with_no_color() -> None:
    plain = run_process("trend", RUN_GLOB, "-q")
    assert plain.returncode == 0 and b"\x1b" not in plain.stdout and "█".encode() in plain.stdout
    from gradinspect import formats
    from gradinspect.runs import trend

    report = trend(RUN_GLOB)
    colored = formats.get("table").render(report, formats.RenderOptions(width=80, color=True))
    assert "\x1b[" in colored
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", colored)
    assert [x.rstrip() for x in stripped.splitlines()] == plain.stdout.decode().splitlines()


# --- CI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,code", [
    (["--fail-on", "spike"], 1), (["--fail-on", "nonfinite"], 1), (["--max-clip-fraction", "1"], 0),
    (["--max-clip-fraction", "0.5"], 1), (["--fail-on", "spike", "--spike-factor", "100"], 0), ([], 0)])
def test_fail_on_and_max_clip_fraction(args: list[str], code: int) -> None:
    r = run("trend", RUN_GLOB, "-q", *args)
    assert r.exit_code == code, r.output
    assert ("FAIL" in r.stdout) == (code == 1)


def test_healthy_steps_pass_every_rule() -> None:
    paths = [str(RUN / f"step_{i:06d}.safetensors") for i in range(21)]
    r = run("trend", *paths, "-q", "--fail-on", "spike", "--fail-on", "nonfinite", "--max-clip-fraction", "1")
    assert r.exit_code == 0 and "OK    21 steps, 0 spikes; rules hold: spike, nonfinite, clip_fraction" in r.stdout


def test_github_annotations() -> None:
    r = run("trend", RUN_GLOB, "-q", "--fail-on", "nonfinite", "--fail-on", "spike", "-f", "github")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("::error title=gradinspect trend spike step 21::step 21: global L2 norm 27.4")
    assert "head.weight 88.6%" in lines[0]
    assert any(x.startswith("::error title=gradinspect trend nonfinite step 31::step 31: 0 NaN and 8 Inf")
               for x in lines)
    assert lines[-1] == "FAIL  12 findings (spike, nonfinite); 40 steps, 11 spikes"


def test_junit_one_testcase_per_rule() -> None:
    r = run("trend", RUN_GLOB, "-q", "--fail-on", "nonfinite", "--max-clip-fraction", "1", "-f", "junit")
    assert r.exit_code == 1
    suite = ET.fromstring(r.stdout).find("testsuite")
    assert suite is not None and suite.get("name") == "gradinspect.trend"
    cases = {c.get("name"): c.find("failure") for c in suite.iter("testcase")}
    assert set(cases) == {"nonfinite", "clip_fraction"}
    assert cases["clip_fraction"] is None and cases["nonfinite"] is not None
    assert "step 31" in (cases["nonfinite"].get("message") or "")


def test_output_suffix_picks_the_format(tmp_path: Path) -> None:
    out = tmp_path / "run.csv"
    r = run("trend", RUN_GLOB, "-q", "--output", out)
    assert r.exit_code == 0 and r.stdout == ""
    assert out.read_text().startswith("step,name,l1,l2,linf,norm,sq,share,nonfinite\n")


def test_warnings_are_said_once_for_all_steps() -> None:
    r = run("trend", RUN_GLOB, "-f", "json")
    assert r.stderr.count("Warning") == 1 and "(and in 39 more steps)" in r.stderr


def test_help_has_examples_on_the_sample_run() -> None:
    r = run("trend", "--help")
    assert r.exit_code == 0 and "gradinspect trend 'sample_data/run/step_*.safetensors'" in r.stdout
    for opt in ("--window", "--spike-factor", "--clip-target", "--fail-on", "--max-clip-fraction", "--step-pattern",
                "--shards", "--group-by", "--output"):
        assert opt in r.stdout


# --- --group-by: each file read once, groups rebuilt exactly ------------------------------------

def _numbers(report) -> list[tuple]:
    return [(r.name, repr(r.l1), repr(r.l2), repr(r.linf), repr(r.norm), repr(r.sq), repr(r.share), r.nan, r.inf,
             r.numel) for r in report.tensors]


@pytest.mark.parametrize("p", [1, 2, "inf"])
@pytest.mark.parametrize("group_by", [1, 2, r"fc\d|norm"])
def test_regroup_is_bit_for_bit_norms_group_by_on_the_sample_run(p, group_by) -> None:
    from gradinspect import inspect
    from gradinspect.runs import regroup

    for i in range(0, 40, 3):
        path = RUN / f"step_{i:06d}.safetensors"
        per_tensor = inspect(path, norm_type=p, sort="none")
        grouped = regroup(per_tensor, group_by)
        assert grouped is not None
        assert _numbers(grouped) == _numbers(inspect(path, norm_type=p, sort="none", group_by=group_by))


@pytest.mark.parametrize("seed", range(6))
def test_regroup_is_bit_for_bit_on_wide_float64(tmp_path: Path, seed: int) -> None:
    from gradinspect import inspect
    from gradinspect.runs import regroup

    g = np.random.default_rng(seed)
    tensors = {}
    for j in range(12):
        scale = 10.0 ** g.uniform(-60, 60)
        a = g.standard_normal(int(g.integers(1, 50))) * scale
        if seed % 3 == 0 and j == 5:
            a[0] = np.inf if seed else np.nan
        if j == 7:
            a[:] = 0.0
        tensors[f"l{j % 4}.m{j % 3}.w{j}"] = a
    path = tmp_path / "g.safetensors"
    from safetensors.numpy import save_file as save64

    save64(tensors, str(path))
    for by in (1, 2):
        per_tensor = inspect(path, sort="none")
        grouped = regroup(per_tensor, by)
        assert grouped is not None
        assert _numbers(grouped) == _numbers(inspect(path, sort="none", group_by=by))


def test_regroup_declines_what_it_cannot_rebuild_exactly(tmp_path: Path) -> None:
    from gradinspect import compute_norms
    from gradinspect.runs import regroup

    assert regroup(compute_norms({"a.x": [1.0], "a.y": [2.0]}, norm_type=3, sort="none"), 1) is None
    tiny = compute_norms({"a.x": np.array([1e-200]), "a.y": np.array([2.0])}, sort="none")  # Σx² underflows
    assert regroup(tiny, 1) is None
    assert regroup(compute_norms({"a.x": [1.0], "a.y": [2.0]}, sort="none"), 1) is not None


@pytest.mark.parametrize("args,reads", [((), 3), (("--group-by", "1"), 3), (("--group-by", "1", "-p", "3"), 6)])
def test_each_step_is_read_once_with_group_by(monkeypatch: pytest.MonkeyPatch, args: tuple, reads: int) -> None:
    import gradinspect.api as api

    calls = []
    real = api.inspect
    monkeypatch.setattr(api, "inspect", lambda *a, **k: calls.append(a) or real(*a, **k))
    paths = [str(RUN / f"step_{i:06d}.safetensors") for i in (20, 21, 22)]
    r = run("trend", *paths, "-f", "json", "-q", *args)
    assert r.exit_code == 0, r.output
    assert len(calls) == reads
    t = strict_json(r.stdout)
    for j, p in enumerate(paths):
        n = strict_json(run("norms", p, "--sort", "none", "-f", "json", *args).stdout)
        assert [t["series"]["norm"][t["tensors"].index(row["name"])][j] for row in n["tensors"]] == \
            [row["norm"] for row in n["tensors"]]
        assert [t["series"]["share"][t["tensors"].index(row["name"])][j] for row in n["tensors"]] == \
            [row["share"] for row in n["tensors"]]


def test_a_far_threshold_leaves_the_chart_to_the_norms(tmp_path: Path) -> None:
    for i in range(10):
        _save(tmp_path / f"step_{i}.safetensors", {"w": [100.0 + 2 * i]})
    far = run("trend", str(tmp_path / "step_*.safetensors"), "-q", "--width", "80")
    assert far.exit_code == 0 and "max_norm 1 is below" in far.stdout and "╌" not in far.stdout
    bars = [x for x in far.stdout.splitlines() if "┤" in x or "│" in x]
    assert len(bars) == 8 and len({x.count("█") for x in bars}) > 2  # the norms use the rows, not one flat block
    near = run("trend", str(tmp_path / "step_*.safetensors"), "-q", "--max-norm", "110")
    assert "╌" in near.stdout and "max_norm 110" in near.stdout and "is below" not in near.stdout


@pytest.mark.parametrize("values,expect", [
    ([[0.0], [0.0]], "dead            w"),  # every norm 0: nothing to draw on a log scale, no crash
    ([[np.nan], [np.inf]], "clipped        no finite step"),
    ([[3.0]], "steps           1 (7)"),
])
def test_degenerate_runs_still_draw(tmp_path: Path, values: list, expect: str) -> None:
    for i, v in enumerate(values):
        _save(tmp_path / f"s_{7 + i}.safetensors", {"w": v})
    r = run("trend", str(tmp_path / "s_*.safetensors"), "-q")
    assert r.exit_code == 0, r.output
    assert expect in r.stdout and "└" in r.stdout
    axis = next(x for x in r.stdout.splitlines() if "└" in x)
    assert axis.count("─") == 3 * len(values)  # a few steps: 3 columns each


def test_fail_on_nonfinite_lists_each_step(tmp_path: Path) -> None:
    for i, v in enumerate([[1.0], [np.nan], [np.inf], [1.0]]):
        _save(tmp_path / f"s_{i}.safetensors", {"w": v})
    r = run("trend", str(tmp_path / "s_*.safetensors"), "-q", "--fail-on", "nonfinite", "-f", "github")
    assert r.exit_code == 1
    assert [x.split("::")[1] for x in r.stdout.splitlines()[:-1]] == [
        "error title=gradinspect trend nonfinite step 1", "error title=gradinspect trend nonfinite step 2"]
    assert r.stdout.splitlines()[-1] == "FAIL  2 findings (nonfinite); 4 steps, 0 spikes"


def test_progress_is_told_the_total_once_and_every_byte() -> None:
    from gradinspect.runs import trend

    class Bar:
        def __init__(self) -> None:
            self.totals: list[int] = []
            self.done = 0

        def set_total(self, n: int) -> None:
            self.totals.append(n)

        def __call__(self, n: int) -> None:
            self.done += n

    bar = Bar()
    paths = [RUN / f"step_{i:06d}.safetensors" for i in range(3)]
    trend(paths, progress=bar)
    assert bar.totals == [sum(p.stat().st_size for p in paths)]
    assert 0.99 * bar.totals[0] < bar.done <= bar.totals[0]  # the float tensors' bytes; headers are the rest


@pytest.mark.parametrize("args", [["--loss-scale", "4"], ["-p", "inf", "--max-norm", "5", "--eps", "0"],
                                  ["--include", "head.*"], ["--exclude", "*.bias", "-p", "1.5"], ["--dedup"]])
def test_shared_options_give_the_numbers_of_norms(args: list[str]) -> None:
    paths = [str(RUN / f"step_{i:06d}.safetensors") for i in (30, 31)]
    t = strict_json(run("trend", *paths, "-q", "-f", "json", *args).stdout)
    for j, p in enumerate(paths):
        n = strict_json(run("norms", p, "-q", "--sort", "none", "-f", "json", *args).stdout)
        assert t["steps"][j]["total"] == {k: n["total"][k] for k in t["steps"][j]["total"]}
        assert t["steps"][j]["clip"] == {k: n["clip"][k] for k in ("coef", "clipped")}
        assert [t["series"]["norm"][t["tensors"].index(r["name"])][j] for r in n["tensors"]] == \
            [r["norm"] for r in n["tensors"]]
    assert (t["max_norm"], t["eps"]) == ((5.0, 0.0) if "--eps" in args else (1.0, 1e-6))


def test_a_broken_step_is_exit_2_with_nothing_on_stdout(tmp_path: Path) -> None:
    _save(tmp_path / "step_1.safetensors", {"w": [1.0]})
    bad = tmp_path / "step_2.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    r = run("trend", str(tmp_path / "step_*.safetensors"), "--step-pattern", r"(\d)", "-f", "json")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {bad}: ") and r.stderr.count("\n") == 1


def test_a_narrow_table_cuts_names_never_numbers() -> None:
    r = run("trend", RUN_GLOB, "-q", "--width", "30")
    assert r.exit_code == 0
    row = next(x for x in r.stdout.splitlines() if x.lstrip().startswith("21 "))
    assert row.split()[:4] == ["21", "27.5", "2.68", "10.2×"] and row.endswith("88.6%") and "…" in row


@pytest.mark.parametrize(("meta", "name", "message"), [
    ({"step": "99999999999999999999999"}, "g.safetensors", r"metadata step .* is not a step number"),
    ({}, "step_99999999999999999999999.safetensors", r"the last integer in .* is not a step number"),
    ({"step": "\uff17"}, "g.safetensors", r"metadata step .* is not a step number"),
    ({"step": " 7"}, "g.safetensors", r"metadata step .* is not a step number"),
])
def test_step_numbers_out_of_range_are_one_error(tmp_path: Path, meta: dict[str, str], name: str,
                                                  message: str) -> None:
    """Found in review: a step past int64 was a traceback; ' 7' and a fullwidth 7 were read as 7."""
    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / name), metadata=meta or None)
    r = run("trend", tmp_path / name, "-q", "--json")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert re.search(message, r.stderr), r.stderr


def test_one_file_of_a_step_without_metadata_step_is_an_error(tmp_path: Path) -> None:
    """Found in review: one rank's metadata step was taken when another rank's file had none."""
    (tmp_path / "step_7").mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "step_7/r0.safetensors"), metadata={"step": "100"})
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "step_7/r1.safetensors"))
    r = run("trend", str(tmp_path / "step_*/"), "--shards", "slices", "-q")
    assert r.exit_code == 2 and "has no metadata step, but" in r.stderr and "must agree" in r.stderr
