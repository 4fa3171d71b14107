"""What the dump writers (:mod:`gradinspect.torch`, :mod:`gradinspect.jax`) share: the metadata they
write (as ``trend`` and the loss-scale handling read it) and the atomic write of a safetensors file."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

__all__ = ["check_step", "dump_metadata", "save_atomically"]

_OPTIONS = ("step", "loss_scale")  # metadata keys given as save_grads keyword arguments


def check_step(step: object) -> int:
    """``step`` when it is a step number ``trend`` reads (an int from 0 to 2**63 - 1), else ValueError."""
    from .trend import MAX_STEP

    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be an integer from 0 to 2**63 - 1, not {step!r}")
    return int(step)


def dump_metadata(step: int | None, loss_scale: float | None, metadata: Mapping[str, str] | None,
                  reserved: tuple[str, ...] = _OPTIONS) -> dict[str, str]:
    """The user's ``metadata`` (str to str; none of the ``reserved`` keys) with ``step`` and ``loss_scale``
    written as gradinspect reads them (ASCII digits; a float's repr)."""
    md: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if key in reserved:
            raise ValueError(f"metadata key {key!r} is written by save_grads: pass it as {key}= instead"
                             if key in _OPTIONS else f"metadata key {key!r} is written by save_grads")
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, not {key!r}: {value!r}")
        md[key] = value
    if step is not None:
        md["step"] = str(check_step(step))
    if loss_scale is not None:
        scale = float(loss_scale)
        if not 0.0 < scale < math.inf:
            raise ValueError(f"loss_scale must be a finite number > 0, not {loss_scale!r}")
        md["loss_scale"] = repr(scale)
    return md


def save_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """``write(tmp)`` (a safetensors ``save_file``) to a temporary file beside ``path``, then renamed over it:
    a reader sees the old dump or the whole new one."""
    from .atomic import write_atomically

    write_atomically(path, write, prefix=f".{os.path.basename(os.fspath(path))}.")
