"""Benchmark gradinspect against what users write today, and against the machine.

    python benchmarks/bench.py                 # generate data (once) and print a Markdown table
    python benchmarks/bench.py --runs 7 --only f32.safetensors

Data (made once in benchmarks/data/, about 4 GB; --data to put it elsewhere):
transformer-shaped gradients (24 layers, hidden 960, MLP 2560, vocab 32000: 218
tensors, 296 M elements) as float32 and bfloat16 safetensors, the same float32 as
an uncompressed and a compressed npz, and 20,000 small tensors as safetensors
and npz.

Every approach runs in a fresh process with a warm page cache; the table gives
the median wall time of --runs runs, GB/s of file bytes, peak RSS, and the
relative error of the global L2 norm against an exact reference (float64
squares summed in long double, per tensor, then math.fsum).  torch is used
when importable and skipped cleanly otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAYERS, HIDDEN, MLP, VOCAB = 24, 960, 2560, 32000
SMALL_TENSORS, SMALL_NUMEL = 20_000, 64


def transformer_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (MLP, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (MLP, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, MLP)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def make_grads(seed: int = 0) -> dict[str, np.ndarray]:
    """Gradient-like values: normal, with a per-tensor scale spread over 3 decades."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in transformer_shapes().items():
        scale = np.float32(10.0 ** rng.uniform(-5, -2))
        out[name] = rng.standard_normal(shape, dtype=np.float32) * scale
    return out


def generate(data: Path) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    data.mkdir(parents=True, exist_ok=True)
    todo = [n for n in ("f32.safetensors", "bf16.safetensors", "f32.npz", "f32_compressed.npz",
                        "small.safetensors", "small.npz") if not (data / n).exists()]
    if not todo:
        return
    print(f"generating {', '.join(todo)} in {data} ...", file=sys.stderr)
    g = make_grads()
    if "f32.safetensors" in todo:
        save_file(g, str(data / "f32.safetensors"))
    if "bf16.safetensors" in todo:
        save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in g.items()}, str(data / "bf16.safetensors"))
    if "f32.npz" in todo:
        np.savez(data / "f32.npz", **g)
    if "f32_compressed.npz" in todo:
        np.savez_compressed(data / "f32_compressed.npz", **g)
    del g
    rng = np.random.default_rng(1)
    small = {f"block.{i // 10}.param{i % 10}": rng.standard_normal(SMALL_NUMEL, dtype=np.float32)
             for i in range(SMALL_TENSORS)}
    if "small.safetensors" in todo:
        save_file(small, str(data / "small.safetensors"))
    if "small.npz" in todo:
        np.savez(data / "small.npz", **small)


def reference(path: Path, cache: dict) -> float:
    """Exact-to-~1e-18 L2 norm: per tensor Σx² in long double (squares exact), fsum over tensors."""
    key = f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if key in cache:
        return cache[key]
    sums = []
    for arr in _iter_arrays(path):
        x = arr.reshape(-1)
        for i in range(0, x.size, 1 << 22):
            c = x[i : i + (1 << 22)].astype(np.float64)
            sums.append(float(np.sum(np.square(c).astype(np.longdouble))))
    cache[key] = math.sqrt(math.fsum(sums))
    return cache[key]


def _iter_arrays(path: Path) -> Iterator[np.ndarray]:
    if path.suffix == ".safetensors":
        import ml_dtypes  # noqa: F401  (registers bfloat16 for safetensors' numpy loader)
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:
            names = f.keys()  # a safe_open handle is not iterable itself
            for k in names:
                yield f.get_tensor(k)
    else:
        with np.load(path) as z:
            for k in z.files:
                yield z[k]


# --- the approaches, each a fresh process printing {"l2": float} ----------------------

GRADINSPECT = [sys.executable, "-m", "gradinspect", "norms", "{file}", "--format", "json"]

TORCH_WAY = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file
    ts = [t for t in load_file(sys.argv[1]).values() if t.is_floating_point()]
    l2 = torch.nn.utils.get_total_norm(ts, 2.0)
    l1 = torch.nn.utils.get_total_norm(ts, 1.0)
    print(json.dumps({"l2": float(l2), "l1": float(l1)}))
""")

NUMPY_WAY = textwrap.dedent("""
    import json, sys, math
    import numpy as np
    path = sys.argv[1]
    if path.endswith(".safetensors"):
        import ml_dtypes
        from safetensors.numpy import load_file
        arrays = load_file(path)
    else:
        arrays = dict(np.load(path))
    norms = [float(np.linalg.norm(a)) for a in arrays.values()]
    print(json.dumps({"l2": math.sqrt(sum(n * n for n in norms))}))
""")

FLOOR_INFLATE = textwrap.dedent("""
    import sys, zipfile
    # zipfile inflates each member in blocks and checks its CRC; nothing is kept.
    with zipfile.ZipFile(sys.argv[1]) as z:
        for info in z.infolist():
            with z.open(info) as f:
                while f.read(1 << 22):
                    pass
""")

FLOOR_MMAP_DOT = textwrap.dedent("""
    import json, struct, sys
    import numpy as np
    path = sys.argv[1]
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    m = np.memmap(path, dtype=np.float32, mode="r", offset=8 + n)
    print(json.dumps({"l2": float(np.sqrt(np.dot(m, m)))}))
""")


def measure(cmd: list[str], runs: int) -> dict:
    """Median wall and peak RSS over ``runs`` runs (after one warm-up run)."""
    wrapped = [sys.executable, str(HERE / "_rss.py"), *cmd]
    subprocess.run(wrapped, capture_output=True)  # warm-up: page cache, bytecode
    walls, rss, last = [], [], ""
    for _ in range(runs):
        out = subprocess.run(wrapped, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-800:]}")
        lines = out.stdout.strip().splitlines()
        figures = json.loads(lines[-1])
        walls.append(figures["wall"])
        rss.append(figures["peak_rss_kib"] / 1024)
        last = "\n".join(lines[:-1])
    return {"wall": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
            "rss": statistics.median(rss), "stdout": last}


def l2_of(stdout: str) -> float | None:
    if not stdout.strip():
        return None
    doc = json.loads(stdout)
    if "total" in doc:
        v = doc["total"]["l2"]
        return float(v) if not isinstance(v, str) else float("nan")
    return float(doc["l2"])


def have_torch() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    try:
        import torch

        versions.append(f"torch {torch.__version__}")
    except ImportError:
        versions.append("no torch")
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB; {', '.join(versions)}"


def sparse_file(path: Path, gib: float) -> int:
    """A float32 safetensors file of ``gib`` GiB, sparse (zeros) but for one 1.0 per GiB."""
    numel = int(gib * 2**30) // 4
    header = json.dumps({"g": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(start + 4 * numel)
        for k in range(int(gib)):
            f.seek(start + k * 2**30)
            f.write(np.float32(1.0).tobytes())
    return numel


def memory_run(data: Path, gib: float, runs: int) -> None:
    """Peak RSS on a multi-GiB file: constant memory, whatever the size."""
    path = data / f"sparse_{gib:g}gib.safetensors"
    if not path.exists():
        sparse_file(path, gib)
    m = measure([a.replace("{file}", str(path)) for a in GRADINSPECT], runs)
    l2 = l2_of(m["stdout"])
    print(f"\n{gib:g} GiB float32 file (sparse): gradinspect {m['wall']:.2f} s, peak RSS {m['rss']:.0f} MiB, "
          f"L2 {l2} (exact: {math.sqrt(int(gib)):g}).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", action="append", default=[], help="file name(s) to run, e.g. f32.safetensors")
    ap.add_argument("--sparse-gib", type=float, default=8.0, help="size of the constant-memory run (0: skip)")
    args = ap.parse_args()
    generate(args.data)
    cache_file = args.data / "reference.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    files = ["f32.safetensors", "bf16.safetensors", "f32.npz", "f32_compressed.npz", "small.safetensors", "small.npz"]
    files = [f for f in files if not args.only or f in args.only]
    torch_ok = have_torch()
    rows = []
    for name in files:
        path = args.data / name
        size = path.stat().st_size
        ref = reference(path, cache)
        cache_file.write_text(json.dumps(cache, indent=1))
        approaches = [("gradinspect", [a.replace("{file}", str(path)) for a in GRADINSPECT])]
        if name.endswith(".safetensors"):
            approaches.append(("torch: load_file + get_total_norm (L2, L1)",
                               [sys.executable, "-c", TORCH_WAY, str(path)] if torch_ok else None))
        approaches.append(("numpy: load all + np.linalg.norm", [sys.executable, "-c", NUMPY_WAY, str(path)]))
        if name == "f32.safetensors":
            approaches.append(("floor: np.dot over the memory map", [sys.executable, "-c", FLOOR_MMAP_DOT, str(path)]))
        if name == "f32_compressed.npz":
            approaches.append(("floor: inflate every member (zlib, one thread)",
                               [sys.executable, "-c", FLOOR_INFLATE, str(path)]))
        approaches.append(("floor: cat FILE > /dev/null", ["sh", "-c", f"cat '{path}' > /dev/null"]))
        ours = None
        for label, cmd in approaches:
            if cmd is None:
                rows.append((name, label, None, size, None, None, None))
                continue
            m = measure(cmd, args.runs)
            l2 = l2_of(m["stdout"])
            err = abs(l2 - ref) / ref if l2 is not None else None
            if label == "gradinspect":
                ours = m["wall"]
            rows.append((name, label, m, size, err, ours, l2))
            print(f"{name:20s} {label:45s} {m['wall']:7.3f} s  {m['rss']:7.0f} MiB  err={err}", file=sys.stderr)
    print(f"Machine: {machine()}. Median of {args.runs} fresh-process runs, warm page cache.\n")
    print("| file | approach | wall (s) | GB/s | peak RSS (MiB) | L2 rel. error | gradinspect / this |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label, m, size, err, ours, _ in rows:
        if m is None:
            print(f"| {name} | {label} | skipped (torch not installed) | | | | |")
            continue
        ratio = f"{ours / m['wall']:.2f}" if ours and label != "gradinspect" else ""
        e = "" if err is None else (f"{err:.1e}" if err else "0")
        print(f"| {name} ({size / 1e9:.2f} GB) | {label} | {m['wall']:.3f} | {size / m['wall'] / 1e9:.2f} | "
              f"{m['rss']:.0f} | {e} | {ratio} |")
    small = [r for r in rows if r[0].startswith("small") and r[1] == "gradinspect"]
    for name, _, m, *_ in small:
        print(f"\n{name}: {m['wall'] / SMALL_TENSORS * 1e6:.1f} µs per tensor, whole process.", end="")
    print()
    if args.sparse_gib:
        memory_run(args.data, args.sparse_gib, args.runs)


if __name__ == "__main__":
    main()
