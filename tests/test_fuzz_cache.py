"""A short deterministic run of the cache fuzzer (benchmarks/fuzz_cache.py), and checks that its judge can fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gradinspect_fuzz_cache", ROOT / "benchmarks" / "fuzz_cache.py")
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["gradinspect_fuzz_cache"] = fuzz  # dataclasses look their module up
_spec.loader.exec_module(fuzz)

SEED = 20261130
CONFIGS = ["long-p2", "mixed-pinf-group", "dumper", "index"]


def test_fuzz_cache_short_run_has_no_contract_failures(tmp_path: Path) -> None:
    res = fuzz.run(cases=80, seed=SEED, out=tmp_path, subprocess_every=40, configs=CONFIGS)
    assert res.cases == 80 and res.subprocess_runs == 2
    assert res.outcomes["rejected"] > 30 and res.outcomes["accepted-same"] + res.outcomes["served"] > 3, res.outcomes
    assert {"step-stale", "step-recomputed", "file-stale", "file-recomputed"} <= set(res.by_target)
    assert not res.failures, "\n" + fuzz.describe(res)


def test_the_judge_reports_a_crash_and_a_wrong_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = fuzz.runs.trend

    def crashes(path: str, cache: Any = None, **kw: Any) -> Any:
        if cache is not None and Path(cache.directory).name == "case":  # a case's mutated cache, not the setup's
            raise IndexError("a crash")
        return real(path, cache=cache, **kw)

    monkeypatch.setattr(fuzz.runs, "trend", crashes)
    res = fuzz.run(cases=4, seed=SEED, out=tmp_path / "a", subprocess_every=0, configs=["mixed-p2"])
    assert [f["kind"] for f in res.failures] == ["crash-in-process"] * 4

    def wrong(path: str, cache: Any = None, **kw: Any) -> Any:
        report = real(path, cache=cache, **kw)
        if cache is not None and Path(cache.directory).name == "case" and cache.step_misses:  # a rejected entry
            return real(path, cache=None, **{**kw, "max_norm": 1e-3})
        return report

    monkeypatch.setattr(fuzz.runs, "trend", wrong)
    res = fuzz.run(cases=12, seed=SEED, out=tmp_path / "b", subprocess_every=0, configs=["mixed-p2"])
    assert res.outcomes["rejected"] == 0 and res.failures
    assert {f["kind"] for f in res.failures} == {"rejected-but-differs"}


def test_well_formed_flags_broken_json_and_csv() -> None:
    assert fuzz.well_formed("json", b'{"a": 1}') == ""
    assert fuzz.well_formed("json", b'{"a": NaN}').startswith("invalid JSON")
    assert fuzz.well_formed("json", b'{"a": [1, 2]]').startswith("invalid JSON")
    assert fuzz.well_formed("csv", b"a,b\n1,2\n") == ""
    assert fuzz.well_formed("csv", b"a,b\n1,2,3\n") == "ragged CSV"
    assert fuzz.well_formed("json", b"\xff") == "not UTF-8"
