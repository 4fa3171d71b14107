"""The .npy reader (alone and in npz members) against headers it cannot trust."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
from click.testing import CliRunner, Result

import gradinspect
from gradinspect.cli import cli

_LOCAL = struct.Struct("<4s5H3L2H")
_CDIR = struct.Struct("<4s6H3L5H2L")
_EOCD = struct.Struct("<4s4H2LH")


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": "80", "NO_COLOR": "1"})


def _refused_by_cli(*args: object, match: str) -> str:
    """Exit 2 with one ``Error:`` line containing ``match``, nothing on stdout."""
    r = run(*args)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert match in r.stderr, r.stderr
    return r.stderr


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


def test_bfloat16_npz_is_refused_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "b.npz"
    np.savez(path, v=np.ones(2, np.float32), w=np.array([1.0, np.nan], ml_dtypes.bfloat16))
    err = _refused_by_cli("norms", path, match="member 'w.npy': raw void dtype |V2")
    assert "bfloat16" in err
    _refused_by_cli("check", path, match="bfloat16")


def test_void_npy_files_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "b.npy", np.ones(3, ml_dtypes.bfloat16))
    err = _refused_by_cli("norms", tmp_path / "b.npy", match="raw void dtype |V2")
    assert "bfloat16" in err
    np.save(tmp_path / "f8.npy", np.ones(3, ml_dtypes.float8_e4m3fn))
    err = _refused_by_cli("norms", tmp_path / "f8.npy", match="raw void dtype |V1")
    assert "float8" in err
    np.save(tmp_path / "v5.npy", np.zeros(3, "V5"))
    _refused_by_cli("norms", tmp_path / "v5.npy", match="raw void dtype |V5")


def test_structured_dtype_is_still_skipped(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", w=np.ones(2), rec=np.zeros(2, [("a", "<f4"), ("b", "<i4")]))
    r = gradinspect.inspect(tmp_path / "s.npz")
    assert [t.name for t in r.tensors] == ["w"] and [s.name for s in r.skipped] == ["rec"]
