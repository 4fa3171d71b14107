"""Gradient dumps from a PyTorch training loop: :func:`save_grads` and :class:`GradDumper` (issue 10 §5).

torch is imported inside the functions only (``import gradinspect`` never imports it); without it
they raise ImportError saying ``pip install 'gradinspect[torch]'``.

A dump is a ``.safetensors`` file of the current ``.grad`` of every parameter that has one, in
its own dtype (bfloat16 and float16 kept), under the parameter's name.  A parameter reachable under
several names (tied embeddings) is saved once, under its first name, as ``model.parameters()``
yields it once, so that the global norm is that of ``clip_grad_norm_(model.parameters())``.
The safetensors metadata holds ``step`` and ``loss_scale`` (when given: ``gradinspect`` reads
``step`` as the step number of ``trend`` and divides every norm by ``loss_scale``), ``rank`` and
``world_size`` (0 and 1 outside ``torch.distributed``).

Sharded gradients (FSDP2's ``fully_shard``, DTensor): each rank saves its local shard under the
parameter's name, so that ``gradinspect norms --shards slices`` over the ranks' files merges the
shards exactly; along a mesh dimension on which the gradient is replicated (HSDP), only the
rank at coordinate 0 saves it, so that no piece is counted twice.  A gradient that is not yet
reduced (a ``Partial`` placement) is refused.  Plain tensors are saved by every rank as they
are: DDP ranks hold copies of the same gradients (``--shards replicas``).

A file is written to a temporary name in its directory and renamed over ``path``
(``os.replace``), so that a reader never sees half a dump.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .dumps import check_step, dump_metadata, save_atomically

__all__ = ["save_grads", "GradDumper", "TORCH_EXTRA"]

TORCH_EXTRA = "pip install 'gradinspect[torch]'"
_RESERVED = ("step", "loss_scale", "rank", "world_size")


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"gradinspect.torch needs PyTorch: {TORCH_EXTRA}") from e
    return torch


def _dist_info(torch: Any) -> tuple[int, int]:
    """(rank, world size) of ``torch.distributed``; (0, 1) when it is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _named(model_or_named_parameters: Any) -> Iterable[tuple[str, Any]]:
    if hasattr(model_or_named_parameters, "named_parameters"):
        return model_or_named_parameters.named_parameters()  # type: ignore[no-any-return]
    if isinstance(model_or_named_parameters, Mapping):
        return model_or_named_parameters.items()
    return model_or_named_parameters  # type: ignore[no-any-return]


def _dtensor_class(torch: Any) -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _local(name: str, grad: Any, dtensor: Any) -> tuple[Any, bool] | None:
    """(the tensor this rank saves, whether it is a shard of a DTensor), or None: another rank saves it."""
    if dtensor is None or not isinstance(grad, dtensor):
        return grad, False
    coords = grad.device_mesh.get_coordinate()
    if coords is None:  # this rank is not in the gradient's mesh
        return None
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError(f"the gradient of {name!r} is a partial sum ({placement}): reduce it before saving")
        if placement.is_replicate() and coords[dim] != 0:
            return None
    return grad.to_local(), True


def _grads(model_or_named_parameters: Any, torch: Any) -> list[tuple[str, Any, bool]]:
    """(name, this rank's local gradient, whether it is a DTensor shard) of each parameter once, in order."""
    dtensor = _dtensor_class(torch)
    seen: set[int] = set()
    out = []
    for item in _named(model_or_named_parameters):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("expected a model, (name, parameter) pairs or a {name: parameter} mapping, "
                            f"not an iterable of {type(item).__name__}")
        name, param = item
        if id(param) in seen:
            continue
        seen.add(id(param))
        grad = getattr(param, "grad", None)
        if grad is None:
            continue
        local = _local(name, grad, dtensor)
        if local is not None:
            out.append((name, local[0].detach(), local[1]))
    return out


def save_grads(model_or_named_parameters: Any, path: str | os.PathLike[str], *, step: int | None = None,
               loss_scale: float | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Save the current gradients of a model (or of ``(name, parameter)`` pairs, or a ``{name: parameter}``
    mapping) to the ``.safetensors`` file ``path``, atomically; see the module docstring.

    ``step``: the training step (metadata ``step``); ``loss_scale``: the scale the gradients still carry
    (AMP before unscaling: ``scaler.get_scale()``), divided out by gradinspect; ``metadata``: more
    ``str`` keys and values (not the four keys save_grads writes).
    """
    torch = _torch()
    from safetensors.torch import save_file

    rank, world_size = _dist_info(torch)
    md = dump_metadata(step, loss_scale, metadata, _RESERVED) | {"rank": str(rank), "world_size": str(world_size)}
    tensors = {name: g.to("cpu").contiguous() for name, g, _ in _grads(model_or_named_parameters, torch)}
    save_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=md))


class GradDumper:
    """Dump a model's gradients every ``every`` steps, and at the steps that go wrong.

    Call :meth:`step` after ``backward()`` (and before ``optimizer.zero_grad()``) at every step, on every
    rank.  It writes ``directory/step_{step:08d}.safetensors`` (``..._rank{r}.safetensors`` when
    ``torch.distributed`` runs more than one rank, ``r`` zero-padded to the width of the largest rank so that
    name order is rank order: ``_rank00`` to ``_rank11`` with 12 ranks) when ``step % every == 0`` (step 0
    included), and
    also when the step's global L2 norm is not finite (``on_nonfinite``) or is more than
    ``spike_factor`` (None: never) times the baseline: the gradients of the step that went wrong.

    The baseline is ``trend``'s (``gradinspect trend`` flags the same steps when every step is dumped):
    the median (numpy's) of the finite norms among the last ``window`` steps (a non-finite step takes a
    slot and is left out), with at least 3 of them.  Norms are of the unscaled gradients (divided by
    the step's ``loss_scale``), computed on the gradients' device in float64 (one host sync per step),
    across all ranks (an all-reduce of the squared norms of the shards), so that every rank decides
    alike and dumps together.  With AMP's ``GradScaler``, the steps whose scaled gradients overflow
    (which the scaler skips) are non-finite steps too: ``on_nonfinite=False`` leaves them out.
    """

    def __init__(self, model: Any, directory: str | os.PathLike[str], every: int = 100, on_nonfinite: bool = True,
                 spike_factor: float | None = 3.0, window: int = 20) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, not {every!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, not {window!r}")
        if spike_factor is not None and not 0.0 < float(spike_factor) < math.inf:
            raise ValueError(f"spike_factor must be a finite number > 0 or None, not {spike_factor!r}")
        _torch()
        self.model = model
        self.directory = os.fspath(directory)
        self.every = every
        self.on_nonfinite = on_nonfinite
        self.spike_factor = None if spike_factor is None else float(spike_factor)
        self.window = window
        self._recent: deque[float | None] = deque(maxlen=window)  # the last steps' norms, None: non-finite
        self.last_norm: float | None = None  # the last step's global norm (None: not computed)
        self.last_reason: str | None = None  # why the last step was dumped: "nonfinite", "spike", "every" or None
        os.makedirs(self.directory, exist_ok=True)

    def path(self, step: int) -> str:
        """The file :meth:`step` writes for ``step`` on this rank."""
        rank, world_size = _dist_info(_torch())
        suffix = f"_rank{rank:0{len(str(world_size - 1))}d}" if world_size > 1 else ""
        return os.path.join(self.directory, f"step_{step:08d}{suffix}.safetensors")

    def baseline(self) -> float | None:
        """The median of the finite norms among the last ``window`` steps (None with fewer than 3)."""
        finite = [x for x in self._recent if x is not None]
        if len(finite) < 3:
            return None
        import numpy as np

        return float(np.median(np.array(finite, dtype=np.float64)))

    def global_norm(self, loss_scale: float | None = None) -> float:
        """The global L2 norm of the current gradients across ranks, divided by ``loss_scale``
        (a collective call under ``torch.distributed``: every rank must make it)."""
        torch = _torch()
        grads = _grads(self.model, torch)
        world_size = _dist_info(torch)[1]
        device = grads[0][1].device if grads else torch.device("cpu")
        if world_size > 1 and torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # squares of [shards, whole tensors]
        for sharded in (True, False):
            part = [g for _, g, s in grads if s == sharded and g.numel()]
            if part:
                norms = torch._foreach_norm(part, 2, dtype=torch.float64)
                sums[int(not sharded)] = torch.stack([n.to(device) for n in norms]).square().sum()
        if world_size > 1:
            torch.distributed.all_reduce(sums)
            sums[1] /= world_size  # whole tensors are copies on every rank (DDP): counted once
        norm = float(sums.sum().sqrt())
        return norm if loss_scale is None else norm / float(loss_scale)

    def step(self, step: int, loss_scale: float | None = None) -> str | None:
        """After ``backward()``: dump this step's gradients if it is due or went wrong; the path written, or None
        (:attr:`last_reason` says why: ``"nonfinite"``, ``"spike"``, ``"every"``).

        ``loss_scale``: the scale the gradients carry (AMP: ``scaler.get_scale()``), written to the
        metadata and divided out of the norm.
        """
        check_step(step)
        reason = "every" if step % self.every == 0 else None
        if self.on_nonfinite or self.spike_factor is not None:
            norm = self.last_norm = self.global_norm(loss_scale)
            finite = math.isfinite(norm)
            base = self.baseline()
            if not finite and self.on_nonfinite:
                reason = "nonfinite"
            elif finite and self.spike_factor is not None and base is not None and norm > self.spike_factor * base:
                reason = "spike"
            self._recent.append(norm if finite else None)
        self.last_reason = reason
        if reason is None:
            return None
        path = self.path(step)
        save_grads(self.model, path, step=step, loss_scale=loss_scale)
        return path
