"""Steps read from the cache keep their float columns as one array (``trend.packed_step``), and a trend
report makes its series only when they are read: both must be, to every reader, the step and the report of
a plain run.  Also the byte check of spelled cells (``trend._well_spelled``) on its edge cases."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect.cache as cache_mod
from gradinspect.api import compute_norms
from gradinspect.cache import Cache
from gradinspect.runs import trend
from gradinspect.trend import (
    FLOAT_COLUMNS,
    SPELLING_WIDTH,
    StepResult,
    StepTotals,
    _well_spelled,
    analyze,
    column_array,
    evaluate,
    packed_step,
    spell_cells,
)


def _bits(values: tuple[float, ...]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _plain_step(rng: np.random.Generator, step: int = 3, bad: bool = False) -> StepResult:
    """A step of 9 tensors (one all-zero); with ``bad``, the last holds a NaN and an Inf (NaN equals nothing:
    such steps are compared bit for bit)."""
    arrays = {f"w{i}": rng.standard_normal(int(rng.integers(1, 50))).astype(np.float32) for i in range(7)}
    arrays["zero"] = np.zeros(4, np.float32)
    arrays["last"] = np.array([1.0, np.nan, np.inf] if bad else [1.0, 2.0, 3.0], np.float32)
    return StepResult.from_reports(step, compute_norms(arrays, sort="none", norm_type=3.0), sources=("s",))


def _packed_copy(step: StepResult) -> StepResult:
    floats = np.array([getattr(step, c) for c in FLOAT_COLUMNS], dtype=np.float64)
    others = {f.name: getattr(step, f.name) for f in dataclasses.fields(StepResult) if f.name not in FLOAT_COLUMNS}
    return packed_step(floats, **others)


def test_a_packed_step_is_the_step_to_every_reader(rng: np.random.Generator) -> None:
    plain = _plain_step(rng)
    packed = _packed_copy(plain)
    assert "l1" not in vars(packed)  # not made until read
    for step in (_plain_step(rng, bad=True), plain):
        for c in FLOAT_COLUMNS:
            arr = column_array(_packed_copy(step), c)
            assert arr.dtype == np.float64 and not arr.flags.writeable
            assert _bits(tuple(arr.tolist())) == _bits(getattr(step, c))  # bit for bit, NaN and Inf included
            assert _bits(getattr(_packed_copy(step), c)) == _bits(getattr(step, c))
    assert packed == plain and plain == packed
    assert repr(packed) == repr(plain)
    for c in FLOAT_COLUMNS:  # now made: tuples of floats, the same bits
        got = getattr(packed, c)
        assert type(got) is tuple and all(type(x) is float for x in got)
        assert _bits(got) == _bits(getattr(plain, c))
    assert packed.norm is packed.norm  # made once


def test_a_packed_step_pickles_copies_and_replaces(rng: np.random.Generator) -> None:
    plain = _plain_step(rng)
    for step in (_packed_copy(plain), _packed_copy(plain)):
        back = pickle.loads(pickle.dumps(step))
        assert back == plain and _bits(back.share) == _bits(plain.share)
        assert copy.copy(step) == plain and copy.deepcopy(step) == plain
        moved = dataclasses.replace(step, step=9)
        assert moved.step == 9 and _bits(moved.sq) == _bits(plain.sq) and dataclasses.replace(moved, step=3) == plain
        with pytest.raises(dataclasses.FrozenInstanceError):
            step.l1 = (1.0,)  # type: ignore[misc]
        with pytest.raises(ValueError, match="read-only"):
            column_array(step, "l2")[0] = 1.0
        _ = step.l1  # the second one is read after its tuples are made


def test_packed_step_checks_what_the_constructor_checks(rng: np.random.Generator) -> None:
    plain = _plain_step(rng)
    floats = np.array([getattr(plain, c) for c in FLOAT_COLUMNS])
    others = {f.name: getattr(plain, f.name) for f in dataclasses.fields(StepResult) if f.name not in FLOAT_COLUMNS}
    with pytest.raises(ValueError, match="different lengths"):
        packed_step(floats[:, 1:], **others)
    with pytest.raises(ValueError, match="different lengths"):
        packed_step(floats[1:], **others)
    with pytest.raises(ValueError, match="float64"):
        packed_step(floats.astype(np.float32), **others)
    with pytest.raises(TypeError, match="fields"):
        packed_step(floats, **{k: v for k, v in others.items() if k != "names"})
    with pytest.raises(TypeError, match="fields"):
        packed_step(floats, **others, l1=plain.l1)
    with pytest.raises(ValueError, match="a name twice"):
        packed_step(floats, **{**others, "names": ("a",) * len(plain.names)})


def test_the_cache_serves_packed_steps_equal_to_the_computed_ones(tmp_path: Path, rng: np.random.Generator,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)  # files just written are cached
    run = tmp_path / "run"
    run.mkdir()
    for s in range(6):
        arrays = {f"layer{i}.w": rng.standard_normal(30 + i).astype(np.float32) * (1 + s) for i in range(5)}
        if s == 4:
            arrays["layer1.w"][3] = np.nan
        save_file(arrays, str(run / f"step_{s}.safetensors"), metadata={"step": str(s)})
    pattern = str(run / "step_*.safetensors")
    plain = trend(pattern, cache=None, norm_type=3.0)
    cache = Cache(tmp_path / "cache")
    cold = trend(pattern, cache=cache, norm_type=3.0)
    warm_cache = Cache(tmp_path / "cache")
    warm = trend(pattern, cache=warm_cache, norm_type=3.0)
    assert warm_cache.step_hits == 6
    assert all("_packed_floats" in vars(s) for s in warm.steps)
    for a, b, c in zip(plain.steps, cold.steps, warm.steps, strict=True):
        assert a.step == 4 or a == b == c  # NaN equals nothing: step 4 is compared by its bits
        for col in FLOAT_COLUMNS:
            assert _bits(getattr(a, col)) == _bits(getattr(c, col))
    assert _same_with_nan(warm.to_dict(), plain.to_dict())
    for i in range(5):
        assert _bits(warm.series_norm[i]) == _bits(plain.series_norm[i])


def _same_with_nan(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_with_nan(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_with_nan(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_reports_series_are_made_when_read_and_are_the_steps_values(rng: np.random.Generator) -> None:
    plain_steps = [_plain_step(rng, step=k, bad=k == 4) for k in range(5)]
    for steps in (plain_steps, [_packed_copy(s) for s in plain_steps]):
        report = analyze(steps, norm_type=3.0)
        assert "Deferred" in type(vars(report)["series_norm"]).__name__  # not made by analyze
        checked = evaluate(report, ("spike", "nonfinite"), 0.5)
        assert "Deferred" in type(vars(checked)["series_share"]).__name__  # nor by evaluate
        assert checked.findings and checked.rules == ("spike", "nonfinite", "clip_fraction")
        again = pickle.loads(pickle.dumps(checked))  # pickled before the series are made
        for r in (report, checked, again):
            assert len(r.series_norm) == len(plain_steps[0].names)
            for i in range(len(plain_steps[0].names)):
                assert _bits(r.series_norm[i]) == _bits(tuple(s.norm[i] for s in plain_steps))
                assert _bits(r.series_share[i]) == _bits(tuple(s.share[i] for s in plain_steps))
        assert type(vars(report)["series_norm"]) is tuple  # made once, then kept
        assert math.isnan(report.series_share[-1][4]) and not math.isnan(report.series_share[-1][3])  # NaN at step 4


def test_the_cell_check_takes_every_json_number_and_refuses_what_could_break_the_document() -> None:
    good = spell_cells(((-2.2250738585072014e-308, 1.0, math.nan, math.inf, -math.inf, 5e-324),))
    assert good[0, 0].all()  # a cell filled to its last byte, no NUL
    assert _well_spelled(good)

    def bad(cell: bytes) -> bool:
        cells = good.copy()
        cells[0, 1] = np.frombuffer(cell.ljust(SPELLING_WIDTH, b"\0")[:SPELLING_WIDTH], np.uint8)
        return not _well_spelled(cells)

    for cell in (b"", b"\0" + b"1", b"1\0" + b"2", b"1" * 22 + b"\0" + b"1", b"1,2", b'"NaN', b"NaN", b'"Inf"',
                 b"1 2", b"\xff", b'"-Infinity"x', b"]"):
        assert bad(cell), cell
    for cell in (b"1" * 23, b"1" * 24, b"-1.5e+300", b'"NaN"', b"0"):
        assert not bad(cell), cell
    assert not _well_spelled(np.zeros((2, 3, 4, SPELLING_WIDTH), np.uint8))


def test_csv_rows_spell_packed_and_hand_made_steps_as_floats(rng: np.random.Generator) -> None:
    """The CSV of a packed step is that of the plain step (its tuples are not made for it); a step made by hand
    with ints is spelled as floats (it was a TypeError), as its JSON numbers are the same values."""
    plain = [_plain_step(rng, step=k, bad=k == 1) for k in range(3)]
    want = list(analyze(plain).csv_rows())
    packed = [_packed_copy(s) for s in plain]
    assert list(analyze(packed).csv_rows()) == want
    assert all("l1" not in vars(s) for s in packed)
    assert next(r[2] for r in want if r[1] == "last" and r[0] == 1) == "NaN"
    names = ("a", "b")
    by_hand = StepResult(1, ("s",), StepTotals(7.0, 5.0, 4.0, 5.0, 25.0, 0, 0, 2, 2), 1.0, False, names, (3, 4), (3, 4),
                         (3, 4), (3, 4), (9, 16), (0.36, 0.64), (0, 0), names, (0, 0), (0, 0), (False, False))
    assert list(analyze([by_hand]).csv_rows()) == [
        (1, "a", "3.0", "3.0", "3.0", "3.0", "9.0", "0.36", 0), (1, "b", "4.0", "4.0", "4.0", "4.0", "16.0", "0.64", 0)]
    raw = list(analyze([by_hand]).csv_rows(spelled=False))
    assert raw[0][2:8] == (3, 3, 3, 3, 9, 0.36)


def test_a_run_of_packed_and_plain_steps_is_analysed_as_the_plain_run(rng: np.random.Generator) -> None:
    """New dumps after a cached run: some steps packed (from the cache), some just computed, in one group of rows.
    The series are those of the plain run, bit for bit, and the packed steps' tuples are not made for it."""
    plain = [_plain_step(rng, step=k, bad=k == 2) for k in range(6)]
    mixed = [_packed_copy(s) if s.step % 2 else s for s in plain]
    want, got = analyze(plain, norm_type=3.0), analyze(mixed, norm_type=3.0)
    for a, b in ((want.series_norm, got.series_norm), (want.series_share, got.series_share)):
        assert len(a) == len(b) and all(_bits(x) == _bits(y) for x, y in zip(a, b, strict=True))
    assert _same_with_nan(got.to_dict(), want.to_dict())
    assert all("sq" not in vars(s) for s in mixed if s.step % 2)


def test_to_dict_without_series_leaves_them_unmade(rng: np.random.Generator) -> None:
    report = analyze([_plain_step(rng, step=k) for k in range(3)])
    doc = report.to_dict(series=False)
    assert doc["series"] is None and "Deferred" in type(vars(report)["series_norm"]).__name__
    full = report.to_dict()
    assert {k: v for k, v in full.items() if k != "series"} == {k: v for k, v in doc.items() if k != "series"}
    assert full["series"]["norm"] == [list(r) for r in report.series_norm]
