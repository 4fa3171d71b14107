"""The gradient-clipping coefficient, as deep-learning frameworks compute it.

Pure functions: no I/O.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_EPS", "clip_coef"]

#: ``torch.nn.utils.clip_grad_norm_`` adds this to the total norm.
DEFAULT_EPS = 1e-6


def clip_coef(total_norm: float, max_norm: float, eps: float = DEFAULT_EPS) -> float:
    """The factor that clipping to ``max_norm`` multiplies every gradient by.

    With ``eps > 0`` this is PyTorch's ``clip_grad_norm_``::

        coef = min(1, max_norm / (total_norm + eps))

    With ``eps == 0`` it is optax's ``clip_by_global_norm`` and TensorFlow's
    ``clip_by_global_norm``: ``max_norm / max(total_norm, max_norm)``.

    As in PyTorch, an infinite norm gives 0 and a NaN norm gives NaN.
    """
    if math.isnan(total_norm) or math.isnan(max_norm):
        return math.nan
    if eps == 0.0:
        if total_norm <= max_norm:
            return 1.0
        return max_norm / total_norm  # 0.0 for an infinite norm
    denom = total_norm + eps
    return min(1.0, max_norm / denom)
