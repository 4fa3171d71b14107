"""gradinspect check: every rule passing and failing, every format, the config file."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run, strict_json
from gradinspect.api import compute_norms
from gradinspect.check import Rules, evaluate
from gradinspect.formats.github import escape_data, escape_property


@pytest.fixture
def grads(tmp_path: Path) -> Path:
    """Global L2 = 5 (3 from big.weight's single 3, 4 from other.weight): big holds 9/25 = 36%."""
    path = tmp_path / "g.safetensors"
    save_file({
        "big.weight": np.array([3.0, 0.0], np.float32),
        "other.weight": np.array([4.0], np.float32),
        "dead.weight": np.zeros(6, np.float32),
    }, str(path))
    return path


def _rules(**kw: object) -> list[str]:
    report = compute_norms({"a": np.array([3.0, 0.0]), "b": np.array([4.0]), "z": np.zeros(3)}, sort="none")
    return [f.rule + ":" + str(f.tensor) for f in evaluate(report, Rules(**kw)).findings]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw,failing,passing",
    [
        ("max_total", {"max_total": 4.9}, {"max_total": 5.0}),
        ("min_total", {"min_total": 5.1}, {"min_total": 5.0}),
        ("clip", {"fail_on_clip": True}, None),
        ("max_share", {"max_share": 0.6}, {"max_share": 0.64}),
        ("zero", {"fail_on_zero": True}, None),
        ("max_tensor_norm", {"max_tensor_norm": 3.9}, {"max_tensor_norm": 4.0}),
    ],
)
def test_each_rule_fails_and_passes(kw: str, failing: dict, passing: dict | None) -> None:
    found = _rules(**failing)
    assert found and all(f.startswith(kw + ":") for f in found)
    expected_tensor = {"max_share": "b", "zero": "z", "max_tensor_norm": "b"}.get(kw)
    assert found == [f"{kw}:{expected_tensor}"]
    if passing is not None:
        assert _rules(**passing) == []


def test_clip_rule_passes_below_threshold() -> None:
    report = compute_norms({"a": np.array([0.5])}, max_norm=1.0)
    assert evaluate(report, Rules(fail_on_clip=True)).ok


def test_nonfinite_rule_one_finding_per_tensor_with_counts() -> None:
    report = compute_norms({"a": np.array([np.nan, np.inf, np.nan]), "b": np.array([np.inf]), "c": np.ones(2)})
    result = evaluate(report, Rules())
    assert [(f.rule, f.tensor, f.value) for f in result.findings] == [("nonfinite", "a", 3.0), ("nonfinite", "b", 1.0)]
    assert "2 NaN and 1 inf" in result.findings[0].message
    assert evaluate(report, Rules(nonfinite=False)).ok
    # a NaN global norm fails the global limits too
    findings = evaluate(report, Rules(nonfinite=False, max_total=1e9, min_total=0.0)).findings
    assert [f.rule for f in findings] == ["max_total", "min_total"]


def test_rules_validation() -> None:
    with pytest.raises(ValueError, match=r"max_share must be a number from 0 to 1, not 1\.5"):
        Rules(max_share=1.5)
    with pytest.raises(ValueError, match="max_total must be a finite number, not nan"):
        Rules(max_total=math.nan)


# --- CLI -------------------------------------------------------------------


def test_cli_exit_codes(grads: Path) -> None:
    r = run("check", grads)
    assert r.exit_code == 0 and r.stdout.startswith("OK ")
    r = run("check", grads, "--max-total", "4")
    assert r.exit_code == 1
    assert r.stdout.splitlines() == ["FAIL  global L2 5 > 4", "FAIL  1 finding (max_total); 3 tensors, global L2 5"]
    r = run("check", grads.parent / "missing.safetensors", "--max-total", "4")
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith("Error: ")


def test_cli_every_option(grads: Path) -> None:
    def rules(*args: str) -> list[str]:
        r = run("check", grads, "-f", "json", *args)
        assert r.exit_code in (0, 1)
        return [f["rule"] for f in strict_json(r.stdout)["findings"]]

    assert rules("--min-total", "6") == ["min_total"]
    assert rules("--fail-on-clip") == ["clip"]
    assert rules("--fail-on-clip", "--max-norm", "5", "--eps", "0") == []
    assert rules("--max-share", "0.5") == ["max_share"]
    assert rules("--fail-on-zero") == ["zero"]
    assert rules("--max-tensor-norm", "3.5") == ["max_tensor_norm"]
    assert rules("--max-tensor-norm", "3.5", "--exclude", "other.*") == []
    assert rules("--max-tensor-norm", "3.5", "--include", "big.*") == []
    assert rules("--max-total", "6", "--norm-type", "1") == ["max_total"]  # L1 = 7


def test_cli_nonfinite_and_allow(tmp_path: Path) -> None:
    path = tmp_path / "n.safetensors"
    save_file({"w": np.array([np.nan, 1.0], np.float32), "v": np.ones(2, np.float32)}, str(path))
    r = run("check", path)
    assert r.exit_code == 1 and "FAIL  w: 1 NaN and 0 inf values" in r.stdout
    assert run("check", path, "--allow-nonfinite").exit_code == 0


def test_json_format(grads: Path) -> None:
    r = run("check", grads, "--max-share", "0.5", "--format", "json")
    doc = strict_json(r.stdout)
    assert doc["schema"] == "gradinspect.check/1" and doc["ok"] is False
    assert doc["rules"] == ["nonfinite", "max_share"]
    assert doc["findings"] == [{"rule": "max_share", "tensor": "other.weight", "value": 0.64, "limit": 0.5,
                                "message": "other.weight holds 64.0% of the squared L2 norm > 50.0%"}]
    assert doc["report"]["schema"] == "gradinspect.norms/1" and doc["report"]["total"]["l2"] == 5.0
    assert r.stderr == ""


def test_github_format(grads: Path) -> None:
    r = run("check", grads, "--max-share", "0.5", "--max-total", "1", "-f", "github")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0] == "::error title=gradinspect max_total::global L2 5 > 1"
    assert lines[1] == ("::error title=gradinspect max_share other.weight::"
                        "other.weight holds 64.0%25 of the squared L2 norm > 50.0%25")
    assert lines[2].startswith("FAIL  2 findings")
    assert escape_data("a%b\r\nc") == "a%25b%0D%0Ac"
    assert escape_property("x: y, z") == "x%3A y%2C z"


def test_junit_format(grads: Path) -> None:
    r = run("check", grads, "--fail-on-zero", "--max-total", "10", "-f", "junit")
    assert r.exit_code == 1
    root = ET.fromstring(r.stdout)
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["nonfinite", "max_total", "zero"]
    assert cases["max_total"].find("failure") is None
    failure = cases["zero"].find("failure")
    assert failure is not None and "dead.weight" in (failure.get("message") or "")


def _pyproject(directory: Path, body: str) -> Path:
    path = directory / "pyproject.toml"
    path.write_text(body)
    return path


def test_config_from_nearest_pyproject(grads: Path, tmp_path: Path) -> None:
    _pyproject(tmp_path, "[tool.gradinspect.check]\nmax_total = 4.0\nfail_on_zero = true\n")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    _pyproject(tmp_path / "a", "[project]\nname = 'x'\n")  # nearer, but without the table: skipped
    r = run("check", grads, "-f", "json", cwd=sub)
    assert r.exit_code == 1
    assert sorted(f["rule"] for f in strict_json(r.stdout)["findings"]) == ["max_total", "zero"]
    # command-line flags win
    r = run("check", grads, "-f", "json", "--max-total", "6", cwd=sub)
    assert [f["rule"] for f in strict_json(r.stdout)["findings"]] == ["zero"]


def test_config_file_option_and_keys(grads: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "gate.toml"
    cfg.write_text('[tool.gradinspect.check]\nnorm_type = "inf"\nmax_total = 3.5\nexclude = ["dead.*"]\n'
                   'format = "json"\nmax_norm = 2.0\neps = 0.0\nfail_on_clip = true\n')
    r = run("check", grads, "--config", cfg)
    doc = strict_json(r.stdout)
    assert doc["report"]["norm_type"] == "inf" and doc["report"]["total"]["tensors"] == 2
    assert sorted(f["rule"] for f in doc["findings"]) == ["clip", "max_total"]
    assert doc["report"]["clip"]["coef"] == 0.5  # L∞ 4 at max_norm 2, optax formula


@pytest.mark.parametrize(
    "body,fragment",
    [
        ("[tool.gradinspect.check]\nmax_totl = 1\n", "unknown key 'max_totl'"),
        ("[tool.gradinspect.check]\nmax_total = 'ten'\n", "max_total must be a finite number"),
        ("[tool.gradinspect.check]\nfail_on_zero = 1\n", "fail_on_zero must be true or false"),
        ("[tool.gradinspect.check]\nmax_share = 2.0\n", "max_share must be a number from 0 to 1"),
        ("[tool.gradinspect.check]\nnorm_type = 0\n", "norm_type must be"),
        ("[tool.gradinspect.check]\nformat = 'xml'\n", "format must be one of"),
        ("[tool.gradinspect.check\n", "not valid TOML"),
        ("[tool.other]\nx = 1\n", "no [tool.gradinspect.check] table"),
        ("[tool.gradinspect.check]\nmax_total = inf\n", "max_total must be a finite number"),
        ("[tool.gradinspect.check]\nmax_total = " + "1" * 400 + "\n", "max_total must be a finite number"),
        ("[tool.gradinspect.check]\nnorm_type = " + "1" * 400 + "\n", "norm_type must be"),
        ("[tool.gradinspect.check]\nshards = 'halves'\n", "shards must be"),
        ("[tool.gradinspect.check]\njobs = 0\n", "jobs must be"),
    ],
)
def test_config_errors_exit_2_naming_the_key(grads: Path, tmp_path: Path, body: str, fragment: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    r = run("check", grads, "--config", cfg)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {cfg}: ") and fragment in r.stderr and r.stderr.count("\n") == 1


def test_broken_file_is_never_a_finding(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for fmt in ("text", "json", "github", "junit"):
        r = run("check", path, "-f", fmt)
        assert r.exit_code == 2 and r.stdout == "" and "not valid JSON" in r.stderr


def test_boolean_flags_can_turn_config_off(grads: Path, tmp_path: Path) -> None:
    _pyproject(tmp_path,
               "[tool.gradinspect.check]\nfail_on_zero = true\nfail_on_clip = true\nshards = 'slices'\njobs = 1\n")
    assert run("check", grads, cwd=tmp_path).exit_code == 1
    assert run("check", grads, "--no-fail-on-zero", "--no-fail-on-clip", cwd=tmp_path).exit_code == 0


def test_a_pyproject_that_is_not_utf8_is_an_error(grads: Path, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_bytes(b"[tool.x]\nname = '\xff\xfe'\n")
    r = run("check", grads, cwd=tmp_path)
    assert r.exit_code == 2 and "not valid TOML" in r.stderr


def test_junit_is_valid_xml_whatever_the_names(tmp_path: Path) -> None:
    path = tmp_path / "g.safetensors"
    save_file({"a\x01b\x1bc": np.zeros(3, np.float32)}, str(path))
    r = run("check", path, "--fail-on-zero", "-f", "junit")
    assert r.exit_code == 1
    ET.fromstring(r.stdout)  # parses
    assert "a\\x01b\\x1bc" in r.stdout  # shown as escapes, as in every other format
