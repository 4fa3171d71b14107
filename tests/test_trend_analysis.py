"""The trend analysis core (issue 9 §3, §4): spikes and culprits, NaN, clipping, dead, missing, drift, JSON shape."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gradinspect import compute_norms, inspect
from gradinspect.clip import clip_coef
from gradinspect.formats.json import dumps
from gradinspect.trend import (
    TREND_CSV_COLUMNS,
    TREND_SCHEMA,
    StepResult,
    StepTotals,
    allowed_clipped,
    analyze,
    baselines,
    max_norm_for_target,
    median_rows,
    series,
)


def step_of(step: int, mapping: dict, **opts) -> StepResult:
    """A step from in-memory arrays, through compute_norms as `norms` computes it."""
    opts.setdefault("sort", "none")
    report = compute_norms({k: np.asarray(v, dtype=np.float64) for k, v in mapping.items()}, **opts)
    tensor_report = None
    if opts.get("group_by") is not None:
        tensor_report = compute_norms({k: np.asarray(v, dtype=np.float64) for k, v in mapping.items()},
                                      **{**opts, "group_by": None})
    return StepResult.from_reports(step, report, tensor_report, sources=(f"step_{step}",))


def run(mappings: list[dict], **opts) -> list[StepResult]:
    return [step_of(i, m, **opts) for i, m in enumerate(mappings)]


def same(a: float, b: float) -> bool:
    """Bit-for-bit (NaN equal to NaN)."""
    return repr(float(a)) == repr(float(b)) and math.copysign(1, a) == math.copysign(1, b)


# --- per step: the numbers of `norms` ------------------------------------------------------

@pytest.mark.parametrize("group_by", [None, 1])
def test_step_numbers_are_those_of_inspect_on_that_step_alone(tmp_path: Path, rng: np.random.Generator,
                                                              group_by: int | None) -> None:
    steps, reports = [], []
    for i in range(4):
        tensors = {"enc.w": rng.standard_normal((7, 3)).astype(np.float32),
                   "enc.b": rng.standard_normal(5).astype(np.float32) * 1e-3,
                   "dec.w": rng.standard_normal(11).astype(np.float16)}
        if i == 2:
            tensors["dec.w"][3] = np.nan
        path = tmp_path / f"step_{10 * i}.safetensors"
        save_file(tensors, str(path))
        opts = {"max_norm": 2.0, "sort": "none", "group_by": group_by}
        report = inspect(str(path), **opts)
        tensor_report = inspect(str(path), **{**opts, "group_by": None}) if group_by else None
        steps.append(StepResult.from_reports(10 * i, report, tensor_report))
        reports.append(report)
    trend = analyze(list(reversed(steps)), max_norm=2.0, group_by=group_by)
    doc = trend.to_dict()
    assert [s["step"] for s in doc["steps"]] == [0, 10, 20, 30]
    for s, report in zip(doc["steps"], reports, strict=True):
        assert s["sources"] == list(report.sources)
        for key, value in report.total.to_dict().items():
            assert same(s["total"][key], value), key
        assert same(s["clip"]["coef"], report.clip.coef) and s["clip"]["clipped"] == report.clip.clipped
    assert doc["tensors"] == [r.name for r in reports[0].tensors]
    for j, report in enumerate(reports):
        for r, row in enumerate(report.tensors):
            assert same(doc["series"]["norm"][r][j], row.norm) and same(doc["series"]["share"][r][j], row.share)
    rows = list(trend.csv_rows(spelled=False))
    assert len(rows) == sum(len(r.tensors) for r in reports)
    for (step, name, *nums, nonfinite), row in zip(rows, [(10 * j, r) for j, rep in enumerate(reports)
                                                           for r in rep.tensors], strict=True):
        assert (step, name, nonfinite) == (row[0], row[1].name, row[1].nonfinite)
        assert all(same(x, getattr(row[1], k)) for x, k in zip(nums, TREND_CSV_COLUMNS[2:8], strict=True))
    # first_nonfinite names the tensor also with --group-by
    assert doc["first_nonfinite"] == {"step": 20, "tensors": [{"name": "dec.w", "nan": 1, "inf": 0}]}


def test_from_reports_refuses_reports_that_lose_rows_or_tensors() -> None:
    arrays = {"a.x": np.ones(3), "a.y": np.zeros(2), "b": np.ones(1)}
    with pytest.raises(ValueError, match="pass the same step's report without group_by"):
        StepResult.from_reports(0, compute_norms(arrays, group_by=1, sort="none"))
    with pytest.raises(ValueError, match="top=None"):
        StepResult.from_reports(0, compute_norms(arrays, sort="none", top=1))
    with pytest.raises(ValueError, match="not of the same tensors"):
        StepResult.from_reports(0, compute_norms(arrays, group_by=1), compute_norms({"b": np.ones(1)}))
    with pytest.raises(ValueError, match="step 3 twice"):
        analyze([step_of(3, arrays), step_of(3, arrays)])
    with pytest.raises(ValueError, match="window must be >= 1"):
        analyze([step_of(3, arrays)], window=0)
    with pytest.raises(ValueError, match="spike_factor must be a finite number > 0"):
        analyze([step_of(3, arrays)], spike_factor=0.0)
    with pytest.raises(ValueError, match="clip target must be between 0 and 1"):
        analyze([step_of(3, arrays)], clip_target=-0.1)


# --- spikes and culprits ---------------------------------------------------------------------

def test_planted_spike_culprit_parts_are_exact() -> None:
    base = {"d": [1.0], "c": [1.0, 0.0], "a": [1.0, 0.0], "b": [1.0, 0.0]}
    mappings = [dict(base), {**base, "e": [1.0]}, dict(base), {**base, "e": [3.0]},
                # the spike: increases a 64, c 16, b 16, e 21 - median(1, 9) = 16, f 16 (absent before), d -1
                {"d": [0.0], "c": [4.0, 1.0], "a": [8.0, 1.0], "b": [4.0, 1.0], "e": [4.0, 2.0, 1.0], "f": [4.0]}]
    steps = run(mappings)
    trend = analyze(steps, window=20)
    prior = [s.total.norm for s in steps[:4]]
    assert len(trend.spikes) == 1
    spike = trend.spikes[0]
    assert spike.step == 4
    assert spike.baseline == np.median(prior) == (2.0 + math.sqrt(5.0)) / 2
    assert spike.norm == steps[4].total.norm == math.sqrt(136.0)
    assert spike.ratio == spike.norm / spike.baseline
    got = [(c.name, c.sq, c.baseline_sq, c.part) for c in spike.culprits]
    assert got == [("a", 65.0, 1.0, 0.5), ("c", 17.0, 1.0, 0.125), ("b", 17.0, 1.0, 0.125),
                   ("e", 21.0, 5.0, 0.125), ("f", 16.0, 0.0, 0.125)]
    assert sum(c.part for c in spike.culprits) == 1.0
    assert trend.tensors == ("d", "c", "a", "b", "e", "f")


def test_no_spike_without_three_finite_steps_before_and_below_the_factor() -> None:
    norms = [1.0, 1.0, 100.0, 1.0, 2.9, 3.1, 1.0]
    trend = analyze(run([{"w": [x]} for x in norms]), spike_factor=3.0)
    # step 2 has 2 steps before it; step 4: median(1, 1, 100, 1) = 1, 2.9 < 3; step 5: median(1,1,100,1,2.9) = 1
    assert [(s.step, s.baseline, s.ratio) for s in trend.spikes] == [(5, 1.0, 3.1)]
    trend = analyze(run([{"w": [x]} for x in norms]), spike_factor=2.0)
    assert [s.step for s in trend.spikes] == [4, 5]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_the_window_counts_dumps_and_a_nonfinite_dump_takes_a_slot(bad: float) -> None:
    mappings = [{"w": [1.0]}, {"w": [2.0]}, {"w": [3.0]}, {"w": [bad, 1.0]}, {"w": [4.0]}, {"w": [100.0]}]
    steps = run(mappings)
    steps = [dataclasses.replace(s, step=10 * s.step + (7 if s.step == 5 else 0)) for s in steps]
    # window 3 before step 57: steps 20, 30 (NaN), 40 -> two finite, no baseline
    assert analyze(steps, window=3).spikes == ()
    # window 4: steps 10, 20, 30 (NaN, left out), 40 -> median(2, 3, 4) = 3
    (spike,) = analyze(steps, window=4).spikes
    assert (spike.step, spike.baseline, spike.ratio) == (57, 3.0, 100.0 / 3.0)
    # window 5: 1, 2, 3, 4 (even count: the mean of the middle two)
    (spike,) = analyze(steps, window=5).spikes
    assert spike.baseline == 2.5


def test_baselines_and_median_rows_are_numpys_median(rng: np.random.Generator) -> None:
    norms = rng.lognormal(size=60)
    finite = rng.random(60) > 0.2
    norms[~finite] = np.nan
    for window in range(1, 9):
        got = baselines(norms, finite, window)
        for i in range(60):
            prior = [norms[j] for j in range(max(0, i - window), i) if finite[j]]
            if len(prior) < 3:
                assert math.isnan(got[i])
            else:
                assert got[i] == np.median(prior), (window, i)
    values = rng.standard_normal((50, 9))
    values[rng.random((50, 9)) < 0.3] = np.nan
    med, count = median_rows(values)
    for row, m, c in zip(values, med, count, strict=True):
        present = row[~np.isnan(row)]
        assert c == len(present)
        assert (math.isnan(m) and c == 0) or m == np.median(present)


def test_a_zero_baseline_makes_any_positive_norm_a_spike_with_ratio_infinity() -> None:
    steps = run([{"w": [0.0, 0.0], "v": [0.0]}] * 3 + [{"w": [0.0, 0.0], "v": [1e-30]}])
    trend = analyze(steps)
    (spike,) = trend.spikes
    assert (spike.step, spike.baseline, spike.ratio) == (3, 0.0, math.inf)
    assert [(c.name, c.baseline_sq, c.part) for c in spike.culprits] == [("v", 0.0, 1.0)]
    doc = json.loads(dumps(trend.to_dict()))
    assert doc["spikes"][0]["ratio"] == "Infinity"
    assert doc["dead"] == ["w"]


# --- non-finite steps ------------------------------------------------------------------------------

def test_planted_nan_step_is_first_nonfinite_never_a_spike_never_in_a_baseline() -> None:
    mappings = [{"a": [1.0], "b": [1.0, 0.0], "c": [0.0]} for _ in range(8)]
    mappings[4] = {"a": [1.0], "b": [np.nan, np.nan], "c": [np.inf]}
    mappings[6] = {"a": [np.nan], "b": [1.0, 0.0], "c": [0.0]}
    trend = analyze(run(mappings), window=3)
    assert trend.first_nonfinite is not None
    assert trend.first_nonfinite.to_dict() == {"step": 4, "tensors": [{"name": "b", "nan": 2, "inf": 0},
                                                                      {"name": "c", "nan": 0, "inf": 1}]}
    assert trend.spikes == ()
    doc = trend.to_dict()
    assert math.isnan(doc["series"]["share"][1][4]) and math.isinf(doc["series"]["norm"][2][4])
    text = dumps(doc)
    assert '"NaN"' in text and "NaN," not in text.replace('"NaN"', "")
    # c is all-zero where finite but not at step 4: not dead
    assert trend.dead == ()
    # the clip summary is over the 6 finite steps
    assert trend.clip_summary.p50 == math.sqrt(2.0)


def test_a_norm_that_overflows_is_no_nonfinite_step_but_left_out_as_one() -> None:
    # L1 of two 1e308 is inf without a NaN/Inf value: not first_nonfinite, yet no spike, baseline or clip step
    mappings = [{"w": [1.0]}] * 3 + [{"w": [1e308, 1e308]}] + [{"w": [1.0]}, {"w": [4.0]}]
    steps = run(mappings, norm_type=1)
    assert steps[3].total.norm == math.inf and steps[3].total.nonfinite == 0
    trend = analyze(steps, norm_type=1, window=4)
    assert trend.first_nonfinite is None
    assert [(s.step, s.baseline) for s in trend.spikes] == [(5, 1.0)]
    assert trend.clip_summary.max == 4.0


def test_no_nonfinite_step_is_null() -> None:
    trend = analyze(run([{"a": [1.0]}] * 2))
    assert trend.first_nonfinite is None and trend.to_dict()["first_nonfinite"] is None


# --- clipping --------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_clip_fraction_and_percentiles_against_numpy(rng: np.random.Generator, eps: float) -> None:
    norms = rng.lognormal(sigma=1.0, size=37)
    norms[5] = 1.0  # clipped with torch's eps, not with optax's
    mappings = [{"w": [x]} for x in norms] + [{"w": [np.inf]}]
    trend = analyze(run(mappings, max_norm=1.0, eps=eps), max_norm=1.0, eps=eps)
    cs = trend.clip_summary
    expected = np.count_nonzero(norms + eps > 1.0) / len(norms)
    assert cs.fraction_clipped == expected
    assert (cs.p50, cs.p90, cs.p99) == tuple(np.percentile(norms, [50, 90, 99]))
    assert cs.max == norms.max()
    assert cs.target == 0.1


def test_max_norm_for_target_exact_values() -> None:
    norms = [float(x) for x in range(10, 0, -1)]
    assert max_norm_for_target(norms, 0.1, 0.0) == 9.0  # one step (10) may be clipped
    assert max_norm_for_target(norms, 0.1, 1e-6) == 9.0 + 1e-6
    assert max_norm_for_target(norms, 0.0, 0.0) == 10.0
    assert max_norm_for_target(norms, 0.19, 0.0) == 9.0
    assert max_norm_for_target(norms, 0.2, 0.0) == 8.0
    assert max_norm_for_target(norms, 1.0, 0.0) == 0.0
    assert max_norm_for_target([3.0, 3.0, 3.0, 1.0], 0.5, 0.0) == 3.0  # ties: all three unclipped at 3
    assert math.isnan(max_norm_for_target([], 0.1, 0.0))
    with pytest.raises(ValueError, match="between 0 and 1"):
        max_norm_for_target(norms, 1.5, 0.0)
    # 0.29 * 100 is 28.999999999999996 in float64, yet 29 / 100 <= 0.29
    assert allowed_clipped(100, 0.29) == 29 and 29 / 100 <= 0.29
    assert allowed_clipped(10, 0.7) == 7 and allowed_clipped(3, 1 / 3) == 1 and allowed_clipped(0, 0.5) == 0


@pytest.mark.parametrize("eps", [1e-6, 0.0, 0.25])
@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 1 / 3, 0.5, 0.9])
def test_max_norm_for_target_is_the_boundary(rng: np.random.Generator, eps: float, target: float) -> None:
    norms = np.concatenate([rng.lognormal(size=27), [1.5, 1.5, 1.5]])  # ties too
    m = max_norm_for_target(norms, target, eps)

    def fraction(max_norm: float) -> float:
        return sum(clip_coef(float(x), max_norm, eps) < 1.0 for x in norms) / len(norms)

    assert fraction(m) <= target
    assert fraction(float(np.nextafter(m, 0.0))) > target
    # and as `norms` computes the clip of each step, at that max_norm
    steps = [step_of(i, {"w": [x]}, max_norm=m, eps=eps) for i, x in enumerate(norms)]
    assert analyze(steps, max_norm=m, eps=eps, clip_target=target).clip_summary.fraction_clipped <= target


# --- dead, missing, drift ---------------------------------------------------------------------------

def test_dead_and_missing() -> None:
    mappings = [
        {"blk.0.w": [1.0], "blk.0.dead": [0.0, 0.0], "blk.1.w": [0.0], "expert.3": [2.0], "empty": np.zeros(0)},
        {"blk.0.w": [1.0], "blk.0.dead": [0.0, 0.0], "blk.1.w": [1.0], "empty": np.zeros(0)},
        {"blk.0.w": [1.0], "blk.1.w": [0.0], "empty": np.zeros(0)},
        {"blk.0.w": [1.0], "blk.0.dead": [0.0, 0.0], "blk.1.w": [0.0], "empty": np.zeros(0), "late": [0.0]},
    ]
    trend = analyze(run(mappings))
    assert trend.dead == ("blk.0.dead", "late")
    assert [m.to_dict() for m in trend.missing] == [{"name": "blk.0.dead", "steps": [2]},
                                                    {"name": "expert.3", "steps": [1, 2, 3]},
                                                    {"name": "late", "steps": [0, 1, 2]}]
    doc = trend.to_dict()
    r = doc["tensors"].index("expert.3")
    assert doc["series"]["norm"][r] == [2.0, None, None, None]
    grouped = analyze(run(mappings, group_by=2), group_by=2)
    assert grouped.tensors == ("blk.0", "blk.1", "expert.3", "empty", "late")
    assert grouped.dead == ("blk.0.dead", "late")  # tensors, not groups
    assert [m.name for m in grouped.missing] == ["expert.3", "late"]


def test_drift_between_the_first_and_last_quarter_of_finite_steps() -> None:
    early = {"p": [1.0], "q": [1.0], "r": [1.0, 1.0]}  # shares 1/4, 1/4, 1/2
    late = {"p": [1.0, 1.0, 1.0], "q": [1.0], "r": [0.0]}  # 3/4, 1/4, 0
    middle = {"p": [5.0], "q": [0.0], "r": [0.0]}
    mappings = [early, early, middle, {"p": [np.nan], "q": [1.0], "r": [1.0]}, middle, middle, middle, late, late]
    trend = analyze(run(mappings))  # 8 finite steps: the first 2 and the last 2
    assert [d.to_dict() for d in trend.drift] == [{"name": "p", "first": 0.25, "last": 0.75},
                                                  {"name": "r", "first": 0.5, "last": 0.0},
                                                  {"name": "q", "first": 0.25, "last": 0.25}]


def test_drift_keeps_the_ten_largest_changes_with_medians_over_where_present(rng: np.random.Generator) -> None:
    names = [f"t{i}" for i in range(14)]
    mappings = []
    for i in range(11):  # ceil(11 / 4) = 3
        m = {n: rng.standard_normal(3) for n in names}
        if i in (1, 9):
            del m["t0"]
        mappings.append(m)
    trend = analyze(run(mappings))
    shares = {n: [] for n in names}
    for s in trend.steps:
        for n, share in zip(s.names, s.share, strict=True):
            shares[n].append((s.step, share))
    expected = []
    for n in names:
        first = np.median([x for step, x in shares[n] if step in (0, 1, 2)])
        last = np.median([x for step, x in shares[n] if step in (8, 9, 10)])
        expected.append((n, float(first), float(last)))
    expected.sort(key=lambda e: -abs(e[2] - e[1]))
    assert [(d.name, d.first, d.last) for d in trend.drift] == expected[:10]


def test_too_few_finite_steps_for_anything() -> None:
    trend = analyze(run([{"a": [np.nan]}, {"a": [1.0]}]))
    cs = trend.clip_summary
    assert trend.drift == () and trend.spikes == ()
    assert cs.fraction_clipped == 1.0 and cs.max_norm_for_target == 1.0 + 1e-6  # torch: 1 + eps > 1 is clipped
    nothing = analyze(run([{"a": [np.nan]}]))
    assert all(math.isnan(x) for x in (nothing.clip_summary.fraction_clipped, nothing.clip_summary.p50,
                                       nothing.clip_summary.max_norm_for_target))


# --- the JSON shape and CSV ---------------------------------------------------------------------------

def test_json_shape_is_issue_9s() -> None:
    mappings = [{"a": [1.0], "b": [1.0]}] * 4 + [{"a": [10.0], "b": [1.0]}]
    doc = json.loads(dumps(analyze(run(mappings, max_norm=2.0), max_norm=2.0, norm_type=2, window=20,
                                   spike_factor=3.0).to_dict()))
    assert list(doc) == ["schema", "norm_type", "max_norm", "eps", "group_by", "window", "spike_factor", "steps",
                         "tensors", "series", "spikes", "first_nonfinite", "clip_summary", "dead", "missing", "drift"]
    assert doc["schema"] == TREND_SCHEMA == "gradinspect.trend/1"
    assert (doc["norm_type"], doc["max_norm"], doc["eps"], doc["group_by"], doc["window"], doc["spike_factor"]) == (
        2, 2.0, 1e-6, None, 20, 3.0)
    step = doc["steps"][0]
    assert list(step) == ["step", "sources", "total", "clip"]
    assert list(step["total"]) == ["l1", "l2", "linf", "norm", "sq", "nonfinite", "nan", "inf", "tensors", "numel"]
    assert step["sources"] == ["step_0"] and step["total"]["tensors"] == 2 and step["total"]["numel"] == 2
    assert list(step["clip"]) == ["coef", "clipped"]
    assert list(doc["series"]) == ["norm", "share"] and len(doc["series"]["norm"][0]) == 5
    assert list(doc["spikes"][0]) == ["step", "norm", "baseline", "ratio", "culprits"]
    assert doc["spikes"][0]["culprits"] == [{"name": "a", "sq": 100.0, "baseline_sq": 1.0, "part": 1.0}]
    assert list(doc["clip_summary"]) == ["fraction_clipped", "p50", "p90", "p99", "max", "target",
                                         "max_norm_for_target"]
    # 5 finite steps: the first 2 and the last 2 (shares 1/2 and 100/101)
    assert doc["drift"][0] == {"name": "a", "first": 0.5, "last": (0.5 + 100.0 / 101.0) / 2}


def test_csv_rows_long_format() -> None:
    trend = analyze(run([{"a": [3.0, 4.0], "b": [0.0]}, {"a": [np.nan]}]))
    assert TREND_CSV_COLUMNS == ("step", "name", "l1", "l2", "linf", "norm", "sq", "share", "nonfinite")
    assert list(trend.csv_rows()) == [
        (0, "a", "7.0", "5.0", "4.0", "5.0", "25.0", "1.0", 0),
        (0, "b", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", 0),
        (1, "a", "NaN", "NaN", "NaN", "NaN", "NaN", "NaN", 1),
    ]


# --- speed --------------------------------------------------------------------------------------------

def test_a_thousand_steps_of_two_hundred_tensors(rng: np.random.Generator) -> None:
    names = tuple(f"layers.{i // 4}.w{i % 4}" for i in range(200))
    steps = []
    for k in range(1000):
        sq = rng.lognormal(size=200) * (50.0 if k % 97 == 96 else 1.0)
        total = float(sq.sum())
        norm = math.sqrt(total)
        vals = tuple(sq.tolist())
        roots = tuple(np.sqrt(sq).tolist())
        steps.append(StepResult(
            k, (f"step_{k}.safetensors",), StepTotals(norm, norm, norm, norm, total, 0, 0, 200, 200 * 1000),
            clip_coef(norm, 20.0), clip_coef(norm, 20.0) < 1, names, roots, roots, roots, roots, vals,
            tuple((sq / total).tolist()), (0,) * 200, names, (0,) * 200, (0,) * 200, (False,) * 200))
    trend = analyze(steps, max_norm=20.0)  # its speed: benchmarks/bench_trend.py (a script, not a timed test)
    assert {s.step for s in trend.spikes} >= {k for k in range(20, 1000) if k % 97 == 96}
    assert len(trend.tensors) == 200
    s = series(steps)
    assert s.norm.shape == (200, 1000) and s.present.all()


def test_percentiles_are_numpys_bit_for_bit(rng: np.random.Generator) -> None:
    """trend.percentiles against np.percentile (its default, linear), == for every size and quantile."""
    from gradinspect.trend import percentiles

    qs = (0, 1, 12.5, 33.3, 50, 66.7, 90, 99, 99.9, 100)
    for n in [*range(1, 40), 97, 1000, 4097]:
        for scale in (1e-300, 1.0, 1e300):
            values = np.abs(rng.standard_normal(n)) * scale
            values[rng.integers(0, n, n // 3)] = values[0]  # ties
            assert percentiles(values, qs) == tuple(np.percentile(values, qs).tolist()), (n, scale)
