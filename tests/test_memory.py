"""Constant memory: a 1 GiB file must not grow a process's peak RSS by more than a few tens of MiB."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("resource")  # Unix only

LIMIT_MIB = 40

_PROBE = r"""
import json, resource, sys
import numpy, gradinspect.api, gradinspect.sources  # every import before the baseline

def peak_kib():
    try:  # Linux: the high-water mark, which clear_refs can reset
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
except OSError:
    pass
base = peak_kib()
report = gradinspect.api.inspect(sys.argv[1])
print(json.dumps({"growth_mib": (peak_kib() - base) / 1024, "numel": report.total.numel, "sq": report.total.sq}))
"""


def _probe(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _sparse_safetensors(path: Path, numel: int, ones_at: list[int]) -> None:
    """A float32 tensor of ``numel`` zeros (a sparse file) with 1.0 at ``ones_at``."""
    header = json.dumps({"g": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(start + 4 * numel)
        for i in ones_at:
            f.seek(start + 4 * i)
            f.write(np.float32(1.0).tobytes())


def test_one_gib_safetensors_in_constant_memory(tmp_path: Path) -> None:
    numel = (1 << 30) // 4
    ones = [0, 12345, numel // 2, numel - 1]
    path = tmp_path / "big.safetensors"
    _sparse_safetensors(path, numel, ones)
    result = _probe(path)
    assert result["numel"] == numel and result["sq"] == len(ones)
    assert result["growth_mib"] < LIMIT_MIB, result


def test_compressed_npz_streams_through_the_decompressor(tmp_path: Path) -> None:
    numel = (256 << 20) // 8  # 256 MiB of float64 once inflated
    path = tmp_path / "big.npz"
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z,
        z.open("g.npy", "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (numel,)})
        block = np.zeros(1 << 20)
        block[7] = 2.0
        for _ in range(numel // block.size):
            f.write(block.tobytes())
    result = _probe(path)
    assert result["numel"] == numel and result["sq"] == 4.0 * (numel // (1 << 20))
    assert result["growth_mib"] < LIMIT_MIB, result
