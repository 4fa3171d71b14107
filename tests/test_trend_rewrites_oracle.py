"""Rewrites for speed must accept and write exactly what the code they replaced did: the byte check of spelled
cells (``trend._well_spelled``, now ``str_len`` against ``count_nonzero``) and ``formats.json.dumps`` with
``encoded`` values given as pieces.  The replaced code is copied here as the oracle; hypothesis feeds both."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradinspect.formats import json as json_format
from gradinspect.trend import SPELLING_WIDTH, _well_spelled, spell_cells

W = SPELLING_WIDTH
_NUMBER_BYTES = b"0123456789.e+-"
_NAMES = np.array([b'"NaN"', b'"Infinity"', b'"-Infinity"'], dtype=f"S{W}").view(np.uint8).reshape(3, W)


def _old_well_spelled(cells: np.ndarray) -> bool:
    """``trend._well_spelled`` before 5268f22, as it was."""
    flat = cells.reshape(-1, W)
    filled = flat != 0
    if not (filled[:, 0].all() and (filled[:, 1:] <= filled[:, :-1]).all()):  # no NUL before a byte
        return False
    named = flat[:, 0] == ord('"')
    if named.any():
        if not (flat[named][:, None, :] == _NAMES[None]).all(axis=2).any(axis=1).all():
            return False
        flat = flat[~named]
    return not flat.tobytes().translate(None, _NUMBER_BYTES + b"\0")


_ALPHABET = list(b'0123456789.e+-"NaIfinty\0\xff,] \x7f\x80\x01')
_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.0, 5e-324, -5e-324]))
_SPELLED = _FLOAT.map(lambda x: bytes(spell_cells(((x,),))[0, 0]))  # a cell as the cache holds it
_CELL = st.one_of(
    _SPELLED,
    st.tuples(_SPELLED, st.integers(0, W - 1), st.integers(0, 255)).map(  # one byte changed (NUL inside...)
        lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
    st.tuples(_SPELLED, st.integers(0, W - 1)).map(lambda t: t[0][:t[1]] + b"\0" + t[0][t[1]:W - 1]),  # shifted
    st.binary(max_size=W),  # anything, NULs anywhere
    st.lists(st.sampled_from(_ALPHABET), max_size=W).map(bytes),  # near misses
    st.sampled_from([b'"NaN"', b'"Infinity"', b'"-Infinity"', b"1" * W, b"-2.2250738585072014e-308", b"0", b"",
                     b'"NaN"\0x', b'"NaN', b'"Infinity"\0\0\x01', b"1" * (W - 1) + b"\0"]),
).map(lambda b: b.ljust(W, b"\0"))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 3), st.integers(0, 4), st.data(), st.sampled_from(["c", "transposed", "fortran"]))
def test_the_cell_check_accepts_what_the_one_it_replaced_did(rows: int, steps: int, data: st.DataObject,
                                                            layout: str) -> None:
    cells = b"".join(data.draw(st.lists(_CELL, min_size=2 * rows * steps, max_size=2 * rows * steps)))
    a = np.frombuffer(cells, np.uint8).reshape(2, rows, steps, W) if cells else np.zeros((2, rows, steps, W), np.uint8)
    if layout == "transposed":  # not contiguous: as series_spellings stacks steps on axis 2
        a = np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    elif layout == "fortran":
        a = np.asfortranarray(a)
    assert _well_spelled(a) == _old_well_spelled(a)


def test_the_cell_check_takes_every_spelled_float(rng: np.random.Generator) -> None:
    bits = rng.integers(0, 2**64, 20_000, dtype=np.uint64, endpoint=False)
    special = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, math.nan, math.inf, -math.inf] * 2500
    cells = spell_cells((bits.view(np.float64).tolist(), special))
    assert _well_spelled(cells) and _old_well_spelled(cells)


# --- formats.json.dumps with encoded values -------------------------------------------------------------

_OLD_NONFINITE = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity|NaN')
_OLD_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _old_dumps(doc: dict[str, Any], encoded: Mapping[str, str] | None = None) -> str:
    """``formats.json.dumps`` before 6322a97 (``encoded`` values whole), with its helpers, as it was."""
    from gradinspect.formats._escape import escape_char

    def strict(text: str) -> str:
        quoted = _OLD_NONFINITE.sub(lambda m: m.group() if m.group()[0] == '"' else f'"{m.group()}"', text)
        return quoted if "NaN" in text or "Infinity" in text else text

    def escape(m: re.Match[str]) -> str:
        c = m.group()
        return escape_char(c).replace("\\", "\\\\") if "\ud800" <= c <= "\udfff" else f"\\u{ord(c):04x}"

    rows = len(doc.get("tensors", ())) * max(1, len(doc.get("steps", ())))
    indent = 2 if rows <= json_format.PRETTY_MAX_ROWS else None
    if encoded and indent is None:
        text = "{" + ", ".join(f"{json.dumps(k)}: {encoded[k] if k in encoded else strict(json.dumps(v, allow_nan=True, ensure_ascii=False))}"  # noqa: E501
                               for k, v in doc.items()) + "}"
    else:
        text = strict(json.dumps(doc, indent=indent, allow_nan=True, ensure_ascii=False))
    if not text.isascii() or "\x7f" in text:
        text = _OLD_UNSAFE.sub(escape, text)
    return text + "\n"


_TEXT = st.text(st.one_of(st.characters(), st.sampled_from(list('"\\\x7f\x85\u202e\u2028\u061c\ud800\udc80\udcff'
                                                                 "\U0001f600\x00\x1b"))), max_size=12)
_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), _FLOAT, _TEXT),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
                      max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_TEXT, min_size=1, max_size=6), st.lists(st.lists(_FLOAT, max_size=5), max_size=4), _VALUE,
       st.data(), st.booleans())
def test_dumps_with_encoded_pieces_writes_what_it_wrote_before(tensors: list[str], rows: list[list[float]],
                                                               other: Any, data: st.DataObject, one_line: bool) -> None:
    doc = {"schema": "gradinspect.trend/1", "steps": [{"step": 1, "sources": tensors[:1]}], "tensors": tensors,
           "series": {"norm": rows, "share": rows[::-1]}, "other": other}
    whole = json_format._strict(json_format._one_line(doc["series"]))  # as dumps encodes it
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=5)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    saved = json_format.PRETTY_MAX_ROWS
    try:
        json_format.PRETTY_MAX_ROWS = 0 if one_line else 10**9
        got = json_format.dumps(doc, {"series": pieces})
        assert got == _old_dumps(doc, {"series": whole}) == json_format.dumps(doc) == _old_dumps(doc)
    finally:
        json_format.PRETTY_MAX_ROWS = saved
    assert json.loads(got)["series"] == json.loads(whole)  # strict JSON, the series as given


def _old_rows(cells: np.ndarray) -> str:
    """``formats.json._rows`` before 6322a97 (one string), as it was."""
    r, n, w = cells.shape
    if r == 0 or n == 0:
        return "[" + ", ".join(["[]"] * r) + "]"
    buf = np.zeros((r, n * (w + 2) + 4), dtype=np.uint8)
    body = buf[:, :n * (w + 2)].reshape(r, n, w + 2)
    body[:, :, :w] = cells
    body[:, :-1, w:] = np.frombuffer(b", ", dtype=np.uint8)
    buf[:, -4:] = np.frombuffer(b"], [", dtype=np.uint8)
    text = buf.tobytes().translate(None, b"\0").decode("ascii")
    return "[[" + text[:-3] + "]"


@pytest.mark.parametrize("rows", [0, 1, 2, 9])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_rows_laid_out_in_pieces_join_to_the_text_they_were(rng: np.random.Generator, rows: int, steps: int) -> None:
    bits = rng.integers(0, 2**64, rows * steps, dtype=np.uint64, endpoint=False).view(np.float64).tolist()
    values = [[*bits[i * steps:(i + 1) * steps]] for i in range(rows)]
    cells = spell_cells(tuple(values)) if rows else np.zeros((0, steps, W), np.uint8)
    cells = cells.reshape(rows, steps, W)
    text = "".join(json_format._rows(cells))
    assert text == _old_rows(cells)
    assert text == json_format._strict(json_format._one_line(values))  # what dumps writes for those numbers
