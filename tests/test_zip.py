"""The zip (npz) and .npy readers against archives that lie: forged end records, hidden
or disguised members, decompression bombs, ZIP64, oversized directories, bad headers."""

from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gradinspect
from conftest import run
from gradinspect.engine import crc32_combine
from gradinspect.errors import InputError
from gradinspect.sources import open_source

_LOCAL = struct.Struct("<4s5H3L2H")
_CDIR = struct.Struct("<4s6H3L5H2L")
_EOCD = struct.Struct("<4s4H2LH")


def _refused_by_cli(*args: object, match: str) -> str:
    """Exit 2 with one ``Error: <path>: <problem>`` line whose problem contains ``match``, nothing on stdout."""
    r = run(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith(f"Error: {args[-1]}: "), r.stderr
    problem = r.stderr[len(f"Error: {args[-1]}: ") :]
    assert match in problem, r.stderr
    return problem


def _npy(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def _nan_npz(path: Path) -> Path:
    """A real np.savez file whose second member holds a NaN."""
    np.savez(path, ok=np.ones(4), bad=np.array([1.0, np.nan]))
    return path


def _eocd_at(data: bytes | bytearray) -> int:
    at = len(data) - _EOCD.size
    assert data[at : at + 4] == b"PK\x05\x06"
    return at


def _local_at(data: bytes | bytearray, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        return z.getinfo(name).header_offset


def _central_at(data: bytes | bytearray, name: str) -> int:
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        f = _CDIR.unpack_from(data, at)
        if bytes(data[at + _CDIR.size : at + _CDIR.size + f[10]]) == name.encode():
            return at
        at = data.find(b"PK\x01\x02", at + 1)
    raise AssertionError(name)


# --- 1. the end record and the central directory must agree with the archive ------


def test_lowered_entry_count_is_refused_not_a_silent_drop(tmp_path: Path) -> None:
    path = _nan_npz(tmp_path / "g.npz")
    assert run("check", path).exit_code == 1  # the NaN is found in the intact file
    data = bytearray(path.read_bytes())
    eocd = _eocd_at(data)
    struct.pack_into("<HH", data, eocd + 8, 1, 1)  # entries on this disk, total entries: 2 -> 1
    path.write_bytes(bytes(data))
    _refused_by_cli("check", path, match="entries")
    _refused_by_cli("norms", path, match="the end record counts 1")


def test_lowered_count_and_size_are_refused(tmp_path: Path) -> None:
    """Count and size lowered together to drop the last central entry: the directory no longer meets the end record."""
    path = _nan_npz(tmp_path / "g.npz")
    data = bytearray(path.read_bytes())
    eocd = _eocd_at(data)
    last = _central_at(data, "bad.npy")
    cd_off = _EOCD.unpack_from(data, eocd)[6]
    struct.pack_into("<HHL", data, eocd + 8, 1, 1, last - cd_off)
    path.write_bytes(bytes(data))
    _refused_by_cli("check", path, match="ends before the end record")


def _with_comment(data: bytes, comment: bytes) -> bytes:
    eocd = _eocd_at(data)
    return data[: eocd + 20] + struct.pack("<H", len(comment)) + comment


def test_forged_end_record_in_the_comment_does_not_hide_members(tmp_path: Path) -> None:
    path = _nan_npz(tmp_path / "g.npz")
    data = path.read_bytes()
    forged = _EOCD.pack(b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)  # "no members at all"
    path.write_bytes(_with_comment(data, forged + b"padding"))  # its comment length does not reach the end
    r = gradinspect.inspect(path)
    assert sorted(t.name for t in r.tensors) == ["bad", "ok"] and r.total.nonfinite
    assert run("check", path).exit_code == 1


def test_forged_end_record_reaching_the_end_is_refused(tmp_path: Path) -> None:
    path = _nan_npz(tmp_path / "g.npz")
    data = path.read_bytes()
    forged = _EOCD.pack(b"PK\x05\x06", 0, 0, 0, 0, 0, 0, 0)  # comment length 0: it too ends at the end of the file
    path.write_bytes(_with_comment(data, forged))
    _refused_by_cli("check", path, match="2 end-of-central-directory records reach exactly to the end of the file")


def test_extra_central_entry_past_the_count_is_refused(tmp_path: Path) -> None:
    """A central entry the count leaves out, with the size still covering it."""
    path = tmp_path / "g.npz"
    np.savez(path, ok=np.ones(4))
    data = path.read_bytes()
    eocd = _eocd_at(data)
    _, _, _, _, _, cd_size, cd_off, _ = _EOCD.unpack_from(data, eocd)
    entry = data[cd_off : cd_off + cd_size]
    eocd_rec = bytearray(data[eocd:])
    struct.pack_into("<L", eocd_rec, 12, 2 * cd_size)
    path.write_bytes(data[:eocd] + entry + bytes(eocd_rec))
    _refused_by_cli("norms", path, match="the end record counts 1 entries but the central directory holds more")


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("name", b"c", "name"),
        ("method", 8, "compression method"),
        ("crc", 12345, "CRC-32"),
        ("csize", 7, "compressed size"),
        ("usize", 7, "uncompressed size"),
    ],
)
def test_local_header_must_match_its_central_entry(tmp_path: Path, field: str, value: object, what: str) -> None:
    path = _nan_npz(tmp_path / "g.npz")
    data = bytearray(path.read_bytes())
    at = _local_at(data, "bad.npy")
    if field == "name":
        data[at + _LOCAL.size] = ord(value)  # type: ignore[arg-type]
    else:
        fmt, pos = {"method": ("<H", 8), "crc": ("<L", 14), "csize": ("<L", 18), "usize": ("<L", 22)}[field]
        struct.pack_into(fmt, data, at + pos, value)
    path.write_bytes(bytes(data))
    err = _refused_by_cli("check", path, match=what)
    assert "'bad.npy'" in err


def test_overlapping_members_are_refused(tmp_path: Path) -> None:
    """A member whose local header and data lie inside another member's data (the overlap zip bombs use)."""
    def local(name: bytes, npy: bytes) -> bytes:
        return _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(npy), len(npy), len(npy), 5, 0) + name + npy

    b_npy = _npy(np.full(4, 2.0))
    b_local = local(b"b.npy", b_npy)
    a_npy = _npy(np.frombuffer(b_local, np.uint8))  # a.npy's data is b.npy's local header and data
    a_local = local(b"a.npy", a_npy)
    cd = b""
    for name, npy, off in ((b"a.npy", a_npy, 0), (b"b.npy", b_npy, len(a_local) - len(b_local))):
        cd += _CDIR.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, zlib.crc32(npy), len(npy), len(npy), 5, 0, 0, 0, 0, 0,
                         off) + name
    path = tmp_path / "g.npz"
    path.write_bytes(a_local + cd + _EOCD.pack(b"PK\x05\x06", 0, 0, 2, 2, len(cd), len(a_local), 0))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # each member on its own is sound
    _refused_by_cli("norms", path, match="members 'a.npy' and 'b.npy' overlap in the archive")


def test_valid_npz_with_a_comment_and_a_data_descriptor_reads(tmp_path: Path) -> None:
    """A zip written to a pipe (flag bit 3: sizes after the data) with an archive comment."""
    buf = io.BytesIO()

    class Unseekable(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: bytes) -> int:  # type: ignore[override]
            return buf.write(b)

    with zipfile.ZipFile(Unseekable(), "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.comment = b"made on a pipe"
        for name, arr in (("a.npy", np.arange(5.0)), ("b.npy", np.full(3, 2.0, np.float32))):
            with z.open(name, "w") as f:
                f.write(_npy(arr))
    path = tmp_path / "p.npz"
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path) as z:
        assert all(i.flag_bits & 8 for i in z.infolist())
    r = gradinspect.inspect(path)
    assert r.total.sq == 30 + 12 and r.total.numel == 8


# --- 2. members named like directories ------------------------------------------------


def test_directory_named_member_with_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok.npy", _npy(np.ones(3)))
        z.writestr("grads/", _npy(np.array([np.nan])))
    _refused_by_cli("check", path, match="member 'grads/': is named like a directory but holds 136 bytes")


def test_empty_directory_entry_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.mkdir("grads")
        z.writestr("grads/w.npy", _npy(np.full(4, 3.0)))
    r = gradinspect.inspect(path)
    assert [t.name for t in r.tensors] == ["grads/w"] and r.total.sq == 36 and not r.skipped


# --- 3. a member that inflates to more (or fewer) bytes than it declares -------------------


def _crc_of_zeros(n: int) -> int:
    crc, piece, size = 0, zlib.crc32(b"\0"), 1
    while n:
        if n & 1:
            crc = crc32_combine(crc, piece, size)
        piece, size, n = crc32_combine(piece, piece, size), size * 2, n >> 1
    return crc


def _deflated_member_zip(path: Path, stream_head: bytes, zeros_mib: int, usize: int, crc: int) -> None:
    """One deflated member: ``stream_head`` then ``zeros_mib`` MiB of zeros, declaring ``usize`` and ``crc``."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    blob = c.compress(stream_head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes for every MiB of zeros
    blob += block * zeros_mib + c.flush()
    name = b"w.npy"
    local = _LOCAL.pack(b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(blob), usize, len(name), 0) + name
    central = _CDIR.pack(b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(blob), usize, len(name), 0, 0, 0, 0, 0, 0) + name
    cd_off = len(local) + len(blob)
    path.write_bytes(local + blob + central + _EOCD.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central), cd_off, 0))


def test_decompression_bomb_stops_at_the_declared_size(tmp_path: Path) -> None:
    arr = np.arange(16, dtype=np.float64)
    npy = _npy(arr)
    gib = 4
    # The CRC-32 of everything the stream holds, so that only the size gives it away.
    crc = crc32_combine(zlib.crc32(npy), _crc_of_zeros(gib << 30), gib << 30)
    path = tmp_path / "bomb.npz"
    _deflated_member_zip(path, npy, gib << 10, len(npy), crc)  # 4 MiB of file, 4 GiB inflated
    t = time.perf_counter()
    _refused_by_cli("norms", path, match=f"inflates to more than the declared {len(npy)} bytes")
    assert time.perf_counter() - t < 2.0  # inflating it all takes seconds


def test_member_that_inflates_to_fewer_bytes_than_declared(tmp_path: Path) -> None:
    npy = _npy(np.arange(8, dtype=np.float64))
    path = tmp_path / "short.npz"
    _deflated_member_zip(path, npy, 0, len(npy) + 64, zlib.crc32(npy))  # declares 8 doubles more than it holds
    _refused_by_cli("norms", path, match="member 'w.npy': 64 unexpected bytes after the array")
    arr = np.arange(16, dtype=np.float64)
    npy = _npy(arr)  # a header for 16 doubles over a stream holding 8
    _deflated_member_zip(path, npy[:-64], 0, len(npy), zlib.crc32(npy))
    _refused_by_cli("norms", path, match="member 'w.npy': inflates to 192 bytes, fewer than the declared 256")


def test_npy_header_past_the_declared_size_is_refused(tmp_path: Path) -> None:
    npy = _npy(np.arange(4, dtype=np.float64))
    path = tmp_path / "h.npz"
    _deflated_member_zip(path, npy, 0, 50, zlib.crc32(npy))  # declares less than the .npy header alone
    _refused_by_cli("norms", path, match="member 'w.npy': truncated .npy header")


def test_deflated_npz_still_reads_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    g = {f"w{i}": rng.integers(-1000, 1000, size=n) * 2.0**-10 for i, n in enumerate((1, 100, 70_000))}
    np.savez_compressed(tmp_path / "c.npz", **g)
    r = gradinspect.inspect(tmp_path / "c.npz", sort="none")
    assert r.total.sq == math.fsum(x * x for a in g.values() for x in a.tolist())  # exact squares, exact sum
    assert [t.numel for t in r.tensors] == [1, 100, 70_000]


# --- 4. ZIP64 -------------------------------------------------------------------------


def test_zip64_npz_with_66000_members(tmp_path: Path, rng: np.random.Generator) -> None:
    n = 66_000  # more than the 65,535 entries a plain end record can count
    values = rng.integers(-1000, 1000, size=(n, 2)) * 2.0**-10  # squares and their sums stay exact
    path = tmp_path / "many.npz"
    np.savez(path, *values)
    assert path.read_bytes().rfind(b"PK\x06\x06") > 0  # numpy wrote a ZIP64 end record
    r = gradinspect.inspect(path, sort="none")
    assert len(r.tensors) == n and r.total.numel == 2 * n
    assert r.total.sq == math.fsum((values**2).ravel().tolist())
    rows = {t.name: t for t in r.tensors}
    for i in (0, 1, 65_535, 65_536, n - 1):
        assert rows[f"arr_{i}"].sq == float(values[i, 0] ** 2 + values[i, 1] ** 2)


def _zip64_extra(*values: int) -> bytes:
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values)


@pytest.fixture
def sparse_dir(tmp_path: Path) -> Iterator[Path]:
    """Where to put a sparse file: tmpfs if there is one, as it reads holes from the zero page
    (a disk file's 4 GiB of holes fill 4 GiB of page cache first, several times slower)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="gradinspect-test-") as d:
        yield Path(d)


def test_zip64_member_over_4_gib(sparse_dir: Path) -> None:
    """A stored float64 member of 4 GiB + 16 bytes (sparse: holes read as zeros), then a small
    member whose local header lies past 4 GiB: 64-bit sizes and a 64-bit offset."""
    numel = (1 << 29) + 2
    planted = {0: 1.5, 12345: -2.0, (1 << 29) - 1: 3.0, numel - 1: 0.25}
    head = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float64))
    hb = io.BytesIO()
    np.lib.format.write_array_header_1_0(hb, {**head, "shape": (numel,)})
    header = hb.getvalue()
    size = len(header) + 8 * numel
    # CRC-32 of the header, zeros and planted values, in file order
    crc, pos = zlib.crc32(header), 0
    for i in sorted(planted):
        gap = 8 * i - pos
        crc = crc32_combine(crc, _crc_of_zeros(gap), gap)
        crc = zlib.crc32(np.float64(planted[i]).tobytes(), crc)
        pos = 8 * i + 8
    crc = crc32_combine(crc, _crc_of_zeros(8 * numel - pos), 8 * numel - pos)
    big, small_npy = b"big.npy", _npy(np.array([4.0, -8.0]))
    path = sparse_dir / "huge.npz"
    with open(path, "wb") as f:
        f.write(_LOCAL.pack(b"PK\x03\x04", 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(big), 20) + big)
        f.write(_zip64_extra(size, size))
        data = f.tell()
        f.write(header)
        for i, v in planted.items():
            f.seek(data + len(header) + 8 * i)
            f.write(np.float64(v).tobytes())
        small_off = data + size
        f.seek(small_off)
        f.write(_LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(small_npy), len(small_npy), len(small_npy),
                            9, 0) + b"small.npy" + small_npy)
        cd_off = f.tell()
        e1 = _zip64_extra(size, size)
        cd = _CDIR.pack(b"PK\x01\x02", 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(big), len(e1),
                        0, 0, 0, 0, 0) + big + e1
        e2 = _zip64_extra(small_off)
        cd += _CDIR.pack(b"PK\x01\x02", 45, 20, 0, 0, 0, 0, zlib.crc32(small_npy), len(small_npy), len(small_npy), 9,
                         len(e2), 0, 0, 0, 0, 0xFFFFFFFF) + b"small.npy" + e2
        f.write(cd)
        eocd64 = f.tell()
        f.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, len(cd), cd_off))
        f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64, 1))
        f.write(_EOCD.pack(b"PK\x05\x06", 0, 0, 2, 2, len(cd), 0xFFFFFFFF, 0))
    assert path.stat().st_size > 1 << 32 and path.stat().st_blocks * 512 < 1 << 20  # sparse: < 1 MiB on disk
    with zipfile.ZipFile(path) as z:  # the reference reader agrees on the layout
        assert [(i.filename, i.file_size, i.header_offset) for i in z.infolist()] == [
            ("big.npy", size, 0), ("small.npy", len(small_npy), small_off)]
    src = open_source(str(path))
    assert [(t.name, t.numel) for t in src.tensors] == [("big", numel), ("small", 2)]
    r = gradinspect.inspect(path, sort="none")
    rows = {t.name: t for t in r.tensors}
    assert rows["big"].sq == math.fsum(v * v for v in planted.values()) and rows["big"].linf == 3.0
    assert rows["small"].sq == 80.0 and r.total.numel == numel + 2


# --- 5. a central directory too large to read -------------------------------------------


def test_huge_central_directory_is_refused_without_reading_it(tmp_path: Path) -> None:
    cd_size = 300 << 20
    path = tmp_path / "cd.npz"
    with open(path, "wb") as f:
        f.truncate(cd_size)  # holes
        f.seek(cd_size)
        f.write(_EOCD.pack(b"PK\x05\x06", 0, 0, 1, 1, cd_size, 0, 0))
    tracemalloc.start()
    try:
        t = time.perf_counter()
        with pytest.raises(InputError, match="exceeds the 256 MiB limit"):
            open_source(str(path))
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and elapsed < 1.0
    _refused_by_cli("norms", path, match="exceeds the 256 MiB limit")


def test_end_record_claiming_more_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    np.savez(path, w=np.ones(3))
    data = bytearray(path.read_bytes())
    struct.pack_into("<L", data, _eocd_at(data) + 12, 1 << 30)
    path.write_bytes(bytes(data))
    _refused_by_cli("norms", path, match="runs past the end record")


# --- 6. .npy headers that do not decode ---------------------------------------------------


def _npy_v3(header: bytes) -> bytes:
    header += b" " * (-(12 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x03\x00" + struct.pack("<I", len(header)) + header


def test_npy_v3_header_not_utf8(tmp_path: Path) -> None:
    bad = _npy_v3(b"{'descr': '<f8', 'fortran_order': False, 'shape': (1,), '\xff': 1}") + bytes(8)
    (tmp_path / "v3.npy").write_bytes(bad)
    _refused_by_cli("norms", tmp_path / "v3.npy", match="corrupt .npy header")
    with zipfile.ZipFile(tmp_path / "v3.npz", "w") as z:
        z.writestr("w.npy", bad)
    _refused_by_cli("norms", tmp_path / "v3.npz", match="member 'w.npy': corrupt .npy header")


def test_npy_v3_utf8_header_still_reads(tmp_path: Path) -> None:
    good = _npy_v3(b"{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }") + np.array([3.0, 4.0]).tobytes()
    (tmp_path / "ok.npy").write_bytes(good)
    assert gradinspect.inspect(tmp_path / "ok.npy").total.l2 == 5.0


# --- 7. raw void dtypes (how numpy writes bfloat16 and float8) ---------------------------------


def test_bfloat16_npz_is_read_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    np.savez(path, v=np.ones(2, np.float32), w=np.array([1.0, np.nan], ml_dtypes.bfloat16))
    r = gradinspect.inspect(path)
    assert {t.name: (t.dtype, t.nan) for t in r.tensors} == {"v": ("float32", 0), "w": ("bfloat16", 1)}
    assert not r.skipped and r.total.nan == 1


def test_void_npy_files_without_a_default_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "f8.npy", np.ones(3, ml_dtypes.float8_e4m3fn))
    err = _refused_by_cli("norms", tmp_path / "f8.npy", match="raw 1-byte values (<V1): which float8")
    assert "--void-as" in err
    np.save(tmp_path / "v5.npy", np.zeros(3, "V5"))
    _refused_by_cli("norms", tmp_path / "v5.npy", match="raw 5-byte values (|V5): no 5-byte type")


def test_structured_dtype_is_still_skipped(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", w=np.ones(2), rec=np.zeros(2, [("a", "<f4"), ("b", "<i4")]))
    r = gradinspect.inspect(tmp_path / "s.npz")
    assert [t.name for t in r.tensors] == ["w"] and [s.name for s in r.skipped] == ["rec"]


# --- what numpy itself would not read is not read (found by benchmarks/fuzz.py) ------------------


def test_npy_minor_version_and_extra_keys_are_refused(tmp_path: Path) -> None:
    good = _npy(np.ones(3, np.float32))
    minor = bytearray(good)
    minor[7] = 1
    (tmp_path / "minor.npy").write_bytes(bytes(minor))
    with pytest.raises(InputError, match=r"unsupported \.npy format version 1\.1"):
        gradinspect.inspect(tmp_path / "minor.npy")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1, }"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    (tmp_path / "extra.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
                                         + np.ones(3, np.float32).tobytes())
    with pytest.raises(InputError, match=r"corrupt \.npy header \(unexpected key 'extra'\)"):
        gradinspect.inspect(tmp_path / "extra.npy")
    with pytest.raises(ValueError, match="correct keys"):  # numpy refuses it too
        np.load(tmp_path / "extra.npy")


@pytest.mark.parametrize("bit", [5, 6, 13])
def test_zip_members_with_unsupported_flags_are_refused(tmp_path: Path, bit: int) -> None:
    path = tmp_path / "f.npz"
    np.savez(path, w=np.ones(4, np.float32))
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the central entry's general purpose flags
    (flags,) = struct.unpack_from("<H", data, at + 8)
    struct.pack_into("<H", data, at + 8, flags | (1 << bit))
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"member 'w\.npy': uses zip features that are not supported"):
        gradinspect.inspect(path)


@pytest.mark.parametrize("extra_len", [10, 19])
def test_a_short_zip64_local_extra_field_is_an_error_not_a_traceback(tmp_path: Path, extra_len: int) -> None:
    """Found by benchmarks/fuzz.py: a local header whose ZIP64 extra field is cut short."""
    path = tmp_path / "f.npz"
    np.savez(path, w=np.ones(4, np.float32))
    data = bytearray(path.read_bytes())
    assert data[:4] == b"PK\x03\x04" and struct.unpack_from("<H", data, 28)[0] == 20  # np.savez: ZIP64 locals
    struct.pack_into("<H", data, 28, extra_len)
    path.write_bytes(bytes(data))
    r = run("norms", path)
    assert r.exit_code == 2 and r.stdout == "" and r.stderr.startswith(f"Error: {path}: ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
