"""Real torch.save files (torch only writes them: gradinspect reads them without importing torch)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import gradinspect
from conftest import ROOT, exact_sums, rel, rel_sqrt, run, strict_json

torch = pytest.importorskip("torch", reason="torch writes the files these tests read (gradinspect never imports it)")
st_torch = pytest.importorskip("safetensors.torch", reason="the oracle file is written by safetensors.torch")


def _views() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 500, generator=g)
    v = torch.randn(40, generator=g)
    big = torch.randn(700, 400, generator=g)
    return {
        "w": w, "col": w[:, 7], "tr": w.t(), "off": w[5:], "sub": w[:100, 3:17:2], "exp": v.expand(1000, 40),
        "rep": v[5:6].expand(3), "big_t": big.t(), "half": torch.randn(64, 3, generator=g).half(),
        "bf": torch.randn(64, 3, generator=g).bfloat16().t(),
        "f8": torch.randn(10, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(10, generator=g).to(torch.float8_e5m2),
        "f64": torch.randn(9, 9, generator=g).double()[1:5, 1:5],
        "narrow": w.narrow(1, 100, 50), "diag": w.diagonal(), "empty": w[:0], "i": torch.arange(4),
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_views_as_torch_load_gives_them(tmp_path: Path, protocol: int, suffix: str) -> None:
    views = _views()
    pt = tmp_path / f"g{suffix}"
    torch.save(views, pt, pickle_protocol=protocol)
    st = tmp_path / "g.safetensors"
    st_torch.save_file({k: t.contiguous().clone() for k, t in views.items()}, str(st))
    ours, ref = gradinspect.inspect(pt), gradinspect.inspect(st)
    assert ours.total == ref.total
    assert {t.name: (t.l1, t.l2, t.linf, t.numel) for t in ours.tensors} == {
        t.name: (t.l1, t.l2, t.linf, t.numel) for t in ref.tensors}
    with warnings.catch_warnings():  # torch.load warns about protocols 4 and 5; weights_only cannot read FRAME
        warnings.simplefilter("ignore", UserWarning)
        loaded = torch.load(pt, weights_only=protocol == 2)  # our own file: trusted
    for t in ours.tensors:
        arr = loaded[t.name].float().numpy() if loaded[t.name].dtype != torch.float64 else loaded[t.name].numpy()
        assert t.shape == tuple(loaded[t.name].shape)
        if arr.size and arr.dtype == np.float32:
            s1, s2 = exact_sums(arr)
            assert rel(t.l1, s1) <= 1e-12 and rel_sqrt(t.l2, s2) <= 1e-12, t.name
        elif arr.size:
            assert t.l2 == pytest.approx(math.sqrt(math.fsum(float(x) ** 2 for x in arr.reshape(-1))), rel=1e-12)


def test_diff_against_torch_load(tmp_path: Path) -> None:
    views = _views()
    torch.save(views, tmp_path / "g.pt")
    st_torch.save_file({k: t.contiguous().clone() for k, t in views.items()}, str(tmp_path / "g.safetensors"))
    res = run("diff", tmp_path / "g.pt", tmp_path / "g.safetensors", "--format", "json", "--atol", "0")
    assert res.exit_code == 0, res.output
    assert all(t["linf_diff"] == 0 for t in strict_json(res.stdout)["tensors"])


def test_grads_of_a_model_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, torch.nn.Linear(16, 16), head)
    model(torch.randint(0, 50, (4, 7))).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    assert grads["0.weight"] is grads["2.weight"]
    torch.save({"grads": grads, "step": 5, "loss_scale": 8.0}, tmp_path / "grads.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # an OrderedDict with _metadata, tied weights twice
    rep = gradinspect.inspect(tmp_path / "grads.pt")
    dup = {t.name: t.duplicate_of for t in rep.tensors}
    assert dup["grads.2.weight"] == "grads.0.weight"
    once = gradinspect.inspect(tmp_path / "grads.pt", dedup=True)
    total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))  # counts the tied grad once
    assert once.total.l2 == pytest.approx(total / 8.0, rel=1e-6)
    res = run("norms", tmp_path / "grads.pt", "--format", "json", "--dedup")
    assert res.exit_code == 0, res.output
    data = strict_json(res.stdout)
    assert data["metadata"] == {str(tmp_path / "grads.pt"): {"step": "5", "loss_scale": "8.0"}}
    sd = gradinspect.inspect(tmp_path / "sd.pt")
    assert {t.name: t.duplicate_of for t in sd.tensors}["2.weight"] == "0.weight"


def test_parameters_and_a_single_tensor(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.ones(3, 2))
    torch.save({"p": p}, tmp_path / "p.pt")
    torch.save(torch.full((4,), 2.0), tmp_path / "t.pt")
    assert gradinspect.inspect(tmp_path / "p.pt").total.l1 == 6.0
    assert gradinspect.inspect(tmp_path / "t.pt").total.l2 == 4.0


def test_legacy_format_refused(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    res = run("norms", tmp_path / "old.pt")
    assert res.exit_code == 2 and "the legacy torch.save format" in res.stderr, res.output


def test_trend_over_torch_steps(tmp_path: Path) -> None:
    for step in (3, 1, 2):
        torch.save({"step": step, "grads": {"w": torch.full((10,), float(step))}}, tmp_path / f"s{step}.pt")
    res = run("trend", str(tmp_path / "*.pt"), "--format", "json")
    assert res.exit_code == 0, res.output
    steps = strict_json(res.stdout)["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]


def test_torch_is_never_imported(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(5, 5).t()}, tmp_path / "g.pt")
    code = ("import sys, gradinspect; r = gradinspect.inspect(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r.total.numel)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.pt")], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "25"
