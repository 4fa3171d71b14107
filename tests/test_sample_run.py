"""sample_data/run/ (made by sample_data/make_run.py): the facts sample_data/README.md states about it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import gradinspect
from gradinspect.report import NormsReport

RUN = Path(__file__).parent.parent / "sample_data" / "run"
STEPS, JUMP_STEP, FIRST_NONFINITE = 40, 20, 31
WINDOW, FACTOR = 20, 3.0


@pytest.fixture(scope="module")
def reports() -> list[NormsReport]:
    files = sorted(RUN.glob("*"))
    assert [f.name for f in files] == [f"step_{s:06d}.safetensors" for s in range(STEPS)]
    return [gradinspect.inspect(f) for f in files]


def spikes(l2: list[float]) -> dict[int, float]:
    """The spike rule of issue 9: > FACTOR x the median of the finite norms among the WINDOW dumps before."""
    out = {}
    for i, x in enumerate(l2):
        prev = [v for v in l2[max(0, i - WINDOW):i] if math.isfinite(v)]
        if math.isfinite(x) and len(prev) >= 3 and x > FACTOR * float(np.median(prev)):
            out[i] = x / float(np.median(prev))
    return out


def test_every_file_is_one_step_of_19_float_tensors(reports: list[NormsReport]) -> None:
    for step, r in enumerate(reports):
        (meta,) = r.metadata.values()
        assert meta["step"] == str(step)
        assert meta["lr"] == "0.001"
        assert meta["lr.embed.weight"] == ("1" if step >= JUMP_STEP else "0.001")
        assert float(meta["loss"]) > 0
        assert r.total.tensors == 19 and r.total.numel == 54730
        assert [t.dtype for t in r.tensors] == ["float32"] * 19


def test_total_size_at_most_10_mb() -> None:
    size = sum(f.stat().st_size for f in RUN.glob("step_*.safetensors"))
    assert size <= 10_000_000
    assert size == 8_838_080  # as sample_data/README.md says


def test_first_nonfinite_step_is_an_fp16_overflow_in_head_weight(reports: list[NormsReport]) -> None:
    nonfinite = [s for s, r in enumerate(reports) if r.total.nonfinite]
    assert nonfinite == [FIRST_NONFINITE]
    r = reports[FIRST_NONFINITE]
    assert (r.total.nan, r.total.inf) == (0, 8) and r.total.l2 == math.inf
    assert [(t.name, t.nan, t.inf) for t in r.tensors if t.nonfinite] == [("head.weight", 0, 8)]
    (meta,) = r.metadata.values()
    (after,) = reports[FIRST_NONFINITE + 1].metadata.values()
    assert (meta["skipped"], meta["amp_scale"], after["amp_scale"]) == ("true", "4096", "2048")


def test_the_lr_jump_makes_a_spike_that_does_not_recover(reports: list[NormsReport]) -> None:
    l2 = [r.total.l2 for r in reports]
    found = spikes(l2)
    assert sorted(found) == [*range(JUMP_STEP + 1, FIRST_NONFINITE), FIRST_NONFINITE + 1]
    first = JUMP_STEP + 1
    assert found[first] == pytest.approx(l2[first] / float(np.median(l2[1:first])))
    assert found[first] > 10 and l2[first] == pytest.approx(27.471, rel=1e-4)
    assert max(l2[:first]) < 4.1 and min(l2[first:FIRST_NONFINITE]) > 15
    assert all(5 < x < 100 for x in l2[FIRST_NONFINITE + 1:])
    assert found[FIRST_NONFINITE + 1] == pytest.approx(l2[FIRST_NONFINITE + 1] / float(np.median(l2[12:31])))


def test_the_spike_is_carried_by_head_weight(reports: list[NormsReport]) -> None:
    first = JUMP_STEP + 1
    spike = {t.name: t.sq for t in reports[first].tensors}
    baseline = {n: float(np.median([{t.name: t.sq for t in r.tensors}[n] for r in reports[1:first]])) for n in spike}
    inc = {n: spike[n] - baseline[n] for n in spike}
    pos = math.fsum(v for v in inc.values() if v > 0)
    part = {n: v / pos for n, v in inc.items() if v > 0}
    top = sorted(part, key=lambda n: -part[n])[:4]
    assert top == ["head.weight", "blocks.0.fc2.weight", "blocks.2.fc2.weight", "blocks.1.fc2.weight"]
    assert part["head.weight"] > 0.88
    head = [next(t.share for t in r.tensors if t.name == "head.weight") for r in reports]
    assert head[first] > 0.87 and min(head[first + 1:FIRST_NONFINITE]) > 0.95
    assert max(head[:first]) < 0.14
