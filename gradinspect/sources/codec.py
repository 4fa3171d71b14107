"""Decoding stored bytes: deflate streams (bounded: a bomb costs nothing), CRC-32s and their combination."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

from ..errors import InputError
from .store import ByteStore

__all__ = ["INFLATE_IN", "inflate", "inflate_head", "crc32_combine"]

INFLATE_IN = 1 << 20


def inflate(store: ByteStore, offset: int, stored: int, declared: int, where: str) -> Iterator[bytes]:
    """The decompressed bytes of a raw deflate stream of ``stored`` bytes at ``offset``, a block at a time.

    It must inflate to exactly ``declared`` bytes and its stream must end with its compressed
    bytes; a stream that would give more stops one byte past the declared size, so a
    decompression bomb costs nothing.  ``where`` prefixes every error message.
    """
    path = store.path
    d = zlib.decompressobj(-15)
    pos, remaining = offset, stored
    got = 0
    tail = b""
    while not d.eof:
        if not tail:
            if not remaining:
                break
            n = min(INFLATE_IN, remaining)
            tail = store.read(n, pos)
            pos, remaining = pos + n, remaining - n
        try:
            out = d.decompress(tail, min(INFLATE_IN * 4, declared - got + 1))
        except zlib.error as e:
            raise InputError(path, f"{where}corrupt compressed data ({e})") from None
        tail = d.unconsumed_tail
        got += len(out)
        if got > declared:
            raise InputError(path, f"{where}inflates to more than the declared {declared} bytes")
        if out:
            yield out
    if got < declared and d.eof:
        raise InputError(path, f"{where}inflates to {got} bytes, fewer than the declared {declared}")
    if not d.eof:
        raise InputError(path, f"{where}compressed data ends early")
    if remaining or tail or d.unused_data:
        raise InputError(path, f"{where}the compressed stream ends before the declared compressed size")


def inflate_head(store: ByteStore, pos: int, csize: int, where: str, enough: int,
                 complete: Callable[[bytes], bool]) -> bytes:
    """The start of a deflated member, up to ``enough`` bytes, reading more only until
    ``complete(head)`` (a few KiB read for an .npy header)."""
    for n in (8192, 1 << 16, 1 << 20):
        d = zlib.decompressobj(-15)
        try:
            head = d.decompress(store.read(min(csize, n), pos), enough)
        except zlib.error as e:
            raise InputError(store.path, f"{where}corrupt compressed data ({e})") from None
        if n >= csize or len(head) >= enough or complete(head):
            return head
    return head


# --- CRC-32 of a concatenation (zlib's crc32_combine, which Python does not expose) ---

_POLY = 0xEDB88320  # reflected CRC-32 polynomial


def _multmodp(a: int, b: int) -> int:
    """a(x) · b(x) modulo the CRC-32 polynomial, in the reflected bit order."""
    m, prod = 1 << 31, 0
    while True:
        if a & m:
            prod ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return prod


_X2N = [1 << 30]  # x^(2^k) mod p
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))

_SHIFT_CACHE: dict[int, int] = {}


def _x8n(nbytes: int) -> int:
    """x^(8·nbytes) mod p: appending ``nbytes`` zero bytes."""
    op = _SHIFT_CACHE.get(nbytes)
    if op is None:
        op, k, n = 1 << 31, 3, nbytes
        while n:
            if n & 1:
                op = _multmodp(_X2N[k & 31], op)
            n >>= 1
            k += 1
        if len(_SHIFT_CACHE) < 64:
            _SHIFT_CACHE[nbytes] = op
    return op


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    return _multmodp(_x8n(len2), crc1) ^ crc2
