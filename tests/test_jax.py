"""gradinspect.jax.save_grads (issue 10 §5): a pytree of JAX gradients round-trips through a safetensors dump."""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import pytest

import gradinspect
from conftest import ROOT, rel, run, strict_json
from gradinspect.jax import save_grads


@pytest.fixture
def needs_jax() -> None:
    pytest.importorskip("jax", reason="jax is not installed (the optional extra gradinspect[jax])")


def _fsum_l2(leaves: list[np.ndarray]) -> float:
    """The oracle: math.fsum of exactly widened squares."""
    return math.sqrt(math.fsum(v * v for a in leaves for v in np.asarray(a).astype(np.float64).reshape(-1).tolist()))


class Adam(NamedTuple):
    mu: Any
    count: Any


def _tree(seed: int) -> tuple[Any, dict[str, tuple[str, tuple[int, ...]]], list[np.ndarray]]:
    """A flax-like pytree of jax arrays (float32 and bfloat16 leaves), the names and dtypes it must give,
    and its leaves as numpy arrays."""
    import jax.numpy as jnp

    g = np.random.default_rng(seed)

    def arr(shape: tuple[int, ...], dtype: Any) -> Any:
        return jnp.asarray((g.standard_normal(shape) * 3).astype(dtype))

    tree = {
        "params": {
            "Dense_0": {"kernel": arr((8, 16), np.float32), "bias": arr((16,), ml_dtypes.bfloat16)},
            "blocks": [{"w": arr((4, 4), ml_dtypes.bfloat16)}, {"w": arr((5,), np.float32)}],
            "pair": (arr((3,), np.float32), arr((2, 2), ml_dtypes.bfloat16)),
        },
        "opt": Adam(mu=arr((6,), np.float32), count=arr((), np.float32)),
    }
    names = {  # in jax's leaf order (dict keys sorted)
        "opt.mu": ("float32", (6,)), "opt.count": ("float32", ()),
        "params.Dense_0.bias": ("bfloat16", (16,)), "params.Dense_0.kernel": ("float32", (8, 16)),
        "params.blocks.0.w": ("bfloat16", (4, 4)), "params.blocks.1.w": ("float32", (5,)),
        "params.pair.0": ("float32", (3,)), "params.pair.1": ("bfloat16", (2, 2)),
    }
    import jax

    return tree, names, [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.usefixtures("needs_jax")
def test_pytree_round_trip(tmp_path: Path) -> None:
    tree, names, leaves = _tree(1)
    save_grads(tree, tmp_path / "g.safetensors", step=7)
    r = gradinspect.inspect(tmp_path / "g.safetensors", sort="none")
    assert {t.name: (t.dtype, t.shape) for t in r.tensors} == names and not r.skipped
    assert rel(r.total.l2, Fraction(_fsum_l2(leaves))) <= 1e-12
    # bit for bit what the same arrays give in memory
    mem = gradinspect.compute_norms(dict(zip(names, leaves, strict=True)), sort="none")
    assert r.total.sq == mem.total.sq and {t.name: t.sq for t in r.tensors} == {t.name: t.sq for t in mem.tensors}
    assert r.metadata == {str(tmp_path / "g.safetensors"): {"step": "7"}}


@pytest.mark.usefixtures("needs_jax")
def test_trend_reads_the_step(tmp_path: Path) -> None:
    for name, step in (("late", 12), ("early", 3)):  # no digits in the names: the metadata says the step
        save_grads(_tree(step)[0], tmp_path / f"{name}.safetensors", step=step)
    r = run("trend", str(tmp_path / "*.safetensors"), "-f", "json", "--no-cache")
    assert r.exit_code == 0, r.output
    doc = strict_json(r.stdout)
    assert [s["step"] for s in doc["steps"]] == [3, 12]
    assert doc["steps"][0]["total"]["l2"] == gradinspect.inspect(tmp_path / "early.safetensors").total.l2


@pytest.mark.usefixtures("needs_jax")
def test_loss_scale_and_metadata(tmp_path: Path) -> None:
    tree, _, leaves = _tree(2)
    save_grads(tree, tmp_path / "g.safetensors", loss_scale=1024.0, metadata={"run": "x"})
    r = gradinspect.inspect(tmp_path / "g.safetensors")
    assert r.loss_scale == 1024.0 and r.loss_scale_from == "metadata"
    assert rel(r.total.l2, Fraction(_fsum_l2(leaves)) / 1024) <= 1e-12
    assert r.metadata[str(tmp_path / "g.safetensors")] == {"loss_scale": "1024.0", "run": "x"}


@pytest.mark.usefixtures("needs_jax")
def test_refusals(tmp_path: Path) -> None:
    import jax.numpy as jnp

    out = tmp_path / "g.safetensors"
    with pytest.raises(ValueError, match="a bare array has no name"):
        save_grads(jnp.ones(3), out)
    with pytest.raises(ValueError, match=r"two leaves are both named 'a\.b'"):
        save_grads({"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}}, out)
    with pytest.raises(ValueError, match="metadata key 'step' is written by save_grads: pass it as step= instead"):
        save_grads({"w": jnp.ones(1)}, out, metadata={"step": "1"})
    with pytest.raises(ValueError, match="step must be an integer from 0 to 2\\*\\*63 - 1, not -1"):
        save_grads({"w": jnp.ones(1)}, out, step=-1)
    with pytest.raises(TypeError, match="leaf 'w': dtype float8_e4m3fnuz cannot be saved"):
        save_grads({"w": jnp.ones(2, jnp.float8_e4m3fnuz)}, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_without_jax_says_what_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['jax'] = None\n"
            "from gradinspect.jax import save_grads\n"
            "try:\n    save_grads({'w': [1.0]}, 'x.safetensors')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout == "gradinspect.jax.save_grads needs JAX: pip install 'gradinspect[jax]'\n"
    assert not (tmp_path / "x.safetensors").exists()


def test_jax_is_imported_lazily() -> None:
    code = "import sys, gradinspect.jax; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True)
    assert out.stdout == "False\n"
