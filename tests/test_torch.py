"""Against PyTorch's own clip_grad_norm_, when torch is importable (it is not a dependency)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import gradinspect
from conftest import exact_sums, rel_sqrt

torch = pytest.importorskip("torch")


def _params(grads: dict[str, np.ndarray]) -> list:
    params = []
    for g in grads.values():
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
        p.grad = torch.from_numpy(g.copy())
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e3])
def test_clip_coef_matches_clip_grad_norm(norm_type: float, max_norm: float) -> None:
    rng = np.random.default_rng(7)
    grads = {f"w{i}": rng.standard_normal((i + 3, 5)) * 0.1 for i in range(6)}
    params = _params(grads)
    before = [p.grad.clone() for p in params]
    total = float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type))
    torch_coef = float((params[0].grad / before[0]).flatten()[0])
    report = gradinspect.compute_norms(grads, norm_type=norm_type, max_norm=max_norm)
    assert report.total.norm == pytest.approx(total, rel=1e-12)
    if total + 1e-6 > max_norm:
        assert report.clip.clipped
        assert report.clip.coef == pytest.approx(torch_coef, rel=1e-12)
        assert report.clip.coef == pytest.approx(max_norm / (total + 1e-6), rel=1e-15)
    else:
        assert not report.clip.clipped and report.clip.coef == 1.0 and torch_coef == 1.0


def test_nonfinite_like_torch() -> None:
    for bad, expect in ((math.inf, 0.0), (math.nan, math.nan)):
        grads = {"a": np.array([1.0, bad]), "b": np.ones(3)}
        params = _params(grads)
        total = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        coef = gradinspect.compute_norms(grads).clip.coef
        torch_coef = float(params[1].grad[0])  # b's gradient was multiplied by the coefficient
        if math.isnan(expect):
            assert math.isnan(total) and math.isnan(coef) and math.isnan(torch_coef)
        else:
            assert total == math.inf and coef == torch_coef == 0.0


def test_float32_and_bfloat16_against_the_exact_oracle() -> None:
    """Ours is exact to 1e-12 on torch tensors; torch's own float32 norm is only reported (run with -s)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(10_000_000, dtype=np.float32) * 1e-3 + np.float32(1e-3)).astype(np.float32)
    _, exact_sq = exact_sums(x)
    ours = gradinspect.compute_norms({"g": x}).total.l2
    assert rel_sqrt(ours, exact_sq) <= 1e-12
    theirs = float(torch.nn.utils.get_total_norm([torch.from_numpy(x)], 2.0))
    print(f"torch get_total_norm float32 relative error: {rel_sqrt(theirs, exact_sq):.1e}")
    bf = torch.from_numpy(x).to(torch.bfloat16)
    ours_bf = gradinspect.compute_norms({"g": bf}).total.l2
    _, exact_bf = exact_sums(bf.view(torch.int16).numpy().view(ml_dtypes.bfloat16))
    assert rel_sqrt(ours_bf, exact_bf) <= 1e-12
