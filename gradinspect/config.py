"""``[tool.gradinspect.check]`` settings from pyproject.toml or ``--config FILE``.

Keys are the long option names with underscores.  An unknown key or a value of
the wrong type is an error naming the key.  A config file must be a regular file
of at most ``MAX_CONFIG_BYTES`` (1 MiB); anything that cannot be parsed is a
:class:`ConfigError`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import GradInspectError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "find_config", "load_check_config", "CHECK_KEYS", "MAX_CONFIG_BYTES", "MAX_JOBS"]

TABLE = ("tool", "gradinspect", "check")
MAX_CONFIG_BYTES = 1 << 20
MAX_JOBS = 64  # threads: more buy nothing (reads and numpy saturate first) and cost ~5 MiB each


class ConfigError(GradInspectError):
    """A config file that cannot be used: ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def _number(v: Any) -> float:
    """A finite number (TOML allows inf and nan, and integers past the float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("a finite number")
    try:
        x = float(v)
    except OverflowError:
        raise TypeError("a finite number") from None
    if not math.isfinite(x):
        raise TypeError("a finite number")
    return x


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _globs(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise TypeError("a string or a list of strings")


def _norm_type(v: Any) -> float:
    from .norms import parse_norm_type

    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise TypeError('1, 2, "inf" or a number > 0')
    try:
        return parse_norm_type(v)
    except (ValueError, OverflowError):
        raise TypeError('1, 2, "inf" or a number > 0') from None


def _within(ok: Callable[[float], bool], what: str) -> Callable[[Any], float]:
    """A validator of finite numbers for which ``ok`` holds."""

    def check(v: Any) -> float:
        x = _number(v)
        if not ok(x):
            raise TypeError(what)
        return x

    return check


_share = _within(lambda x: 0.0 <= x <= 1.0, "a number from 0 to 1")
_positive = _within(lambda x: x > 0.0, "a finite number > 0")
_non_negative = _within(lambda x: x >= 0.0, "a finite number >= 0")


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    return v


def _jobs(v: Any) -> int:
    if type(v) is not int or not 1 <= v <= MAX_JOBS:
        raise TypeError(f"a whole number from 1 to {MAX_JOBS}")
    return v


CHECK_KEYS: dict[str, Callable[[Any], Any]] = {
    "norm_type": _norm_type,
    "max_norm": _positive,
    "eps": _non_negative,
    "include": _globs,
    "exclude": _globs,
    "allow_nonfinite": _bool,
    "max_total": _number,
    "min_total": _number,
    "fail_on_clip": _bool,
    "max_share": _share,
    "fail_on_zero": _bool,
    "max_tensor_norm": _number,
    "max_replica_diff": _non_negative,
    "format": _string,
    "shards": _string,
    "dedup": _bool,
    "jobs": _jobs,
    "quiet": _bool,
}


def _read(path: Path) -> dict[str, Any]:
    from .errors import InputError
    from .sources.store import read_small as _read_small

    try:
        data = _read_small(os.fspath(path), MAX_CONFIG_BYTES)  # a regular file; a FIFO cannot block
    except InputError as e:
        raise ConfigError(path, e.problem) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except RecursionError:
        raise ConfigError(path, "not valid TOML (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError; an integer past Python's digit limit
        raise ConfigError(path, f"not valid TOML ({e})") from None


def _table(doc: dict[str, Any]) -> Any:
    node: Any = doc
    for key in TABLE:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def find_config(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest pyproject.toml, from ``start`` (default: the working directory)
    upward, that holds a ``[tool.gradinspect.check]`` table."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / "pyproject.toml"
        if candidate.is_file() and _table(_read(candidate)) is not None:
            return candidate
    return None


def load_check_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``[tool.gradinspect.check]`` settings of ``path``."""
    path = Path(path)
    table = _table(_read(path))
    if table is None:
        raise ConfigError(path, "no [tool.gradinspect.check] table")
    if not isinstance(table, dict):
        raise ConfigError(path, "tool.gradinspect.check is not a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in CHECK_KEYS:
            raise ConfigError(path, f"unknown key {key!r} in [tool.gradinspect.check] (known: {', '.join(CHECK_KEYS)})")
        try:
            out[key] = CHECK_KEYS[key](value)
        except TypeError as e:
            raise ConfigError(path, f"[tool.gradinspect.check] {key} must be {e}, not {value!r}") from None
    return out
