"""A trend document's series laid out from spelled cells (``formats.json.trend_dumps``) is the very text
``json.dumps`` writes for the same numbers: checked against Python's own encoder, for every kind of float,
for steps spelled here and for steps read back from the cache."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import gradinspect.cache as cache_mod
from gradinspect.cache import Cache
from gradinspect.cli import cli
from gradinspect.clip import clip_coef
from gradinspect.formats import json as json_format
from gradinspect.runs import trend
from gradinspect.trend import (
    SPELLING_WIDTH,
    StepResult,
    StepTotals,
    analyze,
    evaluate,
    series_spellings,
    spell_cells,
    with_spellings,
)

SPECIAL = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308,
           1e16, 1e-5, 0.0001, 123456789.0, 1.0, 0.1, math.inf, -math.inf, math.nan]


def _oracle(x: float) -> str:
    """How strict JSON spells a float: Python's encoder, its non-finite spellings as strings."""
    text = json.dumps(x, allow_nan=True)
    return {"NaN": '"NaN"', "Infinity": '"Infinity"', "-Infinity": '"-Infinity"'}.get(text, text)


def _floats(rng: np.random.Generator, n: int) -> list[float]:
    """Any doubles: random bit patterns (NaNs with payloads, subnormals, both zeros) and the special ones."""
    bits = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    return [*SPECIAL, *bits.view(np.float64).tolist()]


def test_spell_cells_is_the_json_spelling_of_every_kind_of_float(rng: np.random.Generator) -> None:
    values = _floats(rng, 200_000)
    cells = spell_cells((values,))
    assert cells.shape == (1, len(values), SPELLING_WIDTH) and cells.dtype == np.uint8
    got = [bytes(c).rstrip(b"\0").decode("ascii") for c in cells[0]]
    assert got == [_oracle(x) for x in values]
    assert not any(b"\0" in bytes(c).rstrip(b"\0") for c in cells[0])  # padding only at the end
    with pytest.raises(TypeError, match="float"):
        spell_cells(((1, 2),))  # an int is no float: spelled differently by json


def _step(k: int, names: tuple[str, ...], norm: list[float], share: list[float]) -> StepResult:
    n = len(names)
    sq = [x * x for x in norm]
    total = math.fsum(sq)
    g = math.sqrt(total) if math.isfinite(total) else total
    return StepResult(k, (f"s{k}",), StepTotals(g, g, g, g, total, 0, 0, n, n), clip_coef(g, 1.0),
                      clip_coef(g, 1.0) < 1, names, tuple(norm), tuple(norm), tuple(norm), tuple(norm), tuple(sq),
                      tuple(share), (0,) * n, names, (0,) * n, (0,) * n, (False,) * n)


def _plain(report: object) -> str:
    return json_format.dumps(report.to_dict())  # type: ignore[attr-defined]


@pytest.mark.parametrize("rows", [0, 1, 7, 300])
def test_the_laid_out_series_is_the_plain_encoding(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
                                                  rows: int) -> None:
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)  # one line, as for a long run
    names = tuple(f"layer.{i}.w" for i in range(rows))
    pool = _floats(rng, 4000)
    steps = [_step(k, names, [pool[int(i)] for i in rng.integers(0, len(pool), rows)],
                   [pool[int(i)] for i in rng.integers(0, len(pool), rows)]) for k in range(12)]
    report = analyze(steps)
    spelled = series_spellings(report)
    assert spelled is not None and spelled[0].shape == (rows, 12, SPELLING_WIDTH)
    if rows:  # evaluate() changes only the findings: its report is laid out the same, without checking again
        ruled = evaluate(report, ["spike", "nonfinite"], 0.5)
        assert json_format.trend_dumps(ruled) == _plain(ruled)
        again = series_spellings(ruled)
        assert again is not None and all(np.array_equal(a, b) for a, b in zip(again, spelled, strict=True))
    text = json_format.trend_dumps(report)
    assert text == _plain(report)
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))  # strict: no bare NaN
    for r, row in enumerate(doc["series"]["norm"]):
        for st, x in zip(steps, row, strict=True):
            assert x == _oracle(st.norm[r]).strip('"') if isinstance(x, str) else x == st.norm[r]
            assert not isinstance(x, float) or struct.pack("<d", x) == struct.pack("<d", st.norm[r])  # -0.0


def test_a_report_whose_series_are_not_its_steps_is_encoded_from_the_series(rng: np.random.Generator,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)
    names = ("a", "b", "c")
    steps = [_step(k, names, rng.random(3).tolist(), rng.random(3).tolist()) for k in range(5)]
    report = analyze(steps)
    assert series_spellings(report) is not None
    norm = tuple(tuple(x * 2 for x in row) for row in report.series_norm)
    for changed in (dataclasses.replace(report, series_norm=norm),
                    dataclasses.replace(report, series_share=report.series_share[:2]),
                    dataclasses.replace(report, series_norm=tuple(map(list, report.series_norm))),  # type: ignore
                    dataclasses.replace(report, tensors=("a", "b", "x"))):
        assert series_spellings(changed) is None
        assert json_format.trend_dumps(changed) == _plain(changed)
    nan_rows = tuple((math.nan, *row[1:]) for row in report.series_norm)  # a NaN equals nothing
    assert series_spellings(dataclasses.replace(report, series_norm=nan_rows)) is None


def test_rows_missing_from_some_steps_are_encoded_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)
    steps = [_step(0, ("a", "b"), [1.0, 2.0], [0.2, 0.8]), _step(1, ("a",), [math.nan], [math.nan]),
             _step(2, ("b", "a"), [3.0, 0.5], [0.9, 0.1])]
    report = analyze(steps)
    assert series_spellings(report) is None and report.series_norm[1][1] is None
    assert json_format.trend_dumps(report) == _plain(report)


def test_with_spellings_checks_the_shape() -> None:
    st = _step(0, ("a", "b"), [1.0, 2.0], [0.2, 0.8])
    with pytest.raises(ValueError, match="spellings of shape"):
        with_spellings(st, np.zeros((2, 3, SPELLING_WIDTH), np.uint8))
    assert with_spellings(st, spell_cells((st.norm, st.share))).spellings.shape == (2, 2, SPELLING_WIDTH)


def test_a_cached_run_writes_the_text_of_an_uncached_one(tmp_path: Path, rng: np.random.Generator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps read from step entries carry the spellings stored with them: laid out, the same bytes."""
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)
    run = tmp_path / "run"
    run.mkdir()
    for k in range(6):
        grads = {f"m.{i}.w": (rng.standard_normal(5 + i) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
                 for i in range(40)}
        grads["m.0.w"][:] = 0.0
        if k == 3:
            grads["m.1.w"][0] = np.nan
        if k == 4:
            grads["m.2.w"][1] = np.inf
        save_file(grads, str(run / f"step_{k}.safetensors"), metadata={"step": str(k)})
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)  # store files written just now
    pattern = str(run / "step_*.safetensors")
    plain = _plain(trend(pattern))
    cache = Cache(tmp_path / "c")
    cold = trend(pattern, cache=cache)
    assert cache.step_misses == 6 and cache.stored >= 6
    warm_cache = Cache(tmp_path / "c")
    warm = trend(pattern, cache=warm_cache)
    assert warm_cache.step_hits == 6
    assert "spellings" in vars(warm.steps[0])  # from the entry, not spelled again
    assert [repr(s) for s in warm.steps] == [repr(s) for s in cold.steps]  # every field, its type too (NaN, bool)
    assert warm.steps[0].tensor_zero[list(warm.steps[0].tensor_names).index("m.0.w")] is True
    assert warm.steps[3].total.nan == 1 and sum(warm.steps[3].tensor_nan) == 1
    for report in (cold, warm):
        assert series_spellings(report) is not None
        assert json_format.trend_dumps(report) == plain


def test_the_cli_writes_a_long_run_the_same_cold_warm_and_without_cache(tmp_path: Path, rng: np.random.Generator,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run long enough for one-line JSON (60 steps x 20 tensors), with a NaN step, an Inf step and a tensor
    missing from one step: every run of it prints the same bytes, with the norms of an independent oracle."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)
    run = tmp_path / "run"
    run.mkdir()
    steps = []
    for k in range(60):
        grads = {f"block.{i}.w": rng.standard_normal(3 + i).astype(np.float32) * (30.0 if k == 41 else 1.0)
                 for i in range(20) if not (k == 7 and i == 5)}
        if k == 50:
            grads["block.3.w"][0] = np.nan
        if k == 52:
            grads["block.4.w"][1] = -np.inf
        save_file(grads, str(run / f"step_{k:03d}.safetensors"))
        steps.append(grads)
    args = ["trend", str(run / "step_*.safetensors"), "-f", "json", "-q"]
    runner = CliRunner()
    outs = [runner.invoke(cli, [*args, *extra], catch_exceptions=False)
            for extra in (["--no-cache"], ["--cache-dir", str(tmp_path / "c")], ["--cache-dir", str(tmp_path / "c")])]
    assert [r.exit_code for r in outs] == [0, 0, 0]
    assert outs[0].stdout == outs[1].stdout == outs[2].stdout
    text = outs[0].stdout
    assert text.count("\n") == 1  # one line, as a long run is written
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    row = doc["tensors"].index
    assert doc["series"]["norm"][row("block.3.w")][50] == "NaN"
    assert doc["series"]["norm"][row("block.5.w")][7] is None
    assert doc["missing"] == [{"name": "block.5.w", "steps": [7]}]
    assert 41 in [s["step"] for s in doc["spikes"]]
    # without the missing tensor every step has the same rows: the series are laid out from the spellings
    exclude = [*args, "--exclude", "block.5.w"]
    cold, warm = (runner.invoke(cli, [*exclude, "--cache-dir", str(tmp_path / "c")], catch_exceptions=False)
                  for _ in range(2))
    plain = runner.invoke(cli, [*exclude, "--no-cache"], catch_exceptions=False)
    assert cold.stdout == warm.stdout == plain.stdout and cold.stdout.count("\n") == 1
    doc = json.loads(plain.stdout)
    assert doc["series"]["norm"][doc["tensors"].index("block.4.w")][52] == "Infinity" and doc["missing"] == []
    for name, norms in zip(doc["tensors"], doc["series"]["norm"], strict=True):
        for k, got in enumerate(norms):
            x = steps[k][name].astype(np.float64)
            if np.isfinite(x).all():
                want = math.sqrt(math.fsum((x * x).tolist()))
                assert abs(got - want) <= 1e-12 * want
