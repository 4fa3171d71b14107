"""The statistics cache (issue 9 §5): warm runs are bit-for-bit cold runs, read no tensor data, and
nothing stale, corrupt, forged or foreign is ever trusted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import gradinspect.cache as cache_mod
import gradinspect.engine as engine
from conftest import ROOT, run, strict_json
from gradinspect.api import inspect
from gradinspect.cache import Cache
from gradinspect.errors import InputError
from gradinspect.runs import trend


@pytest.fixture(autouse=True)
def _settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written by a test are stored at once (the 2 s racy window is tested on its own)."""
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 0)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The source of every engine call (each reads tensor data)."""
    calls: list[str] = []
    real = engine.reduce_entries

    def counted(src, entries, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(src.path)
        return real(src, entries, *a, **k)

    monkeypatch.setattr(engine, "reduce_entries", counted)
    return calls


@pytest.fixture
def headers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every file whose header is parsed (opened as a source)."""
    import gradinspect.sources.paths as paths

    calls: list[str] = []
    real = paths.open_source

    def counted(path: str):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real(path)

    monkeypatch.setattr(paths, "open_source", counted)
    return calls


def _step(path: Path, seed: int, nan: bool = False) -> Path:
    r = np.random.default_rng(seed)
    t = {
        "a.w": r.standard_normal((33, 17)).astype(np.float32) * 10.0 ** r.integers(-3, 3),
        "a.b": r.standard_normal(5).astype(np.float32),
        "b.w": r.standard_normal(70_000).astype(ml_dtypes.bfloat16),
        "b.big": r.standard_normal(300_000).astype(np.float64) * 1e-30,
        "count": np.array([seed], dtype=np.int64),
    }
    if nan:
        t["a.b"][2] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return path


def _run(tmp_path: Path, n: int = 4) -> list[Path]:
    return [_step(tmp_path / "run" / f"step_{i:03d}.safetensors", i, nan=i == 2) for i in range(n)]


def _glob(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "step_*.safetensors")


def _trend_json(tmp_path: Path, *args: str) -> str:
    r = run("trend", _glob(tmp_path), "-f", "json", "-q", *args)
    assert r.exit_code == 0, r.output
    return r.stdout


def _entries(d: Path) -> list[Path]:
    """The file entries."""
    return sorted(p for p in d.iterdir() if p.suffix == ".json")


def _step_entries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".step")


def _drop_steps(d: Path) -> None:
    """Remove the step entries, so that the next run looks up its file entries."""
    for p in _step_entries(d):
        p.unlink()


# --- bit for bit, no reads ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [(), ("-p", "3"), ("-p", "inf", "--group-by", "1"), ("--loss-scale", "3")])
def test_warm_is_cold_bit_for_bit_and_reads_nothing(tmp_path: Path, reads: list[str], args: tuple) -> None:
    _run(tmp_path)
    cdir = tmp_path / "c"
    plain = _trend_json(tmp_path, "--no-cache", *args)
    assert len(reads) == 4
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir), *args)
    assert len(reads) == 8 and len(_entries(cdir)) == 4
    warm = _trend_json(tmp_path, "--cache-dir", str(cdir), *args)
    assert len(reads) == 8  # not one tensor read
    assert warm == cold == plain
    assert strict_json(warm)["steps"][2]["total"]["nan"] == 1


def test_library_inspect_with_a_cache_is_bit_for_bit(tmp_path: Path, reads: list[str]) -> None:
    (f,) = _run(tmp_path, 1)
    c = Cache(tmp_path / "c")
    want = json.dumps(inspect(f, norm_type=2.5).to_dict(), sort_keys=True)
    assert json.dumps(inspect(f, norm_type=2.5, cache=c).to_dict(), sort_keys=True) == want
    assert (c.hits, c.misses, c.stored) == (0, 1, 1)
    assert json.dumps(inspect(f, norm_type=2.5, cache=c).to_dict(), sort_keys=True) == want
    assert (c.hits, c.misses) == (1, 1) and len(reads) == 2
    # another norm type is another entry; a subset selected is served from the entry of the whole
    inspect(f, norm_type=2, cache=c, include=["a.*"])
    assert c.misses == 2 and len(_entries(tmp_path / "c")) == 2
    sub = inspect(f, norm_type=2.5, cache=c, include=["a.*"])
    assert c.hits == 2 and len(reads) == 3
    assert sub.to_dict() == inspect(f, norm_type=2.5, include=["a.*"]).to_dict()


def test_a_partial_entry_computes_only_the_missing_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (f,) = _run(tmp_path, 1)
    c = Cache(tmp_path / "c")
    inspect(f, cache=c, include=["a.*"])
    asked: list[list[str]] = []
    real = engine.reduce_entries
    monkeypatch.setattr(engine, "reduce_entries",
                        lambda src, e, *a, **k: asked.append([t.name for t in e]) or real(src, e, *a, **k))
    assert inspect(f, cache=c).to_dict() == inspect(f).to_dict()
    assert sorted(asked[0]) == ["b.big", "b.w"]  # then the uncached reference run reads all four
    assert inspect(f, cache=c).to_dict() == inspect(f).to_dict() and len(asked) == 3


# --- invalidation ---------------------------------------------------------------------------------


def _rewrite_same_size(f: Path) -> None:
    """Other numbers, same size, mtime set back: only ctime (and the bytes) tell."""
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-8:] = np.full(1, 7.5, np.float64).tobytes()  # the last element of b.big
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns


def _touch(f: Path) -> None:
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 1_000_000_000))


def _replace_by_copy(f: Path) -> None:
    """Same bytes and mtime (cp -p), another inode, renamed over."""
    tmp = f.with_suffix(".tmp")
    shutil.copy2(f, tmp)
    os.replace(tmp, f)


@pytest.mark.parametrize("change", [_touch, _rewrite_same_size, _replace_by_copy])
def test_a_changed_file_is_read_again(tmp_path: Path, reads: list[str], headers: list[str], change) -> None:  # type: ignore[no-untyped-def]
    files = _run(tmp_path)
    cdir = str(tmp_path / "c")
    _trend_json(tmp_path, "--cache-dir", cdir)
    change(files[1])
    del reads[:], headers[:]
    warm = _trend_json(tmp_path, "--cache-dir", cdir)
    assert reads == [str(files[1])]
    assert set(headers) == {str(files[1])}  # the other steps come whole from their step entries
    assert warm == _trend_json(tmp_path, "--no-cache")
    del reads[:]
    assert _trend_json(tmp_path, "--cache-dir", cdir) == warm and reads == []  # and cached again


def test_a_truncated_file_is_an_error_not_a_hit(tmp_path: Path) -> None:
    files = _run(tmp_path)
    cdir = str(tmp_path / "c")
    _trend_json(tmp_path, "--cache-dir", cdir)
    size = files[3].stat().st_size
    os.truncate(files[3], size - 8)
    r = run("trend", _glob(tmp_path), "-q", "--cache-dir", cdir)
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {files[3]}: ") and r.stdout == ""


def test_a_file_changed_after_the_lookup_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (f,) = _run(tmp_path, 1)
    c = Cache(tmp_path / "c")
    inspect(f, cache=c)
    real = Cache.lookup

    def then_change(self: Cache, src, p, *key):  # type: ignore[no-untyped-def]
        got = real(self, src, p, *key)
        assert got  # a hit
        _rewrite_same_size(f)
        return got

    monkeypatch.setattr(Cache, "lookup", then_change)
    with pytest.raises(InputError, match="changed while being read"):
        inspect(f, cache=c)


def test_a_file_changed_just_now_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 2_000_000_000)
    (f,) = _run(tmp_path, 1)
    c = Cache(tmp_path / "c")
    inspect(f, cache=c)
    assert c.stored == 0 and not (tmp_path / "c").exists()


# --- corrupt, forged, foreign entries -------------------------------------------------------------


def _bad_json(p: Path) -> None:
    p.write_text(p.read_text()[:-1] + ",")


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _wrong_checksum(p: Path) -> None:
    doc = json.loads(p.read_text())
    doc["checksum"] = "0" * 64
    p.write_text(json.dumps(doc))


def _forged(p: Path) -> None:
    """The key matches, a sum is altered, the checksum left: the checksum catches it."""
    doc = json.loads(p.read_text())
    _double_a_sum(doc)
    p.write_text(json.dumps(doc))


def _double_a_sum(doc: dict) -> None:
    for row in doc["stats"].values():
        row[5] = (float.fromhex(row[5]) * 2).hex()


def _other_version(p: Path) -> None:
    """A well-formed entry (its checksum recomputed) of another version: foreign, not used."""
    doc = json.loads(p.read_text())
    doc["key"]["version"] = "0.0.1"
    doc["checksum"] = cache_mod._checksum(doc["key"], doc["stats"])
    p.write_text(json.dumps(doc))


def _other_file(p: Path) -> None:
    """Another file's valid entry under this file's name."""
    others = [q for q in _entries(p.parent) if q != p]
    shutil.copy(others[0], p)


def _not_an_object(p: Path) -> None:
    p.write_text('[1, 2, {"key": null}]')


def _bad_row(p: Path) -> None:
    doc = json.loads(p.read_text())
    doc["stats"][next(iter(doc["stats"]))] = [1, 2]
    doc["checksum"] = cache_mod._checksum(doc["key"], doc["stats"])
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("spoil", [_bad_json, _truncated, _wrong_checksum, _forged, _other_version, _other_file,
                                   _not_an_object, _bad_row, lambda p: p.write_bytes(b"\xff\xfe\x00")])
def test_a_spoiled_entry_is_ignored_and_rebuilt(tmp_path: Path, reads: list[str], spoil) -> None:  # type: ignore[no-untyped-def]
    _run(tmp_path)
    cdir = tmp_path / "c"
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir))
    entries = _entries(cdir)
    victim = entries[1]
    spoil(victim)
    _drop_steps(cdir)
    del reads[:]
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) == cold
    assert len(reads) == 1
    _drop_steps(cdir)
    del reads[:]
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) == cold and reads == []  # rebuilt
    assert _entries(cdir) == entries


def test_the_checksum_is_what_catches_a_forged_entry(tmp_path: Path) -> None:
    """The same forgery with its checksum recomputed is served: so the checksum did the catching above
    (it guards against corruption; whoever can write the cache directory can forge it, as ~/.cache)."""
    _run(tmp_path, 2)
    cdir = tmp_path / "c"
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir))
    victim = _entries(cdir)[0]
    doc = json.loads(victim.read_text())
    _double_a_sum(doc)
    doc["checksum"] = cache_mod._checksum(doc["key"], doc["stats"])
    victim.write_text(json.dumps(doc))
    _drop_steps(cdir)
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) != cold


def test_an_unwritable_cache_dir_is_no_error(tmp_path: Path) -> None:
    _run(tmp_path, 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _trend_json(tmp_path, "--cache-dir", str(blocker / "sub")) == _trend_json(tmp_path, "--no-cache")


# --- step entries: a warm step is a stat and one read ---------------------------------------------


@pytest.mark.parametrize("args", [(), ("-p", "3", "--max-norm", "0.5"), ("-p", "inf", "--group-by", "1"),
                                  ("--include", "a.*", "--eps", "0"), ("--step-pattern", r"_(\d+)\."),
                                  ("--loss-scale", "3", "--dedup")])
def test_a_warm_step_parses_no_header_and_is_bit_for_bit(tmp_path: Path, reads: list[str], headers: list[str],
                                                          args: tuple) -> None:
    _run(tmp_path)
    cdir = tmp_path / "c"
    plain = _trend_json(tmp_path, "--no-cache", *args)
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir), *args)
    assert len(_step_entries(cdir)) == 4
    del reads[:], headers[:]
    warm = _trend_json(tmp_path, "--cache-dir", str(cdir), *args)
    assert reads == [] and headers == []  # no tensor read, no header parsed
    assert warm == cold == plain
    if not args:  # the library shares the CLI's entries
        c = Cache(cdir)
        assert json.dumps(trend(_glob(tmp_path), cache=c).to_dict()) == json.dumps(trend(_glob(tmp_path)).to_dict())
        assert (c.step_hits, c.step_misses, c.hits, c.misses, c.stored) == (4, 0, 0, 0, 0)


def test_a_selection_given_as_an_iterator_selects_in_every_step(tmp_path: Path) -> None:
    _run(tmp_path)
    c = Cache(tmp_path / "c")
    want = json.dumps(trend(_glob(tmp_path), include=["a.*"]).to_dict())
    assert json.dumps(trend(_glob(tmp_path), include=iter(["a.*"]), cache=c).to_dict()) == want
    assert json.dumps(trend(_glob(tmp_path), include=(g for g in ["a.*"]), cache=c).to_dict()) == want
    assert c.step_hits == 4  # the same selection, the same entries


def test_each_option_set_has_its_step_entries(tmp_path: Path, reads: list[str], headers: list[str]) -> None:
    _run(tmp_path)
    cdir = str(tmp_path / "c")
    one = _trend_json(tmp_path, "--cache-dir", cdir, "--max-norm", "1")
    del reads[:], headers[:]
    half = _trend_json(tmp_path, "--cache-dir", cdir, "--max-norm", "0.5")
    assert reads == [] and len(headers) == 4  # the file entries serve the numbers; each step is parsed once
    assert half == _trend_json(tmp_path, "--no-cache", "--max-norm", "0.5") != one
    assert len(_step_entries(Path(cdir))) == 8
    del headers[:]
    assert _trend_json(tmp_path, "--cache-dir", cdir, "--max-norm", "1") == one and headers == []


def test_warnings_and_the_metadata_step_come_from_the_entry(tmp_path: Path, headers: list[str]) -> None:
    for i in range(4):  # the number is in the metadata only; an integer tensor is a warning
        save_file({"w": np.full(3, i + 1.0, np.float32), "count": np.array([i])},
                  str(tmp_path / f"s{9 - i}.safetensors"), metadata={"step": str(10 * i)})
    pattern = str(tmp_path / "s*.safetensors")
    cdir = str(tmp_path / "c")
    plain = run("trend", pattern, "-f", "json", "--no-cache")
    cold = run("trend", pattern, "-f", "json", "--cache-dir", cdir)
    del headers[:]
    warm = run("trend", pattern, "-f", "json", "--cache-dir", cdir)
    assert headers == []
    assert warm.exit_code == cold.exit_code == plain.exit_code == 0
    assert warm.stdout == cold.stdout == plain.stdout
    assert [s["step"] for s in strict_json(warm.stdout)["steps"]] == [0, 10, 20, 30]
    assert warm.stderr == cold.stderr == plain.stderr and "skipped count" in warm.stderr


def _dir_run(tmp_path: Path) -> str:
    for i in range(3):
        d = tmp_path / "run" / f"step_{i}"
        d.mkdir(parents=True)
        save_file({"a": np.full(5, i + 1.0, np.float32)}, str(d / "a.safetensors"))
        save_file({"b": np.full(7, -2.0 * i, np.float32)}, str(d / "b.safetensors"))
    return str(tmp_path / "run" / "step_*")


def _add_file(d: Path) -> None:
    save_file({"c": np.full(2, 3.0, np.float32)}, str(d / "c.safetensors"))


def _remove_file(d: Path) -> None:
    (d / "b.safetensors").unlink()


def _add_other_file(d: Path) -> None:
    (d / "notes.txt").write_text("not tensors")  # not read, but a warning


@pytest.mark.parametrize("change", [_add_file, _remove_file, _add_other_file])
def test_a_file_added_to_or_removed_from_a_step_is_seen(tmp_path: Path, headers: list[str], change) -> None:  # type: ignore[no-untyped-def]
    pattern = _dir_run(tmp_path)
    cdir = str(tmp_path / "c")
    run("trend", pattern, "-f", "json", "--cache-dir", cdir)
    del headers[:]
    assert run("trend", pattern, "-f", "json", "--cache-dir", cdir).exit_code == 0 and headers == []
    step = tmp_path / "run" / "step_1"
    change(step)
    warm = run("trend", pattern, "-f", "json", "--cache-dir", cdir)
    assert headers and {os.path.dirname(h) for h in headers} == {str(step)}
    plain = run("trend", pattern, "-f", "json", "--no-cache")
    assert warm.exit_code == plain.exit_code == 0
    assert (warm.stdout, warm.stderr) == (plain.stdout, plain.stderr)
    assert len(strict_json(warm.stdout)["tensors"]) == (3 if change is _add_file else 2)
    del headers[:]
    assert run("trend", pattern, "-f", "json", "--cache-dir", cdir).stdout == warm.stdout and headers == []


def test_a_file_changed_while_its_step_is_computed_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  headers: list[str]) -> None:
    files = _run(tmp_path, 2)
    real = Cache.lookup_step

    def then_change(self: Cache, key):  # type: ignore[no-untyped-def]
        got = real(self, key)
        if key.paths[0] == str(files[1]):
            _rewrite_same_size(files[1])  # after its identity was taken, before it is read
        return got

    monkeypatch.setattr(Cache, "lookup_step", then_change)
    c = Cache(tmp_path / "c")
    first = trend(_glob(tmp_path), cache=c)
    assert len(_step_entries(tmp_path / "c")) == 1  # only step 0's
    monkeypatch.setattr(Cache, "lookup_step", real)
    assert trend(_glob(tmp_path), cache=c) == first == trend(_glob(tmp_path))  # what was read: the new bytes
    assert len(_step_entries(tmp_path / "c")) == 2


def test_a_step_changed_just_now_is_not_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(tmp_path, 2)
    monkeypatch.setattr(cache_mod, "SETTLE_NS", 2_000_000_000)
    c = Cache(tmp_path / "c")
    trend(_glob(tmp_path), cache=c)
    assert c.stored == 0 and not (tmp_path / "c").exists()


def _entry_parts(p: Path) -> tuple[dict, bytes]:
    """A step entry's lines of JSON (its head, with the lines of ``names`` and ``tensor_names`` as keys of it)
    and its binary part."""
    data = p.read_bytes()
    lines = data[65:].split(b"\n", 3)
    head = json.loads(lines[0])
    head["names"], head["tensor_names"] = json.loads(lines[1]), json.loads(lines[2])
    return head, lines[3]


def _write_entry(p: Path, head: dict, blob: bytes) -> None:
    """An entry with its checksum recomputed: well-formed as far as the checksum can tell."""
    import hashlib

    head = dict(head)
    names, tensor_names = head.pop("names"), head.pop("tensor_names")
    body = b"".join(json.dumps(x).encode() + b"\n" for x in (head, names, tensor_names)) + blob
    p.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def _spellings_at(head: dict) -> int:
    """Where in the binary part the spellings of the norms and shares start (from its end)."""
    from gradinspect.trend import SPELLING_WIDTH

    return -2 * len(head["names"]) * SPELLING_WIDTH


_NORM_BYTE = 8 * 3 + 6  # in the floats: the second-highest byte of the step's global norm (the 4th float)


def _flip_a_float(p: Path) -> None:
    _, blob = _entry_parts(p)
    data = bytearray(p.read_bytes())
    data[len(data) - len(blob) + _NORM_BYTE] ^= 0x10
    p.write_bytes(bytes(data))


def _step_truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-9])


def _step_other_version(p: Path) -> None:
    head, blob = _entry_parts(p)
    head["key"]["version"] = "0.0.1"
    _write_entry(p, head, blob)


def _step_of_another_step(p: Path) -> None:
    others = [q for q in _step_entries(p.parent) if q != p]
    shutil.copy(others[0], p)


def _step_short_blob(p: Path) -> None:
    head, blob = _entry_parts(p)
    _write_entry(p, head, blob[:-8])


def _step_names_not_strings(p: Path) -> None:
    head, blob = _entry_parts(p)
    head["names"] = [1] * len(head["names"])
    _write_entry(p, head, blob)


def _step_a_name_twice(p: Path) -> None:
    head, blob = _entry_parts(p)
    head["names"][1] = head["names"][0]
    _write_entry(p, head, blob)


def _step_bad_flag(p: Path) -> None:
    head, blob = _entry_parts(p)
    at = _spellings_at(head) - 1  # the last tensor's tensor_zero: 0 or 1
    _write_entry(p, head, blob[:at] + b"\x07" + blob[at + 1:])


def _flip_a_spelling(p: Path) -> None:
    head, _ = _entry_parts(p)
    data = bytearray(p.read_bytes())
    data[len(data) + _spellings_at(head)] ^= 0x01  # the first norm's first digit
    p.write_bytes(bytes(data))


def _step_spellings_cut(p: Path) -> None:
    head, blob = _entry_parts(p)
    _write_entry(p, head, blob[:-24])


def _step_negative_count(p: Path) -> None:
    head, blob = _entry_parts(p)
    head["total"][0] = -1
    _write_entry(p, head, blob)


@pytest.mark.parametrize("spoil", [_flip_a_float, _flip_a_spelling, _step_truncated, _step_other_version,
                                   _step_of_another_step, _step_short_blob, _step_spellings_cut,
                                   _step_names_not_strings, _step_a_name_twice, _step_bad_flag,
                                   _step_negative_count, lambda p: p.write_bytes(b""),
                                   lambda p: p.write_bytes(b"0" * 64 + b"\n{}\n"), lambda p: p.write_text("\n" * 99)])
def test_a_spoiled_step_entry_is_ignored_and_rebuilt(tmp_path: Path, reads: list[str], headers: list[str],
                                                      spoil) -> None:  # type: ignore[no-untyped-def]
    files = _run(tmp_path)
    cdir = tmp_path / "c"
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir))
    victim = Path(_key(Cache(cdir), files[2]).file)
    assert victim in _step_entries(cdir)
    spoil(victim)
    del reads[:], headers[:]
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) == cold
    assert set(headers) == {str(files[2])} and reads == []  # step 2 computed again, from its file entry
    del headers[:]
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) == cold and headers == []  # rebuilt


def _key(c: Cache, f: Path) -> cache_mod.StepKey:
    """The key of the step entry of file ``f`` with the default options (the CLI's): as ``trend`` makes it."""
    keys: list[cache_mod.StepKey] = []
    real = c.step_key

    def kept(*a):  # type: ignore[no-untyped-def]
        keys.append(real(*a))
        return keys[-1]

    c.step_key = kept  # type: ignore[method-assign]
    trend([str(f)], cache=c)
    return keys[0]


def test_the_checksum_is_what_catches_a_spoiled_step_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flipped float with its checksum recomputed is served: so the checksum did the catching above."""
    from gradinspect.formats import json as json_format

    monkeypatch.setattr(json_format, "PRETTY_MAX_ROWS", 0)  # on one line: the series laid out from the spellings
    _run(tmp_path, 2)
    cdir = tmp_path / "c"
    cold = _trend_json(tmp_path, "--cache-dir", str(cdir))
    victim = _step_entries(cdir)[0]
    head, blob = _entry_parts(victim)
    at = _NORM_BYTE
    _write_entry(victim, head, blob[:at] + bytes([blob[at] ^ 0x10]) + blob[at + 1:])
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) != cold
    at = len(blob) + _spellings_at(head)  # and a norm's spelling: what -f json writes
    _write_entry(victim, head, blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1:])
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)) != cold


# --- where, how much, and two runs at once --------------------------------------------------------


def test_no_cache_writes_nothing_and_cache_dir_is_used(tmp_path: Path, _own_cache_dir: Path) -> None:
    _run(tmp_path, 2)
    _trend_json(tmp_path, "--no-cache")
    assert list(_own_cache_dir.iterdir()) == []
    _trend_json(tmp_path, "--cache-dir", str(tmp_path / "mine"))
    assert list(_own_cache_dir.iterdir()) == [] and len(_entries(tmp_path / "mine")) == 2
    _trend_json(tmp_path)  # the default: $GRADINSPECT_CACHE_DIR
    assert len(_entries(_own_cache_dir)) == 2


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GRADINSPECT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Cache().directory == str(tmp_path / "xdg" / "gradinspect")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_mod.default_dir() == str(tmp_path / "home" / ".cache" / "gradinspect")


def test_pruning_keeps_the_newest_within_the_bounds(tmp_path: Path) -> None:
    files = _run(tmp_path, 6)
    cdir = tmp_path / "c"
    trend([str(f) for f in files], cache=Cache(cdir, max_files=4))
    kept = sorted(cdir.iterdir())  # file and step entries count together
    assert len(kept) == 4 and {p.suffix for p in kept} <= {".json", ".step"}
    for i, p in enumerate(kept):
        os.utime(p, (1000 + i, 1000 + i))
    stale = [cdir / ".tmp-left.json", cdir / ".tmp-left.step"]
    for p in stale:
        p.write_text("{")
        os.utime(p, (0, 0))
    sizes = [p.stat().st_size for p in kept]
    c = Cache(cdir, max_bytes=sizes[3] + sizes[2] + sizes[1] // 2)
    assert c.prune() == 2
    assert sorted(cdir.iterdir()) == kept[2:] and not any(p.exists() for p in stale)


_CHILD = ("import sys, gradinspect.cache as c; c.SETTLE_NS = 0; from gradinspect.cli import main; "
          "main(sys.argv[1:])")


def test_two_runs_at_once_leave_the_cache_valid(tmp_path: Path, reads: list[str]) -> None:
    _run(tmp_path, 12)
    cdir = tmp_path / "c"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    args = [sys.executable, "-c", _CHILD, "trend", _glob(tmp_path), "-f", "json", "-q", "--cache-dir", str(cdir)]
    for _ in range(2):
        procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert outs[0][0] == outs[1][0] and outs[0][1] == b""
    assert len(_entries(cdir)) == len(_step_entries(cdir)) == 12
    assert not [p for p in cdir.iterdir() if p.name.startswith(".tmp-")]
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)).encode() == outs[0][0]
    _drop_steps(cdir)
    assert _trend_json(tmp_path, "--cache-dir", str(cdir)).encode() == outs[0][0]
    assert reads == []  # every entry valid: the step entries, then the file entries


# --- trend --follow -------------------------------------------------------------------------------


def _atomic_step(path: Path, value: float) -> None:
    tmp = path.with_name(".writing")
    save_file({"w": np.full(4, value, np.float32)}, str(tmp))
    os.replace(tmp, path)


def _read_until(proc: subprocess.Popen, text: bytes, seen: bytearray, timeout: float = 30.0) -> bool:
    import selectors
    import time

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    end = time.monotonic() + timeout
    while text not in seen and time.monotonic() < end:
        if sel.select(timeout=0.2):
            chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
            if not chunk:
                break
            seen += chunk
    return text in seen


def test_follow_redraws_as_steps_land_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    import signal

    for i in range(3):
        _atomic_step(tmp_path / f"step_{i}.safetensors", i + 1.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "80"}
    proc = subprocess.Popen([sys.executable, "-m", "gradinspect", "trend", str(tmp_path / "step_*.safetensors"),
                             "--follow", "--interval", "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = bytearray()
        assert _read_until(proc, b"steps           3 (0\xe2\x80\x932)", seen), bytes(seen)
        _atomic_step(tmp_path / "step_3.safetensors", 9.0)
        assert _read_until(proc, b"steps           4 (0\xe2\x80\x933)", seen), bytes(seen)
        assert b"spikes          1: step 3\n" in seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"Traceback" not in out
    assert bytes(seen + out).count(b"steps           ") == 2  # drawn once per change, not per look


def test_follow_is_for_the_table(tmp_path: Path) -> None:
    _run(tmp_path, 1)
    r = run("trend", _glob(tmp_path), "--follow", "-f", "json")
    assert r.exit_code == 2 and "--follow draws the table" in r.output


def test_a_dumper_directory_uses_step_entries(tmp_path: Path, reads: list[str]) -> None:
    """A GradDumper directory (step_N_rankR files, several steps): each step its own entry, warm reads nothing,
    and a rank file rewritten is read again for its step only."""
    d = tmp_path / "dump"
    for step in (0, 5, 10):
        for rank in (0, 1):
            _step(d / f"step_{step:08d}_rank{rank}.safetensors", 10 * step + rank)
    args = ("trend", str(d), "-f", "json", "-q", "--shards", "slices")
    cdir = tmp_path / "c"
    plain = run(*args, "--no-cache")
    assert plain.exit_code == 0, plain.output
    assert [s["step"] for s in strict_json(plain.stdout)["steps"]] == [0, 5, 10]
    cold = run(*args, "--cache-dir", str(cdir))
    assert len(_step_entries(cdir)) == 3
    n = len(reads)
    warm = run(*args, "--cache-dir", str(cdir))
    assert len(reads) == n  # not one tensor read
    assert warm.stdout == cold.stdout == plain.stdout
    _rewrite_same_size(d / "step_00000005_rank1.safetensors")
    again = run(*args, "--cache-dir", str(cdir))
    assert {os.path.basename(p) for p in reads[n:]} == {"step_00000005_rank1.safetensors"}
    assert again.stdout != warm.stdout


def test_a_checkpoint_directory_step_sees_a_file_rewritten_in_place(tmp_path: Path) -> None:
    """A distributed checkpoint is one directory per step: a .distcp file rewritten in place (same size, mtime
    put back) leaves the directory's own identity as it was, and must still miss the step entry."""
    src = ROOT / "tests" / "data" / "dcp" / "st2" / "step_0000"
    for step in (5, 6):
        shutil.copytree(src, tmp_path / "run" / f"step_{step:04d}")
    args = ("trend", str(tmp_path / "run" / "step_*"), "--step-pattern", r"step_(\d+)", "-f", "json", "-q")
    cdir = str(tmp_path / "c")
    cold = run(*args, "--cache-dir", cdir)
    assert cold.exit_code == 0, cold.output
    assert len(_step_entries(Path(cdir))) == 2
    f = sorted((tmp_path / "run" / "step_0006").glob("*.distcp"))[0]
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-2] ^= 0x01  # a bit of the last tensor's data
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    warm = run(*args, "--cache-dir", cdir)
    plain = run(*args, "--no-cache")
    assert warm.stdout == plain.stdout != cold.stdout


def test_a_cold_step_is_parsed_once(tmp_path: Path, headers: list[str]) -> None:
    """A step's number from its metadata is taken as the step is read, not from a header parse of its own."""
    for i in range(4):
        save_file({"w": np.full(3, i + 1.0, np.float32)}, str(tmp_path / f"s{9 - i}.safetensors"),
                  metadata={"step": str(10 * i)})
    r = run("trend", str(tmp_path / "s*.safetensors"), "-f", "json", "--no-cache")
    assert r.exit_code == 0, r.output
    assert [s["step"] for s in strict_json(r.stdout)["steps"]] == [0, 10, 20, 30]
    assert sorted(headers) == sorted(str(p) for p in tmp_path.glob("s*.safetensors"))


def test_a_cache_directory_removed_during_a_run_is_made_again(tmp_path: Path) -> None:
    """The directory is made once per Cache, and again when it is gone (removed by hand between steps)."""
    files = _run(tmp_path, 2)
    c = Cache(tmp_path / "c")
    trend([str(files[0])], cache=c)
    assert len(_step_entries(tmp_path / "c")) == 1
    shutil.rmtree(tmp_path / "c")
    trend([str(files[1])], cache=c)
    assert len(_step_entries(tmp_path / "c")) == 1 and len(_entries(tmp_path / "c")) == 1
