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
from typing import Any, TextIO

from . import Format, RenderOptions
from ._escape import escape_char

#: Larger documents are written on one line: Python's JSON encoder is ~10x
#: faster without indentation (``jq .`` pretty-prints them).
PRETTY_MAX_ROWS = 1000


def dumps(doc: dict[str, Any]) -> str:
    # A trend document holds a row's numbers for every step: its series count steps x tensors.
    rows = len(doc.get("tensors", ())) * max(1, len(doc.get("steps", ())))
    rows += len(doc.get("report", {}).get("tensors", ()))
    indent = 2 if rows <= PRETTY_MAX_ROWS else None
    # One pass of the C encoder; Python's spellings of non-finite numbers (bare NaN, Infinity, -Infinity,
    # never inside a string) then become strings.  A document of 400,000 numbers is encoded once, not twice.
    text = json.dumps(doc, indent=indent, allow_nan=True, ensure_ascii=False)
    if "NaN" in text or "Infinity" in text:
        text = _NONFINITE.sub(_quoted, text)
    if not text.isascii() or "\x7f" in text:
        text = _UNSAFE.sub(_escape, text)
    return text + "\n"


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


def _render(report: Any, out: TextIO, options: RenderOptions) -> None:
    out.write(dumps(report.to_dict()))


render_norms = render_check = render_diff = render_info = render_trend = _render


class JsonFormat(Format):
    name = "json"
    suffixes = ('.json',)
    kinds = ('norms', 'check', 'diff', 'info', 'trend')
    machine = True
    help = "strict JSON with a schema version, for scripts"

    def render(self, report: Any, options: RenderOptions) -> str:
        return dumps(report.to_dict())


FORMAT = JsonFormat()
