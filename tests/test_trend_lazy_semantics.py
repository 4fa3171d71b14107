"""What a library user can do with a packed step (``trend.packed_step``) and a trend report whose series
are made when first read must be what they could do with a plain step and report: pickle at every protocol
(read in another process too), copy (a step with a NaN equals its copy), ask ``hasattr``, read from threads at
once, and not change a frozen value through an array (theirs, or a copy's)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gradinspect.api import compute_norms
from gradinspect.formats import json as json_format
from gradinspect.trend import (
    FLOAT_COLUMNS,
    StepResult,
    TrendReport,
    analyze,
    column_array,
    evaluate,
    packed_step,
    series,
)


def _bits(values: tuple[float | None, ...]) -> bytes:
    return struct.pack(f"<{len(values)}d", *values)


def _plain_step(rng: np.random.Generator, step: int, bad: bool = False) -> StepResult:
    arrays = {f"w{i}": rng.standard_normal(int(rng.integers(1, 30))).astype(np.float32) for i in range(5)}
    arrays["last"] = np.array([1.0, np.nan, np.inf] if bad else [1.0, 2.0, 3.0], np.float32)
    return StepResult.from_reports(step, compute_norms(arrays, sort="none"), sources=(f"s{step}",))


def _others(step: StepResult) -> dict[str, object]:
    return {f.name: getattr(step, f.name) for f in dataclasses.fields(StepResult) if f.name not in FLOAT_COLUMNS}


def _packed_copy(step: StepResult) -> StepResult:
    return packed_step(np.array([getattr(step, c) for c in FLOAT_COLUMNS], dtype=np.float64), **_others(step))


def _steps(rng: np.random.Generator) -> list[StepResult]:
    return [_plain_step(rng, k, bad=k == 2) for k in range(5)]


def _check_series(report: TrendReport, steps: list[StepResult]) -> None:
    """The report's series are the steps' values, bit for bit (NaN included)."""
    assert len(report.series_norm) == len(report.series_share) == len(steps[0].names)
    for i in range(len(steps[0].names)):
        assert _bits(report.series_norm[i]) == _bits(tuple(s.norm[i] for s in steps))
        assert _bits(report.series_share[i]) == _bits(tuple(s.share[i] for s in steps))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("packed", [False, True])
def test_a_report_whose_series_are_not_made_pickles_at_every_protocol(rng: np.random.Generator, protocol: int,
                                                                      packed: bool) -> None:
    steps = _steps(rng)
    report = evaluate(analyze([_packed_copy(s) for s in steps] if packed else steps), ("nonfinite",))
    back = pickle.loads(pickle.dumps(report, protocol=protocol))
    _check_series(back, steps)
    assert back.findings == report.findings and [s.step for s in back.steps] == [s.step for s in steps]
    _check_series(report, steps)


def test_a_report_pickled_here_is_read_in_another_process(rng: np.random.Generator, tmp_path: Path) -> None:
    steps = _steps(rng)
    path = tmp_path / "report.pickle"
    for protocol in (0, pickle.HIGHEST_PROTOCOL):
        path.write_bytes(pickle.dumps(analyze([_packed_copy(s) for s in steps]), protocol=protocol))
        code = ("import pickle, struct, sys; r = pickle.load(open(sys.argv[1], 'rb')); "
                "print(b''.join(struct.pack(f'<{len(x)}d', *x) for x in (*r.series_norm, *r.series_share)).hex())")
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        want = b"".join(_bits(tuple(getattr(s, c)[i] for s in steps))
                        for c in ("norm", "share") for i in range(len(steps[0].names)))
        assert bytes.fromhex(out.stdout.strip()) == want


def _round_trips() -> list[Callable[[StepResult], StepResult]]:
    def pickled(protocol: int) -> Callable[[StepResult], StepResult]:
        return lambda s: pickle.loads(pickle.dumps(s, protocol=protocol))  # type: ignore[no-any-return]
    return [copy.copy, copy.deepcopy, *(pickled(p) for p in range(pickle.HIGHEST_PROTOCOL + 1))]


@pytest.mark.parametrize("trip", _round_trips())
def test_a_packed_steps_array_stays_read_only_through_copies_and_pickles(
        rng: np.random.Generator, trip: Callable[[StepResult], StepResult]) -> None:
    plain = _plain_step(rng, 3)
    step = trip(_packed_copy(plain))
    for c in FLOAT_COLUMNS:
        with pytest.raises(ValueError, match="read-only"):
            column_array(step, c)[0] = 123.0
    assert step == plain and all(_bits(getattr(step, c)) == _bits(getattr(plain, c)) for c in FLOAT_COLUMNS)


def test_a_packed_step_does_not_follow_the_array_it_was_made_of(rng: np.random.Generator) -> None:
    plain = _plain_step(rng, 3)
    floats = np.array([getattr(plain, c) for c in FLOAT_COLUMNS], dtype=np.float64)
    step = packed_step(floats, **_others(plain))
    first = hash(step)
    floats[:] = 7.0  # the caller's array, written after the step was made
    assert hash(step) == first and step == plain
    assert all(_bits(tuple(column_array(step, c).tolist())) == _bits(getattr(plain, c)) for c in FLOAT_COLUMNS)


def _column(steps: list[StepResult], column: str, name: str) -> bytes:
    """A row's values over the steps, bit for bit; absent where the step has no such row."""
    return b"".join(b"absent" if name not in s.names else _bits((getattr(s, column)[s.names.index(name)],))
                    for s in steps)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("missing", [False, True])
def test_a_report_made_from_a_series_does_not_follow_later_changes_to_it(rng: np.random.Generator,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         packed: bool, missing: bool) -> None:
    steps = _steps(rng)
    if missing:  # a row absent from a step: the series are made from the arrays, None where absent
        arrays = {f"w{i}": rng.standard_normal(7).astype(np.float32) for i in range(3)}
        steps[3] = StepResult.from_reports(3, compute_norms(arrays, sort="none"), sources=("s3",))
    s = series([_packed_copy(st) for st in steps] if packed else steps)
    report = analyze(s)
    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)  # one line: the series laid out from spellings
    s.norm[:] = 1.0  # the caller's arrays, written after the analysis
    s.share[:] = 0.5
    s.present[:] = False
    text = json_format.trend_dumps(report)
    for i, name in enumerate(report.tensors):
        for column, rows in (("norm", report.series_norm), ("share", report.series_share)):
            assert b"".join(b"absent" if v is None else _bits((v,)) for v in rows[i]) == _column(steps, column, name)
    assert json_format.dumps(report.to_dict()) == text


def test_a_field_not_set_is_an_attribute_error_as_for_any_dataclass() -> None:
    step = StepResult.__new__(StepResult)
    report = TrendReport.__new__(TrendReport)
    for obj, name in ((step, "l1"), (step, "share"), (report, "series_norm"), (report, "series_share")):
        assert not hasattr(obj, name)
        assert getattr(obj, name, "absent") == "absent"
        with pytest.raises(AttributeError, match=name):
            getattr(obj, name)


def test_threads_reading_a_column_or_a_series_first_get_one_and_the_same_value(rng: np.random.Generator) -> None:
    """Two threads that both make a value (as the first reads of one step may) get the one kept: a step with
    a NaN equals itself (``==`` compares its tuples, the same object), as a plain step does."""
    from gradinspect.trend import _Deferred

    both_making = threading.Barrier(2, timeout=10)

    class _Row:  # a packed row whose tuple takes long to make: both threads are making it at once
        def __init__(self, row: np.ndarray) -> None:
            self.row = row

        def tolist(self) -> list[float]:
            both_making.wait()
            return self.row.tolist()  # type: ignore[no-any-return]

    class _Floats:
        def __init__(self, floats: np.ndarray) -> None:
            self.floats = floats

        def __getitem__(self, k: int) -> _Row:
            return _Row(self.floats[k])

    step = _packed_copy(_plain_step(rng, 2, bad=True))
    floats = vars(step)["_packed_floats"]
    vars(step)["_packed_floats"] = _Floats(floats)

    def make() -> tuple[tuple[float, ...], ...]:
        both_making.wait()
        return ((float("nan"),),)

    report = analyze([_plain_step(rng, k) for k in range(3)])
    object.__setattr__(report, "series_share", _Deferred(make))
    for read in (lambda: step.norm, lambda: report.series_share):
        got: list[object] = []
        threads = [threading.Thread(target=lambda g=got, r=read: g.append(r())) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 2 and got[0] is got[1] is read()
    vars(step)["_packed_floats"] = floats  # the other columns made without waiting
    assert step == step and step.norm == step.norm and _bits(step.norm) == _bits(tuple(floats[3].tolist()))


@pytest.mark.parametrize("trip", [copy.copy, copy.deepcopy])
def test_a_packed_step_with_a_nan_equals_its_copy_as_a_plain_one_does(rng: np.random.Generator,
                                                                   trip: Callable[[StepResult], StepResult]) -> None:
    plain = _plain_step(rng, 2, bad=True)
    assert trip(plain) == plain  # the same tuples: NaN equals itself (by identity)
    step = _packed_copy(plain)
    again = trip(step)
    assert again == step and step == again and hash(again) == hash(step)
    assert all(_bits(getattr(again, c)) == _bits(getattr(plain, c)) for c in FLOAT_COLUMNS)
