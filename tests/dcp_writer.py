"""Writes torch.distributed.checkpoint (DCP) directories for the tests, with torch's own ``dcp.save``.

Run as a script (``python tests/dcp_writer.py OUT --world N``): with N > 1 it spawns N processes
joined by the gloo backend on CPU, each holding DTensor shards of the same global tensors.
Next to each checkpoint it writes ``<name>.full.safetensors``: the full tensors, from the same values.
Every tensor's values are a function of its name and a seed alone, so every rank knows them all.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings

import torch

#: name: (shape, dtype, placements over a 1-d mesh: "S0" row shards, "S1" column shards, "R" replicated)
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "layers.0.w": ((7, 5), torch.float32, "S0"),  # uneven row shards
    "layers.0.b": ((5,), torch.float64, "S0"),
    "layers.1.w": ((4, 6), torch.bfloat16, "S0"),
    "layers.1.v": ((3, 8), torch.float32, "S1"),  # column shards: not row-major contiguous
    "emb": ((6, 2, 3), torch.float16, "S0"),
    "norm": ((5,), torch.float32, "R"),  # replicated: DCP saves it once
}
#: larger tensors (more than one reading chunk of 2**17 elements), when asked for
BIG: dict[str, tuple[tuple[int, ...], torch.dtype, str]] = {
    "big.rows": ((301, 1000), torch.float32, "S0"),
    "big.cols": ((700, 450), torch.float64, "S1"),
}


SMALL = ("layers.0.w", "layers.1.w", "layers.1.v", "norm")  # for the fixtures kept in tests/data (a few KB)
LOSS_SCALE = 1024.0


def specs(big: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    if os.environ.get("DCP_WRITER_SMALL"):
        return {k: v for k, v in TENSORS.items() if k in SMALL}
    return {**TENSORS, **BIG} if big else dict(TENSORS)


def full_tensors(seed: int, big: bool = False) -> dict[str, torch.Tensor]:
    """The global tensors: fixed values from ``seed``."""
    out = {}
    for i, (name, (shape, dtype, _)) in enumerate(specs(big).items()):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        scale = 10.0 ** (i - 3)
        out[name] = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return out


def state_dict(seed: int, step: int, mesh: object | None, big: bool) -> dict[str, object]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    full = full_tensors(seed, big)
    sd: dict[str, object] = {}
    for name, t in full.items():
        if mesh is None:
            sd[name] = t
            continue
        place = specs(big)[name][2]
        p = Replicate() if place == "R" else Shard(int(place[1]))
        sd[name] = distribute_tensor(t, mesh, [p])  # type: ignore[arg-type]
    sd["step"] = step
    sd["loss_scale"] = LOSS_SCALE
    sd["extra"] = {"lr": 0.1}  # not a tensor: ignored
    return sd


def write(out: str, steps: int, mesh: object | None, safetensors_format: bool, big: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    rank = torch.distributed.get_rank() if mesh is not None else 0
    for step in range(steps):
        name = os.path.join(out, f"step_{step:04d}")
        fmt = SerializationFormat.SAFETENSORS if safetensors_format else SerializationFormat.TORCH_SAVE
        writer = FileSystemWriter(name, serialization_format=fmt)
        dcp.save(state_dict(step + 1, step * 10, mesh, big), storage_writer=writer)
        if rank == 0:
            from safetensors.torch import save_file

            meta = {"step": str(step * 10), "loss_scale": str(LOSS_SCALE)}
            save_file(full_tensors(step + 1, big), name + ".full.safetensors", metadata=meta)


def _worker(rank: int, world: int, port: int, out: str, steps: int, st: bool, big: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        write(out, steps, init_device_mesh("cpu", (world,)), st, big)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--safetensors", action="store_true", help="DCP's safetensors serialization")
    ap.add_argument("--big", action="store_true", help="add tensors larger than one reading chunk")
    ap.add_argument("--small", action="store_true", help="fewer tensors (the fixtures kept in tests/data)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.small:
        os.environ["DCP_WRITER_SMALL"] = "1"  # the spawned ranks inherit it
    warnings.simplefilter("ignore")
    if a.world == 1:
        write(a.out, a.steps, None, a.safetensors, a.big)
    else:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(a.world, _free_port(), a.out, a.steps, a.safetensors, a.big), nprocs=a.world)


if __name__ == "__main__":
    main(sys.argv[1:])
