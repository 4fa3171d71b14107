"""Writing a file so that a reader sees the old one or the whole new one, never half of it: a temporary
file beside it, then a rename (the temporary file is removed when anything fails)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

__all__ = ["write_atomically", "write_bytes_atomically", "ordinary_mode"]


def ordinary_mode() -> int:
    """The permissions a new file gets from ``open`` under this process's umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None], *, prefix: str = ".tmp-",
                     suffix: str = ".tmp", mode: int | None = None) -> None:
    """``write(tmp)`` to a new temporary file beside ``path`` (named ``prefix...suffix``; permissions
    ``mode``, else 0o600), then rename it over ``path``."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes, *, prefix: str = ".tmp-",
                           suffix: str = ".tmp", mode: int | None = None) -> None:
    """:func:`write_atomically` of ``data``."""
    def put(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomically(path, put, prefix=prefix, suffix=suffix, mode=mode)
