"""Fuzz gradinspect's torch .pt reader: mutated real files and hand-made malicious pickles.

    python benchmarks/fuzz_pickle.py --cases 2000 --seed 1
    python benchmarks/fuzz_pickle.py --seconds 600 --out /tmp/gradinspect-fuzz-pickle

Seeds: archives written by tests/ptwriter.py (every kind of view, protocols 2 to 5, nested
containers, step/loss_scale) and, when ``--torch-python`` (default: this interpreter) has torch,
real ``torch.save`` files written in that process (views, a model's ``state_dict()`` with tied
weights, parameters, float8/bfloat16, protocols 2/4/5); torch is never imported here.
Cases:

- ``mutate-pickle``: bit flips, byte overwrites, insertions, deletions, truncations, opcode
  swaps and integer edits of ``data.pkl``, rebuilt into a valid archive (fresh CRC-32s);
- ``mutate-file``: the same on the whole file (zip records, storages);
- ``malicious``: pickles that would create a marker file if anything ran: ``os.system``,
  ``posix.system``, ``builtins.eval``/``exec``/``getattr``/``__import__``/``open``,
  ``subprocess``, reduce chains, ``BUILD`` and ``NEWOBJ`` on allowed types with hostile state,
  persistent-id tricks (non-storage ids, storage types that are functions, path-like keys,
  two types for one key), memo abuse (undefined, huge, overwritten indices), deep nesting
  (tuples, lists, dicts, marks), DUP bombs, huge and negative sizes, offsets and strides,
  random opcode soup; each planted at a random place of a valid tensor pickle.

Each case runs ``norms`` or ``info`` (JSON) in a forked child with its address space capped
(RLIMIT_AS), a timer, and stdout/stderr in files.  The contract: exit 0 with JSON on stdout,
or exit 2 with nothing on stdout and one ``Error:`` line on stderr; never a traceback, a
signal, a timeout (20 CPU seconds, or 180 s of wall clock) or a MemoryError (2 GiB of address
space); and the marker file never exists.  An unmutated seed must
exit 0.  Failing inputs are saved in --out with the command line that reproduces them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ptwriter as pw  # noqa: E402

MEMORY = 2 << 30  # bytes of address space per case
CPU = 20  # CPU seconds per case (RLIMIT_CPU: what the case costs, whatever else runs on the machine)
TIMEOUT = 180  # wall-clock seconds per case (a hang that uses no CPU)


@dataclass
class Results:
    cases: int = 0
    max_cpu: float = 0.0  # seconds, the costliest case
    max_rss: int = 0  # KiB, the largest case
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# --- seeds ---------------------------------------------------------------------------------------

def _seed_objects(rng: np.random.Generator) -> list[Any]:
    a = pw.T.of(rng.standard_normal((30, 20)).astype(np.float32))
    b = pw.T.of(rng.standard_normal(7).astype(np.float16))
    return [
        {"w": a, "col": pw.T(a.storage, 3, (30,), (20,)), "tr": pw.T(a.storage, 0, (20, 30), (1, 20)),
         "exp": pw.T(b.storage, 0, (5, 7), (0, 1)), "step": 3, "loss_scale": 2.0},
        {"grads": {"x": [a, {"y": b}], "z": (a,)}, "note": "hi", "n": None, "flag": True, "bytes": b"\x00\x01"},
        {"big": pw.T.of(rng.standard_normal(5000).astype(np.float32)), "f64": pw.T.of(rng.standard_normal(9))},
    ]


def seeds(work: Path, rng: np.random.Generator, torch_python: str | None = None) -> list[Path]:
    out = []
    for i, obj in enumerate(_seed_objects(rng)):
        for protocol in (2, 3, 4, 5):
            path = work / f"seed{i}_p{protocol}.pt"
            pw.save(obj, path, protocol)
            out.append(path)
    python = torch_python or sys.executable
    done = subprocess.run([python, "-c", _TORCH_SEEDS, str(work)], capture_output=True, text=True, check=False)
    if done.returncode == 0:  # torch is there: real torch.save files too (written in another process)
        out += sorted(work.glob("torch*.pt"))
    return out


_TORCH_SEEDS = """
import sys
try:
    import torch
except ImportError:
    sys.exit(3)
work = sys.argv[1]
torch.manual_seed(0)
w = torch.randn(30, 20)
emb = torch.nn.Embedding(40, 8)
model = torch.nn.Sequential(emb, torch.nn.Linear(8, 40))
model[1].weight = emb.weight
objs = [{"w": w, "t": w.t(), "c": w[:, 3], "e": torch.randn(8).expand(4, 8), "step": 9},
        model.state_dict(), {"p": torch.nn.Parameter(torch.ones(3)), "bf": torch.randn(6).bfloat16(),
                             "f8": torch.randn(6).to(torch.float8_e4m3fn), "l": [w[2:], {"k": w[:, ::2]}]}]
for i, obj in enumerate(objs):
    for protocol in (2, 4, 5):
        torch.save(obj, f"{work}/torch{i}_p{protocol}.pt", pickle_protocol=protocol)
"""


def _pickle_of(path: Path) -> tuple[bytes, dict[str, bytes], str]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        storages = {n[len(prefix) + 5 :]: z.read(n) for n in names if n.startswith(prefix + "data/")}
        return z.read(pkl), storages, prefix.rstrip("/")


# --- cases -----------------------------------------------------------------------------------------

def _mutate(data: bytes, r: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    how = r.choice(["flip", "byte", "insert", "delete", "truncate", "int", "opcode", "splice"])
    at = r.randrange(max(1, len(b)))
    if how == "flip" and b:
        b[at] ^= 1 << r.randrange(8)
    elif how == "byte" and b:
        b[at] = r.randrange(256)
    elif how == "insert":
        b[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
    elif how == "delete":
        del b[at : at + r.randint(1, 8)]
    elif how == "truncate":
        del b[at:]
    elif how == "int" and len(b) > at + 4:
        b[at : at + 4] = struct.pack("<i", r.choice([-1, 0, 1 << 30, -(1 << 31), 2**31 - 1, 255, 65535]))
    elif how == "opcode" and b:
        b[at] = r.choice(b"()tR.bQ\x81\x92\x93\x94qhjr2]}sueao\x85\x86\x87\x8a\x8b\x95\x82\x97ciIPV")
    else:
        other = bytes(b)
        c = r.randrange(max(1, len(other)))
        b[at:at] = other[c : c + r.randint(1, 64)]
    return bytes(b), how


def _u(s: str) -> bytes:
    return pw.unicode(s)


def _g(module: str, name: str, r: random.Random) -> bytes:
    return pw.global_(module, name, r.choice([2, 4]))


def malicious(marker: Path, r: random.Random) -> tuple[bytes, str]:
    """A payload expression (bytes pushing one object) that would create ``marker`` if run, and its family."""
    cmd = f"touch {marker}"
    pyc = f"open({str(marker)!r}, 'w').close()"
    fam = r.choice(["global", "chain", "build", "newobj", "persid", "memo", "deep", "dup", "sizes", "soup",
                    "ext", "inst"])
    if fam == "global":
        module, name, arg = r.choice([
            ("os", "system", cmd), ("posix", "system", cmd), ("builtins", "eval", pyc), ("builtins", "exec", pyc),
            ("__builtin__", "eval", pyc), ("subprocess", "getoutput", cmd), ("builtins", "open", str(marker)),
            ("pathlib", "Path", str(marker)), ("torch", "load", str(marker)), ("numpy", "load", str(marker))])
        return _g(module, name, r) + _u(arg) + b"\x85R", fam
    if fam == "chain":  # getattr(__import__('os'), 'system')(cmd), or via an allowed global's attributes
        if r.random() < 0.5:
            return (_g("builtins", "getattr", r) + _g("builtins", "__import__", r) + _u("os") + b"\x85R"
                    + _u("system") + b"\x86R" + _u(cmd) + b"\x85R"), fam
        return (_g("builtins", "getattr", r) + _g("collections", "OrderedDict", r) + _u("__class__") + b"\x86R"
                + _u(cmd) + b"\x85R"), fam
    if fam == "build":  # BUILD/SETSTATE on allowed objects with a hostile state
        target = r.choice([b"}", b"]", b")", _g("collections", "OrderedDict", r) + b")R",
                           _g("torch", "device", r) + _u("cpu") + b"\x85R", _g("torch", "float32", r)])
        state = r.choice([b"}" + _u("__setstate__") + _g("os", "system", r) + b"s",
                          b"}" + _u("_metadata") + b"}s", b"N" + b"}" + _u("__class__") + _u("x") + b"s\x86",
                          _u(cmd), b"}" + _u("__reduce__") + _u(cmd) + b"s"])
        return target + state + b"b", fam
    if fam == "newobj":
        cls = r.choice([_g("torch", "Size", r), _g("collections", "OrderedDict", r), _g("builtins", "set", r),
                        _g("torch", "FloatStorage", r), _g("builtins", "object", r)])
        return cls + b"(" + _u(cmd) + b"t" + r.choice([b"\x81", b"}\x92", b"R"]), fam
    if fam == "persid":
        pid = r.choice([
            b"(" + _u("storage") + _g("os", "system", r) + _u("0") + _u("cpu") + b"K\x01t",
            b"(" + _u("storage") + _g("torch", "FloatStorage", r) + _u("../../../" + str(marker)) + _u("cpu")
            + b"K\x01t",
            b"(" + _u("storage") + _g("torch", "FloatStorage", r) + _u("0") + _u("cpu") + pw.integer(-5) + b"t",
            b"(" + _u("storage") + _g("torch", "FloatStorage", r) + _u("0") + _u("cpu") + pw.integer(1 << 70) + b"t",
            b"(" + _u("module") + _u("os") + b"t", _u(cmd), b"N", b"(t",
        ])
        return pid + b"Q", fam
    if fam == "memo":
        return r.choice([b"h\x07", b"j\xff\xff\xff\xff", b"N" + b"r\xff\xff\xff\xff" + b"0" + b"j\xff\xff\xff\xff",
                         b"]\x94" + b"h\x00" * 50 + b"0" * 50, b"N\x94" * 1000 + b"0" * 999,
                         b"]q\x00h\x00a"]), fam
    if fam == "deep":
        n = r.choice([300, 5000, 100_000, 1_000_000])
        return r.choice([b")" + b"\x85" * n, b"](" * n + b"e" * n, b"}" * 1 + b"(" * n + b"1" * n,
                         b"]" * n + b"a" * (n - 1), b"}" * n + b"N" + b"s" * (n - 1),
                         b"(" * n + b"N" + b"t" * n, b"]" + b"\x94](h\x00e" * min(n, 60_000)]), fam
    if fam == "dup":
        return b")" + b"2\x86" * r.randint(20, 200), fam
    if fam == "sizes":
        big = r.choice([1 << 62, 1 << 63, 1 << 70, -1, -(1 << 62), 0])
        t = pw.T(pw.Storage(np.zeros(4, np.float32)), 0, (4,), (1,))
        pkl, _ = pw.dumps({"t": t})
        body = pkl[2:-1]
        return body.replace(pw.integer(4) + b"\x85", pw.integer(big) + b"\x85", 1), fam
    if fam == "ext":
        return r.choice([b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00", b"\x97", b"\x98"]), fam
    if fam == "inst":
        return r.choice([b"(" + _u(cmd) + b"ios\nsystem\n", b"(" + _g("os", "system", r) + _u(cmd) + b"o",
                         b"cos\nsystem\n" + b"(S'" + cmd.encode() + b"'\ntR", b"P" + cmd.encode() + b"\n"]), fam
    ops = b"()tR.bQ\x81\x92\x93\x94qhjr2]}sueao\x85\x86\x87\x88\x89NK\x8a\x90\x8f\x91G01"
    soup = bytes(r.choice(ops) for _ in range(r.randint(1, 200)))
    return soup, fam


def _plant(payload: bytes, r: random.Random) -> bytes:
    """A valid tensor pickle with the payload as the value of one of its keys (or the whole pickle)."""
    t = pw.T.of(np.arange(6, dtype=np.float32))
    pkl, _ = pw.dumps({"w": t, "x": 1}, r.choice([2, 4]))
    if r.random() < 0.2:
        return pkl[:2] + payload + b"."
    return pkl.replace(pw.integer(1) + b"u", payload + b"u", 1)


@dataclass
class Case:
    n: int
    kind: str
    detail: str
    path: Path
    args: list[str]
    must_read: bool = False


def make_case(n: int, seed: int, seed_files: list[Path], work: Path, marker: Path) -> Case:
    r = random.Random(f"{seed}:{n}")
    kind = r.choices(["seed", "mutate-pickle", "mutate-file", "malicious"], [1, 8, 4, 10])[0]
    command = r.choice(["norms", "norms", "info"])
    path = work / f"case{n % 64}.pt"
    src = r.choice(seed_files)
    detail = src.name
    if kind == "seed":
        path.write_bytes(src.read_bytes())
    elif kind == "mutate-pickle":
        pkl, storages, prefix = _pickle_of(src)
        for _ in range(r.choice([1, 1, 2, 4])):
            pkl, how = _mutate(pkl, r)
            detail += f" {how}"
        path.write_bytes(pw.archive(pkl, storages, prefix=prefix))
    elif kind == "mutate-file":
        data = src.read_bytes()
        for _ in range(r.choice([1, 2, 8])):
            data, how = _mutate(data, r)
            detail += f" {how}"
        path.write_bytes(data)
    else:
        payload, fam = malicious(marker, r)
        detail = fam
        path.write_bytes(pw.archive(_plant(payload, r), {"0": np.arange(6, dtype=np.float32).tobytes()}))
    args = [command, str(path), "--format", "json", "-q"]
    if command == "norms" and r.random() < 0.3:
        args.append("--dedup")
    return Case(n, kind, detail, path, args, must_read=kind == "seed")


# --- running and judging ---------------------------------------------------------------------------

def run_case(case: Case, work: Path) -> dict[str, Any]:
    out, err = work / "stdout", work / "stderr"
    t0 = time.monotonic()
    from gradinspect.cli import main

    pid = os.fork()
    if pid == 0:  # the child: capped, timed, quiet
        try:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
            resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU + 5))
            signal.alarm(TIMEOUT)
            fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd_out, 1)
            os.dup2(fd_err, 2)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - (pytest replaces them)
            sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
            try:
                main(case.args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        except BaseException:
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(70)
    _, status, usage = os.wait4(pid, 0)
    return {"status": status, "stdout": out.read_bytes(), "stderr": err.read_bytes(),
            "seconds": time.monotonic() - t0, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss}


def judge(case: Case, run: dict[str, Any], marker: Path) -> str | None:
    """The failure kind, or None when the contract holds."""
    if marker.exists():
        return "marker-created"
    status = run["status"]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {signal.SIGALRM: "timeout", signal.SIGXCPU: "cpu-timeout"}.get(sig, f"signal-{sig}")
    code = os.WEXITSTATUS(status)
    stdout, stderr = run["stdout"], run["stderr"]
    if b"Traceback" in stderr:
        return "traceback"
    if b"MemoryError" in stderr:
        return "memory-error"
    if code == 2:
        lines = stderr.decode("utf-8", "replace").splitlines()
        if stdout:
            return "error-with-stdout"
        if len(lines) != 1 or not lines[0].startswith("Error: "):
            return "error-not-one-line"
        return "valid-input-refused" if case.must_read else None
    if code != 0:
        return f"exit-{code}"
    try:
        json.loads(stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError:
        return "invalid-json"
    return None


def outcome(run: dict[str, Any]) -> str:
    status = run["status"]
    if os.WIFSIGNALED(status):
        return f"signal-{os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return {0: "ok", 2: "error-exit-2"}.get(code, f"exit-{code}")


def run(cases: int | None = None, seconds: float | None = None, seed: int = 1, out: Path | None = None,
        work: Path | None = None, torch_python: str | None = None) -> Results:
    import tempfile

    import gradinspect.cli  # imported once here, inherited by every forked case  # noqa: F401
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-pickle-")) if work is None else work
    tmp.mkdir(parents=True, exist_ok=True)
    marker = tmp / "MARKER-pwned"
    seed_files = seeds(tmp, np.random.default_rng(seed), torch_python)
    res = Results()
    t0 = time.monotonic()
    n = 0
    while (cases is None or n < cases) and (seconds is None or time.monotonic() - t0 < seconds):
        case = make_case(n, seed, seed_files, tmp, marker)
        got = run_case(case, tmp)
        res.cases += 1
        res.by_kind[case.kind if case.kind != "malicious" else f"malicious:{case.detail}"] += 1
        res.outcomes[outcome(got)] += 1
        res.max_cpu, res.max_rss = max(res.max_cpu, got["cpu"]), max(res.max_rss, got["rss"])
        failure = judge(case, got, marker)
        if failure is not None:
            res.failures.append({"case": n, "kind": case.kind, "detail": case.detail, "failure": failure,
                                 "args": case.args, "stderr": got["stderr"][-2000:].decode("utf-8", "replace")})
            if out is not None:
                d = out / f"{failure}-{n}"
                d.mkdir(parents=True, exist_ok=True)
                (d / "input.pt").write_bytes(case.path.read_bytes())
                (d / "failure.json").write_text(json.dumps(res.failures[-1], indent=1))
            if marker.exists():
                marker.unlink()
        n += 1
    res.seconds = time.monotonic() - t0
    return res


def describe(res: Results) -> str:
    lines = [f"{res.cases} cases in {res.seconds:.0f} s; failures: {len(res.failures)}; costliest case "
             f"{res.max_cpu:.1f} CPU s, largest {res.max_rss / 1024:.0f} MiB RSS",
             "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(res.outcomes.items())),
             "cases: " + ", ".join(f"{k} {v}" for k, v in sorted(res.by_kind.items()))]
    for f in res.failures[:20]:
        lines.append(f"  case {f['case']} {f['kind']} ({f['detail']}): {f['failure']}: {f['stderr'][-300:]!r}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gradinspect-fuzz-pickle"))
    ap.add_argument("--torch-python", help="an interpreter with torch, to write real torch.save seeds "
                    "(default: this one, if it has torch)")
    a = ap.parse_args()
    if a.cases is None and a.seconds is None:
        a.cases = 500
    res = run(a.cases, a.seconds, a.seed, a.out, torch_python=a.torch_python)
    print(describe(res))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
