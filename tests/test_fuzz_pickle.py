"""A short deterministic run of the .pt fuzzer (benchmarks/fuzz_pickle.py), and checks that its judge can fail."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gradinspect_fuzz_pickle", ROOT / "benchmarks" / "fuzz_pickle.py")
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["gradinspect_fuzz_pickle"] = fuzz  # dataclasses look their module up
_spec.loader.exec_module(fuzz)


def test_fuzz_pickle_short_run_holds_the_contract(tmp_path: Path) -> None:
    res = fuzz.run(cases=80, seed=20261129, out=tmp_path / "out", work=tmp_path / "work")
    assert res.cases == 80
    assert not res.failures, "\n" + fuzz.describe(res)
    assert res.outcomes["ok"] >= 3 and res.outcomes["error-exit-2"] >= 30, res.outcomes
    families = {k.split(":")[1] for k in res.by_kind if k.startswith("malicious:")}
    assert len(families) >= 8, families
    assert not (tmp_path / "work" / "MARKER-pwned").exists()


def _case(must_read: bool = False) -> Any:
    return fuzz.Case(0, "malicious", "global", Path("x.pt"), ["norms", "x.pt"], must_read)


def _status(code: int) -> int:
    return code << 8  # as os.waitpid reports an exit code


@pytest.mark.parametrize(("run", "must_read", "kind"), [
    ({"status": _status(1), "stdout": b"", "stderr": b"Traceback (most recent call last):\n"}, False, "traceback"),
    ({"status": _status(2), "stdout": b"{}", "stderr": b"Error: x\n"}, False, "error-with-stdout"),
    ({"status": _status(2), "stdout": b"", "stderr": b"Error: x\nmore\n"}, False, "error-not-one-line"),
    ({"status": _status(2), "stdout": b"", "stderr": b"Error: x\n"}, True, "valid-input-refused"),
    ({"status": _status(0), "stdout": b'{"a": NaN}', "stderr": b""}, False, "invalid-json"),
    ({"status": _status(1), "stdout": b"", "stderr": b""}, False, "exit-1"),
    ({"status": 9, "stdout": b"", "stderr": b""}, False, "signal-9"),
    ({"status": 14, "stdout": b"", "stderr": b""}, False, "timeout"),
    ({"status": 24, "stdout": b"", "stderr": b""}, False, "cpu-timeout"),
])
def test_judge_catches_contract_breaks(tmp_path: Path, run: dict[str, Any], must_read: bool, kind: str) -> None:
    assert fuzz.judge(_case(must_read), run, tmp_path / "marker") == kind


def test_judge_catches_a_created_marker(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    ok = {"status": _status(2), "stdout": b"", "stderr": b"Error: refused\n"}
    assert fuzz.judge(_case(), ok, marker) is None
    marker.touch()
    assert fuzz.judge(_case(), ok, marker) == "marker-created"


def test_malicious_payloads_are_live(tmp_path: Path) -> None:
    """The global-family payloads run under the real pickle module (so the campaign tests something)."""
    import pickle
    import random

    marker = tmp_path / "m"
    r = random.Random(3)
    for _ in range(200):
        payload, fam = fuzz.malicious(marker, r)
        if fam == "global" and b"system" in payload:
            pickle.loads(b"\x80\x02" + payload + b".")
            break
    assert marker.exists() and os.path.getsize(marker) == 0
