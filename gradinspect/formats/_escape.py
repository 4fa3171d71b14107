"""Text from the input (tensor names, paths, metadata) made safe to print.

A tensor name is whatever a file says it is: it may hold terminal escape
sequences, newlines that would start a forged line (a GitHub ``::error``
workflow command), bidi overrides that reorder what is shown, or lone
surrogates (a non-UTF-8 file name, or a ``\\udc80`` escape in a JSON header)
that cannot be written as UTF-8 at all.  :func:`printable` shows every such
character as a visible escape; every human format and the ``Error:`` line use it.
"""

from __future__ import annotations

import re

__all__ = ["UNSAFE", "escape_char", "printable"]

#: C0 controls, DEL, C1 controls, the bidi marks, embeddings, overrides and isolates,
#: the Unicode line and paragraph separators, and lone surrogates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_char(c: str) -> str:
    """One unsafe character as a Python-style escape: ``\\n``, ``\\x1b``, ``\\u202e``.

    A surrogate U+DC80..U+DCFF is how Python holds a byte that is not UTF-8
    (PEP 383, e.g. in a file name): it is shown as that byte, ``\\xff``.
    """
    short = _SHORT.get(c)
    if short:
        return short
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    if 0xDC80 <= o <= 0xDCFF:
        return f"\\x{o - 0xDC00:02x}"
    return f"\\u{o:04x}"


def printable(text: str) -> str:
    """``text`` with every character of :data:`UNSAFE` replaced by :func:`escape_char`: one line, no
    terminal control, valid UTF-8.  A literal backslash is left alone, so this is for showing, not parsing."""
    return UNSAFE.sub(lambda m: escape_char(m.group()), text)
