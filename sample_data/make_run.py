#!/usr/bin/env python3
"""Generate sample_data/run/: the gradients of every step of a short, real training run that goes wrong.

The model, data, backward pass and Adam are those of make_samples.py (imported, not copied).
The run trains in fp16 mixed precision (make_samples' FP16 policy: fp16 activations and
gradients, fp32 accumulation, fp32 master weights) with a dynamic loss scaler that behaves like
torch's GradScaler (init_scale 2**12, backoff 0.5, growth interval 2000): the gradients are
unscaled to float32 and checked; a step with NaN/Inf is skipped and the scale halved.
Each step's unscaled gradients are written to run/step_{step:06d}.safetensors before the update.

The story: healthy training; after the update of step JUMP_STEP the learning rate of the
'embed.weight' parameter group jumps from 1e-3 to 1.0 (a per-group lr typo, as in
exploding.safetensors) and stays there. The next gradient is a spike, the run does not recover,
and the growing embedding later overflows the fp16 backward pass: NaN/Inf in the gradients.

    python sample_data/make_run.py

Needs numpy, safetensors, ml_dtypes and scikit-learn. Runs on one BLAS thread (set by make_samples).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_samples as ms  # sets the one-BLAS-thread environment before numpy loads
import numpy as np

OUT = Path(__file__).resolve().parent / "run"

STEPS = 40                  # dumps: steps 0..STEPS-1 (about 221 kB each)
JUMP_STEP = 20              # the update made with this step's gradients uses the bad lr, and so do all later ones
JUMP_GROUP = "embed.weight"
JUMP_LR = 1.0               # instead of ms.LR = 1e-3
INIT_SCALE = 2.0 ** 12      # GradScaler(init_scale=...); torch's default is 2**16
BACKOFF, GROWTH_INTERVAL = 0.5, 2000
WINDOW, SPIKE_FACTOR = 20, 3.0   # the spike rule of `gradinspect trend`, for the printed summary

NOTE = (f"make_run.py: pre-norm residual MLP on load_digits, Adam lr={ms.LR}, batch {ms.BATCH}, seed {ms.SEED}, "
        f"fp16 autocast-style backward with a dynamic loss scale (init 2**{int(math.log2(INIT_SCALE))}); "
        f"gradients unscaled to float32 before this dump (amp_scale is already divided out); "
        f"from the update of step {JUMP_STEP} on, the '{JUMP_GROUP}' group uses lr={JUMP_LR}")


def run() -> list[dict]:
    rng = np.random.default_rng(ms.SEED)
    xtr, ytr, _, _ = ms.load_data()
    params = ms.init_params(rng)
    opt = ms.Adam(params)
    it = ms.batches(len(ytr), rng)
    scale, good = INIT_SCALE, 0

    OUT.mkdir(exist_ok=True)
    for p in OUT.glob("step_*.safetensors"):
        p.unlink()
    rows = []
    for step in range(STEPS):
        idx = next(it)
        loss, g16 = ms.loss_and_grads(params, xtr[idx], ytr[idx], ms.FP16, loss_scale=scale)
        with np.errstate(over="ignore", invalid="ignore"):
            grads = {k: v.astype(np.float32) * np.float32(1.0 / scale) for k, v in g16.items()}
        finite = all(bool(np.isfinite(v).all()) for v in grads.values())
        lr_group = JUMP_LR if step >= JUMP_STEP else ms.LR
        metadata = {"step": str(step), "loss": f"{loss:.6f}", "lr": f"{ms.LR:g}", f"lr.{JUMP_GROUP}": f"{lr_group:g}",
                    "amp_scale": f"{scale:g}", "skipped": "false" if finite else "true", "note": NOTE}
        ms.write_safetensors(OUT / f"step_{step:06d}.safetensors", {**grads, "step": ms.step_tensor(step)}, metadata)
        rows.append({"step": step, "loss": loss, "scale": scale, "skipped": not finite, "grads": grads,
                     "wnorm": float(np.linalg.norm(params[JUMP_GROUP]))})
        if finite:                                   # GradScaler.step + update
            opt.step(params, grads, lr_overrides={JUMP_GROUP: lr_group})
            good += 1
            if good == GROWTH_INTERVAL:
                scale, good = scale * 2.0, 0
        else:                                        # skip the update, back off
            scale, good = scale * BACKOFF, 0
    return rows


def summarize(rows: list[dict]) -> None:
    """Per-step global L2 (float64) and non-finite count, and the spike rule of `gradinspect trend`."""
    sqs, l2s = [], []
    print(f"{'step':>4} {'loss':>9} {'global L2':>12} {'nonfinite':>9} {'amp scale':>9} {'|embed.w|':>9}  "
          f"{'ratio':>7}  top tensor (share of squared L2)")
    for i, r in enumerate(rows):
        sq = {k: math.fsum((v.astype(np.float64) ** 2).ravel()) for k, v in r["grads"].items()}
        nonfinite = sum(int((~np.isfinite(v)).sum()) for v in r["grads"].values())
        total = math.fsum(sq.values())
        l2 = math.sqrt(total) if nonfinite == 0 else float("nan")
        prev = [x for x in l2s[max(0, i - WINDOW):i] if math.isfinite(x)]
        base = float(np.median(prev)) if len(prev) >= 3 else None
        ratio = l2 / base if base and math.isfinite(l2) else None
        mark = " SPIKE" if ratio is not None and ratio > SPIKE_FACTOR else ""
        top = max(sq, key=lambda k: sq[k] if math.isfinite(sq[k]) else -1.0)
        bad = ", ".join(f"{k} {int((~np.isfinite(v)).sum())}" for k, v in r["grads"].items()
                        if not np.isfinite(v).all())
        print(f"{r['step']:4d} {r['loss']:9.4f} {l2:12.6g} {nonfinite:9d} {r['scale']:9g} {r['wnorm']:9.4g}  "
              f"{'' if ratio is None else f'{ratio:7.2f}':>7}  "
              + (f"non-finite: {bad}" if nonfinite else f"{top} ({100 * sq[top] / total:.1f}%)") + mark)
        if mark and not any(x["spike"] for x in sqs):
            # the first spike: which tensors grew (the culprit rule of `gradinspect trend`)
            base_steps = [j for j in range(max(0, i - WINDOW), i) if math.isfinite(l2s[j])]
            inc = {k: sq[k] - float(np.median([sqs[j]["sq"][k] for j in base_steps])) for k in sq}
            pos = math.fsum(v for v in inc.values() if v > 0)
            parts = sorted(((v / pos, k) for k, v in inc.items() if v > 0), reverse=True)[:4]
            print("       culprits: " + ", ".join(f"{k} {100 * p:.1f}%" for p, k in parts))
        sqs.append({"sq": sq, "spike": bool(mark)})
        l2s.append(l2)
    size = sum(p.stat().st_size for p in OUT.glob("step_*.safetensors"))
    print(f"\n{len(rows)} files, {size} bytes in {OUT}")


def main() -> int:
    summarize(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
