"""Fuzz the trend cache: mutate the step and file entries of a filled cache, run ``trend``, check its contract.

    python benchmarks/fuzz_cache.py --seconds 300 --seed 1
    python benchmarks/fuzz_cache.py --cases 300 --seed 7 --out /tmp/gradinspect-fuzz-cache

Small runs (a few safetensors steps each: one long enough for one-line JSON, whose series are laid
out from the step entries' spellings; one with steps of different tensor sets, NaN/Inf/-0.0/
subnormal values and names with unicode, quotes, backslashes, newlines and control characters; a
GradDumper directory of two ranks) are written once, and for every configuration (-p 1/2/3/inf,
--group-by, --include/--exclude) a cache is filled and its warm output checked equal to the
``--no-cache`` output in every text format (json, csv, table, github, junit, html).

Each case copies a configuration's filled cache, mutates one entry (a step entry, ``.step``, or a file
entry, ``.json``, whose step entries are then removed so that it is read), with the checksum left stale
or recomputed, and runs ``trend`` in-process (``gradinspect.runs.trend``, rendered as JSON and CSV) and
through the CLI (click's runner; every ``--subprocess-every``-th case also ``python -m gradinspect``).
Mutations: byte flips (anywhere, or in a region: head, names lines, floats, counts, zero flags,
spelled cells), truncation, extension, swapped lines, head fields set to hostile values (huge,
negative, wrong types, another entry's key, control characters), names lines of non-strings,
duplicates, hostile names and deep nesting, floats set to NaN/Inf/-0.0/subnormals, counts set huge,
zero flags not 0/1, cells of garbage (NUL, non-ASCII, ``1,2]``, other numbers), another entry's bytes,
empty or foreign files; for file entries, JSON field edits (keys, counts, exponents, hex floats).

The contract, per case:

- no exception escapes (in-process) and the CLI exits 0 with no traceback and nothing but
  ``Warning:`` lines on stderr;
- an entry the cache rejects (a miss) gives output equal to the ``--no-cache`` output, and the
  entry is rebuilt (a second run finds every step entry and prints the same);
- an entry with a stale checksum is never accepted;
- an entry with a recomputed checksum that is accepted may serve what it says (``served``: counted,
  not a failure) but the output stays strict JSON / well-formed CSV; a served step number that collides
  with another step may end the run with an InputError: one ``Error:`` line, exit 2 (``served-error``).

Failures are saved under --out, one directory per kind, with the mutated entry and a description.
Results depend only on --seed and the case number (and the --out path: entry names hash the run's paths).
The process grows by about 0.2 MB a case: click's test runner keeps the streams of every invocation.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from gradinspect import runs  # noqa: E402
from gradinspect.cache import Cache  # noqa: E402
from gradinspect.cli import cli  # noqa: E402
from gradinspect.errors import InputError  # noqa: E402
from gradinspect.formats import RenderOptions  # noqa: E402
from gradinspect.formats import get as get_format  # noqa: E402

DEFAULT_OUT = Path("/tmp/gradinspect-fuzz-cache")
WIDTH = 24  # gradinspect.trend.SPELLING_WIDTH
HOSTILE_NAMES = ["é€😀", 'q"uote', "back\\slash", "new\nline", "tab\tx", "\x1b[31mred", "nul\x00x", "\u202eevil",
                 "::error::INJECTED"]
FORMATS = ("json", "csv", "table", "github", "junit", "html")  # trend's text formats


# --- the runs and configurations ----------------------------------------------------------------------------

def _save(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def make_runs(root: Path, seed: int) -> dict[str, str]:
    """The runs (their PATH or glob as given to trend), written under ``root``."""
    rng = np.random.default_rng(seed)
    long_run, mixed, dumper = root / "long", root / "mixed", root / "dumper"
    for d in (long_run, mixed, dumper):
        d.mkdir(parents=True)
    for k in range(5):  # 5 steps x 220 tensors: more than 1,000 numbers, one-line JSON from the spellings
        grads = {f"layer.{i}.{'w' if i % 2 else 'b'}": (rng.standard_normal(1 + i % 7) * 10.0 ** (i % 9 - 4)
                                                       ).astype(np.float32) for i in range(220)}
        grads.update({name: rng.standard_normal(2).astype(np.float32) for name in HOSTILE_NAMES})
        _save(long_run / f"step_{k}.safetensors", grads)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 5e-324, 1e308, -1e-310])
    for k in range(4):  # different tensor sets, non-finite values, hostile names
        t: dict[str, np.ndarray] = {"a.w": rng.standard_normal(4).astype(np.float32),
                                    "b.w": np.zeros(3, np.float32), "c.w": rng.standard_normal(5)}
        if k != 1:
            t[HOSTILE_NAMES[k % len(HOSTILE_NAMES)] + ".w"] = rng.standard_normal(2).astype(np.float32)
        if k == 2:
            t["c.w"] = np.concatenate([special[:4], [1.0]])
            t["extra.w"] = np.array([-0.0, 5e-324])
        if k == 3:
            t["a.w"][1] = np.nan
            t["late\\\"x.w"] = np.array([1e-40, -1e-40], np.float32)
        _save(mixed / f"ckpt_{k:02d}.safetensors", t, metadata={"step": str(10 * k)})
    for k in range(3):  # a GradDumper directory: two ranks of three steps
        for r in range(2):
            _save(dumper / f"step_{k:08d}_rank{r}.safetensors",
                  {f"r{r}.m.{i}.w": rng.standard_normal(3).astype(np.float32) for i in range(4)})
    index, replicas, dcp = root / "index", root / "replicas", root / "dcp"
    for k in range(3):  # steps that are index files of two shards each
        index.mkdir(exist_ok=True)
        weights = {}
        for part in range(2):
            shard = f"grads_{k}-{part + 1:05d}-of-00002.safetensors"
            names = [f"p{part}.m.{i}.w" for i in range(3)]
            _save(index / shard, {n: rng.standard_normal(4).astype(np.float32) for n in names})
            weights.update(dict.fromkeys(names, shard))
        (index / f"grads_{k}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weights}))
    for k in range(3):  # steps that are directories of two data-parallel ranks' copies (--shards replicas)
        d = replicas / f"step_{k}"
        d.mkdir(parents=True)
        same = {f"m.{i}.w": rng.standard_normal(3).astype(np.float32) for i in range(3)}
        for r in range(2):
            _save(d / f"rank{r}.safetensors", same)
    dcp_data = ROOT / "tests" / "data" / "dcp" / "ranks3"
    if dcp_data.is_dir():  # steps that are torch distributed checkpoints (directories)
        for d in sorted(dcp_data.iterdir()):
            if d.is_dir():
                shutil.copytree(d, dcp / d.name)
    return {"long": str(long_run / "step_*.safetensors"), "mixed": str(mixed / "ckpt_*.safetensors"),
            "dumper": str(dumper), "index": str(index / "grads_*.safetensors.index.json"),
            "replicas": str(replicas / "step_*"), **({"dcp": str(dcp / "step_*")} if dcp.is_dir() else {})}


@dataclass(frozen=True)
class Config:
    name: str
    run: str
    args: tuple[str, ...]  # CLI options
    kw: dict[str, Any]  # runs.trend's arguments for the same


CONFIGS = [
    Config("long-p2", "long", (), {}),
    Config("long-p1", "long", ("-p", "1"), {"norm_type": 1}),
    Config("long-pinf", "long", ("-p", "inf"), {"norm_type": "inf"}),
    Config("long-p3", "long", ("-p", "3"), {"norm_type": 3}),
    Config("long-group", "long", ("--group-by", "2"), {"group_by": 2}),
    Config("long-include", "long", ("--include", "layer.1*"), {"include": ["layer.1*"]}),
    Config("mixed-p2", "mixed", (), {}),
    Config("mixed-pinf-group", "mixed", ("-p", "inf", "--group-by", "1"), {"norm_type": "inf", "group_by": 1}),
    Config("mixed-exclude", "mixed", ("--exclude", "b.*"), {"exclude": ["b.*"]}),
    Config("mixed-pattern", "mixed", ("--step-pattern", r"ckpt_(\d+)"), {"step_pattern": r"ckpt_(\d+)"}),
    Config("dumper", "dumper", (), {}),
    Config("index", "index", (), {}),
    Config("replicas", "replicas", ("--shards", "replicas"), {"shards": "replicas"}),
    Config("dcp-group", "dcp", ("--group-by", "1"), {"group_by": 1}),
]


# --- running trend ----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    outputs: dict[str, bytes]  # format -> output
    error: str = ""
    step_misses: int = 0
    file_misses: int = 0
    clean: bool = False  # the error is an InputError


def in_process(path: str, cfg: Config, cache_dir: Path | None) -> Outcome:
    """``runs.trend`` with a cache in ``cache_dir`` (None: no cache), rendered as JSON and CSV."""
    cache = None if cache_dir is None else Cache(cache_dir)
    try:
        report = runs.trend(path, cache=cache, **cfg.kw)
        out = {}
        for fmt in ("json", "csv"):
            data = get_format(fmt).render(report, RenderOptions())
            out[fmt] = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    except InputError as e:  # one Error: line in the CLI, exit 2
        return Outcome(False, {}, f"InputError: {e}", clean=True)
    except Exception:  # the finding
        return Outcome(False, {}, traceback.format_exc())
    return Outcome(True, out, "", 0 if cache is None else cache.step_misses, 0 if cache is None else cache.misses)


def via_cli(path: str, cfg: Config, fmt: str, cache_dir: Path | None) -> tuple[int, bytes, bytes, str]:
    """The CLI in this process (click's runner): exit code, stdout, stderr, an escaped exception."""
    args = ["trend", path, "-f", fmt, "-q", *cfg.args,
            *(["--no-cache"] if cache_dir is None else ["--cache-dir", str(cache_dir)])]
    r = CliRunner().invoke(cli, args)
    crash = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        crash = "".join(traceback.format_exception(r.exception))
    return r.exit_code, r.stdout_bytes, r.stderr_bytes, crash


def via_subprocess(path: str, cfg: Config, fmt: str, cache_dir: Path) -> tuple[int, bytes, bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "gradinspect", "trend", path, "-f", fmt, "-q", *cfg.args,
                        "--cache-dir", str(cache_dir)], capture_output=True, env=env, timeout=120, check=False)
    return p.returncode, p.stdout, p.stderr


def well_formed(fmt: str, data: bytes) -> str:
    """'' when ``data`` is strict JSON / rectangular CSV, else what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if fmt == "json":
        try:
            json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"bare {c}")))
        except ValueError as e:
            return f"invalid JSON: {e}"
    elif fmt == "csv":
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            return "ragged CSV"
    return ""


# --- entries and mutations ----------------------------------------------------------------------------------

def sha(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode("ascii")


@dataclass
class Step:
    """A step entry's parts (the layout of gradinspect.cache's step entries, written independently)."""

    head: bytes
    names: bytes
    tnames: bytes
    binary: bytes
    n: int
    t: int

    @classmethod
    def parse(cls, data: bytes) -> Step:
        head, names, tnames, binary = data[65:].split(b"\n", 3)
        n = len(json.loads(names))
        t = n if tnames == b"null" else len(json.loads(tnames))
        return cls(head, names, tnames, binary, n, t)

    def body(self) -> bytes:
        return b"\n".join((self.head, self.names, self.tnames, self.binary))

    def regions(self) -> dict[str, tuple[int, int]]:
        """Byte ranges of the binary part."""
        n, t = self.n, self.t
        floats = 8 * (6 + 6 * n)
        counts = floats + 8 * (n + 2 * t)
        zero = counts + t
        return {"floats": (0, floats), "counts": (floats, counts), "zero": (counts, zero),
                "cells": (zero, zero + 2 * n * WIDTH)}


HOSTILE_VALUES: list[Any] = [-1, 0, 2**64, 2**64 - 1, 10**30, 1.5, "1", None, True, [], {}, [0, 0, 0, 0],
                             [2**70, 0, 0, 0], [-1, 0, 0, 0], ["\x1b[31m", "::error::INJECTED"], "\ud800",
                             ["a"] * 3, [1, 2], "x" * 10000, [["nested"]]]


_JSON_NUMBER = re.compile(rb'-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|"NaN"|"Infinity"|"-Infinity"')


def malformed_number_text(entry: bytes) -> bool:
    """True when a step entry's spelled cells are all number text (digits, '.', 'e', '+', '-') or quoted names,
    NUL-padded, but one is no JSON number ('1e', '01.5'): gradinspect lays such cells out as they are (documented
    in gradinspect.trend.series_spellings: a full grammar check cost a tenth of a warm run), so the JSON of an
    entry forged that way is malformed by design, not by a bug."""
    try:
        st = Step.parse(entry)
        a, b = st.regions()["cells"]
    except (ValueError, IndexError):
        return False
    cells = [st.binary[i:i + WIDTH] for i in range(a, b, WIDTH)]
    texts = [c.rstrip(b"\0") for c in cells]
    if any(not t or b"\0" in t for t in texts):
        return False
    alphabet = all(not t.translate(None, b"0123456789.e+-") or t in (b'"NaN"', b'"Infinity"', b'"-Infinity"')
                   for t in texts)
    return alphabet and not all(_JSON_NUMBER.fullmatch(t) for t in texts)


def _hostile(rng: random.Random) -> Any:
    return rng.choice(HOSTILE_VALUES)


def mutate_step(data: bytes, rng: random.Random, others: list[bytes]) -> tuple[bytes, str, bool]:
    """A mutated step entry: (its bytes without the checksum line, the mutation, whether a checksum applies:
    False for raw bytes that are kept as they are)."""
    s = Step.parse(data)
    kind = rng.choice(["flip", "flip-region", "flip-region", "truncate", "extend", "swap-lines", "head-field",
                       "head-field", "key-of-another", "names-line", "names-line", "tnames-line", "float",
                       "count", "zero-flag", "cell", "cell", "cell", "another-entry", "foreign"])
    body = s.body()
    if kind == "flip":
        whole = bytearray(data)
        i = rng.randrange(len(whole))
        whole[i] ^= rng.randrange(1, 256)
        return bytes(whole), f"flip byte {i}", False
    if kind == "flip-region":
        name, (a, b) = rng.choice(list(s.regions().items()))
        if a == b:
            return body, f"flip-region {name} (empty)", True
        binary = bytearray(s.binary)
        i = rng.randrange(a, b)
        binary[i] ^= 1 << rng.randrange(8)
        s.binary = bytes(binary)
        return s.body(), f"flip a bit in {name} at {i}", True
    if kind == "truncate":
        i = rng.choice([0, 1, 64, 65, len(body) // 2, len(body) - 1, rng.randrange(len(body))])
        return body[:i], f"truncate to {i}", True
    if kind == "extend":
        extra = rng.choice([b"\n", b"\0", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
                            b"\0" * 2 * WIDTH])
        return body + extra, f"extend by {len(extra)}", True
    if kind == "swap-lines":
        lines = [s.head, s.names, s.tnames]
        i, j = rng.sample(range(3), 2)
        lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join((*lines, s.binary)), f"swap lines {i} {j}", True
    if kind in ("head-field", "key-of-another"):
        head = json.loads(s.head)
        if kind == "key-of-another" and others:
            head["key"] = json.loads(Step.parse(rng.choice(others)).head)["key"]
            what = "key of another entry"
        else:
            fld = rng.choice(["step", "sources", "warnings", "total", "clipped", "key", "extra", "-remove"])
            if fld == "-remove":
                gone = rng.choice(sorted(head))
                del head[gone]
                what = f"remove {gone}"
            else:
                head[fld] = _hostile(rng)
                what = f"{fld} = {head[fld]!r:.60}"
        s.head = json.dumps(head, separators=(",", ":"), ensure_ascii=rng.random() < 0.7).encode(
            "utf-8", "surrogatepass")
        return s.body(), f"head {what}", True
    if kind in ("names-line", "tnames-line"):
        n = s.n if kind == "names-line" else s.t
        choice = rng.randrange(9)
        if choice == 0:
            line = json.dumps([rng.choice(HOSTILE_NAMES) + str(i) for i in range(n)]).encode()
        elif choice == 1:
            line = json.dumps(["dup"] * n).encode()
        elif choice == 2:
            line = json.dumps([i for i in range(n)]).encode()
        elif choice == 3:
            line = rng.choice([b"null", b"{}", b"", b'"x"', b"[", b"\xff\xfe", b'["\\ud800"]' if n == 1 else b"[1]"])
        elif choice == 4:
            line = b"[" * 100_000 + b"]" * 100_000
        elif choice == 5:
            line = json.dumps([f"x{i}" for i in range(n + rng.choice([-1, 1]))]).encode()
        elif choice == 6:
            line = json.dumps([f"\\u{i:04x}\ud800" for i in range(n)], ensure_ascii=True).encode()
        elif choice == 7:
            line = json.dumps([f"n{i}" for i in range(n)], ensure_ascii=False).encode("utf-8")
        else:
            line = b"null"
        if kind == "names-line":
            s.names = line
        else:
            s.tnames = line
        return s.body(), f"{kind} #{choice}", True
    if kind == "float":
        a, b = s.regions()["floats"]
        i = a + 8 * rng.randrange((b - a) // 8)
        x = rng.choice([math.nan, math.inf, -math.inf, -0.0, 5e-324, -5e-324, 1.7976931348623157e308, -1.0, 0.0])
        raw = struct.pack("<d", x) if rng.random() < 0.8 else struct.pack("<Q", 0x7FF8_0000_0000_0001)
        s.binary = s.binary[:i] + raw + s.binary[i + 8:]
        return s.body(), f"float {i // 8} = {x!r}", True
    if kind == "count":
        a, b = s.regions()["counts"]
        if a == b:
            return body, "count (none)", True
        i = a + 8 * rng.randrange((b - a) // 8)
        v = rng.choice([2**64 - 1, 2**63, 1, 10**9, 0])
        s.binary = s.binary[:i] + struct.pack("<Q", v) + s.binary[i + 8:]
        return s.body(), f"count at {i} = {v}", True
    if kind == "zero-flag":
        a, b = s.regions()["zero"]
        if a == b:
            return body, "zero-flag (none)", True
        i = rng.randrange(a, b)
        v = rng.choice([2, 255, 1, 0])
        s.binary = s.binary[:i] + bytes([v]) + s.binary[i + 1:]
        return s.body(), f"zero flag at {i} = {v}", True
    if kind == "cell":
        a, b = s.regions()["cells"]
        if a == b:
            return body, "cell (none)", True
        i = a + WIDTH * rng.randrange((b - a) // WIDTH)
        cell = rng.choice([b"", b"\0x", b"\xff", b"\xc3\xa9", b"1,2]", b"]]", b'"NaN', b"NaN", b"1e", b"01", b"-",
                           b"1\x001", b"0.5", b"1e+300", b'"Infinity"', b"9" * WIDTH, b"-1" + b"0" * (WIDTH - 2),
                           bytes(rng.randrange(256) for _ in range(WIDTH))])
        s.binary = s.binary[:i] + cell[:WIDTH].ljust(WIDTH, b"\0") + s.binary[i + WIDTH:]
        return s.body(), f"cell at {(i - a) // WIDTH} = {cell!r:.40}", True
    if kind == "another-entry" and others:
        return rng.choice(others), "the bytes of another step entry", False
    foreign = rng.choice([b"", b"\n", b"{}", json.dumps({"key": {}, "stats": {}, "checksum": ""}).encode(),
                          bytes(rng.randrange(256) for _ in range(rng.randrange(200))), b"0" * 64 + b"\n" * 4])
    return foreign, f"foreign ({len(foreign)} bytes)", rng.random() < 0.5


def _file_checksum(key: Any, stats: Any) -> str:
    body = json.dumps({"key": key, "stats": stats}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def mutate_file_entry(data: bytes, rng: random.Random, recompute: bool) -> tuple[bytes, str]:
    """A mutated file entry (JSON: key, stats, checksum), its checksum recomputed when ``recompute``."""
    kind = rng.choice(["flip", "truncate", "stats-key", "stats-field", "stats-field", "stats-row", "key-field"])
    if kind == "flip":
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= rng.randrange(1, 256)
        return bytes(b), f"flip byte {i}"
    if kind == "truncate":
        i = rng.randrange(len(data))
        return data[:i], f"truncate to {i}"
    doc = json.loads(data)
    stats = doc["stats"]
    if not stats:
        return data, "no stats"
    k = rng.choice(sorted(stats))
    if kind == "stats-key":
        new = rng.choice(["0" + k, "-1", "999", "1e3", " " + k, k + ".0", "x"])
        stats[new] = stats.pop(k)
        what = f"stats key {k!r} -> {new!r}"
    elif kind == "stats-field":
        j = rng.randrange(8)
        value = rng.choice([-1, 2**64, 10**30, 1.5, None, "0x1p+99999", "nan", "inf", "-inf", "-0x1p+0", "0x0p+0",
                             "0x1p-1074", "zz", 100_001, -100_001, 2**40, "0x1.fffffffffffffp+1023"])
        rows = list(stats.values()) if rng.random() < 0.5 else [stats[k]]
        for row in rows:
            if type(row) is list and len(row) == 8:
                row[j] = value
        what = f"stats[{k if len(rows) == 1 else '*'}][{j}] = {value!r}"
    elif kind == "stats-row":
        stats[k] = rng.choice([[], [0] * 9, None, "x", stats[k][:4], [stats[k]]])
        what = f"stats[{k}] = {stats[k]!r:.40}"
    else:
        fld = rng.choice(sorted(doc["key"]))
        doc["key"][fld] = _hostile(rng)
        what = f"key {fld} = {doc['key'][fld]!r:.40}"
    if recompute:
        doc["checksum"] = _file_checksum(doc["key"], stats)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii"), what


# --- the run ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    subprocess_runs: int = 0
    served: Counter[str] = field(default_factory=Counter)  # the mutations served as they say, by kind


@dataclass
class Setup:
    work: Path
    paths: dict[str, str]
    plain: dict[str, dict[str, bytes]]  # config -> format -> the --no-cache output (CLI)
    plain_in: dict[str, dict[str, bytes]]  # config -> format -> in-process, no cache
    filled: dict[str, Path]  # config -> its filled cache


def setup(work: Path, seed: int, check: Callable[[str, str], None], configs: Sequence[str] | None = None) -> Setup:
    """The runs, every configuration's plain outputs and filled cache (warm output checked equal, every format)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    paths = make_runs(work / "runs", seed)
    time.sleep(2.1)  # a file changed less than 2 s before it is read is not stored
    plain, plain_in, filled = {}, {}, {}
    for cfg in CONFIGS:
        if cfg.run not in paths or (configs is not None and cfg.name not in configs):
            continue
        path = paths[cfg.run]
        plain[cfg.name] = {}
        for fmt in FORMATS:
            code, out, err, crash = via_cli(path, cfg, fmt, None)
            check(f"{cfg.name} {fmt} --no-cache exit {code} {err[-300:]!r} {crash}", "setup" if code == 0 else "")
            plain[cfg.name][fmt] = out
        base = in_process(path, cfg, None)
        check(f"{cfg.name} in-process {base.error}", "setup" if base.ok else "")
        plain_in[cfg.name] = base.outputs
        cache_dir = work / "filled" / cfg.name
        for attempt in ("cold", "warm"):
            for fmt in FORMATS:
                code, out, err, crash = via_cli(path, cfg, fmt, cache_dir)
                same = code == 0 and out == plain[cfg.name][fmt] and not crash
                check(f"{cfg.name} {attempt} -f {fmt} differs from --no-cache: {err[-300:]!r} {crash}",
                      "setup" if same else "")
        warm = in_process(path, cfg, cache_dir)
        check(f"{cfg.name} warm in-process misses {warm.step_misses} or differs",
              "setup" if warm.ok and warm.step_misses == 0 and warm.outputs == base.outputs else "")
        filled[cfg.name] = cache_dir
    return Setup(work, paths, plain, plain_in, filled)


def _entries(d: Path, suffix: str) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


def run(seconds: float | None = None, cases: int | None = None, seed: int = 0, out: Path = DEFAULT_OUT,
        subprocess_every: int = 25, log: Callable[[str], None] | None = None,
        configs: Sequence[str] | None = None) -> Result:
    """Cases until ``cases`` or ``seconds`` (with ``configs``: only those configurations, by name)."""
    res = Result()
    setup_failures: list[str] = []
    st = setup(out / "work", seed, lambda msg, ok: None if ok else setup_failures.append(msg), configs)
    for msg in setup_failures:
        res.failures.append({"kind": "warm-differs-at-setup", "detail": msg})
    start = time.monotonic()
    i = 0
    while (cases is None or i < cases) and (seconds is None or time.monotonic() - start < seconds):
        _case(st, seed, i, res, subprocess_every)
        i += 1
        if log is not None and i % 100 == 0:
            log(f"{i} cases, {dict(res.outcomes)}, {len(res.failures)} failures")
    res.cases = i
    return res


def _fail(res: Result, st: Setup, kind: str, info: dict[str, Any], entry: bytes) -> None:
    info = {"kind": kind, **info}
    res.outcomes["FAIL:" + kind] += 1
    res.failures.append(info)
    d = st.work.parent / "failures" / f"{kind}-{info['case']}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "entry").write_bytes(entry)
    (d / "failure.json").write_text(json.dumps(info, indent=1, default=repr))


def _case(st: Setup, seed: int, i: int, res: Result, subprocess_every: int) -> None:
    rng = random.Random(f"{seed}:{i}")
    cfg = rng.choice([c for c in CONFIGS if c.name in st.filled])
    path, filled = st.paths[cfg.run], st.filled[cfg.name]
    steps = _entries(filled, ".step")
    files = _entries(filled, ".json")
    target = "step" if rng.random() < 0.75 or not files else "file"
    recompute = rng.random() < 0.5
    res.by_target[f"{target}-{'recomputed' if recompute else 'stale'}"] += 1
    victim = rng.choice(steps if target == "step" else files)
    data = victim.read_bytes()
    if target == "step":
        others = [p.read_bytes() for p in steps if p != victim]
        for c in rng.sample(sorted(st.filled), min(2, len(st.filled))):  # entries of other options
            others += [p.read_bytes() for p in _entries(st.filled[c], ".step")[:1]]
        body, what, checksummed = mutate_step(data, rng, others)
        if not checksummed:
            entry = body
        else:
            entry = (sha(body) if recompute else data[:64]) + b"\n" + body
    else:
        entry, what = mutate_file_entry(data, rng, recompute)
    info = {"case": i, "seed": seed, "config": cfg.name, "target": target, "entry": victim.name, "mutation": what,
            "checksum": "recomputed" if recompute else "stale"}
    case_dir = st.work / "case"

    def fresh() -> None:
        if case_dir.exists():
            shutil.rmtree(case_dir)
        shutil.copytree(filled, case_dir)
        (case_dir / victim.name).write_bytes(entry)
        if target == "file":  # the step entries would answer first
            for p in _entries(case_dir, ".step"):
                p.unlink()

    fresh()
    got = in_process(path, cfg, case_dir)
    if not got.ok and not (got.clean and recompute):  # a served step number may collide with another: an error
        _fail(res, st, "crash-in-process", {**info, "traceback": got.error}, entry)
        return
    if not got.ok:
        fresh()
        code, out, err, crash = via_cli(path, cfg, rng.choice(["json", "csv"]), case_dir)
        lines = err.decode("utf-8", "replace").splitlines()
        if crash or code != 2 or out or len(lines) != 1 or not lines[0].startswith("Error: "):
            _fail(res, st, "served-error-not-one-line", {**info, "exit": code, "stderr": lines, "traceback": crash},
                  entry)
            return
        res.outcomes["served-error"] += 1
        res.served[f"{target}: {re.sub('[0-9]+', 'N', what.split(' =')[0])} (error)"] += 1
        return
    rejected = (got.step_misses if target == "step" else got.file_misses) > 0
    same = got.outputs == st.plain_in[cfg.name]
    if rejected and not same:
        _fail(res, st, "rejected-but-differs", info, entry)
        return
    if not rejected and not same:
        if not recompute and entry[:64] == data[:64] and entry != data:
            _fail(res, st, "stale-checksum-served", info, entry)
            return
        bad = [f"{fmt}: {w}" for fmt, o in got.outputs.items() if (w := well_formed(fmt, o))]
        if bad and not (target == "step" and recompute and malformed_number_text(entry)):
            _fail(res, st, "served-malformed", {**info, "problems": bad}, entry)
            return
    outcome = "rejected" if rejected else ("accepted-same" if same else "served")
    if rejected:  # rebuilt: a second run finds every step entry
        again = in_process(path, cfg, case_dir)
        if not again.ok or again.step_misses or again.outputs != st.plain_in[cfg.name]:
            _fail(res, st, "not-rebuilt", {**info, "misses": again.step_misses, "traceback": again.error}, entry)
            return
    fmt = rng.choice(["json", "csv"])
    fresh()
    code, out, err, crash = via_cli(path, cfg, fmt, case_dir)
    stderr_bad = [ln for ln in err.decode("utf-8", "replace").splitlines() if not ln.startswith("Warning: ")]
    if crash or b"Traceback" in err:
        _fail(res, st, "crash-cli", {**info, "format": fmt, "traceback": crash or err.decode("utf-8", "replace")},
              entry)
        return
    if code == 2 and outcome == "served" and not out and len(stderr_bad) == 1 and stderr_bad[0].startswith("Error: "):
        outcome = "served-error"
    elif code != 0 or stderr_bad:
        _fail(res, st, "cli-exit", {**info, "format": fmt, "exit": code, "stderr": err.decode("utf-8", "replace")},
              entry)
        return
    elif outcome != "served" and out != st.plain[cfg.name][fmt]:
        _fail(res, st, "cli-differs", {**info, "format": fmt, "outcome": outcome}, entry)
        return
    elif outcome == "served" and (w := well_formed(fmt, out)):
        if not (target == "step" and recompute and malformed_number_text(entry)):
            _fail(res, st, "served-malformed-cli", {**info, "format": fmt, "problem": w}, entry)
            return
        outcome = "served-number-text"  # laid out as it is: documented
    if subprocess_every and i % subprocess_every == 0:
        fresh()
        res.subprocess_runs += 1
        code, out, err = via_subprocess(path, cfg, fmt, case_dir)
        plain = (0, st.plain[cfg.name][fmt])
        if b"Traceback" in err or (outcome in ("rejected", "accepted-same") and (code, out) != plain):
            _fail(res, st, "subprocess", {**info, "format": fmt, "exit": code,
                                          "stderr": err.decode("utf-8", "replace")[-2000:]}, entry)
            return
    res.outcomes[outcome] += 1
    if outcome.startswith("served"):
        res.served[f"{target}: {re.sub('[0-9]+', 'N', what.split(' =')[0])}"] += 1


def describe(res: Result) -> str:
    lines = [f"{res.cases} cases ({res.subprocess_runs} also as a subprocess)",
             "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(res.outcomes.items())),
             "targets: " + ", ".join(f"{k} {v}" for k, v in sorted(res.by_target.items()))]
    lines.append("served as they say: " + (", ".join(f"{k} {v}" for k, v in res.served.most_common()) or "none"))
    kinds = Counter(f["kind"] for f in res.failures)
    lines.append("failures: " + (", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"))
    for f in res.failures[:10]:
        lines.append(json.dumps({k: v for k, v in f.items() if k != "traceback"}, default=repr)[:400])
        if "traceback" in f:
            lines.append("    " + str(f["traceback"]).strip().splitlines()[-1][:300])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cases", type=int, help="number of cases (deterministic for a seed)")
    g.add_argument("--seconds", type=float, help="run until this many seconds have passed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"work files and failures (default {DEFAULT_OUT})")
    ap.add_argument("--subprocess-every", type=int, default=25, help="run every N-th case also as `python -m`")
    ap.add_argument("--config", action="append", choices=[c.name for c in CONFIGS], help="only these (repeatable)")
    a = ap.parse_args(argv)
    if a.cases is None and a.seconds is None:
        a.cases = 200
    res = run(seconds=a.seconds, cases=a.cases, seed=a.seed, out=a.out, subprocess_every=a.subprocess_every,
              log=lambda m: print(m, file=sys.stderr, flush=True), configs=a.config)
    print(describe(res))
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
