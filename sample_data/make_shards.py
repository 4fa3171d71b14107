"""Make the per-rank examples of --shards from healthy.safetensors (numpy and safetensors only).

    python sample_data/make_shards.py

- ddp/rank{0,1}.safetensors: data parallel (DDP). After the all-reduce every
  rank holds the same full gradient: two *replicas* of each tensor.
- fsdp/rank{0,1}.safetensors: fully sharded (FSDP / ZeRO-2/3). Each rank holds
  a contiguous half of every flattened gradient under the same name: two
  *slices* of each tensor.

Only blocks.0.* and head.* are kept, so the files stay small.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors' numpy loader read bfloat16)
import numpy as np
from safetensors.numpy import load_file, save

HERE = Path(__file__).resolve().parent


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors bytes with the metadata keys sorted, so reruns give identical files."""
    data = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data[:8] + text + data[8 + n :])


def main() -> None:
    grads = load_file(str(HERE / "healthy.safetensors"))
    keep = {k: v for k, v in sorted(grads.items()) if k.startswith(("blocks.0.", "head."))}
    for rank in (0, 1):
        write(HERE / "ddp" / f"rank{rank}.safetensors", keep,
              {"rank": str(rank), "note": "DDP: every rank holds the full, all-reduced gradient"})
        halves = {}
        for k, v in keep.items():
            flat = v.reshape(-1)
            cut = (flat.size + 1) // 2
            halves[k] = np.ascontiguousarray(flat[:cut] if rank == 0 else flat[cut:])
        write(HERE / "fsdp" / f"rank{rank}.safetensors", halves,
              {"rank": str(rank), "note": "FSDP: each rank holds half of every flattened gradient"})


if __name__ == "__main__":
    main()
