"""``trend --follow`` over steps that are distributed checkpoint directories (``.metadata`` + ``*.distcp``): a
member rewritten in place (same name, same size, mtime put back) leaves the directory's own identity as it was,
and must still be seen (the committed fixtures under tests/data/dcp, copied)."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT
from gradinspect.runs import files_state
from gradinspect.sources.paths import file_state

DCP = ROOT / "tests" / "data" / "dcp"


def _flip_in_place(f: Path) -> None:
    """One bit of the file's last tensor data flipped, written into the same file, its mtime put back."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-2] ^= 0x01
    with open(f, "r+b") as fh:
        fh.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def _run(tmp_path: Path, case: str = "ranks3") -> Path:
    for step in (1, 2):
        shutil.copytree(DCP / case / "step_0000", tmp_path / "run" / f"step_{step:04d}")
    return tmp_path / "run"


def test_followed_state_holds_the_member_files(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    step = run_dir / "step_0002"
    pattern = [str(run_dir / "step_*")]
    before = files_state(pattern)
    members = sorted(str(p) for p in step.iterdir())
    assert [s[0] for s in before][-5:] == [str(step), *members]  # .metadata and the three .distcp files
    dir_before = file_state(str(step))
    _flip_in_place(step / "__1_0.distcp")
    assert file_state(str(step)) == dir_before  # the directory itself looks unchanged
    after = files_state(pattern)
    assert after != before
    assert [a for a, b in zip(after, before, strict=True) if a != b] == [file_state(str(step / "__1_0.distcp"))]
    assert files_state(pattern) == after  # nothing else moves between two looks


def _read_until(proc: subprocess.Popen[bytes], text: bytes, count: int, seen: bytearray, timeout: float = 30.0
                ) -> bool:
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while seen.count(text) < count and time.monotonic() < end:
        if sel.select(timeout=0.2):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    return seen.count(text) >= count


def test_follow_redraws_when_a_distcp_is_rewritten_in_place(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "st2")  # its .distcp files end with tensor data (ranks3's with a zip directory)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "80"}
    proc = subprocess.Popen([sys.executable, "-m", "gradinspect", "trend", str(run_dir / "step_*"), "--step-pattern",
                             r"step_(\d+)", "--no-cache", "--follow", "--interval", "0.2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = bytearray()
        drawn = b"steps           2 (1\xe2\x80\x932)"
        assert _read_until(proc, drawn, 1, seen), bytes(seen)
        first = bytes(seen)
        _flip_in_place(run_dir / "step_0002" / "__0_0.distcp")
        assert _read_until(proc, drawn, 2, seen), bytes(seen)
        assert bytes(seen[len(first):]) != first  # the second table has the new numbers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
