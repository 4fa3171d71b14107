"""Output formats: one typed contract, one registry.

A format is a module defining ``FORMAT``, an instance of a :class:`Format`
subclass (its name, the file suffixes it claims for ``--output``, the kinds of
report it renders, whether it is machine output), and one line naming that
module in :data:`MODULES`.  The CLI builds ``--format`` from :func:`names`;
the CLI imports every format for ``--help``, so a format module imports its
heavy dependencies (rich, numpy) inside ``render``.  :data:`DEFAULT` is each
kind's default format.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TextIO

from ._escape import printable

__all__ = ["Format", "RenderOptions", "MODULES", "DEFAULT", "names", "get", "render", "for_suffix", "suffixes",
           "kind_of", "write_with", "write_file", "printable"]

#: The format modules, in --help order: adding a format is a module and a line here.
MODULES = ("table", "text", "json", "csv", "markdown", "github", "junit", "png", "svg", "html")

#: The format of each kind of report when --format and --output say nothing.
DEFAULT: Mapping[str, str] = {"norms": "table", "diff": "table", "info": "table", "check": "text", "trend": "table"}


@dataclass(frozen=True)
class RenderOptions:
    """How a human-facing format may look: ``width`` and ``color`` None = detect.

    ``elide``: names too long for ``width`` are elided in the middle; False
    keeps every name whole (the table may be wider than ``width``), as for
    output that is not a terminal.  With ``width`` None, a stream that is not a
    terminal is never elided.  ``heatmap``: what the trend plots' heatmap
    shows, ``"norm"`` (log10 of each row's norm) or ``"share"`` (its share of
    the squared L2 norm); ``--heatmap`` of ``trend``.
    """

    width: int | None = None
    color: bool | None = None
    elide: bool = True
    heatmap: str = "norm"  # the plot formats' heatmap (png, svg, html): "norm" (log10) or "share"


class Format(ABC):
    """The contract every output format implements."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()  # what --output PATH ends with to pick this format (".json")
    kinds: ClassVar[tuple[str, ...]]  # the report kinds it renders: "norms", "check", "diff", "info", "trend"
    binary: ClassVar[bool] = False  # render returns bytes
    machine: ClassVar[bool] = False  # True: the document and nothing else (no colour, no terminal detection)
    help: ClassVar[str]

    @abstractmethod
    def render(self, report: Any, options: RenderOptions) -> str | bytes:
        """The whole document for ``report`` (of one of :attr:`kinds`)."""


def kind_of(report: Any) -> str:
    """``"norms"``, ``"check"``, ``"diff"``, ``"info"`` or ``"trend"``: the report class's ``kind``."""
    return report.kind  # type: ignore[no-any-return]


def write_with(writers: Mapping[str, Callable[[Any, TextIO, RenderOptions], None]], report: Any,
               options: RenderOptions) -> str:
    """Run the writer for ``report``'s kind into a string: for formats written as stream writers."""
    buf = io.StringIO()
    writers[kind_of(report)](report, buf, options)
    return buf.getvalue()


_loaded: dict[str, Format] = {}


def _all() -> dict[str, Format]:
    if not _loaded:
        for m in MODULES:
            f: Format = importlib.import_module(f"{__name__}.{m}").FORMAT
            _loaded[f.name] = f
    return _loaded


def names(kind: str) -> list[str]:
    """The formats that can write reports of ``kind``, in registration order."""
    return [f.name for f in _all().values() if kind in f.kinds]


def get(name: str) -> Format:
    return _all()[name]


def suffixes(kind: str) -> list[str]:
    """The --output suffixes that pick a format for reports of ``kind``."""
    return list(dict.fromkeys(s for f in _all().values() if kind in f.kinds for s in f.suffixes))


def for_suffix(kind: str, path: str) -> str | None:
    """The format ``--output path`` implies for a report of ``kind`` (None: no format claims its suffix)."""
    suffix = os.path.splitext(path)[1].lower()
    for f in _all().values():
        if kind in f.kinds and suffix in f.suffixes:
            return f.name
    return None


def render(name: str, kind: str, report: Any, out: TextIO, options: RenderOptions = RenderOptions()) -> None:
    """Write ``report`` (of ``kind``) to ``out`` in format ``name``."""
    fmt = get(name)
    if kind not in fmt.kinds or kind_of(report) != kind:
        raise ValueError(f"format {name!r} cannot write {kind} reports")
    text = fmt.render(report, options)
    out.write(text.decode("utf-8") if isinstance(text, bytes) else text)


def write_file(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a temporary file in the same directory, fsync, os.replace.

    On any error the temporary file is removed and ``path`` is left as it was.
    A new file gets the mode ``open()`` would give it; a replaced file keeps its mode.
    """
    blob = data.encode("utf-8") if isinstance(data, str) else data
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    import tempfile  # only when a file is written

    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
