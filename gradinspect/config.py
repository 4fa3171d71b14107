"""``[tool.gradinspect.check]`` settings from pyproject.toml or ``--config FILE``.

Keys are the long option names with underscores.  An unknown key or a value of
the wrong type is an error naming the key.  A config file must be a regular file
of at most ``MAX_CONFIG_BYTES`` (1 MiB); anything that cannot be parsed is a
:class:`ConfigError`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import GradInspectError
from .options import MAX_JOBS, Option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "find_config", "load_check_config", "CHECK_KEYS", "MAX_CONFIG_BYTES", "MAX_JOBS",
           "check_options"]

TABLE = ("tool", "gradinspect", "check")
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(GradInspectError):
    """A config file that cannot be used: ``str()`` is ``"<path>: <problem>"``."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def check_options() -> tuple[Option, ...]:
    """The ``[tool.gradinspect.check]`` keys: ``gradinspect check``'s options marked ``config``, in --help order."""
    from . import check
    from .options import format_option

    return tuple(opt for opt in (*check.COMMAND_OPTIONS, format_option("check"), *check.COMMAND_OPTIONS_AFTER)
                 if opt.config)


class _Keys(Mapping[str, Callable[[Any], Any]]):
    """``CHECK_KEYS``: {key: converter raising TypeError}, built from the option table when first used."""

    def _keys(self) -> dict[str, Callable[[Any], Any]]:
        return {opt.name: opt.from_config for opt in check_options()}

    def __getitem__(self, key: str) -> Callable[[Any], Any]:
        return self._keys()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())


CHECK_KEYS: Mapping[str, Callable[[Any], Any]] = _Keys()


def _read(path: Path) -> dict[str, Any]:
    from .errors import InputError
    from .sources.store import read_small as _read_small

    try:
        data = _read_small(os.fspath(path), MAX_CONFIG_BYTES)  # a regular file; a FIFO cannot block
    except InputError as e:
        raise ConfigError(path, e.problem) from None
    try:
        doc: dict[str, Any] = tomllib.loads(data.decode("utf-8"))  # tomli (Python < 3.11) has no stubs
        return doc
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
    keys = dict(CHECK_KEYS)
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(path, f"unknown key {key!r} in [tool.gradinspect.check] (known: {', '.join(keys)})")
        try:
            out[key] = keys[key](value)
        except TypeError as e:
            raise ConfigError(path, f"[tool.gradinspect.check] {key} must be {e}, not {value!r}") from None
    return out
