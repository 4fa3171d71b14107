"""gradinspect: exact gradient norms of saved gradients.

>>> import gradinspect
>>> report = gradinspect.compute_norms({"w": [3.0, 4.0]}, max_norm=1.0)
>>> report.total.l2, report.clip.clipped
(5.0, True)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that `gradinspect --help` does not pay for numpy.
_LAZY = {
    "inspect": "api",
    "compute_norms": "api",
    "Stats": "norms",
    "combine": "norms",
    "stats_of": "norms",
    "clip_coef": "clip",
    "NormsReport": "report",
    "TensorNorms": "report",
    "Totals": "report",
    "Clip": "report",
    "Skipped": "report",
    "GradInspectError": "errors",
    "InputError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
