"""A small tied-embedding model and the rank function of the FSDP2 test (tests/test_torch_writers.py), in a module
of their own so that each spawned rank imports torch and gradinspect only, not pytest and the test module."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from gradinspect.torch import GradDumper, save_grads

VOCAB, DIM = 37, 16


class TiedLM(torch.nn.Module):  # type: ignore[misc]
    """A tiny language model whose output layer is its embedding (tied), plus a parameter that gets no grad."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 2 * DIM), torch.nn.GELU(), torch.nn.Linear(2 * DIM, DIM))
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: Any) -> Any:
        h = self.embed(x)
        return self.head(self.norm(h + self.mlp(h)))


def batch(gen: Any) -> tuple[Any, Any]:
    x = torch.randint(0, VOCAB, (4, 12), generator=gen)
    return x[:, :-1], x[:, 1:]


def loss_of(model: Any, xy: tuple[Any, Any]) -> Any:
    x, y = xy
    return torch.nn.functional.cross_entropy(model(x).float().reshape(-1, VOCAB), y.reshape(-1))


def fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a TiedLM under fully_shard, 6 steps with a GradDumper (every=2); at step 5 rank 0's shard of one
    gradient is multiplied by 1000 (only the all-reduced norm lets rank 1 see it); then the full gradients."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TiedLM()
        fully_shard(model)
        gen = torch.Generator().manual_seed(10 + rank)  # each rank its own batches
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dumper = GradDumper(model, os.path.join(out, "run"), every=2)
        seen = []
        for step in range(6):
            loss_of(model, batch(gen)).backward()
            if step == 5 and rank == 0:
                model.mlp[0].weight.grad.to_local().mul_(1000)
            written = dumper.step(step)
            seen.append([dumper.last_norm, dumper.last_reason, written and os.path.basename(written)])
            if step < 5:
                opt.step()
                opt.zero_grad()
        full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}  # collective
        if rank == 0:
            save_file(full, os.path.join(out, "full.safetensors"))
        odd_placements(rank, out)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def odd_placements(rank: int, out: str) -> None:
    """A one-row weight under fully_shard (rank 1's shard is empty) and a replicated DTensor gradient (saved by
    rank 0 only); a partial-sum gradient is refused."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    torch.manual_seed(2)
    tiny = torch.nn.Linear(4, 1)
    fully_shard(tiny)
    tiny(torch.randn(5, 4)).square().sum().backward()
    mesh = init_device_mesh("cpu", (2,))
    rep = torch.nn.Parameter(distribute_tensor(torch.ones(3), mesh, [Replicate()]))
    rep.grad = distribute_tensor(torch.full((3,), 2.0), mesh, [Replicate()])
    params = dict(tiny.named_parameters(), replicated=rep)
    save_grads(params, os.path.join(out, f"odd_rank{rank}.safetensors"))
    tiny_full = {n: p.grad.full_tensor() for n, p in tiny.named_parameters()}
    if rank == 0:
        save_file({**tiny_full, "replicated": torch.full((3,), 2.0)}, os.path.join(out, "odd_full.safetensors"))
    partial = torch.nn.Parameter(distribute_tensor(torch.ones(2), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    try:
        save_grads({"partial": partial}, os.path.join(out, "never.safetensors"))
    except ValueError as e:
        assert "the gradient of 'partial' is a partial sum" in str(e), e
    else:
        raise AssertionError("a partial gradient was saved")
