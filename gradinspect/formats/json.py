r"""Strict RFC 8259 JSON: non-finite numbers become the strings "NaN", "Infinity", "-Infinity".

The output is always valid UTF-8.  Text from the input is kept exactly, with
one exception: a lone surrogate cannot be UTF-8, and its JSON escape
(``"\udc80"``) is rejected by strict parsers.  Python holds a byte that is not
UTF-8 (in a file name, PEP 383) as a surrogate U+DC80..U+DCFF: it is written as
the four characters ``\xNN`` of that byte (``"g\\xff.safetensors"`` in the JSON
text); any other lone surrogate as the six characters ``\uNNNN``.  DEL, C1
controls, U+2028/2029 and the bidi controls are written as JSON ``\u`` escapes,
which parsers read back unchanged, so the text is safe on a terminal too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from . import Format, RenderOptions
from ._escape import escape_char

#: Larger documents are written on one line: Python's JSON encoder is ~10x
#: faster without indentation (``jq .`` pretty-prints them).
PRETTY_MAX_ROWS = 1000


def dumps(doc: dict[str, Any], encoded: Mapping[str, Sequence[str]] | None = None) -> str:
    """``doc`` as strict JSON text.  ``encoded``: top-level values already encoded, by key, exactly as
    this function would encode them, each as pieces of text to join (used only on one line, for a large
    document: joined once, with the rest, rather than copied at each step)."""
    indent = 2 if _pretty(doc) else None
    # One pass of the C encoder; Python's spellings of non-finite numbers (bare NaN, Infinity, -Infinity,
    # never inside a string) then become strings.  A document of 400,000 numbers is encoded once, not twice.
    if encoded and indent is None:  # what json.dumps writes on one line, with some values given (strict)
        parts = ["{"]
        for k, v in doc.items():
            parts += (", " if len(parts) > 1 else "", json.dumps(k), ": ")
            parts += encoded[k] if k in encoded else (_strict(_one_line(v)),)
        parts.append("}\n")
        text = "".join(parts)
    else:
        text = _strict(json.dumps(doc, indent=indent, allow_nan=True, ensure_ascii=False)) + "\n"
    if not text.isascii() or "\x7f" in text:
        text = _UNSAFE.sub(_escape, text)
    return text


def _pretty(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` is small enough to be indented (:data:`PRETTY_MAX_ROWS`)."""
    # A trend document holds a row's numbers for every step: its series count steps x tensors.
    rows = len(doc.get("tensors", ())) * max(1, len(doc.get("steps", ())))
    rows += len(doc.get("report", {}).get("tensors", ()))
    return rows <= PRETTY_MAX_ROWS


def _one_line(value: Any) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


def _strict(text: str) -> str:
    """JSON text from ``json.dumps(allow_nan=True)`` with its non-finite numbers as strings."""
    return _NONFINITE.sub(_quoted, text) if "NaN" in text or "Infinity" in text else text


def _rows(cells: np.ndarray) -> list[str]:
    """Rows of numbers spelled in cells (``(rows, n, width)`` bytes, NUL-padded:
    :func:`gradinspect.trend.spell_cells`) as :func:`dumps` writes a list of lists of those numbers on one
    line, ``[[a, b], [c, d]]``, in pieces to join.  Laid out with numpy, then the padding dropped in one pass."""
    import numpy as np

    r, n, w = cells.shape
    if r == 0 or n == 0:
        return ["[" + ", ".join(["[]"] * r) + "]"]
    buf = np.zeros((r, n * (w + 2) + 4), dtype=np.uint8)
    body = buf[:, :n * (w + 2)].reshape(r, n, w + 2)
    body[:, :, :w] = cells
    body[:, :-1, w:] = np.frombuffer(b", ", dtype=np.uint8)
    buf[:, -4:] = np.frombuffer(b"], [", dtype=np.uint8)
    # Every row followed by "], [", but the last, by "]"
    text = buf.reshape(-1)[:-3].tobytes().translate(None, b"\0").decode("ascii")
    return ["[[", text, "]"]


def trend_dumps(report: Any) -> str:
    """A trend report's JSON: :func:`dumps` of its ``to_dict()``, with the series (steps x rows numbers)
    laid out from the spellings its steps carry (:func:`gradinspect.trend.series_spellings`) when
    they have them: the same text, without spelling 400,000 numbers again on a warm run."""
    from ..trend import series_spellings

    small = _pretty({"tensors": report.tensors, "steps": report.steps})  # pretty-printed: encoded as it is
    spelled = None if small else series_spellings(report)
    doc = report.to_dict(series=spelled is None)  # the series are not made (or read) when they are laid out
    if spelled is None:
        return dumps(doc)
    norm, share = spelled
    return dumps(doc, {"series": ['{"norm": ', *_rows(norm), ', "share": ', *_rows(share), "}"]})


# A JSON string (left as it is) or a bare non-finite number (quoted).
_NONFINITE = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity|NaN')


def _quoted(m: re.Match[str]) -> str:
    t = m.group()
    return t if t[0] == '"' else f'"{t}"'


# _escape.UNSAFE but for C0 controls, which json.dumps escapes itself: these are only ever inside strings.
_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if "\ud800" <= c <= "\udfff":  # visible text, its backslash escaped for JSON
        return escape_char(c).replace("\\", "\\\\")
    return f"\\u{ord(c):04x}"


class JsonFormat(Format):
    name = "json"
    suffixes = ('.json',)
    kinds = ('norms', 'check', 'diff', 'info', 'trend')
    machine = True
    help = "strict JSON with a schema version, for scripts"

    def render(self, report: Any, options: RenderOptions) -> str:
        return trend_dumps(report) if report.kind == "trend" else dumps(report.to_dict())


FORMAT = JsonFormat()
