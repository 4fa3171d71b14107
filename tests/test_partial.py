"""``--part I/N --partial OUT`` and ``gradinspect merge`` (issue 11 §1): N parts merged print the plain run's
report, byte for byte, with its exit code; parts that do not belong together are exit 2, naming the part."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import Result
from safetensors.numpy import save_file

from conftest import ROOT, exact_sums, rel_sqrt, run
from gradinspect import formats

SAMPLE = ROOT / "sample_data"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chunked, batched, deflated and stored-npz tensors; a tied copy in three encodings; replicas
    (one copy differing, one holding NaN); a second model to diff against."""
    root = tmp_path_factory.mktemp("partial")
    g = np.random.default_rng(11)
    emb = g.standard_normal((500, 64)).astype(np.float32)
    m = root / "m"
    m.mkdir()
    save_file({"w1": g.standard_normal(300_001).astype(np.float32) * 1e-3, "emb": emb,
               "b1": g.standard_normal(10).astype(np.float32), "step": np.array(7, np.int64)},
              str(m / "a.safetensors"))
    save_file({"lm_head": emb.copy(), "w2": g.standard_normal(200_000).astype(ml_dtypes.bfloat16),
               "n": g.standard_normal(7).astype(np.float16)}, str(m / "b.safetensors"))
    np.savez_compressed(m / "c.npz", z1=g.standard_normal(150_000).astype(np.float32), z2=np.ones(5, np.float32),
                        z3=emb.copy())
    np.savez(m / "d.npz", s1=g.standard_normal(140_000).astype(np.float32), s2=np.arange(3, dtype=np.float32))
    (m / "notes.txt").write_text("a file gradinspect skips, with a warning\n")
    m2 = root / "m2"
    shutil.copytree(m, m2)
    a = dict(np.load(m / "c.npz"))
    a["z1"] = a["z1"] * np.float32(1.0 + 1e-7)
    np.savez_compressed(m2 / "c.npz", **a)
    r = root / "r"
    r.mkdir()
    base = {"x": g.standard_normal(200_000).astype(np.float32), "y": g.standard_normal(33).astype(np.float32),
            "z": g.standard_normal(1000).astype(np.float32)}
    save_file(base, str(r / "rank0.safetensors"))
    other = {k: v.copy() for k, v in base.items()}
    other["y"][3] += np.float32(1e-3)
    other["z"][10] = np.nan
    save_file(other, str(r / "rank1.safetensors"))
    save_file(base, str(root / "single.safetensors"))
    return root


def _cases(d: Path) -> dict[str, list[str]]:
    m, m2, r = str(d / "m"), str(d / "m2"), str(d / "r")
    return {
        "norms": ["norms", m],
        "norms-grouped": ["norms", m, "--group-by", "1", "--sort", "name", "--top", "3", "-p", "1"],
        "norms-dedup-p3": ["norms", m, "--dedup", "-p", "3", "--max-norm", "0.5", "--loss-scale", "8"],
        "norms-replicas": ["norms", r, "--shards", "replicas"],
        "norms-slices": ["norms", str(SAMPLE / "fsdp"), "--shards", "slices", "--sort", "norm"],
        "check": ["check", m, "--max-total", "1", "--fail-on-zero"],
        "check-replicas": ["check", r, "--shards", "replicas", "--allow-nonfinite"],
        "diff": ["diff", m, m2, "--rtol", "1e-9"],
        "diff-replicas": ["diff", r, str(d / "single.safetensors"), "--shards-a", "replicas", "--allow-missing"],
        "diff-strip": ["diff", r, str(d / "single.safetensors"), "--shards-a", "slices", "--strip-prefix", "x"],
        "trend": ["trend", str(SAMPLE / "run" / "step_*.safetensors"), "--group-by", "2", "--fail-on", "spike",
                  "--window", "5"],
        "trend-p3": ["trend", str(SAMPLE / "run" / "step_00000[0-9].safetensors"), "-p", "3", "--group-by", "1"],
    }


def _table(args: list[str]) -> str:
    return "text" if args[0] == "check" else "table"


def _parts(tmp: Path, args: list[str], n: int, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
    """Run the N parts (in a shuffled order, each with its own --jobs); their files, shuffled."""
    rnd = random.Random(seed)
    order = list(range(n))
    rnd.shuffle(order)
    out = []
    for i in order:
        path = tmp / f"part{i}-of-{n}.json"
        jobs = [] if args[0] == "diff" else ["--jobs", str(rnd.randint(1, 4))]
        res = run(*args, "--part", f"{i}/{n}", "--partial", path, *jobs, *extra)
        assert res.exit_code == 0, res.output
        assert res.stdout == ""
        out.append(str(path))
    rnd.shuffle(out)
    return out


def _same(plain_args: list[str], parts: list[str], fmt: str) -> int:
    plain = run(*plain_args, "--format", fmt)
    merged = run("merge", *parts, "--format", fmt)
    assert plain.exit_code in (0, 1), plain.output
    assert merged.stdout_bytes == plain.stdout_bytes
    assert merged.stderr_bytes == plain.stderr_bytes  # the same warnings
    assert merged.exit_code == plain.exit_code
    return plain.exit_code


CASES = ["norms", "norms-grouped", "norms-dedup-p3", "norms-replicas", "norms-slices", "check", "check-replicas",
         "diff", "diff-replicas", "diff-strip", "trend", "trend-p3"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_parts_merge_to_the_plain_run(data: Path, tmp_path: Path, case: str, n: int) -> None:
    args = _cases(data)[case]
    parts = _parts(tmp_path, args, n, seed=n * 31 + len(case))
    docs = [json.loads(Path(p).read_text()) for p in parts]
    done = sorted(row[0] for d in docs for row in d["results"])
    assert done == list(range(docs[0]["units"]))  # every work unit in exactly one part
    if n > 1 and docs[0]["units"] >= n:
        assert sum(1 for d in docs if d["results"]) > 1  # the work is shared
    codes = {_same(args, parts, fmt) for fmt in ("json", _table(args))}
    assert len(codes) == 1


def test_the_cases_cover_findings_and_warnings(data: Path) -> None:
    """The cases above mean something: findings (exit 1), copies, replicas that differ, a re-read step."""
    cases = _cases(data)
    assert run(*cases["check"]).exit_code == 1
    assert run(*cases["diff"]).exit_code == 1
    assert run(*cases["trend"]).exit_code == 1
    norms = json.loads(run(*cases["norms"], "-f", "json").stdout)
    assert {r["name"]: r["duplicate_of"] for r in norms["tensors"] if r["duplicate_of"]} == {
        "lm_head": "emb", "z3": "emb"}  # raw, batched-away and deflated copies of one tensor
    assert "skipped 1 file" in run(*cases["norms"]).stderr
    warned = run(*cases["norms-replicas"]).stderr
    assert "copies of y differ" in warned and "copies of z hold NaN/inf" in warned
    assert "copies of z hold NaN/inf" in run(*cases["diff-replicas"]).stderr


@pytest.mark.parametrize("case", ["norms", "diff", "check"])
def test_more_parts_than_work(data: Path, tmp_path: Path, case: str) -> None:
    args = _cases(data)[case]
    parts = _parts(tmp_path, args, 60, seed=5)
    empty = [p for p in parts if not json.loads(Path(p).read_text())["results"]]
    assert empty  # most parts have nothing to do, and still count
    _same(args, parts, "json")


@pytest.mark.parametrize("command", ["norms", "check", "diff", "trend"])
def test_every_format(data: Path, tmp_path: Path, command: str) -> None:
    args = _cases(data)[command]
    parts = _parts(tmp_path, args, 3, seed=1)
    plots = importlib.util.find_spec("matplotlib") is not None
    for fmt in formats.names(command):
        if formats.get(fmt).binary or fmt in ("html", "svg"):
            if fmt in ("png", "svg") and not plots:
                continue  # needs gradinspect[plot]: covered where matplotlib is installed
            a, b = tmp_path / f"plain.{fmt}", tmp_path / f"merged.{fmt}"
            assert run(*args, "--output", a).exit_code == run("merge", *parts, "--output", b).exit_code
            assert a.read_bytes() == b.read_bytes()
        else:
            _same(args, parts, fmt)


def test_format_given_to_the_parts_is_merge_default(data: Path, tmp_path: Path) -> None:
    args = _cases(data)["norms"]
    parts = _parts(tmp_path, args, 2, seed=2, extra=("--format", "csv"))
    assert run("merge", *parts).stdout_bytes == run(*args, "--format", "csv").stdout_bytes
    assert run("merge", *parts, "-f", "json").stdout_bytes == run(*args, "--format", "json").stdout_bytes


def test_merged_global_norm_against_the_oracle(data: Path, tmp_path: Path) -> None:
    parts = _parts(tmp_path, ["norms", str(data / "m")], 7, seed=3)
    report = json.loads(run("merge", *parts, "-f", "json").stdout)
    s2 = 0
    for f in sorted((data / "m").iterdir()):
        if f.suffix == ".txt":
            continue
        if f.suffix == ".npz":
            arrays = list(np.load(f).values())
        else:
            from safetensors.numpy import load_file

            arrays = [a for a in load_file(str(f)).values() if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16]
        for a in arrays:
            s2 += exact_sums(a)[1]
    assert rel_sqrt(report["total"]["l2"], s2) <= 1e-12


def _part(args: list[str], tmp: Path, i: int, n: int, name: str | None = None, cwd: Path | None = None) -> str:
    path = tmp / (name or f"p{i}.json")
    res = run(*args, "--part", f"{i}/{n}", "--partial", path, cwd=cwd)
    assert res.exit_code == 0, res.output
    return str(path)


def test_relative_paths_and_no_files_needed(data: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(data / "m", work / "m")
    args = ["norms", "m", "--dedup"]
    parts = [_part(args, tmp_path, i, 3, cwd=work) for i in range(3)]
    plain = run(*args, "-f", "json", cwd=work)
    shutil.rmtree(work)  # merge reads the parts only
    merged = run("merge", *parts, "-f", "json")
    assert merged.exit_code == 0, merged.output
    assert merged.stdout_bytes == plain.stdout_bytes
    assert json.loads(merged.stdout)["sources"][0].startswith("m/")


# --- parts that do not belong together: exit 2, one line naming the part -----------------------------------


def _error(res: Result) -> str:
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return str(lines[0])


def test_missing_and_duplicate_parts(data: Path, tmp_path: Path) -> None:
    args = _cases(data)["norms"]
    p = [_part(args, tmp_path, i, 3) for i in range(3)]
    assert re.search(r"1 of 3 parts missing: 1/3", _error(run("merge", p[0], p[2])))
    dup = tmp_path / "again.json"
    shutil.copy(p[1], dup)
    line = _error(run("merge", *p, dup))
    assert "part 1/3 twice" in line and "again.json" in line
    assert "3 of 3 parts missing" not in line


def test_parts_of_other_options_or_inputs(data: Path, tmp_path: Path) -> None:
    m = str(data / "m")
    a = _part(["norms", m], tmp_path, 0, 2, "a.json")
    b = _part(["norms", m, "-p", "1"], tmp_path, 1, 2, "b.json")
    line = _error(run("merge", a, b))
    assert "b.json" in line and "options differ" in line and "norm_type" in line
    c = _part(["norms", str(data / "m2")], tmp_path, 1, 2, "c.json")
    assert "paths" in _error(run("merge", a, c))
    d = _part(["check", m], tmp_path, 1, 2, "d.json")
    assert "command differ" in _error(run("merge", a, d))
    e = _part(["norms", m], tmp_path, 1, 3, "e.json")
    assert "one of 2" in _error(run("merge", a, e))


def test_a_file_changed_between_parts(data: Path, tmp_path: Path) -> None:
    m = tmp_path / "m"
    shutil.copytree(data / "m", m)
    args = ["norms", str(m)]
    p0 = _part(args, tmp_path, 0, 2)
    f = m / "a.safetensors"
    st = f.stat()
    raw = bytearray(f.read_bytes())
    raw[-8:] = bytes(8)  # other data, same size, a later mtime
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p1 = _part(args, tmp_path, 1, 2)
    line = _error(run("merge", p0, p1))
    assert "a.safetensors" in line and "changed between parts" in line and "mtime_ns" in line


def _resealed(doc: dict) -> str:
    """``doc`` with a valid checksum: well-formed JSON that gradinspect did not write."""
    import hashlib

    body = {k: v for k, v in doc.items() if k != "checksum"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return json.dumps({**body, "checksum": hashlib.sha256(canon).hexdigest()})


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "report", "empty", "absent", "no-field",
                                    "bad-part", "bad-stats"])
def test_a_damaged_or_foreign_partial(data: Path, tmp_path: Path, damage: str) -> None:
    args = _cases(data)["norms"]
    p0, p1 = _part(args, tmp_path, 0, 2), _part(args, tmp_path, 1, 2)
    raw = Path(p1).read_bytes()
    if damage == "truncated":
        Path(p1).write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":
        doc = json.loads(raw)
        doc["results"][0][3][0][2][5] = "0x1.0000000000001p+0"  # one sum changed: the checksum no longer holds
        Path(p1).write_text(json.dumps(doc))
    elif damage == "foreign":
        Path(p1).write_text(json.dumps({"format": "something/1"}))
    elif damage == "report":
        Path(p1).write_bytes(run(*args, "-f", "json").stdout_bytes)
    elif damage == "empty":
        Path(p1).write_bytes(b"")
    elif damage == "absent":
        os.unlink(p1)
    else:  # resealed with a valid checksum, but not what gradinspect writes
        doc = json.loads(raw)
        if damage == "no-field":
            del doc["results"]
        elif damage == "bad-part":
            doc["part"] = [2, 2]
        else:
            doc["results"][0][3][0][2] = ["x"]
        Path(p1).write_text(_resealed(doc))
    line = _error(run("merge", p0, p1))
    expect = {"truncated": "not JSON", "flipped": "checksum", "foreign": "'something/1'",
              "report": "no gradinspect.partial/1 format field", "empty": "not JSON", "absent": "cannot read",
              "no-field": "field 'results' is missing", "bad-part": "part number",
              "bad-stats": "not a usable partial result"}
    assert expect[damage] in line and p1 in line


def test_a_corrupt_member_split_between_parts(data: Path, tmp_path: Path) -> None:
    """A stored npz member's CRC-32 is combined from chunks that different parts read: merge checks it, and
    says what the plain run says."""
    m = tmp_path / "m"
    m.mkdir()
    np.savez(m / "d.npz", s1=np.random.default_rng(2).standard_normal(140_000).astype(np.float32))
    raw = bytearray((m / "d.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x40
    (m / "d.npz").write_bytes(bytes(raw))
    args = ["norms", str(m)]
    parts = [_part(args, tmp_path, i, 2) for i in range(2)]
    assert all(json.loads(Path(p).read_text())["results"] for p in parts)  # each part read one chunk
    plain = run(*args)
    assert "CRC-32 mismatch" in _error(plain)
    assert _error(run("merge", *parts)) == _error(plain)


def test_part_usage_errors(data: Path, tmp_path: Path) -> None:
    m = str(data / "m")
    for args, said in [(["--part", "0/2"], "--part and --partial go together"),
                       (["--partial", tmp_path / "x.json"], "--part and --partial go together"),
                       (["--part", "2/2", "--partial", tmp_path / "x.json"], "I counts from 0"),
                       (["--part", "1-2", "--partial", tmp_path / "x.json"], "is not I/N"),
                       (["--part", "0/2", "--partial", tmp_path / "x.json", "--output", tmp_path / "r.json"],
                        "give --output to `gradinspect merge`")]:
        for command in (["norms", m], ["check", m], ["diff", m, m], ["trend", m]):
            res = run(*command, *args)
            assert res.exit_code == 2 and res.stdout == "" and said in res.stderr, (command, args, res.output)
    assert not (tmp_path / "x.json").exists()
    res = run("trend", m, "--follow", "--part", "0/2", "--partial", tmp_path / "x.json")
    assert res.exit_code == 2 and "not with --part" in res.stderr
    f = data / "single.safetensors"
    res = run("norms", f, "--part", "0/1", "--partial", f)
    assert res.exit_code == 2 and "--partial names an input file" in res.stderr
    res = run("merge", _part(["norms", m], tmp_path, 0, 1), "--format", "junit")
    assert res.exit_code == 2 and "not a norms format" in res.stderr


def test_help_says_where_parts_count_from() -> None:
    for command in ("norms", "check", "diff", "trend"):
        text = " ".join(run(command, "--help").stdout.split())
        assert "--part I/N" in text and "I counts from 0" in text and "--partial OUT" in text


def test_the_partial_file(data: Path, tmp_path: Path) -> None:
    """Exact sums as float.hex, the identity of every file, the command, options, I, N and the plan's digest."""
    path = _part(["norms", str(data / "m"), "-p", "inf"], tmp_path, 1, 3)
    doc = json.loads(Path(path).read_text())
    assert doc["format"] == "gradinspect.partial/1" and doc["command"] == "norms" and doc["part"] == [1, 3]
    assert doc["options"]["norm_type"] == {"f": "inf"} and len(doc["plan"]) == 64
    f = data / "m" / "a.safetensors"
    ident = doc["files"][str(f)]
    assert ident["path"] == str(f) and ident["size"] == f.stat().st_size and ident["mtime_ns"] == f.stat().st_mtime_ns
    assert re.fullmatch(r"[0-9a-f]{64}", ident["header"])
    assert doc["results"] and all(re.fullmatch(r"-?0x[01]\.[0-9a-f]+p[-+]\d+|inf", row[3])
                                  for _, _, _, res in doc["results"] for row in [r[2] for r in res])
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- the README's examples ---------------------------------------------------------------------------------


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_readme_xargs_example_runs(tmp_path: Path) -> None:
    """The README's `xargs -P` example, run as written by bash with `gradinspect` on PATH."""
    if shutil.which("bash") is None or shutil.which("xargs") is None:
        pytest.skip("needs bash and xargs")
    script = _readme_block("xargs -P")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "gradinspect"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m gradinspect \"$@\"\n")
    shim.chmod(0o755)
    work = tmp_path / "w"
    shutil.copytree(SAMPLE / "run", work / "run")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "COLUMNS": "80", "NO_COLOR": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                          timeout=300, check=False)
    plain = run("trend", "run/step_*.safetensors", "--format", "json", cwd=work)
    assert proc.returncode == plain.exit_code, proc.stderr
    assert proc.stdout == plain.stdout_bytes


def test_readme_slurm_example_is_the_same_recipe() -> None:
    script = _readme_block("#SBATCH --array=0-7")
    assert "--part $SLURM_ARRAY_TASK_ID/8 --partial parts/$SLURM_ARRAY_TASK_ID.json" in " ".join(script.split())
    assert "gradinspect merge parts/*.json" in _readme_block("--dependency=afterok")


def test_any_executor_runs_a_part(data: Path, tmp_path: Path) -> None:
    """A part is a subset of the plan's units: threads and a process pool write the same partial file."""
    from gradinspect.executors import ProcessExecutor, ThreadExecutor
    from gradinspect.partial import run_part

    options = dict(paths=(str(data / "m"),), norm_type=2.0, max_norm=1.0, eps=1e-6, sort="share", top=None,
                   include=(), exclude=(), group_by=None, group_sep=".", shards=None, dedup=False, loss_scale=None,
                   allow_outside_index=False)
    a, b = tmp_path / "threads.json", tmp_path / "processes.json"
    run_part("norms", options, (1, 2), str(a), executor=ThreadExecutor(3))
    with ProcessExecutor(2) as pool:
        run_part("norms", options, (1, 2), str(b), executor=pool)
    assert json.loads(a.read_text())["results"]
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("void_as", [None, "skip", "float16"])
def test_void_arrays_merge_as_one_run_reads_them(tmp_path: Path, void_as: str | None) -> None:
    """Raw 2-byte numpy arrays (bfloat16 by default, or as --void-as says) merge to the plain run."""
    rng = np.random.default_rng(5)
    path = tmp_path / "v_5.npz"
    np.savez(path, a=rng.standard_normal((40, 30)).astype(ml_dtypes.bfloat16), b=rng.standard_normal(300))
    for command in ("norms", "trend"):
        args = [command, str(path), *(["--void-as", void_as] if void_as else [])]
        parts = _parts(tmp_path, args, 2, seed=3, extra=("--no-cache",) if command == "trend" else ())
        _same(args + (["--no-cache"] if command == "trend" else []), parts, "json")
        docs = [json.loads(Path(p).read_text()) for p in parts]
        assert {d["sets"][0]["void_as"] for d in docs} == {void_as}


def test_a_dumper_directory_of_several_steps_merges_as_one_run(tmp_path: Path) -> None:
    """A GradDumper directory (step_N_rankR files): each step's rank files travel with the parts."""
    rng = np.random.default_rng(8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for step in range(0, 50, 10):
        for rank, name in enumerate(("a", "b")):
            save_file({name: rng.standard_normal(200 + step).astype(np.float32)},
                      str(run_dir / f"step_{step:08d}_rank{rank}.safetensors"), metadata={"step": str(step)})
    args = ["trend", str(run_dir), "--no-cache"]
    plain = json.loads(run(*args, "--format", "json").stdout)
    assert [s["step"] for s in plain["steps"]] == [0, 10, 20, 30, 40]
    assert all(len(s["sources"]) == 2 for s in plain["steps"])
    for n in (2, 3):
        _same(args, _parts(tmp_path, args, n, seed=n), "json")


def test_torch_views_merge_as_one_run_reads_them(tmp_path: Path) -> None:
    """A .pt file's strided views (a transpose, an expand) keep their strides in the parts."""
    from ptwriter import Storage, T, save

    rng = np.random.default_rng(9)
    w = Storage(rng.standard_normal(300 * 200).astype(np.float32))
    b = Storage(rng.standard_normal(50).astype(np.float32))
    path = tmp_path / "g.pt"
    save({"w_t": T(w, 0, (200, 300), (1, 200)), "w": T(w, 0, (300, 200), (200, 1)),
          "b_expanded": T(b, 0, (4, 50), (0, 1))}, path)
    args = ["norms", str(path)]
    plain = json.loads(run(*args, "--format", "json").stdout)
    assert {t["name"] for t in plain["tensors"]} == {"w_t", "w", "b_expanded"}
    for n in (2, 3):
        _same(args, _parts(tmp_path, args, n, seed=n), "json")


def test_a_checkpoint_directory_merges_and_a_changed_chunk_file_is_seen(tmp_path: Path) -> None:
    """A distributed checkpoint (a directory, one container): parts merge to the plain run (metadata in its
    order), and a .distcp file rewritten between parts (same size) is exit 2 at merge."""
    ckpt = tmp_path / "step_0000"
    shutil.copytree(ROOT / "tests" / "data" / "dcp" / "ranks3" / "step_0000", ckpt)
    args = ["norms", str(ckpt)]
    _same(args, _parts(tmp_path, args, 3, seed=4), "json")
    p0 = _part(args, tmp_path, 0, 2, "c0.json")
    f = sorted(ckpt.glob("*.distcp"))[0]
    time_ns = f.stat().st_mtime_ns
    f.write_bytes(f.read_bytes())
    os.utime(f, ns=(time_ns + 1_000_000_000, time_ns + 1_000_000_000))
    p1 = _part(args, tmp_path, 1, 2, "c1.json")
    res = run("merge", p0, p1)
    assert res.exit_code == 2 and "changed" in _error(res), res.output
