"""Incremental JSON objects: a header or an index is read member by member, so it never
exists whole as Python objects, and every count is checked before more is allocated."""

from __future__ import annotations

import json
import json.decoder
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import InputError

__all__ = ["Refusal", "walk", "walk_all", "refusals", "value", "string_object", "not_an_object", "ws", "short"]


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def short(v: object, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages about hostile values."""
    if isinstance(v, list) and len(v) > limit:  # do not format a million elements to show eighty characters
        v = v[:limit]
    r = repr(v) if not (type(v) is int and v.bit_length() > 256) else f"<a {v.bit_length()}-bit integer>"
    return r if len(r) <= limit else r[: limit - 3] + "..."

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys)
# json.decoder.scanstring (the C scanner) is not in typeshed's json.decoder
scanstring: Callable[[str, int, bool], tuple[str, int]] = vars(json.decoder)["scanstring"]


def ws(s: str, pos: int) -> int:
    m = _WS.match(s, pos)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def walk(s: str, pos: int, member: Any) -> int:
    """Call ``member(key, value_pos) -> value_end`` for each member of the JSON object at
    ``s[pos]`` (after whitespace), in order; return where the object ends.
    Duplicate keys are the member function's to catch."""
    pos = ws(s, pos)
    if not s.startswith("{", pos):
        raise json.JSONDecodeError("Expecting '{'", s, pos)
    pos = ws(s, pos + 1)
    if s.startswith("}", pos):
        return pos + 1
    while True:
        if not s.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", s, pos)
        key, pos = scanstring(s, pos + 1, True)
        pos = ws(s, pos)
        if not s.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", s, pos)
        pos = ws(s, member(key, ws(s, pos + 1)))
        if s.startswith(",", pos):
            pos = ws(s, pos + 1)
        elif s.startswith("}", pos):
            return pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", s, pos)


def value(s: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(s, pos)
    except StopIteration:  # pragma: no cover - raw_decode turns it into JSONDecodeError
        raise json.JSONDecodeError("Expecting value", s, pos) from None


def string_object(s: str, pos: int, what: str, limit: int, too_many: str, not_strings: str,
                   max_len: int | None = None, share: bool = False) -> tuple[dict[str, str], int]:
    """The JSON object of strings at ``s[pos]`` and where it ends, refused (:class:`Refusal`)
    past ``limit`` keys or with a key or value longer than ``max_len``; ``share``: equal values
    are one string object (an index names each shard thousands of times)."""
    out: dict[str, str] = {}
    shared: dict[str, str] = {}

    def member(key: str, at: int) -> int:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        if len(out) >= limit:
            raise Refusal(too_many)
        if not s.startswith('"', at):
            raise Refusal(not_strings)
        v, end = scanstring(s, at + 1, True)
        if max_len is not None and len(key) > max_len:
            raise Refusal(f"{what} has a key longer than {max_len:,} characters")
        if max_len is not None and len(v) > max_len:
            raise Refusal(f"{what} value of {short(key)} is longer than {max_len:,} characters")
        out[key] = shared.setdefault(v, v) if share else v
        return end

    return out, walk(s, pos, member)


class Refusal(ValueError):
    """A problem, found while parsing JSON, that is not a syntax error."""


def walk_all(s: str, member: Any) -> None:
    """:func:`walk` the object at the start of ``s``: nothing but whitespace may follow it."""
    end = ws(s, walk(s, 0, member))
    if end != len(s):
        raise json.JSONDecodeError("Extra data", s, end)


@contextmanager
def refusals(path: str, what: str = "") -> Iterator[None]:
    """What is wrong with the JSON text parsed in the block, as ``InputError(path, what + "...")``."""
    try:
        yield
    except Refusal as e:
        raise InputError(path, str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(path, f"{what}not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(path, f"{what}not valid JSON (nested too deeply)") from None
    except MemoryError:
        raise InputError(path, f"{what}too large for the memory available") from None


def not_an_object(s: str) -> bool:
    """Whether the JSON text ``s`` holds a value other than an object; a syntax error raises.
    Only a short text is parsed whole to find its errors (a long array could take gigabytes)."""
    pos = ws(s, 0)
    if s.startswith("{", pos):
        return False
    if len(s) <= 1 << 20:
        end = ws(s, value(s, pos)[1])
        if end != len(s):
            raise json.JSONDecodeError("Extra data", s, end)
    elif not s.startswith(tuple('["-0123456789tfn'), pos):
        raise json.JSONDecodeError("Expecting value", s, pos)
    return True
