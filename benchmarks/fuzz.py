"""Fuzz gradinspect: mutate valid files of every format it reads, run the CLI, check its contract.

    python benchmarks/fuzz.py --cases 2000 --seed 1 --jobs 2
    python benchmarks/fuzz.py --seconds 300 --out /tmp/gradinspect-fuzz
    python benchmarks/fuzz.py --cases 500 --repo /path/to/other/checkout   # run another checkout

Inputs: .safetensors (float32/64, bfloat16, float16, float8, metadata), .npy
v1/v2/v3 (also big-endian, Fortran order), .npz stored, deflated and zip64, a
*.safetensors.index.json with its shards, and a directory of mixed files.
Mutations: bit flips, byte overwrites, insertions, deletions, truncations at
random points and at structural boundaries, safetensors header edits (dtype,
shape, offsets, length prefix, duplicate keys, huge and negative numbers, deep
nesting, lone surrogates, control characters, ANSI/OSC escapes and workflow
commands in names and metadata), npy header edits (descr, shape,
fortran_order, header length, version byte, non-UTF-8 bytes), zip field edits
(EOCD, central directory, local headers, zip64 records and extra fields),
rebuilt archives with a mutated member, index edits and hostile file names.

Each case runs one of ``norms``, ``check``, ``info`` or ``diff FILE ORIGINAL``
(rotating, with rotating output formats and options) and checks the contract:

- exit 0 (or 1 for check findings / diff outside a tolerance) with output that
  parses (strict JSON: no NaN/Infinity literals, no lone surrogates; CSV rows
  as wide as the header; JUnit XML well-formed), strict UTF-8, no raw control
  characters in human formats, and nothing but ``Warning: `` lines on stderr;
- or exit 2, nothing on stdout, exactly one stderr line starting ``Error: ``;
- never a traceback, a hang (timeout), a crash by a signal, or MemoryError
  (the address space is capped with RLIMIT_AS);
- no line starting ``::error::INJECTED`` (a GitHub workflow command smuggled
  in through a file or tensor name) in stderr or in human-format stdout;
- an unmutated seed, or a file whose data values alone were changed, is read
  (exit 2 there is ``valid-input-refused``);
- when ``norms``/``check`` accept a file, the global L2, L1, L∞, NaN/Inf
  counts, tensor count, element count and tensor names equal an independent
  oracle's (the ``safetensors`` library's parser, ``numpy.load(allow_pickle=
  False)``, float64 sums with math.fsum); a different number is
  ``wrong-result``.  When the oracle refuses a file gradinspect accepts, the
  case is a *disagreement* to review (saved, not a failure); refusals of files
  the oracle reads are counted by message ("refused where the oracle reads").

How cases run (the default, ``--mode fork``): each job owns one long-lived
driver interpreter (``python -c``, PYTHONPATH=--repo) that imports
gradinspect, numpy and rich once, then forks a child per case; the child caps
its address space, arms a timer (SIGALRM's default action kills it), points
fds 0/1/2 at /dev/null and two files, and calls ``gradinspect.cli.main``.  A
fresh process per case (exit code, signals, real fds, no state carried
between cases) at ~10 ms instead of ~150 ms for a new interpreter.  What it
does not reproduce is interpreter start and shutdown, so every distinct
failure is re-run once with ``--mode subprocess`` semantics (``python -m
gradinspect`` in a new process) and marked ``confirmed`` when that fails the
same way.  ``--mode subprocess`` runs every case that way.

Failing inputs are saved in --out (default /tmp/gradinspect-fuzz/), one
directory per distinct (command, failure kind, first stderr line with numbers
and the case path stripped), with ``failure.json`` (the command line to
reproduce it, the mutation, the outputs).  Results depend only on --seed and
the case number, not on --jobs or timing (except timeouts).
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
import stat
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_REPO = HERE.parent
DEFAULT_OUT = Path("/tmp/gradinspect-fuzz")

FORMATS = ("safetensors", "safetensors-bf16", "safetensors-f8", "safetensors-meta", "npy-v1", "npy-v2", "npy-v3",
           "npy-be-fortran", "npz-stored", "npz-deflated", "npz-zip64", "index", "dir")
COMMANDS = {"norms": ("table", "json", "csv", "markdown"), "check": ("text", "json", "github", "junit"),
            "info": ("table", "json", "csv"), "diff": ("table", "json", "csv", "markdown")}
INJECT = "\n::error::INJECTED"
EVIL_NAMES = ["\udc80", "a\ud800b", "x\x00y", "\x1b[31mred\x1b[0m", "\x1b]8;;http://x/\x07link\x1b]8;;\x07",
              "n" + INJECT, "bell\x07", "\x85next", "\u202eevil", "cr\rlf", "tab\tx", "\x9b2J", "n" * 5000, "",
              "__metadata__", "é€😀"]

# --- seed files ------------------------------------------------------------------------------------------------

_ST_NP = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
          "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _ST_NP["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = math.prod(shape)
    if dtype.kind in "iub":
        return rng.integers(0, 100, n).astype(dtype).reshape(shape)
    scale = 10.0 ** rng.uniform(-3, 1)
    x = rng.standard_normal(n) * scale
    x[rng.random(n) < 0.1] = 0.0
    return x.astype(dtype).reshape(shape)


def st_bytes(tensors: list[tuple[str, str, np.ndarray]], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, st, arr in tensors:
        raw = np.ascontiguousarray(arr).astype(_ST_NP[st]).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def npy_bytes(arr: np.ndarray, version: tuple[int, int], fortran: bool = False) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array(b, np.asfortranarray(arr) if fortran else arr, version=version)
    return b.getvalue()


def zip_bytes(members: list[tuple[str, bytes, int]], zip64: bool = False) -> bytes:
    """A zip of (name, data, method 0/8) members; ``zip64``: zip64 extras in every entry and zip64 end records."""
    out = bytearray()
    cd = bytearray()
    for name, data, method in members:
        nm = name.encode("utf-8", "surrogatepass")  # a lone surrogate makes an invalid UTF-8 name
        flags = 0x800 if not nm.isascii() else 0
        crc = zlib.crc32(data)
        if method == 8:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            comp = c.compress(data) + c.flush()
        else:
            comp = data
        off = len(out)
        if zip64:
            lextra = struct.pack("<HHQQ", 1, 16, len(data), len(comp))
            out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, method, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(nm), len(lextra)) + nm + lextra + comp
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(comp), off)
            cd += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, method, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                              len(nm), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF) + nm + cextra
        else:
            out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(comp), len(data),
                               len(nm), 0) + nm + comp
            cd += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, 0, 0x21, crc, len(comp), len(data),
                              len(nm), 0, 0, 0, 0, 0, off) + nm
    cd_off = len(out)
    out += cd
    n = len(members)
    if zip64:
        e64 = len(out)
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(cd), cd_off)
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, e64, 1)
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_off, 0)
    return bytes(out)


def zip_members(data: bytes) -> list[tuple[str, bytes, int]]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]


@dataclass
class Seed:
    """A valid input: files (relative path -> bytes), the CLI's path argument, and which files are mutable."""

    fmt: str
    files: dict[str, bytes]
    arg: str
    members: list[str]


def corpus(seed: int) -> dict[str, Seed]:
    rng = np.random.default_rng([seed, 7])
    v = lambda shape, dt: _values(rng, shape, np.dtype(dt))
    out: dict[str, Seed] = {}

    def one(fmt: str, name: str, data: bytes) -> None:
        out[fmt] = Seed(fmt, {name: data}, name, [name])

    one("safetensors", "g.safetensors", st_bytes(
        [("embed.weight", "F32", v((8, 6), "f4")), ("head.bias", "F64", v((5,), "f8")), ("step", "I64", v((), "i8")),
         ("blocks.0.w", "F32", v((3, 4, 2), "f4"))], {"format": "pt"}))
    one("safetensors-bf16", "g.safetensors", st_bytes(
        [("a.weight", "BF16", v((6, 5), ml_dtypes.bfloat16)), ("a.bias", "F16", v((7,), "f2")),
         ("mask", "BOOL", v((4,), "?"))]))
    f8 = [("q.e4m3", "F8_E4M3", v((9,), ml_dtypes.float8_e4m3fn)),
          ("q.e5m2", "F8_E5M2", v((4, 3), ml_dtypes.float8_e5m2))]
    if "F8_E8M0" in _ST_NP:
        f8.append(("q.e8m0", "F8_E8M0", np.abs(v((5,), ml_dtypes.float8_e8m0fnu))))
    one("safetensors-f8", "g.safetensors", st_bytes(f8))
    one("safetensors-meta", "g.safetensors", st_bytes(
        [("x", "F32", v((3,), "f4")), ("empty", "F32", v((0, 4), "f4")), ("scalar", "F64", v((), "f8"))],
        {"format": "pt", "step": "1000", "note": "grads é €"}))
    for ver in (1, 2, 3):
        one(f"npy-v{ver}", "g.npy", npy_bytes(v((5, 3), "f4" if ver != 2 else "f2"), (ver, 0)))
    one("npy-be-fortran", "g.npy", npy_bytes(v((4, 3), ">f8"), (1, 0), fortran=True))
    arrays = {"embed.weight": v((6, 4), "f4"), "head.bias": v((3,), "f8"), "step": v((), "i8"), "h.half": v((5,), "f2")}
    for fmt, save in (("npz-stored", np.savez), ("npz-deflated", np.savez_compressed)):
        b = io.BytesIO()
        save(b, **arrays)
        one(fmt, "g.npz", b.getvalue())
    one("npz-zip64", "g.npz", zip_bytes(
        [("embed.weight.npy", npy_bytes(arrays["embed.weight"], (1, 0)), 8),
         ("head.bias.npy", npy_bytes(arrays["head.bias"], (1, 0)), 0),
         ("step.npy", npy_bytes(arrays["step"], (1, 0)), 8)], zip64=True))
    s1 = st_bytes([("layers.0.w", "F32", v((4, 4), "f4")), ("layers.0.b", "BF16", v((4,), ml_dtypes.bfloat16))])
    s2 = st_bytes([("layers.1.w", "F32", v((4, 4), "f4")), ("head.w", "F16", v((2, 4), "f2"))])
    index = {"metadata": {"total_size": len(s1) + len(s2)},
             "weight_map": {"layers.0.w": "model-00001-of-00002.safetensors",
                            "layers.0.b": "model-00001-of-00002.safetensors",
                            "layers.1.w": "model-00002-of-00002.safetensors",
                            "head.w": "model-00002-of-00002.safetensors"}}
    out["index"] = Seed("index", {"ckpt/model.safetensors.index.json": json.dumps(index, indent=2).encode(),
                                  "ckpt/model-00001-of-00002.safetensors": s1,
                                  "ckpt/model-00002-of-00002.safetensors": s2},
                        "ckpt/model.safetensors.index.json",
                        ["ckpt/model.safetensors.index.json", "ckpt/model-00001-of-00002.safetensors",
                         "ckpt/model-00002-of-00002.safetensors"])
    b = io.BytesIO()
    np.savez_compressed(b, **{"z.a": v((3, 3), "f4"), "z.b": v((2,), "f8")})
    out["dir"] = Seed("dir", {"d/a.safetensors": st_bytes([("s.w", "F32", v((4, 2), "f4"))]), "d/b.npz": b.getvalue(),
                              "d/c.npy": npy_bytes(v((6,), "f8"), (1, 0)), "d/notes.txt": b"not a tensor file\n"},
                      "d", ["d/a.safetensors", "d/b.npz", "d/c.npy"])
    return out


# --- mutations -------------------------------------------------------------------------------------------------

_INTERESTING_BYTES = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x5D, 0x2C, 0x3A, 0x0A, 0x1B]


def mut_generic(r: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    if not b:
        return bytes([r.randrange(256)]), "generic:fill"
    op = r.choice(["bitflip", "bitflip", "overwrite", "overwrite", "truncate", "insert", "delete", "dup"])
    if op == "bitflip":
        for _ in range(r.choice([1, 1, 2, 4, 8])):
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    elif op == "overwrite":
        for _ in range(r.choice([1, 2, 4])):
            i = r.randrange(len(b))
            if r.random() < 0.5:
                b[i] = r.choice(_INTERESTING_BYTES)
            else:
                n = r.choice([1, 2, 4, 8])
                b[i : i + n] = bytes(r.randrange(256) for _ in range(n))[: len(b) - i]
    elif op == "truncate":
        del b[r.randrange(len(b)) :]
    elif op == "insert":
        i = r.randrange(len(b) + 1)
        b[i:i] = bytes(r.randrange(256) for _ in range(r.choice([1, 3, 8, 64])))
    elif op == "delete":
        i = r.randrange(len(b))
        del b[i : i + r.choice([1, 2, 8, 64])]
    else:
        i = r.randrange(len(b))
        j = min(len(b), i + r.choice([4, 16, 64]))
        b[j:j] = b[i:j]
    return bytes(b), "generic:" + op


def _boundaries_st(data: bytes) -> list[int]:
    out = [0, 4, 8]
    if len(data) < 8:
        return out
    (n,) = struct.unpack("<Q", data[:8])
    out += [8 + n, 8 + n // 2]
    try:
        h = json.loads(data[8 : 8 + n])
        for k, info in h.items():
            if k != "__metadata__":
                out += [8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1]]
    except Exception:
        pass
    return out


def _boundaries_npy(data: bytes) -> list[int]:
    out = [0, 6, 7, 8, 10, 12]
    if len(data) >= 12 and data[:6] == b"\x93NUMPY":
        hl = struct.unpack("<H", data[8:10])[0] + 10 if data[6] == 1 else struct.unpack("<I", data[8:12])[0] + 12
        out += [hl, hl - 1, hl + 1]
    return [*out, len(data) - 1]


def _boundaries_zip(data: bytes) -> list[int]:
    return sorted({f[0] for f in zip_fields(data)} | {0, len(data)} |
                  {m.start() for m in re.finditer(rb"PK[\x01-\x07][\x02-\x08]", data)})


def mut_truncate_boundary(r: random.Random, data: bytes, fmt: str) -> tuple[bytes, str]:
    points = {"st": _boundaries_st, "npy": _boundaries_npy, "npz": _boundaries_zip}.get(fmt, lambda d: [0])(data)
    p = max(0, min(len(data) - 1, r.choice(points) + r.choice([-2, -1, 0, 0, 0, 1, 2])))
    return data[:p], "truncate@boundary"


def _split_st(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack_st(text: bytes, body: bytes, length: int | None = None, pad: bytes = b" ") -> bytes:
    text += pad * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length % (1 << 64)) + text + body


_NUMBERS = ["1e400", "-1e400", "123456789012345678901234567890", "-1", "-0", "1.0", "1E2", "0x10", "NaN", "Infinity",
            "18446744073709551615", "18446744073709551616", "9223372036854775808", "00", "true", "null", '"3"', "[]"]


def mut_st_header(r: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = _split_st(data)
    names = [k for k in header if k != "__metadata__"]
    name = r.choice(names)
    info = header[name]
    op = r.choice(["dtype", "shape", "offsets", "length", "dupkey", "number", "nesting", "name", "name", "metadata",
                   "nonobject", "raw", "drop", "extra"])
    detail = op
    if op == "dtype":
        info["dtype"] = r.choice([*_ST_NP, "C64", "F4", "F6_E2M3", "F6_E3M2", "XX", "f32", "", 5, None, "U64"])
        detail += f"={info['dtype']!r}"
    elif op == "shape":
        s = list(info["shape"])
        choices = [[], [0], [*s, 1], s[:-1], [x * 2 for x in s], [-1], [1 << 63], [1 << 64], [1 << 32, 1 << 32],
                   [1 << 62, 4], [1.5], ["3"], [True], [s], s[::-1], [math.prod(s) or 1], [2] * 64]
        info["shape"] = r.choice(choices)
        detail += f"={info['shape']!r}"[:60]
    elif op == "offsets":
        b, e = info["data_offsets"]
        other = header[r.choice(names)]["data_offsets"]
        info["data_offsets"] = r.choice([[b + 1, e + 1], [e, b], [0, 0], [b, 1 << 64], [-1, e], [b, e + 8], [b, e - 1],
                                         list(other), [b, e, 0], [b], [float(b), float(e)], [b, len(body) + 1],
                                         [1 << 63, (1 << 63) + e - b], [b - 1, e - 1]])
        detail += f"={info['data_offsets']!r}"
    elif op == "length":
        text = data[8 : 8 + struct.unpack("<Q", data[:8])[0]]
        n = len(text)
        length = r.choice([n - 1, n + 1, n - 8, n + 8, 0, 1, 2, (1 << 63), (1 << 64) - 1, len(data) - 8, len(data),
                           100 * 1024 * 1024 + 1, n + len(body)])
        return data[:0] + struct.pack("<Q", length % (1 << 64)) + data[8:], f"length={length}"
    if op in ("dtype", "shape", "offsets", "drop", "extra", "metadata", "name", "nonobject"):
        if op == "drop":
            del header[name]
        elif op == "extra":
            header["extra." + str(r.randrange(100))] = {
                "dtype": r.choice(["F32", "F64", "BF16"]), "shape": [2],
                "data_offsets": r.choice([[0, 8], [0, 4], [len(body), len(body) + 8]])}
        elif op == "metadata":
            header["__metadata__"] = r.choice([{"k": 1}, [], None, "x", {r.choice(EVIL_NAMES): r.choice(EVIL_NAMES)},
                                               {"k": "v" * 100000}, {"a": {"b": "c"}}, {"": ""}])
            detail += "=" + repr(header["__metadata__"])[:40]
        elif op == "name":
            evil = r.choice(EVIL_NAMES)
            header = {(evil if k == name else k): val for k, val in header.items()}
            detail += "=" + repr(evil)[:40]
        elif op == "nonobject":
            header = r.choice([[], "x", 1, None, [header]])
            detail += "=" + type(header).__name__
        text = json.dumps(header, ensure_ascii=r.random() < 0.7).encode("utf-8", "surrogatepass")
        return _pack_st(text, body), "st-header:" + detail
    text = json.dumps(header).encode()
    if op == "dupkey":
        which = r.choice(["tensor", "field", "metadata"])
        if which == "tensor":
            entry = json.dumps({name: info})[1:-1]
            text = text[:-1] + b"," + entry.encode() + b"}"
        elif which == "field":
            text = text.replace(b'"dtype"', b'"dtype": "F32", "dtype"', 1)
        else:
            text = b'{"__metadata__": {"a": "b"}, ' + text[1:-1] + b', "__metadata__": {"a": "c"}}'
        detail += ":" + which
    elif op == "number":
        spots = [m.span() for m in re.finditer(rb"(?<=[\[,:] )-?\d+|(?<=[\[,:])-?\d+", text)]
        if spots:
            a, b = r.choice(spots)
            lit = r.choice(_NUMBERS)
            text = text[:a] + lit.encode() + text[b:]
            detail += "=" + lit
    elif op == "nesting":
        depth = r.choice([50, 1000, 100000])
        deep = b"[" * depth + b"]" * depth
        where = r.choice(["shape", "metadata", "whole"])
        if where == "shape":
            text = text.replace(b'"shape": [', b'"shape": [' + deep + b",", 1)
        elif where == "metadata":
            text = b'{"__metadata__": {"k": ' + deep + b"}, " + text[1:]
        else:
            text = deep
        detail += f"={where}:{depth}"
    elif op == "raw":
        kind = r.choice(["bom", "trailing-comma", "nul-pad", "bad-utf8", "garbage", "comment", "single-quote"])
        if kind == "bom":
            text = b"\xef\xbb\xbf" + text
        elif kind == "trailing-comma":
            text = text[:-1] + b",}"
        elif kind == "nul-pad":
            packed = _pack_st(text, body, pad=b"\x00") if len(text) % 8 else _pack_st(text + b"\x00", body)
            return packed, "st-header:raw:nul-pad"
        elif kind == "bad-utf8":
            i = text.find(name.encode()) or 2
            text = text[:i] + b"\xff\xfe" + text[i:]
        elif kind == "garbage":
            text = text + b"xyz"
        elif kind == "comment":
            text = b"/*c*/" + text
        else:
            text = text.replace(b'"', b"'")
        detail += ":" + kind
    return _pack_st(text, body), "st-header:" + detail


def _split_npy(data: bytes) -> tuple[int, str, bytes]:
    major = data[6]
    start = 10 if major == 1 else 12
    hlen = struct.unpack("<H" if major == 1 else "<I", data[8:start])[0]
    return major, data[start : start + hlen].decode("latin1"), data[start + hlen :]


def _pack_npy(major: int, text: bytes, body: bytes, length: int | None = None, minor: int = 0) -> bytes:
    start = 10 if major in (0, 1) or major > 3 else 12
    pad = -(start + len(text) + 1) % 64
    text = text.rstrip(b"\n ") + b" " * pad + b"\n" if not text.endswith(b"!") else text
    n = len(text) if length is None else length
    fmt = "<H" if start == 10 else "<I"
    field_ = struct.pack(fmt, n % (1 << (8 * struct.calcsize(fmt))))
    return b"\x93NUMPY" + bytes([major % 256, minor]) + field_ + text + body


_DESCRS = ["<f4", "<f8", "<f2", ">f4", ">f8", "<f16", "<c8", "|b1", "<i8", "|u1", "|V4", "|V2", "<U3", "|S3", "<M8[s]",
           "<m8", "|O", "bogus", "", "[('a', '<f4'), ('b', '<f8')]", "[('a', '|O')]", "('<f4', (2,))", "f4", "float32",
           "<f1", "<f3", "é"]
_SHAPES = ["()", "(0,)", "(1 << 62,)", "(9999999999999999999,)", "(-1,)", "(4294967296, 4294967296)", "(2.0,)", "[3]",
           "(3, 5)", "(5, 3)", "(15,)", "(16,)", "(14,)", "('3',)", "(True,)", "(1,) * 64", "(((3,),),)", "None",
           "(3, 0)", "(7, 0, 1 << 62)"]


def mut_npy_header(r: random.Random, data: bytes) -> tuple[bytes, str]:
    major, text, body = _split_npy(data)
    try:
        d = eval(text, {"__builtins__": {}})  # our own seed header: a dict literal
    except Exception:
        d = {"descr": "<f4", "fortran_order": False, "shape": (3,)}
    op = r.choice(["descr", "descr", "shape", "shape", "fortran", "length", "version", "text", "nonutf8", "magic"])
    detail = op
    raw: str | None = None
    if op == "descr":
        descr = r.choice(_DESCRS)
        shown = descr if descr[:1] in "[(" else repr(descr)
        raw = f"{{'descr': {shown}, 'fortran_order': {d['fortran_order']!r}, 'shape': {d['shape']!r}, }}"
        detail += "=" + raw.split(",")[0][10:]
    elif op == "shape":
        sh = r.choice(_SHAPES)
        raw = f"{{'descr': {d['descr']!r}, 'fortran_order': {d['fortran_order']!r}, 'shape': {sh}, }}"
        detail += "=" + sh
    elif op == "fortran":
        fo = r.choice(["True", "False", "1", "'True'", "None"])
        shape = r.choice([d["shape"], d["shape"][::-1]])
        raw = f"{{'descr': {d['descr']!r}, 'fortran_order': {fo}, 'shape': {shape!r}, }}"
        detail += "=" + fo
    elif op == "length":
        n = len(text)
        length = r.choice([n - 1, n + 1, 0, 1, 0xFFFF, n + len(body), (1 << 32) - 1, 1 << 17, n - 16])
        return _pack_npy(major, text.encode("latin1") + b"!", body, length=length), f"npy-length={length}"
    elif op == "version":
        v = r.choice([0, 1, 2, 3, 4, 255])
        how = r.choice(["repack", "byte"])
        if how == "byte":
            b = bytearray(data)
            b[6] = v
            if r.random() < 0.3:
                b[7] = r.choice([1, 255])
            return bytes(b), f"npy-version:byte={v}"
        return _pack_npy(v, text.encode("latin1"), body), f"npy-version:repack={v}"
    elif op == "text":
        raw = r.choice([
            "[1, 2]", "{'descr': '<f4'}", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
            "__import__('os').system('echo PWNED')", "{'descr': '<f4', 'fortran_order': False, 'shape': " +
            "(" * 300 + ")" * 300 + "}", "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)", "", "{}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'descr': '|O'}", "{" + "'a': 1, " * 5000 + "}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1" + "0" * 5000 + ",)}",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}\x00\x00",
            "{'descr': '\x1b[31m<f4\n::error::INJECTED', 'fortran_order': False, 'shape': (3,)}"])
        detail += "=" + raw[:30]
    elif op == "nonutf8":
        t = text.encode("latin1")
        i = r.randrange(1, max(2, t.find(b"}")))
        t = t[:i] + r.choice([b"\xff", b"\xc3", b"\xed\xb2\x80", b"\xe9"]) + t[i:]
        return _pack_npy(major, t, body), "npy-nonutf8"
    else:
        b = bytearray(data)
        b[r.randrange(6)] ^= 1 << r.randrange(8)
        return bytes(b), "npy-magic"
    return _pack_npy(major, raw.encode("utf-8", "surrogatepass"), body), "npy-header:" + detail


def mut_values(r: random.Random, data: bytes, fmt: str) -> tuple[bytes, str]:
    """Valid structure, hostile values: NaN, Inf, huge, subnormal, negative zero patterns in the data."""
    if fmt == "st":
        header, body = _split_st(data)
        entries = [(k, i) for k, i in header.items() if k != "__metadata__" and i["dtype"] in _ST_FLOAT
                   and i["data_offsets"][1] > i["data_offsets"][0]]
        if not entries:
            return mut_generic(r, data)
        _, i = r.choice(entries)
        start = len(data) - len(body) + i["data_offsets"][0]
        dt = _ST_NP[i["dtype"]]
        n = (i["data_offsets"][1] - i["data_offsets"][0]) // dt.itemsize
    else:
        _, text, body = _split_npy(data)
        d = eval(text, {"__builtins__": {}})
        dt = np.dtype(d["descr"])
        start = len(data) - len(body)
        n = math.prod(d["shape"])
        if n == 0 or dt.kind != "f":
            return mut_generic(r, data)
    b = bytearray(data)
    kind = r.choice(["nan", "inf", "max", "subnormal", "allbits", "random", "negzero"])
    for _ in range(r.choice([1, 2, n])):
        j = r.randrange(n)
        if kind in ("allbits", "random"):
            raw = bytes([0xFF] * dt.itemsize) if kind == "allbits" else \
                bytes(r.randrange(256) for _ in range(dt.itemsize))
        else:
            if kind == "nan":
                val: Any = np.nan
            elif kind == "inf":
                val = r.choice([np.inf, -np.inf])
            elif kind == "max":
                val = float(ml_dtypes.finfo(dt.newbyteorder("=")).max) * r.choice([1, -1])
            elif kind == "subnormal":
                val = float(ml_dtypes.finfo(dt.newbyteorder("=")).smallest_subnormal)
            else:
                val = -0.0
            with np.errstate(all="ignore"):
                raw = np.array(val).astype(dt).tobytes()
        b[start + j * dt.itemsize : start + (j + 1) * dt.itemsize] = raw
    return bytes(b), "values:" + kind


# zip fields: (offset of the value, struct code, label)


def zip_fields(data: bytes) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    e = data.rfind(b"PK\x05\x06")
    if e < 0 or e + 22 > len(data):
        return out
    for off, code, label in ((4, "H", "disk"), (6, "H", "cd_disk"), (8, "H", "count_disk"), (10, "H", "count"),
                             (12, "I", "cd_size"), (16, "I", "cd_offset"), (20, "H", "comment_len")):
        out.append((e + off, code, "eocd." + label))
    count, _, cd_off = struct.unpack_from("<HLL", data, e + 10)
    loc = e - 20
    if loc >= 0 and data[loc : loc + 4] == b"PK\x06\x07":
        out += [(loc + 4, "I", "loc64.disk"), (loc + 8, "Q", "loc64.eocd64_offset"), (loc + 16, "I", "loc64.disks")]
        (e64,) = struct.unpack_from("<Q", data, loc + 8)
        if e64 + 56 <= len(data) and data[e64 : e64 + 4] == b"PK\x06\x06":
            for off, code, label in ((4, "Q", "size"), (16, "I", "disk"), (20, "I", "cd_disk"), (24, "Q", "count_disk"),
                                     (32, "Q", "count"), (40, "Q", "cd_size"), (48, "Q", "cd_offset")):
                out.append((e64 + off, code, "eocd64." + label))
            count, _, cd_off = struct.unpack_from("<QQQ", data, e64 + 32)
    pos = cd_off
    locals_: list[int] = []
    for i in range(min(count, 64)):
        if pos + 46 > len(data) or data[pos : pos + 4] != b"PK\x01\x02":
            break
        for off, code, label in ((4, "H", "version"), (6, "H", "version_needed"), (8, "H", "flags"),
                                 (10, "H", "method"),
                                 (16, "I", "crc"), (20, "I", "csize"), (24, "I", "usize"), (28, "H", "name_len"),
                                 (30, "H", "extra_len"), (32, "H", "comment_len"), (34, "H", "disk"),
                                 (42, "I", "local_offset")):
            out.append((pos + off, code, f"cd[{i}].{label}"))
        nlen, elen, clen = struct.unpack_from("<HHH", data, pos + 28)
        (loff,) = struct.unpack_from("<L", data, pos + 42)
        out += _extra_fields(data, pos + 46 + nlen, elen, f"cd[{i}].extra")
        if loff == 0xFFFFFFFF and elen >= 28:
            loff = struct.unpack_from("<Q", data, pos + 46 + nlen + 20)[0]
        locals_.append(loff)
        pos += 46 + nlen + elen + clen
    for i, lo in enumerate(locals_):
        if lo + 30 > len(data) or data[lo : lo + 4] != b"PK\x03\x04":
            continue
        for off, code, label in ((4, "H", "version"), (6, "H", "flags"), (8, "H", "method"), (14, "I", "crc"),
                                 (18, "I", "csize"), (22, "I", "usize"), (26, "H", "name_len"), (28, "H", "extra_len")):
            out.append((lo + off, code, f"local[{i}].{label}"))
        nlen, elen = struct.unpack_from("<HH", data, lo + 26)
        out += _extra_fields(data, lo + 30 + nlen, elen, f"local[{i}].extra")
    return [f for f in out if f[0] + struct.calcsize(f[1]) <= len(data)]


def _extra_fields(data: bytes, at: int, n: int, label: str) -> list[tuple[int, str, str]]:
    out = []
    i = 0
    while i + 4 <= n:
        _, ln = struct.unpack_from("<HH", data, at + i)
        out += [(at + i, "H", f"{label}.tag"), (at + i + 2, "H", f"{label}.len")]
        for j in range(min(ln // 8, 4)):
            out.append((at + i + 4 + 8 * j, "Q", f"{label}.{['usize', 'csize', 'offset', 'disk'][j]}"))
        i += 4 + ln
    return out


def mut_zip_field(r: random.Random, data: bytes) -> tuple[bytes, str]:
    fields = zip_fields(data)
    if not fields or r.random() < 0.15:
        return mut_zip_structure(r, data)
    off, code, label = r.choice(fields)
    size = struct.calcsize(code)
    top = (1 << (8 * size)) - 1
    (v,) = struct.unpack_from("<" + code, data, off)
    new = r.choice([0, 1, v + 1, v - 1, v * 2, v // 2, top, top - 1, 0x7FFFFFFF, len(data), len(data) + 1,
                    r.randrange(top + 1), v ^ (1 << r.randrange(8 * size)), 0xFFFF, 0xFFFFFFFF, 8, 12, 99])
    new %= top + 1
    b = bytearray(data)
    struct.pack_into("<" + code, b, off, new)
    return bytes(b), f"zip:{re.sub(r'[0-9]+', 'N', label)}={'max' if new == top else new}"


def mut_zip_structure(r: random.Random, data: bytes) -> tuple[bytes, str]:
    op = r.choice(["prepend", "append", "fake-eocd-comment", "no-eocd", "double-eocd", "swap-cd"])
    e = data.rfind(b"PK\x05\x06")
    if op == "prepend":
        return b"MZ" + bytes(r.randrange(256) for _ in range(r.choice([2, 30, 100]))) + data, "zip-struct:prepend"
    if op == "append":
        return data + bytes(r.randrange(256) for _ in range(r.choice([1, 21, 22, 100]))), "zip-struct:append"
    if op == "fake-eocd-comment" and e >= 0:
        fake = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0)
        b = bytearray(data[: e + 22])
        struct.pack_into("<H", b, e + 20, len(fake))
        return bytes(b) + fake, "zip-struct:fake-eocd-in-comment"
    if op == "no-eocd" and e >= 0:
        return data[:e] + b"PK\x05\x05" + data[e + 4 :], "zip-struct:no-eocd"
    if op == "double-eocd" and e >= 0:
        return data + data[e : e + 22], "zip-struct:double-eocd"
    if op == "swap-cd" and e >= 0:
        _, _, _, _, size, off = struct.unpack_from("<4HLL", data, e + 4)
        if 0 < off < e:
            cd = data[off : off + size]
            parts = [p for p in cd.split(b"PK\x01\x02") if p]
            if len(parts) > 1:
                r.shuffle(parts)
                cd = b"".join(b"PK\x01\x02" + p for p in parts)
                return data[:off] + cd + data[off + size :], "zip-struct:swap-cd"
    return mut_generic(r, data)


def mut_npz_member(r: random.Random, data: bytes, zip64: bool) -> tuple[bytes, str]:
    """Rebuild the archive (consistent CRCs and sizes) with one member's .npy mutated, renamed or duplicated."""
    members = zip_members(data)
    i = r.randrange(len(members))
    name, body, method = members[i]
    op = r.choice(["npy", "npy", "values", "name", "dup", "non-npy", "dir", "method"])
    if op == "npy":
        body, d = mut_npy_header(r, body)
    elif op == "values":
        body, d = mut_values(r, body, "npy")
    elif op == "name":
        evil = r.choice(EVIL_NAMES)
        name, d = evil + ".npy", "name=" + repr(evil)[:30]
    elif op == "dup":
        members.append((name, body, method))
        d = "dup"
    elif op == "non-npy":
        name, body, d = "readme.txt", b"hello", "non-npy"
    elif op == "dir":
        members.append(("sub/", b"", 0))
        members.append(("sub/x.npy", body, method))
        d = "dir"
    else:
        method, d = 8 - method, "method"
    members[i] = (name, body, method)
    return zip_bytes(members, zip64=zip64), "npz-member:" + d


def mut_index(r: random.Random, data: bytes) -> tuple[bytes, str]:
    doc = json.loads(data)
    wm = doc["weight_map"]
    k = r.choice(list(wm))
    op = r.choice(["missing-name", "path", "path", "value", "wm", "nesting", "dupkey", "evil-key", "raw"])
    d = op
    if op == "missing-name":
        wm["not.there"] = wm[k]
    elif op == "path":
        wm[k] = r.choice(["../x.safetensors", "/etc/passwd", "", "\x00", "a\n::error::INJECTED.safetensors", ".",
                          "model.safetensors.index.json", "/dev/zero", "nope.safetensors", "sub/../" + wm[k],
                          "\udc80.safetensors", "model.bin", "/" + "a" * 5000, "\x1b[31m.safetensors"])
        d += "=" + repr(wm[k])[:30]
    elif op == "value":
        wm[k] = r.choice([1, None, [], {}, True, 1e400])
        d += "=" + repr(wm[k])
    elif op == "wm":
        doc["weight_map"] = r.choice([[], None, "x", {}, 1])
        d += "=" + repr(doc["weight_map"])
    elif op == "nesting":
        depth = r.choice([1000, 100000])
        return b'{"metadata": ' + b"[" * depth + b"]" * depth + b', "weight_map": ' + json.dumps(wm).encode() + b"}", \
            f"index:nesting={depth}"
    elif op == "dupkey":
        text = json.dumps(doc).encode()
        return text[:-1] + b', "weight_map": {}}', "index:dupkey"
    elif op == "evil-key":
        evil = r.choice(EVIL_NAMES)
        wm[evil] = wm.pop(k)
        d += "=" + repr(evil)[:30]
    else:
        text = json.dumps(doc).encode()
        kind = r.choice(["bom", "bad-utf8", "nan", "empty", "array"])
        text = {"bom": b"\xef\xbb\xbf" + text, "bad-utf8": text[:5] + b"\xff" + text[5:],
                "nan": text.replace(b"{", b'{"x": NaN, ', 1), "empty": b"", "array": b"[" + text + b"]"}[kind]
        return text, "index:raw:" + kind
    return json.dumps(doc, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass"), "index:" + d


def _file_fmt(path: str) -> str:
    if path.endswith(".index.json"):
        return "index"
    return {"safetensors": "st", "npy": "npy", "npz": "npz"}[path.rsplit(".", 1)[1]]


def mutate_file(r: random.Random, rel: str, data: bytes, zip64: bool) -> tuple[bytes, str]:
    fmt = _file_fmt(rel)
    x = r.random()
    if fmt == "index":
        return mut_index(r, data) if x < 0.7 else mut_generic(r, data)
    if x < 0.3:
        return mut_generic(r, data)
    if x < 0.4:
        return mut_truncate_boundary(r, data, fmt)
    if fmt == "st":
        return mut_st_header(r, data) if x < 0.85 else mut_values(r, data, "st")
    if fmt == "npy":
        return mut_npy_header(r, data) if x < 0.85 else mut_values(r, data, "npy")
    return mut_zip_field(r, data) if x < 0.75 else mut_npz_member(r, data, zip64)


# --- cases -----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    fmt: str
    mutation: str
    command: str
    argv: list[str]
    files: dict[str, bytes]  # relative path -> bytes (mutated input under in/, originals under orig/)
    links: dict[str, str] = field(default_factory=dict)  # relative path -> symlink target
    dirs: list[str] = field(default_factory=list)
    oracle: bool = True


_EVIL_FILE_NAMES = ["x\n::error::INJECTED", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07", "\udcff\udcfe", "sp ace", "-dash",
                    "bell\x07", "cr\r", "\u202e", "é"]


def make_case(seed: int, index: int, seeds: dict[str, Seed]) -> Case:
    r = random.Random(f"gradinspect-fuzz:{seed}:{index}")
    fmts = list(FORMATS)
    if index < len(fmts):  # the first cases: every seed unmutated, through norms --format json
        s = seeds[fmts[index]]
        files = {f"in/{k}": v for k, v in s.files.items()}
        return Case(index, s.fmt, "none", "norms", ["norms", f"in/{s.arg}", "--format", "json"], files)
    s = seeds[r.choice(fmts)]
    files = {f"in/{k}": v for k, v in s.files.items()}
    links: dict[str, str] = {}
    dirs: list[str] = []
    arg = f"in/{s.arg}"
    x = r.random()
    if s.fmt == "dir" and x < 0.3:
        op = r.choice(["evil-file", "evil-copy", "subdir", "symlink-loop", "symlink-devzero", "symlink-dup", "empty"])
        ext = r.choice([".safetensors", ".npz", ".npy"])
        if op == "evil-file":
            files[f"{arg}/{r.choice(_EVIL_FILE_NAMES)}{ext}"] = b"garbage" * r.choice([0, 1, 3])
        elif op == "evil-copy":
            src = r.choice(s.members)
            files[f"{arg}/{r.choice(_EVIL_FILE_NAMES)}{src[src.rfind('.'):]}"] = s.files[src]
        elif op == "subdir":
            dirs.append(f"{arg}/sub{ext}")
        elif op == "symlink-loop":
            links[f"{arg}/loop{ext}"] = f"loop{ext}"
        elif op == "symlink-devzero":
            links[f"{arg}/zero{ext}"] = "/dev/zero"
        elif op == "symlink-dup":
            links[f"{arg}/dup.safetensors"] = "a.safetensors"
        else:
            files[f"{arg}/empty{ext}"] = b""
        mutation = "dir:" + op
    else:
        rel = r.choice(s.members)
        data, mutation = mutate_file(r, rel, s.files[rel], s.fmt == "npz-zip64")
        files[f"in/{rel}"] = data
        if s.fmt not in ("dir", "index") and r.random() < 0.06:
            evil = r.choice([*_EVIL_FILE_NAMES, "devzero"])
            new = f"in/{evil}.{rel.rsplit('.', 1)[1]}"
            if evil == "devzero":
                del files[f"in/{rel}"]
                links[new] = "/dev/zero"
            else:
                files[new] = files.pop(f"in/{rel}")
            arg = new
            mutation += "+filename:" + repr(evil)
    command = r.choices(["norms", "check", "info", "diff"], [4, 2, 2, 2])[0]
    fmt = "json" if r.random() < 0.6 else r.choice(COMMANDS[command])
    orig = f"orig/{s.arg}"
    files.update({f"orig/{k}": v for k, v in s.files.items()})
    if command == "diff":
        argv = ["diff", arg, orig, "--format", fmt]
        if r.random() < 0.3:
            argv += r.choice([["--rtol", "1e-6"], ["--atol", "0"], ["--min-cosine", "0.99"]])
    else:
        argv = [command, arg, "--format", fmt]
    oracle = True
    if command == "norms" and r.random() < 0.4:
        extra = r.choice([["-p", "1"], ["-p", "inf"], ["-p", "3"], ["--group-by", "1"], ["--jobs", "1"],
                          ["--sort", "name"], ["--top", "2"], ["--shards", "slices"], ["--shards", "replicas"]])
        argv += extra
        oracle = extra[0] not in ("--shards", "--group-by", "--top")
    if command == "check" and r.random() < 0.4:
        argv += r.choice([["--max-total", "1"], ["--fail-on-zero"], ["--max-share", "0.5"], ["--allow-nonfinite"]])
    return Case(index, s.fmt, mutation, command, argv, files, links, dirs, oracle)


def materialise(case: Case, root: Path) -> None:
    for rel, data in case.files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for rel, target in case.links.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
    for rel in case.dirs:
        (root / rel).mkdir(parents=True, exist_ok=True)


# --- the oracle --------------------------------------------------------------------------------------------------


class OracleRefused(Exception):
    """The oracle will not read the input (``skip``: not its verdict on the file, only a limit of the oracle)."""

    def __init__(self, message: str, skip: bool = False) -> None:
        super().__init__(message)
        self.skip = skip


@dataclass
class Truth:
    tensors: int = 0
    numel: int = 0
    nan: int = 0
    inf: int = 0
    linf: float = 0.0
    l1_parts: list[float] = field(default_factory=list)
    scaled: list[tuple[float, float]] = field(default_factory=list)  # (max, Σ(x/max)²) per tensor
    names: list[str] = field(default_factory=list)

    def add(self, name: str, arr: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            a = np.asarray(arr).astype(np.float64).ravel()
        self.tensors += 1
        self.numel += a.size
        self.names.append(name)
        fin = np.isfinite(a)
        self.nan += int(np.isnan(a).sum())
        self.inf += int(np.isinf(a).sum())
        f = np.abs(a[fin])
        if f.size:
            m = float(f.max())
            self.linf = max(self.linf, m)
            self.l1_parts.extend(f.tolist())
            if m > 0:
                self.scaled.append((m, math.fsum(((f / m) ** 2).tolist())))

    def totals(self) -> dict[str, float]:
        if self.nan:
            return {"l1": math.nan, "l2": math.nan, "linf": math.nan}
        if self.inf:
            return {"l1": math.inf, "l2": math.inf, "linf": math.inf}
        if not self.scaled:
            return {"l1": 0.0, "l2": 0.0, "linf": self.linf}
        m = max(s for s, _ in self.scaled)
        s2 = math.fsum(q * (s / m) ** 2 for s, q in self.scaled)
        with np.errstate(all="ignore"):
            l2 = float(np.float64(m) * np.sqrt(np.float64(s2)))
        try:
            l1 = math.fsum(self.l1_parts)
        except OverflowError:  # the exact sum is past the float range
            l1 = math.inf
        return {"l1": l1, "l2": l2, "linf": self.linf}


def _is_float(dt: np.dtype) -> bool:
    return (dt.kind == "f" and dt.itemsize <= 8) or dt in (np.dtype(x) for x in (
        ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2,
        *((ml_dtypes.float8_e8m0fnu,) if hasattr(ml_dtypes, "float8_e8m0fnu") else ())))


def _oracle_file(path: str, truth: Truth, seen: set[str]) -> None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        raise OracleRefused("not a regular non-empty file")
    low = path.lower()
    named: list[tuple[str, Callable[[], np.ndarray | None]]] = []
    if low.endswith(".safetensors"):
        import safetensors

        with open(path, "rb") as f:
            data = f.read()
        try:
            items = safetensors.deserialize(data)
            with safetensors.safe_open(path, "numpy") as sf:  # validates __metadata__ too
                sf.metadata()
        except Exception as e:
            raise OracleRefused(f"safetensors: {e}") from None
        for name, info in items:
            dt = _ST_NP.get(info["dtype"])
            raw = bytes(info["data"])
            is_float = info["dtype"] in _ST_FLOAT and dt is not None
            named.append((name, lambda raw=raw, dt=dt, is_float=is_float: np.frombuffer(raw, dt) if is_float else None))
    elif low.endswith(".npy"):
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = _npy_header(f, version)
            except Exception as e:
                raise OracleRefused(f"numpy header: {e}") from None
            if math.prod(shape) * dtype.itemsize > st.st_size:
                raise OracleRefused("numpy: data shorter than the header says")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise OracleRefused(f"numpy.load: {type(e).__name__}: {e}") from None
        named.append((os.path.splitext(os.path.basename(path))[0], lambda arr=arr: arr))
    elif low.endswith(".npz"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                for i in z.infolist():  # numpy allocates what a member's header says before reading
                    if i.filename.endswith(".npy"):
                        with z.open(i) as m:
                            shape, _, dtype = _npy_header(m, np.lib.format.read_magic(m))
                        if math.prod(shape) * dtype.itemsize > i.file_size:
                            raise OracleRefused(f"member {i.filename!r} is shorter than its header says")
                        if math.prod(shape) * dtype.itemsize > 1 << 28:
                            raise OracleRefused("a member's header claims over 256 MiB", skip=True)
                with np.load(path, allow_pickle=False) as npz:
                    for k in npz.files:
                        a = npz[k]
                        named.append((k, lambda a=a: a if isinstance(a, np.ndarray) else None))
        except OracleRefused:
            raise
        except Exception as e:
            raise OracleRefused(f"numpy.load npz: {type(e).__name__}: {e}") from None
    else:
        raise OracleRefused("unsupported suffix")
    for name, get in named:
        if name in seen:
            raise OracleRefused(f"tensor {name!r} in two files")
        seen.add(name)
        arr = get()
        if arr is not None and arr.dtype.type is np.void and arr.dtype.fields is None and arr.dtype.itemsize == 2:
            arr = arr.view(ml_dtypes.bfloat16)  # raw 2-byte values: read as bfloat16 by default (--void-as)
        if arr is not None and arr.dtype.fields is None and _is_float(arr.dtype):
            truth.add(name, arr)


def _npy_header(f: Any, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    try:  # numpy has no public reader for version 3.0 headers
        from numpy.lib._format_impl import _read_array_header  # type: ignore[attr-defined]
    except ImportError:  # numpy < 2
        _read_array_header = np.lib.format._read_array_header
    return _read_array_header(f, version)


def oracle(root: Path, arg: str) -> Truth:
    """What an independent reader says the input holds; raises OracleRefused when it will not read it."""
    try:
        return _oracle(root, arg)
    except OracleRefused:
        raise
    except (OSError, ValueError) as e:  # a path the OS or Python will not open
        raise OracleRefused(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # a limit of the oracle, not a verdict on the input
        raise OracleRefused(f"oracle failed: {type(e).__name__}: {e}", skip=True) from None


def _oracle(root: Path, arg: str) -> Truth:
    path = str(root / arg)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.lower().endswith((".safetensors", ".npz", ".npy"))
                       and os.path.isfile(os.path.join(path, n)))
        if not files:
            raise OracleRefused("empty directory")
    elif path.endswith(".index.json"):
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"), parse_constant=_reject_constant)
            wm = doc["weight_map"]
            assert isinstance(wm, dict) and wm and all(isinstance(v, str) and v for v in wm.values())
        except Exception as e:
            raise OracleRefused(f"index: {e!r}") from None
        base = os.path.dirname(path)
        files = sorted({os.path.normpath(os.path.join(base, v)) for v in wm.values()})
        if any(not os.path.realpath(f).startswith(str(root.resolve())) for f in files):
            raise OracleRefused("index points outside the case")
    else:
        files = [path]
    truth = Truth()
    seen: set[str] = set()
    inodes: set[tuple[int, int]] = set()
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise OracleRefused(str(e)) from None
        if (st.st_dev, st.st_ino) in inodes:
            raise OracleRefused("same file twice")
        inodes.add((st.st_dev, st.st_ino))
        before = set(seen)
        _oracle_file(f, truth, seen)
        if path.endswith(".index.json"):
            for name, shard in wm.items():
                if os.path.normpath(os.path.join(base, shard)) == f and name not in seen - before:
                    raise OracleRefused(f"weight_map names {name!r}, not in its shard")
    return truth


def _reject_constant(s: str) -> Any:
    raise ValueError(f"non-standard JSON constant {s}")


# --- running ----------------------------------------------------------------------------------------------------

DRIVER = r"""
import os, sys, json, signal, resource, traceback, time, warnings
warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
import gradinspect.cli as cli
for m in ("api", "pipeline", "sources", "engine", "executors", "diff", "check", "config", "report", "norms"):
    __import__("gradinspect." + m)
import gradinspect.formats as formats
for k in ("norms", "check", "diff", "info"):
    for n in formats.names(k):
        formats.get(n)
try:
    import gradinspect.formats.table, rich.console, rich.table, rich.text
except Exception:
    pass
proto_out = os.dup(1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    req = json.loads(line)
    out_fd = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_fd = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sys.stdout.flush(); sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(devnull, 0); os.dup2(out_fd, 1); os.dup2(err_fd, 2)
            os.chdir(req["cwd"])
            resource.setrlimit(resource.RLIMIT_AS, (req["mem"], req["mem"]))
            signal.setitimer(signal.ITIMER_REAL, req["timeout"])
            try:
                cli.main([os.fsdecode(bytes.fromhex(a)) for a in req["argv"]])
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            for s in (sys.stdout, sys.stderr):
                try:
                    s.flush()
                except BaseException:
                    code = 120
        finally:
            os._exit(code)
    os.close(out_fd); os.close(err_fd)
    _, status, ru = os.wait4(pid, 0)
    res = {"exit": os.waitstatus_to_exitcode(status), "wall": time.monotonic() - t0, "maxrss_kib": ru.ru_maxrss}
    os.write(proto_out, (json.dumps(res) + "\n").encode())
"""

_SUBPROCESS = ("import resource as r, runpy, sys; r.setrlimit(r.RLIMIT_AS, ({mem}, {mem})); "
               "sys.argv[0] = 'gradinspect'; runpy.run_module('gradinspect', run_name='__main__', alter_sys=True)")


@dataclass
class Run:
    exit: int  # negative: killed by that signal
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    wall: float = 0.0


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "GITHUB_ACTIONS", "PYTHONWARNINGS"):
        env.pop(k, None)
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave --repo as it was
    return env


class Runner:
    """Runs CLI argv lists in ``cwd``: through a fork-server driver (``fork``) or a new interpreter
    each (``subprocess``)."""

    def __init__(self, repo: Path, python: str, mode: str, timeout: float, mem: int, scratch: Path) -> None:
        self.repo, self.python, self.mode, self.timeout, self.mem = repo, python, mode, timeout, mem
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def _driver(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([self.python, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, env=_env(self.repo), cwd=str(self.scratch))
        return self.proc

    def run(self, argv: list[str], cwd: Path, mode: str | None = None) -> Run:
        if (mode or self.mode) == "subprocess":
            return self._run_subprocess(argv, cwd)
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        req = {"argv": [os.fsencode(a).hex() for a in argv], "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
               "timeout": self.timeout, "mem": self.mem}
        p = self._driver()
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write((json.dumps(req) + "\n").encode())
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the fuzz driver died (is --repo a gradinspect checkout?)")
        res = json.loads(line)
        code = res["exit"]
        timed_out = code == -14  # SIGALRM: the timer fired
        return Run(code, out.read_bytes(), err.read_bytes(), timed_out, res["wall"])

    def _run_subprocess(self, argv: list[str], cwd: Path) -> Run:
        t0 = time.monotonic()
        try:
            p = subprocess.run(check=False, args=[self.python, "-c", _SUBPROCESS.format(mem=self.mem), *argv],
                               cwd=str(cwd),
                               env=_env(self.repo), stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout)
        except subprocess.TimeoutExpired as e:
            return Run(-9, e.stdout or b"", e.stderr or b"", True, time.monotonic() - t0)
        return Run(p.returncode, p.stdout, p.stderr, False, time.monotonic() - t0)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None


# --- judging ---------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


@dataclass
class Verdict:
    outcome: str  # ok | error-exit-2 | findings | failure
    failures: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    disagreement: str | None = None  # we accepted what the oracle refused
    stricter: str | None = None  # we refused what the oracle accepted
    compared: bool = False  # the numbers were compared with the oracle's


def _valid_by_construction(mutation: str) -> bool:
    """Seeds, and mutations that only change values in the data of a well-formed file (zips rebuilt whole)."""
    if "+filename:'devzero'" in mutation:
        return False
    return mutation == "none" or mutation.startswith(("values:", "npz-member:values:"))


def _strings(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for k, v in x.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


def _num(v: Any) -> float:
    if isinstance(v, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[v]
    return float(v)


def _close(ours: float, truth: float, rtol: float) -> bool:
    if math.isnan(truth) or math.isnan(ours):
        return math.isnan(truth) and math.isnan(ours)
    if math.isinf(truth) or math.isinf(ours):
        return ours == truth
    return abs(ours - truth) <= rtol * abs(truth) if truth else ours == 0.0


def _truth(case: Case, root: Path) -> Truth | OracleRefused | None:
    """The oracle's reading of a norms/check case's file, its refusal, or None (no oracle for this case)."""
    if not (case.oracle and case.command in ("norms", "check")):
        return None
    try:
        return oracle(root, case.argv[1])
    except OracleRefused as e:
        return e


def judge(case: Case, run: Run, truth: Truth | OracleRefused | None) -> Verdict:
    """The contract, applied to one run; ``truth`` is the oracle's result (None: not applicable)."""
    fails: list[tuple[str, str]] = []
    cmd = case.command
    fmt = case.argv[case.argv.index("--format") + 1] if "--format" in case.argv else "json"
    try:
        err = run.stderr.decode("utf-8")
    except UnicodeDecodeError as e:
        err = run.stderr.decode("utf-8", "replace")
        fails.append(("stderr-not-utf8", str(e)))
    if run.timed_out:
        return Verdict("failure", [("timeout", f"no exit within the time limit ({run.wall:.1f} s)")])
    if run.exit < 0:
        return Verdict("failure", [(f"signal-{-run.exit}", err.strip().splitlines()[-1] if err.strip() else "")])
    if "Traceback (most recent call last)" in err or "MemoryError" in err:
        last = [ln for ln in err.strip().splitlines() if ln and not ln.startswith(" ")][-1]
        kind = "memory" if "MemoryError" in err else "traceback"
        return Verdict("failure", [*fails, (kind, last)])
    # A line starting "::error::" in a CI log is a GitHub workflow command.  JSON escapes newlines; a CSV field
    # or XML text may legitimately hold one, so machine stdout is left to its own parser.
    shown = err + ("" if fmt in ("json", "csv", "junit") else run.stdout.decode("utf-8", "replace"))
    for ln in shown.split("\n"):
        if ln.startswith("::error::INJECTED"):
            fails.append(("workflow-command-injection", ("stderr: " if ln in err else "stdout: ") + ln))
            break
    if _CONTROL.search(err):
        fails.append(("control-char-stderr", repr(_CONTROL.search(err).group())))  # type: ignore[union-attr]
    allowed = {0, 2} | ({1} if cmd == "check" or (cmd == "diff" and any(
        o in case.argv for o in ("--rtol", "--atol", "--min-cosine"))) else set())
    if run.exit not in allowed:
        fails.append(("bad-exit-code", f"exit {run.exit} from {cmd}"))
        return Verdict("failure", fails)
    if run.exit == 2:
        lines = err.split("\n")
        if run.stdout:
            fails.append(("error-with-stdout", run.stdout[:80].decode("utf-8", "replace")))
        if not (len(lines) == 2 and lines[1] == "" and lines[0].startswith("Error: ")):
            fails.append(("error-not-one-line", (lines[0] if len(lines) > 0 else "")[:200]))
        if _valid_by_construction(case.mutation):
            fails.append(("valid-input-refused", lines[0][:200]))
        stricter = None
        if isinstance(truth, Truth) and cmd in ("norms", "check"):
            stricter = lines[0]
        return Verdict("failure" if fails else "error-exit-2", fails, stricter=stricter)
    # exit 0 or 1: output must parse; stderr only warnings
    bad = [ln for ln in err.split("\n")[:-1] if not ln.startswith("Warning: ")]
    if bad or (err and not err.endswith("\n")):
        fails.append(("stderr-not-warnings", (bad or [err])[0][:200]))
    try:
        out = run.stdout.decode("utf-8")
    except UnicodeDecodeError as e:
        fails.append(("stdout-not-utf8", str(e)))
        return Verdict("failure", fails)
    doc: Any = None
    if fmt == "json":
        try:
            doc = json.loads(out, parse_constant=_reject_constant)
        except ValueError as e:
            fails.append(("invalid-json", str(e)[:200]))
        if doc is not None:
            for s in _strings(doc):
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError:
                    fails.append(("json-lone-surrogate", repr(s)[:80]))
                    break
    elif fmt == "csv":
        try:
            rows = list(csv.reader(io.StringIO(out, newline="")))
        except csv.Error as e:
            fails.append(("csv-invalid", str(e)))
        else:
            if not rows or any(len(row) != len(rows[0]) for row in rows):
                fails.append(("csv-ragged", f"{len(rows)} rows"))
    elif fmt == "junit":
        try:
            ET.fromstring(out)
        except ET.ParseError as e:
            fails.append(("junit-invalid-xml", str(e)))
    if fmt in ("table", "text", "markdown", "github") and _CONTROL.search(out):
        fails.append(("control-char-stdout", repr(_CONTROL.search(out).group())))  # type: ignore[union-attr]
    if not out:
        fails.append(("empty-stdout", ""))
    if isinstance(doc, dict) and "ok" in doc and doc["ok"] != (run.exit == 0):
        fails.append(("ok-disagrees-with-exit", f"ok={doc['ok']} exit={run.exit}"))
    if isinstance(doc, dict) and cmd == "check" and run.exit == 1 and not doc.get("findings"):
        fails.append(("exit-1-without-findings", ""))
    verdict = Verdict("failure" if fails else ("findings" if run.exit == 1 else "ok"), fails)
    if cmd in ("norms", "check") and isinstance(truth, OracleRefused):
        if not truth.skip:
            verdict.disagreement = str(truth)
    elif cmd in ("norms", "check") and isinstance(truth, Truth) and isinstance(doc, dict):
        rep = doc.get("report", doc)
        fails += _compare(rep, truth, "--group-by" not in case.argv and "--top" not in case.argv)
        verdict.compared = True
        if fails:
            verdict.outcome, verdict.failures = "failure", fails
    return verdict


def _as_json_text(name: str) -> str:
    """A name as gradinspect's JSON spells it: a byte that is not UTF-8 (a PEP 383 surrogate
    U+DC80..U+DCFF) as the text \\xNN, any other lone surrogate as the text \\uNNNN."""
    def one(c: str) -> str:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:
            return f"\\x{o - 0xDC00:02x}"
        return f"\\u{o:04x}" if 0xD800 <= o <= 0xDFFF else c

    return "".join(one(c) for c in name)


def _compare(rep: dict, truth: Truth, rows: bool) -> list[tuple[str, str]]:
    try:
        total = rep["total"]
        got = {k: _num(total[k]) for k in ("l1", "l2", "linf")}
        counts = {k: total[k] for k in ("tensors", "numel", "nan", "inf")}
    except (KeyError, TypeError, ValueError) as e:
        return [("report-shape", repr(e))]
    want = truth.totals()
    out = []
    for k, rtol in (("l2", 1e-9), ("l1", 1e-9), ("linf", 0.0)):
        if not _close(got[k], want[k], rtol):
            out.append(("wrong-result", f"total.{k} {got[k]!r}, oracle {want[k]!r}"))
    expect = {"tensors": truth.tensors, "numel": truth.numel, "nan": truth.nan, "inf": truth.inf}
    for k, v in expect.items():
        if counts[k] != v:
            out.append(("wrong-result", f"total.{k} {counts[k]!r}, oracle {v!r}"))
    # zipfile cuts member names at a NUL byte; compare names (on both sides) the way it reads them.
    if rows and sorted(t["name"].split("\0")[0] for t in rep.get("tensors", [])) != sorted(
            _as_json_text(n.split("\0")[0]) for n in truth.names):
        out.append(("wrong-result", "tensor names differ from the oracle's"))
    return [("wrong-result", "; ".join(d for _, d in out))] if out else []


# --- the campaign ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    cases: int = 0
    seconds: float = 0.0
    by_format: Counter = field(default_factory=Counter)
    by_mutation: Counter = field(default_factory=Counter)
    by_command: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    failure_kinds: Counter = field(default_factory=Counter)
    failures: dict[str, dict] = field(default_factory=dict)  # dedup key -> first example (+ count)
    disagreements: dict[str, dict] = field(default_factory=dict)
    stricter: Counter = field(default_factory=Counter)
    compared: int = 0  # cases whose totals were checked against the oracle
    disagreement_cases: int = 0


def _norm_line(text: str, case_dir: str) -> str:
    text = text.replace(case_dir + "/", "").replace(case_dir, "")
    return re.sub(r"[0-9]+", "N", re.sub(r"\\x[0-9a-f]{2}|0x[0-9a-f]+", "0xN", text))[:160]


# Kinds whose signature is their detail (the exception, the character), not the first stderr line.
_DETAIL_KINDS = ("traceback", "memory", "wrong-result", "control-char-stdout", "control-char-stderr",
                 "workflow-command-injection", "timeout", "json-lone-surrogate")


def _mutation_family(m: str) -> str:
    m = m.split("+")[0]
    parts = m.split(":")
    return ":".join(parts[:2]) if parts[0] in ("st-header", "npy-header", "npz-member", "zip-struct", "index", "dir") \
        else parts[0].split("=")[0]


def _save(out: Path, sub: str, key: str, case: Case, root: Path, info: dict) -> str:
    h = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    dest = out / sub / f"{re.sub(r'[^a-z0-9-]', '_', info.get('kind', 'x'))}-{case.command}-{h}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(root, dest / "case", symlinks=True)
    (dest / "failure.json").write_text(json.dumps(info, indent=2, ensure_ascii=True) + "\n")
    return str(dest)


def _reproduce(case: Case, dest: str) -> str:
    argv = " ".join(_shell_quote(a) for a in case.argv)
    return f"cd {dest}/case && PYTHONPATH=REPO python -m gradinspect {argv}"


def _shell_quote(a: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./=+-]+", a):
        return a
    if all(c.isprintable() for c in a):
        return "'" + a.replace("'", "'\\''") + "'"
    return "$'" + "".join(c if c.isprintable() and c not in "'\\" else
                          "".join(f"\\x{b:02x}" for b in os.fsencode(c)) for c in a) + "'"


def run(cases: int | None = None, seconds: float | None = None, seed: int = 0, jobs: int = 2,
        out: Path = DEFAULT_OUT, repo: Path = DEFAULT_REPO, python: str = sys.executable, mode: str = "fork",
        timeout: float = 10.0, mem_mib: int = 2048, confirm: bool = True,
        log: Callable[[str], None] | None = None) -> Result:
    """Run ``cases`` cases (or as many as fit in ``seconds``) and return the counts and distinct failures."""
    assert (cases is None) != (seconds is None), "give cases or seconds"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"work-{os.getpid()}"
    seeds = corpus(seed)
    res = Result()
    lock = threading.Lock()
    counter = iter(range(cases if cases is not None else 1 << 62))
    t0 = time.monotonic()
    deadline = t0 + seconds if seconds is not None else math.inf
    verdicts: dict[int, tuple[Case, Verdict]] = {}
    first: dict[str, tuple[Case, Run, Verdict]] = {}
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        runner = Runner(Path(repo), python, mode, timeout, mem_mib << 20, work / f"scratch-{w}")
        try:
            while time.monotonic() < deadline and not errors:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                case = make_case(seed, i, seeds)
                root = work / f"case-{w}"
                if root.exists():
                    shutil.rmtree(root)
                root.mkdir(parents=True)
                materialise(case, root)
                r = runner.run(case.argv, root)
                truth = _truth(case, root)
                try:
                    v = judge(case, r, truth)
                except Exception as e:  # a bug here must not stop a campaign: report it as such
                    v = Verdict("failure", [("harness-error", f"{type(e).__name__}: {e}")])
                with lock:
                    verdicts[i] = (case, v)
                    for kind, detail in v.failures:
                        sig = detail if kind in _DETAIL_KINDS or kind.startswith("signal") else \
                            r.stderr.decode("utf-8", "replace").split("\n")[0]
                        if kind == "workflow-command-injection":
                            sig = detail.split(":")[0]  # the stream; the message after the name varies
                        elif kind == "wrong-result":
                            sig = ",".join(sorted({d.split(" ")[0] for d in detail.split("; ")}))  # which totals
                        key = f"{case.command}|{kind}|{_norm_line(sig, str(root))}"
                        if key not in first:
                            info = _info(case, r, v, kind, detail, seed)
                            dest = _save(out, "failures", key, case, root, info)
                            info["saved"] = dest
                            info["reproduce"] = _reproduce(case, dest)
                            first[key] = (case, r, v)
                            res.failures[key] = info
                            if log:
                                log(f"FAIL #{i} {case.fmt} {case.mutation} {case.command}: {kind}: {detail[:100]}")
                        res.failures[key]["count"] = res.failures[key].get("count", 0) + 1
                    if v.disagreement:
                        key = re.sub(r"`[^`]*`|'[^']*'", "X", _norm_line(v.disagreement, str(root)))
                        if key not in res.disagreements:
                            info = _info(case, r, v, "disagreement", v.disagreement, seed)
                            info["saved"] = _save(out, "disagreements", key, case, root, info)
                            res.disagreements[key] = info
                        res.disagreements[key]["count"] = res.disagreements[key].get("count", 0) + 1
        except BaseException as e:  # surface driver problems instead of hanging
            errors.append(e)
        finally:
            runner.close()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(jobs)]
    for t in threads:
        t.start()
    last = time.monotonic()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
        if log and time.monotonic() - last > 30:
            last = time.monotonic()
            log(f"... {len(verdicts)} cases, {len(res.failures)} distinct failures, {time.monotonic() - t0:.0f} s")
    if errors:
        raise errors[0]
    res.seconds = time.monotonic() - t0
    for i in sorted(verdicts):
        case, v = verdicts[i]
        res.cases += 1
        res.by_format[case.fmt] += 1
        res.by_mutation[(case.fmt, _mutation_family(case.mutation))] += 1
        res.by_command[case.command] += 1
        res.outcomes[v.outcome] += 1
        for kind, _ in v.failures:
            res.failure_kinds[kind] += 1
        if v.disagreement:
            res.disagreement_cases += 1
        if v.compared:
            res.compared += 1
        if v.stricter:
            res.stricter[re.sub(r"^Error: [^:]*: ", "Error: FILE: ", _norm_line(v.stricter, ""))[:120]] += 1
    if confirm and mode == "fork":
        runner = Runner(Path(repo), python, "subprocess", timeout, mem_mib << 20, work / "confirm")
        for key, (case, _, _) in first.items():
            root = Path(res.failures[key]["saved"]) / "case"
            r2 = runner.run(case.argv, root)
            truth = _truth(case, root)
            try:
                kinds = {k for k, _ in judge(case, r2, truth).failures}
            except Exception as e:
                kinds = {f"harness-error: {e}"}
            res.failures[key]["confirmed"] = res.failures[key]["kind"] in kinds
            Path(res.failures[key]["saved"], "failure.json").write_text(
                json.dumps(res.failures[key], indent=2, ensure_ascii=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary_dict(res, seed, jobs, repo, mode), indent=2) + "\n")
    return res


def _info(case: Case, r: Run, v: Verdict, kind: str, detail: str, seed: int) -> dict:
    return {"kind": kind, "detail": detail, "seed": seed, "case": case.index, "format": case.fmt,
            "mutation": case.mutation, "command": case.command, "argv": case.argv, "exit": r.exit,
            "stdout_head": r.stdout[:600].decode("utf-8", "backslashreplace"),
            "stderr_head": r.stderr[:1500].decode("utf-8", "backslashreplace"),
            "all_failures": v.failures}


def summary_dict(res: Result, seed: int, jobs: int, repo: Path, mode: str) -> dict:
    return {"seed": seed, "jobs": jobs, "repo": str(repo), "mode": mode, "cases": res.cases, "seconds": res.seconds,
            "by_format": dict(res.by_format), "by_command": dict(res.by_command),
            "by_mutation": {f"{a} {b}": n for (a, b), n in sorted(res.by_mutation.items())},
            "outcomes": dict(res.outcomes), "compared_with_oracle": res.compared,
            "disagreement_cases": res.disagreement_cases, "failure_kinds": dict(res.failure_kinds),
            "failures": list(res.failures.values()), "disagreements": list(res.disagreements.values()),
            "stricter_than_oracle": dict(res.stricter.most_common(30))}


def describe(res: Result, top_mutations: bool = True) -> str:
    lines = [f"{res.cases} cases in {res.seconds:.1f} s ({res.cases / max(res.seconds, 1e-9):.1f}/s)"]
    lines.append("by format:  " + ", ".join(f"{k} {v}" for k, v in sorted(res.by_format.items())))
    lines.append("by command: " + ", ".join(f"{k} {v}" for k, v in sorted(res.by_command.items())))
    if top_mutations:
        lines.append("by format and mutation:")
        fmt_w = max((len(a) for a, _ in res.by_mutation), default=0)
        for (a, b), n in sorted(res.by_mutation.items()):
            lines.append(f"  {a:<{fmt_w}}  {b:<28} {n}")
    lines.append("outcomes:   " + ", ".join(f"{k} {v}" for k, v in sorted(res.outcomes.items())))
    lines.append(f"exact:      {res.compared} accepted cases checked against the oracle; "
                 f"{res.disagreement_cases} accepted where the oracle refused (disagreements)")
    if res.stricter:
        lines.append("refused where the oracle reads the file (review; top 8):")
        lines += [f"  {n:5}  {msg}" for msg, n in res.stricter.most_common(8)]
    lines.append("failures by kind: " + (", ".join(f"{k} {v}" for k, v in res.failure_kinds.most_common()) or "none"))
    for info in res.failures.values():
        conf = {True: " [confirmed]", False: " [NOT reproduced in a fresh interpreter]"}.get(info.get("confirmed"), "")
        where = f"{info['command']}, {info['format']}, {info['mutation']}"
        lines.append(f"  {info['kind']} x{info['count']} ({where}){conf}")
        lines.append(f"      {info['detail'][:200]!r}")
        lines.append(f"      {info['reproduce']}")
    if res.disagreements:
        lines.append("disagreements (gradinspect read what the oracle refused; review):")
        for info in res.disagreements.values():
            lines.append(f"  x{info['count']} {info['format']} {info['mutation']}: {info['detail'][:150]}")
            lines.append(f"      {info['saved']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cases", type=int, help="number of cases (deterministic for a seed)")
    g.add_argument("--seconds", type=float, help="run until this many seconds have passed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where failing inputs go (default {DEFAULT_OUT})")
    ap.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="the gradinspect checkout to run (PYTHONPATH)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs gradinspect")
    ap.add_argument("--mode", choices=["fork", "subprocess"], default="fork",
                    help="fork: a fork-server per job (fast); subprocess: a new interpreter per case (faithful)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    ap.add_argument("--mem-mib", type=int, default=2048, help="RLIMIT_AS per case")
    ap.add_argument("--no-confirm", action="store_true", help="do not re-run distinct failures in a fresh interpreter")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args(argv)
    if a.cases is None and a.seconds is None:
        a.cases = 1000
    log = None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = run(cases=a.cases, seconds=a.seconds, seed=a.seed, jobs=a.jobs, out=a.out, repo=a.repo.resolve(),
              python=a.python, mode=a.mode, timeout=a.timeout, mem_mib=a.mem_mib, confirm=not a.no_confirm, log=log)
    print(f"seed {a.seed}, jobs {a.jobs}, mode {a.mode}, repo {a.repo.resolve()}")
    print(describe(res))
    print(f"details: {a.out / 'summary.json'}")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
