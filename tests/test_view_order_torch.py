"""Real torch.save files of strided views through diff and copy detection (logical C order, sources/views.py):
bit for bit the results of the same tensors saved contiguous, and those of a numpy oracle from torch.load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import check_diff_row, run, strict_json

torch = pytest.importorskip("torch", reason="torch writes the files these tests read (gradinspect never imports it)")


def _views(g: Any, noise: float = 0.0, base: dict[str, Any] | None = None,
           big: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Transposed, sliced, expanded and permuted 3-D views; ``big`` (2048 x 2304 float32, 18 MiB) is put in C
    order in two boxes that end inside a chunk.  With ``base``: the same views of ``base``'s tensors plus noise."""
    src = base or {"w": torch.randn(300, 500, generator=g), "x": torch.randn(6, 40, 50, generator=g),
                   "v": torch.randn(40, generator=g), "d": torch.randn(30, 40, generator=g).double(),
                   "h": torch.randn(64, 48, generator=g).bfloat16()}
    if big and base is None:
        src["big"] = torch.randn(2304, 2048, generator=g)
    t = {k: (a + noise * torch.randn(a.shape, generator=g).to(a.dtype)) if noise else a for k, a in src.items()}
    w, x, v = t["w"], t["x"], t["v"]
    out = {
        "t": w.t(), "sliced_t": w[3:, 5::3].t(), "col": w[:, 7], "narrow_t": w.narrow(1, 100, 50).t(),
        "expand": v.expand(200, 40), "expand_inner": v[:, None].expand(40, 200),
        "expand_3d": w[:4, :5].unsqueeze(1).expand(4, 3, 5),
        "perm": x.permute(2, 0, 1), "perm_sliced": x[:, 1:, ::2].permute(2, 1, 0), "perm_120": x.permute(1, 2, 0),
        "f64_t": t["d"].t(), "bf16_t": t["h"].t(),
    }
    if "big" in t:
        out["big_t"] = t["big"].t()
    return out, src


def _numpy(t: Any) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _diff(a: Path, b: Path) -> dict[str, Any]:
    res = run("diff", a, b, "--format", "json")
    assert res.exit_code == 0, res.output
    return strict_json(res.stdout)


def test_diff_of_torch_views(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    va, base = _views(g)
    vb, _ = _views(g, 1e-3, base)
    torch.save(va, tmp_path / "a.pt")
    torch.save(vb, tmp_path / "b.pt")
    torch.save({k: t.contiguous().clone() for k, t in va.items()}, tmp_path / "ac.pt")
    torch.save({k: t.contiguous().clone() for k, t in vb.items()}, tmp_path / "bc.pt")
    ours = _diff(tmp_path / "a.pt", tmp_path / "b.pt")
    ref = _diff(tmp_path / "ac.pt", tmp_path / "bc.pt")
    assert ours["tensors"] == ref["tensors"] and ours["total"] == ref["total"]  # bit for bit
    la, lb = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert {r["name"] for r in ours["tensors"]} == set(la)
    for row in ours["tensors"]:
        a, b = _numpy(la[row["name"]]), _numpy(lb[row["name"]])
        assert row["shape"] == list(a.shape), row["name"]
        check_diff_row(row, a, b)


def test_copies_of_torch_views(tmp_path: Path) -> None:
    """Each view; a clone (strided where torch keeps the strides) and a contiguous copy; a near miss (its flip:
    the same statistics, other bytes).  duplicate_of is the oracle's and the contiguous file's."""
    g = torch.Generator().manual_seed(6)
    views, _ = _views(g, big=False)
    obj: dict[str, Any] = {}
    for k, t in views.items():
        obj[k] = t
        obj[k + "_clone"] = t.clone()
        obj[k + "_flat"] = t.contiguous().clone()
        obj[k + "_flip"] = t.flip(0)
    assert not obj["t_clone"].is_contiguous() and obj["t_clone"].stride() == obj["t"].stride()
    torch.save(obj, tmp_path / "c.pt")
    torch.save({k: t.contiguous().clone() for k, t in obj.items()}, tmp_path / "cc.pt")
    loaded = {k: _numpy(t) for k, t in torch.load(tmp_path / "c.pt").items()}
    expected: dict[str, str] = {}
    firsts: list[str] = []
    for name, arr in loaded.items():
        same = [f for f in firsts if loaded[f].shape == arr.shape and obj[f].dtype == obj[name].dtype
                and loaded[f].tobytes() == arr.tobytes()]
        if same:
            expected[name] = same[0]
        else:
            firsts.append(name)
    assert {k for k in expected if k.endswith("_flip")} == {"expand_flip"}  # v.expand(200, 40): equal rows
    assert {k for k in expected if not k.endswith("_flip")} == {k for k in obj if k.endswith(("_clone", "_flat"))}

    def dups(path: Path, *args: str) -> tuple[dict[str, str], set[str]]:
        res = run("norms", path, "--format", "json", *args)
        assert res.exit_code == 0, res.output
        rows = strict_json(res.stdout)["tensors"]
        return {t["name"]: t["duplicate_of"] for t in rows if t.get("duplicate_of")}, {t["name"] for t in rows}

    assert dups(tmp_path / "c.pt")[0] == expected == dups(tmp_path / "cc.pt")[0]
    assert dups(tmp_path / "c.pt", "--dedup")[1] == set(obj) - set(expected) == dups(tmp_path / "cc.pt", "--dedup")[1]
