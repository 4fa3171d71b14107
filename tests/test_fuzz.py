"""A short deterministic run of the fuzzer (benchmarks/fuzz.py), and checks that its judge can fail."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gradinspect_fuzz", ROOT / "benchmarks" / "fuzz.py")
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["gradinspect_fuzz"] = fuzz  # dataclasses look their module up
_spec.loader.exec_module(fuzz)

SEED = 20261129
CASES = 150


def test_fuzz_short_run_has_no_contract_failures(tmp_path: Path) -> None:
    res = fuzz.run(cases=CASES, seed=SEED, jobs=2, out=tmp_path, repo=ROOT, python=sys.executable, confirm=False)
    assert res.cases == CASES
    assert set(res.by_format) == set(fuzz.FORMATS)
    assert set(res.by_command) == set(fuzz.COMMANDS)
    assert res.outcomes["ok"] > 10 and res.outcomes["error-exit-2"] > 10, res.outcomes
    assert res.compared > 10  # accepted inputs whose numbers were checked against the oracle
    assert not res.failures, "\n" + fuzz.describe(res, top_mutations=False)


def _case(command: str = "norms", fmt: str = "json", extra: tuple[str, ...] = ()) -> object:
    return fuzz.Case(0, "safetensors", "none", command, [command, "in/g.safetensors", "--format", fmt, *extra], {})


def _truth(values: list[float]) -> object:
    t = fuzz.Truth()
    t.add("x", np.array(values))
    return t


def _norms_json(l2: float, l1: float, linf: float, numel: int = 2) -> bytes:
    total = {"tensors": 1, "numel": numel, "l1": l1, "l2": l2, "linf": linf, "nan": 0, "inf": 0}
    return json.dumps({"total": total, "tensors": [{"name": "x"}]}).encode()


@pytest.mark.parametrize(("run", "kind"), [
    ({"exit": 1, "stdout": b"", "stderr": b"Traceback (most recent call last):\n  x\nKeyError: 'a'\n"}, "traceback"),
    ({"exit": 2, "stdout": b"", "stderr": b"Error: a\nb\n"}, "error-not-one-line"),
    ({"exit": 2, "stdout": b"{}", "stderr": b"Error: a\n"}, "error-with-stdout"),
    ({"exit": 0, "stdout": b'{"a": NaN}', "stderr": b""}, "invalid-json"),
    ({"exit": 0, "stdout": b'{"a": "\\udc80"}', "stderr": b""}, "json-lone-surrogate"),
    ({"exit": 0, "stdout": b"{}", "stderr": b"RuntimeWarning: overflow\n"}, "stderr-not-warnings"),
    ({"exit": 0, "stdout": b"{}", "stderr": b"Warning: \x1b[31mx\n"}, "control-char-stderr"),
    ({"exit": 0, "stdout": b"{}", "stderr": b"Warning: x\n::error::INJECTED\n"}, "workflow-command-injection"),
    ({"exit": 1, "stdout": b"{}", "stderr": b""}, "bad-exit-code"),
    ({"exit": -11, "stdout": b"", "stderr": b""}, "signal-11"),
    ({"exit": -14, "stdout": b"", "stderr": b"", "timed_out": True}, "timeout"),
    ({"exit": 0, "stdout": b"\xff", "stderr": b""}, "stdout-not-utf8"),
])
def test_judge_flags_contract_breaks(run: dict, kind: str) -> None:
    kinds = [k for k, _ in fuzz.judge(_case(), fuzz.Run(**run), None).failures]
    assert kind in kinds


def test_judge_table_with_control_characters_fails() -> None:
    v = fuzz.judge(_case(fmt="table"), fuzz.Run(0, b"name\x1b]8;;x\x07\n", b""), None)
    assert ("control-char-stdout", repr("\x1b")) in v.failures


def test_judge_compares_with_the_oracle() -> None:
    truth = _truth([3.0, -4.0])
    ok = fuzz.judge(_case(), fuzz.Run(0, _norms_json(5.0, 7.0, 4.0), b""), truth)
    assert ok.outcome == "ok" and ok.compared
    wrong = fuzz.judge(_case(), fuzz.Run(0, _norms_json(5.000001, 7.0, 4.0), b""), truth)
    assert [k for k, _ in wrong.failures] == ["wrong-result"]
    refused = fuzz.judge(_case(), fuzz.Run(0, _norms_json(5.0, 7.0, 4.0), b""), fuzz.OracleRefused("bad offsets"))
    assert refused.outcome == "ok" and refused.disagreement == "bad offsets"


def test_oracle_totals_are_exact_and_overflow_safe() -> None:
    t = _truth([1e300, 1e300, -3.0, 0.0])
    assert t.totals()["l2"] == pytest.approx(math.sqrt(2) * 1e300, rel=1e-15)
    assert t.totals()["l1"] == 2e300
    assert math.isnan(_truth([1.0, math.nan, math.inf]).totals()["l2"])
    assert _truth([1.0, -math.inf]).totals()["l2"] == math.inf


def test_cases_are_deterministic() -> None:
    seeds = fuzz.corpus(SEED)
    a = [fuzz.make_case(SEED, i, seeds) for i in range(40)]
    b = [fuzz.make_case(SEED, i, fuzz.corpus(SEED)) for i in range(40)]
    assert [(c.argv, c.mutation, c.files) for c in a] == [(c.argv, c.mutation, c.files) for c in b]
    assert len({c.mutation for c in a}) > 20


def test_judge_flags_broken_csv_and_a_refused_valid_input() -> None:
    v = fuzz.judge(_case(fmt="csv"), fuzz.Run(0, b"name,l2\na\rb,1\n", b""), None)
    assert [k for k, _ in v.failures] in (["csv-invalid"], ["csv-ragged"])  # a bare CR splits the row
    refused = fuzz.judge(_case(), fuzz.Run(2, b"", b"Error: in/g.safetensors: corrupt\n"), None)
    assert [k for k, _ in refused.failures] == ["valid-input-refused"]
