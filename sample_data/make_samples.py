#!/usr/bin/env python3
"""Generate the sample gradient dumps in this directory from a real backward pass.

Model: a small pre-norm residual MLP (embed -> 3 x [RMSNorm -> fc1 -> GELU -> fc2, residual]
-> head) written in plain numpy with a hand-written backward pass, trained with Adam on
scikit-learn's bundled 8x8 ``load_digits`` data set (no download).  Everything is seeded.

    python sample_data/make_samples.py           # (re)write all sample files
    python sample_data/make_samples.py --check   # finite-difference gradient check (float64) only

Needs numpy, safetensors, ml_dtypes and scikit-learn.
"""

from __future__ import annotations

import os

# One BLAS thread: keeps float32 matmul results bit-identical from run to run.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import io
import json
import math
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as st_save
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent

SEED = 0
IN_DIM, HIDDEN, FFN, N_BLOCKS, N_CLASSES = 64, 64, 128, 3, 10
BATCH = 64
LR, BETAS, ADAM_EPS = 1e-3, (0.9, 0.999), 1e-8
RMS_EPS = 1e-6
HEALTHY_STEP = 200          # gradients are taken after this many Adam updates

# exploding.safetensors: a per-parameter-group learning rate typo (1.0 instead of 1e-3)
# for the embedding, applied for a few steps before the dumped backward pass.
BAD_GROUP = "embed.weight"
BAD_LR = 1.0
BAD_STEPS = 3

# nan.safetensors: fp16 autocast-style forward/backward with a too-large loss scale
# (torch's GradScaler starts at 2**16 and doubles after every 2000 overflow-free steps).
LOSS_SCALE = 2.0 ** 22

# broken_layer.safetensors: the buggy tensor.
BUG_TENSOR = "blocks.1.fc2.weight"


def param_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("embed.weight", (HIDDEN, IN_DIM)), ("embed.bias", (HIDDEN,))]
    for i in range(N_BLOCKS):
        shapes += [
            (f"blocks.{i}.norm.scale", (HIDDEN,)),
            (f"blocks.{i}.fc1.weight", (FFN, HIDDEN)),
            (f"blocks.{i}.fc1.bias", (FFN,)),
            (f"blocks.{i}.fc2.weight", (HIDDEN, FFN)),
            (f"blocks.{i}.fc2.bias", (HIDDEN,)),
        ]
    shapes += [("head.weight", (N_CLASSES, HIDDEN)), ("head.bias", (N_CLASSES,))]
    return shapes


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    params = {}
    for name, shape in param_shapes():
        if name.endswith("norm.scale"):
            p = np.ones(shape)
        elif name.endswith("bias"):
            p = np.zeros(shape)
        else:
            fan_in = shape[1]
            gain = 0.5 if ".fc2." in name else 1.0   # damp residual branches at init
            p = rng.normal(0.0, gain / math.sqrt(fan_in), size=shape)
        params[name] = p.astype(np.float32)
    return params


# --------------------------------------------------------------------------- numerics


class Precision:
    """Numeric policy: activations/gradients are stored in ``act``, ops compute in ``acc``.

    float32/float32 is ordinary training, float64/float64 is the gradient check and
    float16/float32 mimics CUDA autocast (fp16 tensors, fp32 accumulation, results rounded
    back to fp16, where anything above 65504 becomes inf).
    """

    def __init__(self, act: type, acc: type) -> None:
        self.act, self.acc = np.dtype(act), np.dtype(acc)

    def up(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(self.acc, copy=False)

    def rd(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(self.act, copy=False)

    def mm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.rd(self.up(a) @ self.up(b))


FP32 = Precision(np.float32, np.float32)
FP64 = Precision(np.float64, np.float64)
FP16 = Precision(np.float16, np.float32)

_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(a: np.ndarray) -> np.ndarray:
    return 0.5 * a * (1.0 + np.tanh(_GELU_C * (a + 0.044715 * a**3)))


def gelu_grad(a: np.ndarray) -> np.ndarray:
    t = np.tanh(_GELU_C * (a + 0.044715 * a**3))
    return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * a * a)


def forward(params, x, y, P: Precision):
    """Returns (loss, cache).  Loss is the mean cross-entropy, computed in P.acc."""
    W = {k: P.rd(v) for k, v in params.items()}       # autocast: weights cast to act dtype
    x = P.rd(x)
    h = P.rd(P.up(P.mm(x, W["embed.weight"].T)) + P.up(W["embed.bias"]))
    blocks = []
    for i in range(N_BLOCKS):
        pre = f"blocks.{i}."
        hu = P.up(h)
        inv = 1.0 / np.sqrt(np.mean(hu * hu, axis=-1, keepdims=True) + RMS_EPS)
        n = hu * inv
        r = P.rd(n * P.up(W[pre + "norm.scale"]))
        a = P.rd(P.up(P.mm(r, W[pre + "fc1.weight"].T)) + P.up(W[pre + "fc1.bias"]))
        u = P.rd(gelu(P.up(a)))
        o = P.rd(P.up(P.mm(u, W[pre + "fc2.weight"].T)) + P.up(W[pre + "fc2.bias"]))
        blocks.append(dict(h=h, inv=inv, n=n, r=r, a=a, u=u))
        h = P.rd(P.up(h) + P.up(o))
    logits = P.rd(P.up(P.mm(h, W["head.weight"].T)) + P.up(W["head.bias"]))
    z = P.up(logits).astype(np.float64 if P.acc == np.float64 else np.float32)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    return loss, dict(W=W, x=x, y=y, blocks=blocks, h=h, logp=logp)


def backward(cache, P: Precision, loss_scale: float = 1.0, bug: str | None = None):
    """Hand-written backward pass; returns {name: grad} in P.act (still multiplied by loss_scale).

    ``bug=BUG_TENSOR`` reproduces a classic mistake: the fc2 weight gradient of that block
    uses the saved pre-activation ``a`` instead of the GELU output ``u``.
    """
    W, x, y, h = cache["W"], cache["x"], cache["y"], cache["h"]
    B = len(y)
    p = np.exp(cache["logp"])
    p[np.arange(B), y] -= 1.0
    dlogits = P.rd(p / B * loss_scale)
    g = {}
    g["head.weight"] = P.mm(dlogits.T, h)
    g["head.bias"] = P.rd(P.up(dlogits).sum(axis=0))
    dh = P.mm(dlogits, W["head.weight"])
    for i in reversed(range(N_BLOCKS)):
        pre, c = f"blocks.{i}.", cache["blocks"][i]
        fc2_in = c["a"] if bug == pre + "fc2.weight" else c["u"]
        g[pre + "fc2.weight"] = P.mm(dh.T, fc2_in)
        g[pre + "fc2.bias"] = P.rd(P.up(dh).sum(axis=0))
        du = P.mm(dh, W[pre + "fc2.weight"])
        da = P.rd(P.up(du) * gelu_grad(P.up(c["a"])))
        g[pre + "fc1.weight"] = P.mm(da.T, c["r"])
        g[pre + "fc1.bias"] = P.rd(P.up(da).sum(axis=0))
        dr = P.up(P.mm(da, W[pre + "fc1.weight"]))
        g[pre + "norm.scale"] = P.rd((dr * c["n"]).sum(axis=0))
        dn = dr * P.up(W[pre + "norm.scale"])
        dnorm = c["inv"] * (dn - c["n"] * np.mean(dn * c["n"], axis=-1, keepdims=True))
        dh = P.rd(P.up(dh) + dnorm)                       # residual: both paths add up
    g["embed.weight"] = P.mm(dh.T, x)
    g["embed.bias"] = P.rd(P.up(dh).sum(axis=0))
    return {name: g[name] for name, _ in param_shapes()}


def loss_and_grads(params, x, y, P=FP32, **kw):
    with np.errstate(over="ignore", invalid="ignore"):
        loss, cache = forward(params, x, y, P)
        return loss, backward(cache, P, **kw)


def accuracy(params, x, y) -> float:
    _, cache = forward(params, x, y, FP32)
    return float((cache["logp"].argmax(axis=1) == y).mean())


class Adam:
    def __init__(self, params):
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads, lr=LR, lr_overrides=None):
        self.t += 1
        b1, b2 = BETAS
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for k in params:
            g = grads[k]
            self.m[k] = (b1 * self.m[k] + (1 - b1) * g).astype(np.float32)
            self.v[k] = (b2 * self.v[k] + (1 - b2) * g * g).astype(np.float32)
            step_lr = (lr_overrides or {}).get(k, lr)
            upd = step_lr * (self.m[k] / bc1) / (np.sqrt(self.v[k] / bc2) + ADAM_EPS)
            params[k] = (params[k] - upd).astype(np.float32)


def load_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    test, train = perm[:297], perm[297:]
    return x[train], y[train], x[test], y[test]


def batches(n: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(n)
        for s in range(0, n - BATCH + 1, BATCH):
            yield order[s:s + BATCH]


# --------------------------------------------------------------------------- gradient check


def grad_check() -> bool:
    rng = np.random.default_rng(1234)
    xtr, ytr, _, _ = load_data()
    params = {k: v.astype(np.float64) for k, v in init_params(rng).items()}
    # perturb away from the init (zero biases, unit scales) so every term is exercised
    for k in params:
        params[k] = params[k] + rng.normal(0.0, 0.05, size=params[k].shape)
    idx = rng.choice(len(ytr), 16, replace=False)
    x, y = xtr[idx].astype(np.float64), ytr[idx]

    def fd_check(bug=None, names=None, per=3, h=1e-5):
        _, grads = loss_and_grads(params, x, y, FP64, bug=bug)
        worst = 0.0
        for name, _ in param_shapes():
            if names and name not in names:
                continue
            flat = params[name].reshape(-1)
            for j in rng.choice(flat.size, min(per, flat.size), replace=False):
                old = flat[j]
                flat[j] = old + h
                lp, _ = forward(params, x, y, FP64)
                flat[j] = old - h
                lm, _ = forward(params, x, y, FP64)
                flat[j] = old
                num, ana = (lp - lm) / (2 * h), grads[name].reshape(-1)[j]
                rel = abs(num - ana) / max(abs(num) + abs(ana), 1e-12)
                worst = max(worst, rel)
                if bug is None:
                    print(f"  {name:22s}[{j:5d}]  analytic {ana:+.10e}  numeric {num:+.10e}  rel.err {rel:.1e}")
        return worst

    print("finite-difference check (float64, central differences, h=1e-5), 3 entries per tensor:")
    worst = fd_check()
    ok = worst < 1e-6
    print(f"worst relative error: {worst:.2e} -> {'PASS' if ok else 'FAIL'}")
    worst_bug = fd_check(bug=BUG_TENSOR, names={BUG_TENSOR}, per=8)
    print(f"same check with the broken_layer bug in {BUG_TENSOR}: worst relative error "
          f"{worst_bug:.2e} -> {'caught' if worst_bug > 1e-3 else 'NOT caught'}")
    return ok and worst_bug > 1e-3


# --------------------------------------------------------------------------- writers


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors.numpy.save, with the __metadata__ keys put in sorted order.

    The Rust writer keeps __metadata__ in a HashMap, so its key order (and the file's
    bytes) change from process to process; the header is rewritten with the same length.
    """
    raw = st_save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n], object_pairs_hook=dict)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]


def write_safetensors(path: Path, tensors, metadata) -> None:
    path.write_bytes(safetensors_bytes(tensors, metadata))


def write_npz(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """What np.savez_compressed writes (deflated, zip64 .npy members), minus the wall-clock
    timestamps that np.savez_compressed puts in each zip entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, val in tensors.items():
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, np.asanyarray(val), allow_pickle=False)
    path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------- stats


def read_back(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(read_back(path.parent / shard))
        return out
    with safe_open(str(path), "numpy") as f:            # bf16 needs ml_dtypes imported
        return {k: f.get_tensor(k) for k in f.keys()}


def stats(tensors: dict[str, np.ndarray]) -> dict:
    sq, nan, inf, n_float = {}, 0, 0, 0
    for name, t in tensors.items():
        if t.dtype.kind != "f" and t.dtype != ml_dtypes.bfloat16:
            continue
        n_float += 1
        v = t.astype(np.float64).ravel()
        nan += int(np.isnan(v).sum())
        inf += int(np.isinf(v).sum())
        with np.errstate(over="ignore", invalid="ignore"):
            sq[name] = math.fsum(v * v)
    total = math.fsum(sq.values())
    top = max(sq, key=lambda k: (not math.isnan(sq[k]), sq[k]))
    share = sq[top] / total if math.isfinite(total) and total > 0 else float("nan")
    finite = {k: v for k, v in sq.items() if math.isfinite(v)}
    finite_total = math.fsum(finite.values())
    top_finite = max(finite, key=finite.get) if finite else None
    return dict(count=len(tensors), n_float=n_float, norm=math.sqrt(total), top=top,
                share=share, nan=nan, inf=inf,
                nonfinite_tensors=sorted(k for k in sq if not math.isfinite(sq[k])),
                finite_norm=math.sqrt(finite_total), top_finite=top_finite,
                top_finite_share=finite[top_finite] / finite_total if finite else float("nan"))


def print_stats(label: str, path: Path) -> None:
    s = stats(read_back(path))
    top = "n/a (global norm not finite)" if math.isnan(s["share"]) else f"{s['top']} ({100 * s['share']:.2f}%)"
    print(f"{label}\n  tensors: {s['count']} ({s['n_float']} float)   global L2: {s['norm']:.9g}   "
          f"top: {top}   NaN: {s['nan']}  Inf: {s['inf']}")
    if s["nonfinite_tensors"]:
        print(f"  non-finite tensors ({len(s['nonfinite_tensors'])}): {', '.join(s['nonfinite_tensors'])}")
        print(f"  finite tensors only ({s['n_float'] - len(s['nonfinite_tensors'])}): L2 {s['finite_norm']:.9g}, "
              f"top {s['top_finite']} ({100 * s['top_finite_share']:.2f}%)")


# --------------------------------------------------------------------------- main


def step_tensor(step: int) -> np.ndarray:
    return np.array(step, dtype=np.int64)


def meta(step: int, loss: float, note: str) -> dict[str, str]:
    return {"step": str(step), "loss": f"{loss:.6f}", "note": note}


def make_all() -> None:
    rng = np.random.default_rng(SEED)
    xtr, ytr, xte, yte = load_data()
    params = init_params(rng)
    opt = Adam(params)
    it = batches(len(ytr), rng)
    order = [next(it) for _ in range(HEALTHY_STEP + BAD_STEPS + 2)]   # minibatch of each step

    for step in range(HEALTHY_STEP):
        idx = order[step]
        loss, grads = loss_and_grads(params, xtr[idx], ytr[idx])
        opt.step(params, grads)
        if step % 50 == 0:
            print(f"train step {step:3d}  loss {loss:.4f}")

    # ---- healthy: step 200, minibatch 200
    idx = order[HEALTHY_STEP]
    xb, yb = xtr[idx], ytr[idx]
    loss, healthy = loss_and_grads(params, xb, yb)
    acc = accuracy(params, xte, yte)
    print(f"step {HEALTHY_STEP}: minibatch loss {loss:.4f}, held-out accuracy {acc:.3f} ({len(yte)} images)")
    snapshot = {k: v.copy() for k, v in params.items()}
    opt_state = ({k: v.copy() for k, v in opt.m.items()}, {k: v.copy() for k, v in opt.v.items()}, opt.t)

    for p in OUT.glob("*.safetensors"):
        p.unlink()
    (OUT / "healthy.npz").unlink(missing_ok=True)
    shutil.rmtree(OUT / "sharded", ignore_errors=True)
    files = []

    def emit(name, tensors, m):
        write_safetensors(OUT / name, tensors, m)
        files.append((name, OUT / name))

    emit("healthy.safetensors", {**healthy, "step": step_tensor(HEALTHY_STEP)},
         meta(HEALTHY_STEP, loss,
              f"Adam lr={LR}, batch {BATCH}, load_digits; float32 gradients of the mean "
              f"cross-entropy after {HEALTHY_STEP} updates (held-out accuracy {acc:.3f})"))

    # ---- healthy_next: one Adam step later, next minibatch
    opt.step(params, healthy)
    idx = order[HEALTHY_STEP + 1]
    loss_n, nxt = loss_and_grads(params, xtr[idx], ytr[idx])
    emit("healthy_next.safetensors", {**nxt, "step": step_tensor(HEALTHY_STEP + 1)},
         meta(HEALTHY_STEP + 1, loss_n,
              "same run one Adam update after healthy.safetensors, next minibatch"))

    # ---- exploding: restart from the step-200 state, misconfigured lr for one group
    params = {k: v.copy() for k, v in snapshot.items()}
    opt.m = {k: v.copy() for k, v in opt_state[0].items()}
    opt.v = {k: v.copy() for k, v in opt_state[1].items()}
    opt.t = opt_state[2]
    w0 = float(np.linalg.norm(params[BAD_GROUP]))
    g_bad = healthy
    for k in range(BAD_STEPS):
        opt.step(params, g_bad, lr_overrides={BAD_GROUP: BAD_LR})
        idx = order[HEALTHY_STEP + 1 + k]
        loss_x, g_bad = loss_and_grads(params, xtr[idx], ytr[idx])
    w1 = float(np.linalg.norm(params[BAD_GROUP]))
    emit("exploding.safetensors", {**g_bad, "step": step_tensor(HEALTHY_STEP + BAD_STEPS)},
         meta(HEALTHY_STEP + BAD_STEPS, loss_x,
              f"from the step-{HEALTHY_STEP} state, {BAD_STEPS} Adam updates with lr={BAD_LR} "
              f"(instead of {LR}) for the '{BAD_GROUP}' parameter group only; its weight norm "
              f"went {w0:.3g} -> {w1:.3g}. The blown-up embedding inflates the residual stream "
              f"that feeds the head, so head.weight's gradient (upstream grad x that input) "
              f"dominates this float32 backward pass"))

    # ---- nan: the healthy step in fp16 autocast with loss scale 2**16, then unscale_
    loss_h, g16 = loss_and_grads(snapshot, xb, yb, FP16, loss_scale=LOSS_SCALE)
    with np.errstate(over="ignore", invalid="ignore"):
        unscaled = {k: (v.astype(np.float32) * np.float32(1.0 / LOSS_SCALE)) for k, v in g16.items()}
    emit("nan.safetensors", {**unscaled, "step": step_tensor(HEALTHY_STEP)},
         meta(HEALTHY_STEP, loss_h,
              f"healthy model and minibatch, fp16 forward/backward (fp32 accumulate, fp16 "
              f"results) with loss scale 2**{int(math.log2(LOSS_SCALE))} (too high; GradScaler's "
              f"default init_scale is 2**16); scaled activation gradients overflow fp16 to inf, "
              f"and inf*0 at the zero input pixels gives NaN in embed.weight; grads then unscaled to float32 "
              f"as GradScaler.unscale_ does (GradScaler would skip this step)"))

    # ---- bf16
    emit("bf16.safetensors",
         {**{k: v.astype(ml_dtypes.bfloat16) for k, v in healthy.items()}, "step": step_tensor(HEALTHY_STEP)},
         meta(HEALTHY_STEP, loss, "healthy.safetensors gradients rounded to bfloat16"))

    # ---- npz
    write_npz(OUT / "healthy.npz", {**healthy, "step": step_tensor(HEALTHY_STEP)})
    files.append(("healthy.npz", OUT / "healthy.npz"))

    # ---- sharded (Hugging Face index layout)
    sdir = OUT / "sharded"
    sdir.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    first = {k: v for k, v in healthy.items() if k.startswith(("embed.", "blocks.0."))}
    second = {k: v for k, v in healthy.items() if k not in first}
    shards = [{**first, "step": step_tensor(HEALTHY_STEP)}, second]
    weight_map = {}
    total = 0
    for fname, tensors in zip(names, shards):
        write_safetensors(sdir / fname, tensors,
                          meta(HEALTHY_STEP, loss, "healthy.safetensors gradients, sharded by tensor"))
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (sdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    files.append(("sharded/model.safetensors.index.json", sdir / "model.safetensors.index.json"))

    # ---- broken layer: same model and minibatch as healthy, bug in one backward
    loss_b, broken = loss_and_grads(snapshot, xb, yb, bug=BUG_TENSOR)
    emit("broken_layer.safetensors", {**broken, "step": step_tensor(HEALTHY_STEP)},
         meta(HEALTHY_STEP, loss_b,
              f"same model and minibatch as healthy.safetensors, but the backward of "
              f"'{BUG_TENSOR}' multiplies the upstream gradient by the saved pre-activation "
              f"(fc1 output before GELU) instead of the GELU output; no other tensor changes"))

    print()
    for label, path in files:
        print_stats(label, path)
    diff = [k for k in healthy if not np.array_equal(healthy[k], broken[k])]
    print(f"\nbroken_layer vs healthy: differing tensors: {diff}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="run the float64 finite-difference gradient check only")
    args = ap.parse_args(argv)
    if args.check:
        return 0 if grad_check() else 1
    make_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
