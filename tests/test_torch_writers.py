"""gradinspect.torch: save_grads and GradDumper on real models trained on CPU, read back by the CLI (issue 10 §5)."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import gradinspect
from conftest import exact_sums, rel_sqrt, run, run_process

torch = pytest.importorskip("torch", reason="gradinspect.torch writes dumps from torch models: torch is not installed")

from torch_models import DIM, TiedLM, batch, fsdp_worker, loss_of  # noqa: E402

from gradinspect.torch import GradDumper, save_grads  # noqa: E402


def _trained(dtype: Any = torch.float32, steps: int = 3, seed: int = 0) -> Any:
    """A model trained a few steps on CPU, with the gradients of one more backward() in place."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TiedLM().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        loss_of(model, batch(gen)).backward()
        opt.step()
        opt.zero_grad()
    loss_of(model, batch(gen)).backward()
    return model


def _as_numpy(t: Any) -> Any:
    import ml_dtypes
    import numpy as np

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().astype(np.float32) if t.dtype == torch.float16 else t.numpy()


def _exact_sq(tensors: Any) -> Fraction:
    return sum((exact_sums(_as_numpy(t))[1] for t in tensors), Fraction(0))


def _json(*args: object) -> dict[str, Any]:
    """The CLI's JSON, in-process (the CLI in a subprocess: test_save_grads_counts_a_tied_weight_once...)."""
    r = run(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_save_grads_counts_a_tied_weight_once_as_clip_grad_norm_does(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _trained()
    path = tmp_path / "grads.safetensors"
    save_grads(model, path, step=3)
    saved = load_file(path)
    # the tied weight once, under its first name; the parameter without a grad left out
    assert sorted(saved) == ["embed.weight", "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight",
                             "norm.bias", "norm.weight"]
    for name, p in model.named_parameters():
        if name in saved:
            assert saved[name].dtype == p.grad.dtype and torch.equal(saved[name], p.grad)
    oracle = _exact_sq(p.grad for p in model.parameters() if p.grad is not None)
    twice = _exact_sq(p.grad for _, p in model.named_parameters(remove_duplicate=False) if p.grad is not None)
    assert rel_sqrt(math.sqrt(float(twice)), oracle) > 1e-3  # a dict of named grads would count it twice
    report = gradinspect.inspect(path)
    assert rel_sqrt(report.total.l2, oracle) <= 1e-12
    proc = run_process("norms", str(path), "--format", "json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["total"]["l2"] == report.total.l2
    total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    assert report.total.l2 == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_dtype_is_kept(tmp_path: Path, dtype: str) -> None:
    model = _trained(getattr(torch, dtype))
    path = tmp_path / "grads.safetensors"
    save_grads(model.named_parameters(), path)
    info = _json("info", path, "--format", "json")
    assert {t["dtype"] for t in info["tensors"]} == {dtype}
    oracle = _exact_sq(p.grad for p in model.parameters() if p.grad is not None)
    assert rel_sqrt(gradinspect.inspect(path).total.l2, oracle) <= 1e-12


def test_metadata_step_is_trends_and_loss_scale_is_divided_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    scale = 1024.0
    norms = {}
    for step in (5, 7, 9):
        model = _trained(steps=step)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)  # what backward() of a loss scaled by 1024 gives, before unscaling
        # file names whose last integer is not the step: the metadata must win
        save_grads(model, run / f"dump_{100 - step}.safetensors", step=step, loss_scale=scale,
                   metadata={"note": "scaled"})
        norms[step] = math.sqrt(float(_exact_sq(p.grad for p in model.parameters() if p.grad is not None))) / scale
    info = _json("info", run / "dump_95.safetensors", "--format", "json")
    assert list(info["metadata"].values()) == [{"note": "scaled", "step": "5", "loss_scale": "1024.0",
                                                "rank": "0", "world_size": "1"}]
    trend = _json("trend", run / "dump_*.safetensors", "--format", "json")
    assert [s["step"] for s in trend["steps"]] == [5, 7, 9]
    for s in trend["steps"]:
        assert s["total"]["l2"] == pytest.approx(norms[s["step"]], rel=1e-12)
    report = gradinspect.inspect(run / "dump_93.safetensors")
    assert report.loss_scale == scale and report.total.l2 == pytest.approx(norms[7], rel=1e-12)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    model = _trained(steps=0)
    with pytest.raises(ValueError, match="metadata key 'step' is written by save_grads: pass it as step="):
        save_grads(model, tmp_path / "g.safetensors", metadata={"step": "3"})
    with pytest.raises(TypeError, match="expected a model, \\(name, parameter\\) pairs or a \\{name: parameter\\} "
                                        "mapping, not an iterable of Parameter"):
        save_grads(model.parameters(), tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
        save_grads(model, tmp_path / "g.safetensors", loss_scale=0.0)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        GradDumper(model, tmp_path, every=0)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file left
    with pytest.raises(ValueError, match="step must be an integer from 0 to 2\\*\\*63 - 1, not -1"):
        GradDumper(model, tmp_path / "d").step(-1)


def test_a_failed_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    model = _trained(steps=0)
    path = tmp_path / "grads.safetensors"
    save_grads(model, path, step=1)
    before = path.read_bytes()

    def half(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a dump")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(OSError, match="disk full"):
        save_grads(model, path, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["grads.safetensors"]

def _dump_run(directory: Path, every: int, steps: int, spike: set[int], nan: set[int],
              scale: float | None = None) -> tuple[GradDumper, dict[int, str | None], dict[int, float | None]]:
    """Train ``steps`` steps with a GradDumper; the loss is multiplied by 1000 at the ``spike`` steps and by NaN at
    the ``nan`` steps (whose updates are skipped, as GradScaler skips them)."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dumper = GradDumper(model, directory, every=every)
    reasons: dict[int, str | None] = {}
    norms: dict[int, float | None] = {}
    for step in range(steps):
        loss = loss_of(model, batch(gen))
        if step in spike:
            loss = loss * 1000
        if step in nan:
            loss = loss * math.nan
        (loss * scale if scale else loss).backward()
        dumper.step(step, loss_scale=scale)
        reasons[step], norms[step] = dumper.last_reason, dumper.last_norm
        if step not in spike | nan:
            if scale:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(scale)  # unscaled before the update, as GradScaler does
            opt.step()
        opt.zero_grad()
    return dumper, reasons, norms


def test_grad_dumper_dumps_every_n_steps_and_the_steps_that_went_wrong(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, reasons, norms = _dump_run(run, every=4, steps=14, spike={9}, nan={11})
    assert sorted(os.listdir(run)) == [f"step_{s:08d}.safetensors" for s in (0, 4, 8, 9, 11, 12)]
    assert {s: r for s, r in reasons.items() if r} == {0: "every", 4: "every", 8: "every", 9: "spike",
                                                      11: "nonfinite", 12: "every"}
    # the gradients of the step that went wrong, not the one after
    spiked = gradinspect.inspect(run / "step_00000009.safetensors").total.l2
    assert spiked == pytest.approx(norms[9], rel=1e-9) and spiked > 100 * norms[8]  # type: ignore[operator]
    trend = _json("trend", run, "--format", "json")
    assert [s["step"] for s in trend["steps"]] == [0, 4, 8, 9, 11, 12]
    assert [s["step"] for s in trend["spikes"]] == [9]
    assert trend["first_nonfinite"]["step"] == 11


def test_the_dumpers_spikes_are_trends_when_every_step_is_dumped(tmp_path: Path) -> None:
    """The same baseline rule: with every=1, trend flags exactly the steps the dumper flagged (a NaN step takes a
    slot of the window and is left out of the median, in both), on the unscaled norms."""
    run = tmp_path / "run"
    _, reasons, norms = _dump_run(run, every=1, steps=16, spike={4, 9, 14}, nan={6, 12}, scale=256.0)
    assert len(os.listdir(run)) == 16
    assert [s for s, r in reasons.items() if r == "spike"] == [4, 9, 14]
    assert [s for s, r in reasons.items() if r == "nonfinite"] == [6, 12]
    trend = _json("trend", run, "--format", "json", "--window", "20", "--spike-factor", "3")
    assert [s["step"] for s in trend["spikes"]] == [4, 9, 14]
    assert trend["first_nonfinite"]["step"] == 6
    for s in trend["steps"]:  # the dumper's norms are those of the unscaled gradients too
        if norms[s["step"]] is not None and math.isfinite(norms[s["step"]]):  # type: ignore[arg-type]
            assert s["total"]["l2"] == pytest.approx(norms[s["step"]], rel=1e-9)
    sparse = tmp_path / "sparse"
    _, reasons, _ = _dump_run(sparse, every=1000, steps=16, spike={4, 9, 14}, nan={6, 12}, scale=256.0)
    assert sorted(os.listdir(sparse)) == [f"step_{s:08d}.safetensors" for s in (0, 4, 6, 9, 12, 14)]


# --- two ranks: FSDP2 (fully_shard) on CPU with gloo -------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_fsdp2_ranks_dump_shards_that_merge_to_the_full_gradients(tmp_path: Path) -> None:
    import time

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    ctx = mp.spawn(fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 50
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the two ranks did not finish within 50 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
    assert all(p.exitcode == 0 for p in ctx.processes)

    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == [f"step_{s:08d}_rank{r}.safetensors" for s in (0, 2, 4, 5) for r in (0, 1)]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == [[n, r, w.replace("rank1", "rank0") if w else w] for n, r, w in seen[1]]  # the same decisions
    assert [r for _, r, _ in seen[0]] == ["every", None, "every", None, "every", "spike"]  # from the global norm
    info = _json("info", run / "step_00000005_rank1.safetensors", "--format", "json")
    assert list(info["metadata"].values()) == [{"step": "5", "rank": "1", "world_size": "2"}]
    # the tied weight once; the unused parameter (no grad) left out; embed.weight's 37 rows split 19 + 18
    assert {t["name"]: t["shape"] for t in info["tensors"]}["embed.weight"] == [18, DIM]
    full = load_file(tmp_path / "full.safetensors")
    assert sorted(full) == sorted(t["name"] for t in info["tensors"])
    oracle = _exact_sq(full.values())
    merged = _json("norms", run / "step_00000005_rank*.safetensors", "--shards", "slices", "--format", "json")
    whole = _json("norms", tmp_path / "full.safetensors", "--format", "json")
    assert rel_sqrt(merged["total"]["l2"], oracle) <= 1e-12
    assert rel_sqrt(whole["total"]["l2"], oracle) <= 1e-12
    assert {t["name"]: t["pieces"] for t in merged["tensors"]} == dict.fromkeys(full, 2)
    assert seen[0][5][0] == pytest.approx(whole["total"]["l2"], rel=1e-9)  # the dumper's all-reduced norm
    # row shards in rank order: element by element, the full gradients
    diff = _json("diff", run / "step_00000005_rank*.safetensors", tmp_path / "full.safetensors", "--shards-a", "slices",
                 "--format", "json", "--atol", "0")
    assert diff["ok"] and diff["total"]["linf_diff"] == 0 and not diff["mismatched"] and not diff["only_a"]
    trend = _json("trend", run, "--shards", "slices", "--format", "json")
    assert [s["step"] for s in trend["steps"]] == [0, 2, 4, 5]
    assert [s["step"] for s in trend["spikes"]] == [5]
    for s, (norm, _, _) in zip(trend["steps"], [seen[0][i] for i in (0, 2, 4, 5)], strict=True):
        assert s["total"]["l2"] == pytest.approx(norm, rel=1e-9)
    # an empty shard, and a replicated gradient saved once
    odd = [_json("info", tmp_path / f"odd_rank{r}.safetensors", "--format", "json") for r in (0, 1)]
    assert [{t["name"]: t["shape"] for t in o["tensors"]} for o in odd] == [
        {"weight": [1, 4], "bias": [1], "replicated": [3]}, {"weight": [0, 4], "bias": [0]}]
    odd_full = load_file(tmp_path / "odd_full.safetensors")
    merged = _json("norms", tmp_path / "odd_rank*.safetensors", "--shards", "slices", "--format", "json")
    assert rel_sqrt(merged["total"]["l2"], _exact_sq(odd_full.values())) <= 1e-12
    assert not (tmp_path / "never.safetensors").exists()
