"""Where a run's data reads can be redirected: split work into parts (``--part``) and replay them (``merge``).

The pipeline asks :data:`HOOK` at the few points where it opens files or reads tensor bytes
(:func:`~gradinspect.pipeline.open_set`, the reduction in :func:`~gradinspect.pipeline.tensor_stats`,
:func:`~gradinspect.pipeline.pair_stats`, the byte comparison of tied-weight copies, and
:func:`~gradinspect.runs.find_steps`).  With no hook (the default) nothing changes.  A hook is set
for one computation by :func:`using` (a context variable: threads started inside do not see it);
:func:`suspended` lets a hook call the real function.  :mod:`gradinspect.partial` is the one user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["HOOK", "using", "suspended"]

#: The active hook (an object with ``open_paths``, ``reduce``, ``pair_stats``, ``same_bytes``, ``find_steps``).
HOOK: ContextVar[Any] = ContextVar("gradinspect_hook", default=None)


@contextlib.contextmanager
def using(hook: Any) -> Iterator[None]:
    """Redirect the reads of the computation inside the ``with`` to ``hook``."""
    token = HOOK.set(hook)
    try:
        yield
    finally:
        HOOK.reset(token)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Run the real functions inside the ``with`` (a hook doing the actual work)."""
    token = HOOK.set(None)
    try:
        yield
    finally:
        HOOK.reset(token)
