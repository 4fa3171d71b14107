""".npz files: zip archives (stored or deflated, ZIP64 too) of .npy members.

The central directory decides what is read; the end records, the directory and
each member's local header must agree, members may not overlap, and a deflated
member must inflate to exactly its declared size (see :mod:`.codec`).
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from ..errors import InputError
from . import limits
from .base import Container, Source, TensorDesc
from .codec import inflate_head
from .npy import NPY_HEAD_MAX, npy_desc, npy_header_complete, parse_npy_header
from .store import ByteStore

__all__ = ["CONTAINER"]


class _Window:
    """Small reads near each other (zip local headers, .npy headers) from one larger pread."""

    SIZE = 1 << 18

    def __init__(self, store: ByteStore) -> None:
        self.store, self.size = store, store.size
        self.base, self.data = 0, b""

    def read(self, offset: int, n: int, ahead: bool = True) -> bytes:
        """``n`` bytes at ``offset``; ``ahead``: also fetch what follows (small members)."""
        if not (self.base <= offset and offset + n <= self.base + len(self.data)):
            self.base = offset
            want = max(n, self.SIZE) if ahead else n + 4096
            self.data = self.store.read(min(want, self.size - offset), offset)
        at = offset - self.base
        return self.data[at : at + n]


_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
# APPNOTE 4.3.14: signature, size of the rest of the record, version made by, version needed, this disk,
# disk of the central directory, entries on this disk, entries in all, central directory size, its offset.
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
_UNREADABLE_FLAGS = (1 << 5) | (1 << 6) | (1 << 13)
_LOCAL = struct.Struct("<4s5H3L2H")
_ZIP64_LOCAL = struct.Struct("<HHQQ")  # the ZIP64 extra field of a local header: both sizes
# A central directory above this size is refused (its entries take at least 46 bytes, most npz ones under
# 100: millions of members fit); it is read in windows of _CD_WINDOW bytes, never whole.
limits.MAX_ZIP_CD = 256 << 20
_CD_WINDOW = 1 << 20

# name, name as stored, flags, method, CRC-32, compressed size, uncompressed size, local header offset
_Member = tuple[str, bytes, int, int, int, int, int, int]


def _zip_end(path: str, store: ByteStore, size: int) -> tuple[int, int, int, int]:
    """(entries, central directory size, its offset, where it must end) from the end records.

    The end-of-central-directory record is the one whose comment reaches exactly to the
    end of the file; a second such record (a forged one inside the comment) is refused.
    """
    tail_len = min(size, _EOCD.size + 0xFFFF)
    base = size - tail_len
    tail = store.read(tail_len, base)
    found = []
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0:
        if at + _EOCD.size <= tail_len and at + _EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] == tail_len:
            found.append(at)
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if not found:
        raise InputError(path, "not a zip file (no end-of-central-directory record): corrupt or truncated")
    if len(found) > 1:
        raise InputError(path, f"{len(found)} end-of-central-directory records reach exactly to the end of the file "
                         "(forged ones hide in the archive comment or in member data): refusing an ambiguous zip")
    _, disk, cd_disk, on_disk, count, cd_size, cd_off, _ = _EOCD.unpack_from(tail, found[0])
    end = eocd = base + found[0]
    loc = eocd - _EOCD64_LOC.size
    if loc >= 0 and store.read(4, loc) == b"PK\x06\x07":
        _, _, end, disks = _EOCD64_LOC.unpack(store.read(_EOCD64_LOC.size, loc))
        if end + _EOCD64.size > loc:
            raise InputError(path, "corrupt ZIP64 end-of-central-directory locator")
        sig, rest, _, _, disk, cd_disk, on_disk64, count64, cd_size64, cd_off64 = _EOCD64.unpack(
            store.read(_EOCD64.size, end))
        if sig != b"PK\x06\x06" or end + 12 + rest != loc or disks > 1:
            raise InputError(path, "corrupt ZIP64 end-of-central-directory record")
        for what, v32, v64, full in (("entries", count, count64, 0xFFFF),
                                     ("central directory size", cd_size, cd_size64, 0xFFFFFFFF),
                                     ("central directory offset", cd_off, cd_off64, 0xFFFFFFFF)):
            if v32 not in (full, v64):  # 0xFFFF...: "see the ZIP64 record"
                raise InputError(path, f"the end record and the ZIP64 end record disagree on the {what} "
                                 f"({v32} vs {v64})")
        on_disk, count, cd_size, cd_off = on_disk64, count64, cd_size64, cd_off64
    if disk or cd_disk or on_disk != count:
        raise InputError(path, "zip archives split over several disks are not supported")
    return count, cd_size, cd_off, end


def _zip_directory(path: str, store: ByteStore, size: int) -> tuple[list[_Member], int]:
    """The members the central directory lists, and where it starts.

    The directory is walked by its recorded size and offset: it must end where the end
    record begins and hold exactly the number of entries the end record counts.
    """
    count, cd_size, cd_off, cd_end = _zip_end(path, store, size)
    if cd_off + cd_size != cd_end:
        where = "runs past" if cd_off + cd_size > cd_end else "ends before"
        raise InputError(path, f"the central directory ({cd_size} bytes at byte {cd_off}) {where} the end record "
                         f"at byte {cd_end}: corrupt, truncated or not a plain zip")
    if cd_size > limits.MAX_ZIP_CD:
        raise InputError(path,
                         f"a zip central directory of {cd_size} bytes exceeds the {limits.MAX_ZIP_CD >> 20} MiB limit")
    if count * _CDIR.size > cd_size:
        raise InputError(path, f"the end record counts {count} entries, more than a central directory "
                         f"of {cd_size} bytes can hold")
    members: list[_Member] = []
    buf, start = b"", cd_off  # buf holds the file's bytes from ``start`` on
    pos = cd_off
    while pos < cd_end:
        if len(members) == count:
            raise InputError(path, f"the end record counts {count} entries but the central directory holds more "
                             f"({cd_end - pos} bytes of it are left over)")
        at = pos - start
        if at + _CDIR.size > len(buf):
            buf, start, at = store.read(min(_CD_WINDOW, cd_end - pos), pos), pos, 0
        if at + _CDIR.size > len(buf) or buf[at : at + 4] != b"PK\x01\x02":
            raise InputError(path, f"corrupt zip central directory (entry {len(members) + 1} of {count})")
        f = _CDIR.unpack_from(buf, at)
        flags, method, crc, csize, usize = f[3], f[4], f[7], f[8], f[9]
        nlen, elen, clen, off = f[10], f[11], f[12], f[16]
        n = _CDIR.size + nlen + elen + clen
        if pos + n > cd_end:
            raise InputError(path, f"corrupt zip central directory (entry {len(members) + 1} runs past its end)")
        if at + n > len(buf):
            buf, start, at = store.read(min(max(n, _CD_WINDOW), cd_end - pos), pos), pos, 0
        raw = buf[at + _CDIR.size : at + _CDIR.size + nlen]
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise InputError(path, "a zip member name is not valid UTF-8") from None
        if 0xFFFFFFFF in (csize, usize, off):
            extra = buf[at + _CDIR.size + nlen : at + _CDIR.size + nlen + elen]
            usize, csize, off = _zip64_extra(extra, usize, csize, off, path)
        members.append((name, raw, flags, method, crc, csize, usize, off))
        pos += n
    if len(members) != count:
        raise InputError(path, f"the end record counts {count} entries but the central directory holds {len(members)}")
    return members, cd_off


def _zip64_extra(extra: bytes, usize: int, csize: int, off: int, path: str) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        if tag == 1 and i + 4 + ln <= len(extra):
            vals = list(struct.unpack_from(f"<{ln // 8}Q", extra, i + 4))
            need = [usize, csize, off].count(0xFFFFFFFF)
            if len(vals) < need:
                break
            if usize == 0xFFFFFFFF:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF:
                csize = vals.pop(0)
            if off == 0xFFFFFFFF:
                off = vals.pop(0)
            return usize, csize, off
        i += 4 + ln
    raise InputError(path, "corrupt zip64 extra field")


def _check_local(path: str, where: str, local: tuple[Any, ...], lname: bytes, lextra: bytes, m: _Member) -> None:
    """The local header must say what the central directory says about its member."""
    _, raw, _, method, crc, csize, usize, _ = m
    if lname != raw:
        raise InputError(path, f"{where}its local header names it {lname.decode('utf-8', 'replace')!r}")
    if local[3] != method:
        raise InputError(path, f"{where}the local header says compression method {local[3]}, "
                         f"the central directory {method}")
    if local[2] & 8:  # sizes and CRC in a data descriptor after the data
        return
    lcrc, lcsize, lusize = local[6], local[7], local[8]
    if lcsize == lusize == 0xFFFFFFFF and len(lextra) >= 20 and lextra[:4] == b"\x01\x00\x10\x00":
        # np.savez writes every local header with a ZIP64 extra field: the fast path
        lusize, lcsize = struct.unpack_from("<QQ", lextra, 4)
    elif 0xFFFFFFFF in (lcsize, lusize):
        lusize, lcsize, _ = _zip64_extra(lextra, lusize, lcsize, 0, path)
    for what, a, b in (("CRC-32", lcrc, crc), ("compressed size", lcsize, csize), ("uncompressed size", lusize, usize)):
        if a != b:
            raise InputError(path, f"{where}the local header and the central directory disagree on the {what} "
                             f"({a} vs {b})")


def member_data(path: str, window: _Window, m: _Member) -> int:
    """Where member ``m``'s data starts, once its flags, method and local header are checked."""
    name, _, flags, method, crc, csize, usize, off = m
    size = window.size
    where = f"member {name!r}: "
    if flags & 1:
        raise InputError(path, f"{where}is encrypted")
    if flags & _UNREADABLE_FLAGS:  # patched data (bit 5), strong encryption (6), a masked header (13)
        raise InputError(path,
                         f"{where}uses zip features that are not supported (general purpose flags {flags:#06x})")
    if method not in (0, 8):
        raise InputError(path, f"{where}unsupported zip compression method {method}")
    if method == 0 and csize != usize:
        raise InputError(path, f"{where}stored, yet its sizes differ ({csize} stored, {usize} declared)")
    if off + _LOCAL.size > size:
        raise InputError(path, f"{where}local header past the end of the file: truncated")
    ahead = csize < _Window.SIZE // 4
    head = window.read(off, min(_LOCAL.size + len(m[1]) + 20, size - off), ahead=ahead)  # the usual extra: 20
    local = _LOCAL.unpack_from(head)
    if local[0] != b"PK\x03\x04":
        raise InputError(path, f"{where}corrupt zip local header")
    nlen, hend = local[9], _LOCAL.size + local[9] + local[10]
    data: int = off + hend
    if data + csize > size:
        raise InputError(path, f"{where}data runs past the end of the file: truncated")
    if hend > len(head):
        head = window.read(off, hend, ahead=ahead)
    lname, lextra = head[_LOCAL.size : _LOCAL.size + nlen], head[_LOCAL.size + nlen : hend]
    sizes = local[6:9]
    if not (lname == m[1] and local[3] == method and (local[2] & 8 or sizes == (crc, csize, usize) or (
            sizes == (crc, 0xFFFFFFFF, 0xFFFFFFFF) and lextra == _ZIP64_LOCAL.pack(1, 16, usize, csize)))):
        _check_local(path, where, local, lname, lextra, m)  # says what disagrees
    return data


def read_npz(store: ByteStore, path: str) -> Source:
    size = store.size
    members, cd_off = _zip_directory(path, store, size)
    window = _Window(store)
    tensors = []
    seen: set[str] = set()
    spans = []
    for m in members:
        name, _, _, method, crc, csize, usize, off = m
        where = f"member {name!r}: "
        ahead = csize < _Window.SIZE // 4
        data = member_data(path, window, m)
        spans.append((off, data + csize, name))
        if name.endswith("/"):
            if usize:
                raise InputError(path, f"{where}is named like a directory but holds {usize} bytes")
            continue  # an empty directory entry
        tname = name[:-4] if name.endswith(".npy") else name
        if tname in seen:
            raise InputError(path, f"{where}appears twice in the archive")
        seen.add(tname)
        if not name.endswith(".npy"):
            tensors.append(TensorDesc(tname, path, "unknown", (), 0, 0, "not an .npy array"))
            continue
        if method == 0:
            head = window.read(data, min(csize, 12 + limits.MAX_NPY_HEADER), ahead=ahead)
        else:
            head = inflate_head(store, data, csize, where, NPY_HEAD_MAX, npy_header_complete)[:usize]
        dtype, shape, hlen, fortran = parse_npy_header(head, where, path)
        if method == 0:
            entry = npy_desc(tname, path, where, dtype, shape, store.key, data + hlen, fortran, crc=crc,
                             crc_head=zlib.crc32(head[:hlen]))
        else:
            entry = npy_desc(tname, path, where, dtype, shape, store.key, data, fortran, "deflate", csize, crc,
                             skip=hlen)
        have = usize - hlen
        if have > entry.nbytes:
            raise InputError(path, f"{where}{have - entry.nbytes} unexpected bytes after the array")
        if entry.nbytes > have:
            raise InputError(path, f"{where}array of shape {list(shape)} {entry.dtype} needs {entry.nbytes} bytes, "
                                   f"the member holds {have}: truncated")
        tensors.append(entry)
    _check_spans(path, spans, cd_off)
    return Source(path, "npz", tensors, {}, size, store)


def _check_spans(path: str, spans: list[tuple[int, int, str]], cd_off: int) -> None:
    """Members (local header to end of data) may not overlap each other or the central directory."""
    spans.sort()
    end, last = 0, ""
    for start, stop, name in spans:
        if start < end:
            raise InputError(path, f"members {last!r} and {name!r} overlap in the archive")
        end, last = stop, name
    if end > cd_off:
        raise InputError(path, f"member {last!r} overlaps the zip central directory")


# for other zip-based containers (torch archives): the same walker and the same strictness
Window = _Window
zip_directory = _zip_directory
check_spans = _check_spans


class Npz(Container):
    name = "npz"
    suffixes = (".npz",)

    def describe(self, store: ByteStore, path: str) -> Source:
        return read_npz(store, path)


CONTAINER = Npz()
