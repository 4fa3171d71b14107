"""Remote storage (issue 10 §4): fsspec URLs read by ranges, against a real S3 API on localhost (moto in server
mode, as s3fs's own tests run it) and a local HTTP server that honours Range requests, both started and stopped
here.  Every number must be bit-for-bit that of the same file on local disk."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import ROOT, Exact, decode, exact_sums, rel, rel_sqrt, run, run_process, strict_json

REMOTE = "the remote extra (fsspec, s3fs, moto[server], aiohttp) is not installed"


def _need(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=REMOTE)


# --- servers ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """A moto S3 server on a free localhost port; fsspec's s3 options point at it; dummy credentials."""
    _need("fsspec", "s3fs", "moto.server", "aiohttp")
    import fsspec.config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.setenv(k, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "HTTP_PROXY", "HTTPS_PROXY"):
            mp.delenv(k, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
            import s3fs

            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            fs.endpoint = endpoint  # type: ignore[attr-defined]
            yield fs
        finally:
            server.stop()


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"b{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    return name


def _put(s3: Any, local: Path, url: str) -> None:
    s3.put_file(str(local), url.removeprefix("s3://"))
    s3.invalidate_cache()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``: HEAD, GET with one ``bytes=a-b`` Range (206), GET without (200); ETag and
    Last-Modified from the file; ``server.fail`` answers the next requests with 503 (-1: all of them)."""

    def log_message(self, *args: Any) -> None:
        pass

    def _file(self) -> Path | None:
        p = self.server.root / self.path.partition("?")[0].lstrip("/")  # type: ignore[attr-defined]
        return p if p.is_file() else None

    def _answer(self, body: bool) -> None:
        srv: Any = self.server
        srv.log.append((self.command, self.path, self.headers.get("Range")))
        if srv.fail:
            srv.fail -= 1 if srv.fail > 0 else 0
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        p = self._file()
        if p is None or srv.deny:
            self.send_response(403 if srv.deny else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = p.stat()
        size = st.st_size
        rng = self.headers.get("Range") if srv.ranges else None
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        start, end = (int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)) if m else (0, size - 1)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes" if srv.ranges else "none")
        self.send_header("ETag", f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{size:x}"')
        self.send_header("Last-Modified", self.date_time_string(int(st.st_mtime)))
        self.end_headers()
        if body:
            with open(p, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up (a refused read) is no error here


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Any]:
    """A threaded HTTP server over ``tmp_path / "www"`` logging (method, path, Range) of every request."""
    _need("fsspec", "aiohttp")
    root = tmp_path / "www"
    root.mkdir()
    srv: Any = _Server(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.root, srv.log, srv.fail, srv.ranges, srv.deny = root, [], 0, True, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradinspect.sources import remote

    monkeypatch.setattr(remote, "BACKOFF", 0.01)


# --- files ------------------------------------------------------------------------------------------------------

def _grads(rng: np.random.Generator, n: int = 400_000) -> dict[str, np.ndarray]:
    """Tensors of several dtypes and sizes: chunked big ones, batched small ones, a non-float one."""
    return {
        "embed.weight": rng.standard_normal(n).astype(np.float32) * 1e-3,
        "layers.0.w": rng.standard_normal((300, 257)).astype(np.float64),
        "layers.0.b": rng.standard_normal(257).astype(np.float16),
        "layers.1.w": rng.standard_normal(70_000).astype(ml_dtypes.bfloat16),
        "layers.1.b": rng.standard_normal(33).astype(np.float32),
        "step_count": np.arange(5, dtype=np.int64),
    }


def _numbers(text: str, *where: object) -> Any:
    """The JSON report with the places the files are (a local directory, a URL prefix) replaced by ROOT."""
    for w in where:
        text = text.replace(str(w), "ROOT")
    return strict_json(text)


def _json(*args: object) -> str:
    r = run(*args, "--format", "json")
    assert r.exit_code in (0, 1), r.stderr
    return r.stdout


@pytest.fixture
def uploaded(s3: Any, bucket: str, tmp_path: Path, rng: np.random.Generator) -> tuple[Path, str]:
    """Three steps under ``root/run/`` and other files under ``root/other/``, the same under s3://bucket/
    (and a file that is not read in run/)."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "other").mkdir()
    for step in (1, 2, 3):
        g = _grads(rng)
        if step == 2:
            g["layers.0.w"][3, 4] = np.nan
        save_file(g, str(root / f"run/step_{step}.safetensors"), metadata={"step": str(step)})
    np.savez(root / "other/extra.npz", a=rng.standard_normal(50_000).astype(np.float32))
    np.savez_compressed(root / "other/z.npz", b=rng.standard_normal(30_000).astype(np.float32),
                        c=np.ones(3, np.float16))
    np.save(root / "other/one.npy", rng.standard_normal((200, 300)).astype(np.float32))
    for f in sorted(root.rglob("*.*")):
        _put(s3, f, f"s3://{bucket}/{f.relative_to(root)}")
    (tmp_path / "README.txt").write_text("not a gradient")
    _put(s3, tmp_path / "README.txt", f"s3://{bucket}/run/README.txt")
    return root, f"s3://{bucket}"


# --- S3 ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["run/step_2.safetensors", "other/extra.npz", "other/z.npz", "other/one.npy"])
def test_norms_over_s3_are_those_of_the_local_file(uploaded: tuple[Path, str], name: str) -> None:
    root, url = uploaded
    remote = _json("norms", f"{url}/{name}", "--norm-type", "2")
    assert strict_json(remote)["sources"] == [f"{url}/{name}"]
    assert _numbers(remote, url) == _numbers(_json("norms", root / name), root)
    for jobs in ("1", "3"):
        assert _numbers(_json("norms", f"{url}/{name}", "--jobs", jobs, "--norm-type", "3"), url) == \
            _numbers(_json("norms", root / name, "--norm-type", "3"), root)


def test_remote_norms_match_the_exact_oracle(uploaded: tuple[Path, str]) -> None:
    root, url = uploaded
    from safetensors.numpy import load_file

    g = load_file(str(root / "run/step_1.safetensors"))
    doc = strict_json(_json("norms", f"{url}/run/step_1.safetensors", "--jobs", "2"))
    rows = {t["name"]: t for t in doc["tensors"]}
    s1, s2 = exact_sums(g["embed.weight"])
    assert rel(rows["embed.weight"]["l1"], s1) <= 1e-12 and rel_sqrt(rows["embed.weight"]["l2"], s2) <= 1e-12
    ex = Exact(decode(g["layers.0.w"].reshape(-1)))
    assert rel_sqrt(rows["layers.0.w"]["l2"], ex.s2) <= 1e-12 and rows["layers.0.w"]["linf"] == float(ex.linf)


def test_check_diff_info_trend_over_s3_globs_and_directories(uploaded: tuple[Path, str]) -> None:
    root, url = uploaded
    for args in [
        ("check", "ROOT/run/step_1.safetensors", "--max-total", "1"),
        ("diff", "ROOT/run/step_1.safetensors", "ROOT/run/step_3.safetensors"),
        ("info", "ROOT/run/"),
        ("info", "ROOT/other"),
        ("norms", "ROOT/run/step_*.safetensors", "--shards", "replicas"),
        ("trend", "ROOT/run/step_*.safetensors", "--group-by", "1"),
        ("trend", "ROOT/run/step_1.safetensors", "ROOT/run/step_3.safetensors"),
    ]:
        r = run(*(a.replace("ROOT", url) for a in args), "--format", "json")
        ll = run(*(a.replace("ROOT", str(root)) for a in args), "--format", "json")
        assert r.exit_code == ll.exit_code and r.exit_code in (0, 1), (args, r.stderr)
        assert _numbers(r.stdout, url) == _numbers(ll.stdout, root), args
    # the directory lists the same files, sorted as local ones, and says what it skipped
    r = run("info", f"{url}/run", "--format", "json")
    doc = strict_json(r.stdout)
    assert doc["sources"] == [f"{url}/run/step_{i}.safetensors" for i in (1, 2, 3)]
    assert r.stderr == f"Warning: {url}/run/: skipped 1 file that is not .safetensors/.npz/.npy (README.txt)\n"
    r = run("norms", f"{url}/run/step_9*.safetensors")
    assert (r.exit_code, r.stderr) == (2, f"Error: {url}/run/step_9*.safetensors: no file matches this pattern\n")


def test_index_files_over_s3_expand_to_their_shards(s3: Any, bucket: str, tmp_path: Path,
                                                    rng: np.random.Generator) -> None:
    g = _grads(rng, 20_000)
    names = sorted(n for n in g if g[n].dtype.kind == "f")
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: g[n] for n in members}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(members, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in (index, *(tmp_path / s for s in shards)):
        _put(s3, f, f"s3://{bucket}/m/{f.name}")
    url = f"s3://{bucket}/m"
    r = run("norms", f"{url}/{index.name}", "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert strict_json(r.stdout)["sources"] == [f"{url}/{s}" for s in shards]
    assert _numbers(r.stdout, url) == _numbers(_json("norms", index), tmp_path)
    weight_map[names[0]] = "model-00002-of-00002.safetensors"  # names a tensor its shard does not hold
    index.write_text(json.dumps({"weight_map": weight_map}))
    _put(s3, index, f"{url}/{index.name}")
    r = run("norms", f"{url}/{index.name}")
    assert r.exit_code == 2 and r.stderr.startswith(f"Error: {url}/{index.name}: weight_map puts tensor")


def test_missing_object_and_bucket_are_one_line_at_once(uploaded: tuple[Path, str], s3: Any) -> None:
    _, url = uploaded
    for target in (f"{url}/run/nope.safetensors", "s3://no-such-bucket-here/g.safetensors"):
        r = run("norms", target)
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr == f"Error: {target}: no such file or object\n"


def test_an_object_replaced_while_being_read_is_exit_2(uploaded: tuple[Path, str], s3: Any,
                                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       rng: np.random.Generator) -> None:
    from gradinspect.sources.remote import FsspecStore

    root, url = uploaded
    target = f"{url}/run/step_1.safetensors"
    other = tmp_path / "other.safetensors"
    g = _grads(rng)
    save_file(g, str(other), metadata={"step": "1"})
    assert other.stat().st_size == (root / "run/step_1.safetensors").stat().st_size  # the same size: only the ETag
    real = FsspecStore.read_into
    done: list[int] = []

    def read_then_replace(self: FsspecStore, view: memoryview, offset: int) -> None:
        real(self, view, offset)
        if offset > 1000 and not done:  # after the header and a first data read
            done.append(offset)
            _put(s3, other, target)

    monkeypatch.setattr(FsspecStore, "read_into", read_then_replace)
    r = run("norms", target)
    assert done and r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"Error: {target}: changed while being read\n"


def test_processes_reopen_remote_objects_by_url(uploaded: tuple[Path, str]) -> None:
    from gradinspect import api
    from gradinspect.executors import ProcessExecutor

    root, url = uploaded
    with ProcessExecutor(2) as ex:
        by_processes = api.inspect(f"{url}/run/step_1.safetensors", jobs=ex)
    by_threads = api.inspect(root / "run/step_1.safetensors", jobs=1)
    assert [(t.name, t.l1, t.sq, t.linf) for t in by_processes.tensors] == \
        [(t.name, t.l1, t.sq, t.linf) for t in by_threads.tensors]
    assert by_processes.total == by_threads.total


def test_progress_counts_the_bytes_read(uploaded: tuple[Path, str]) -> None:
    from gradinspect import api

    _, url = uploaded
    told: list[int] = []
    report = api.inspect(f"{url}/run/step_1.safetensors", jobs=2, progress=told.append)
    floats = {k: v for k, v in _grads(np.random.default_rng(0)).items() if v.dtype.kind != "i"}
    assert sum(told) == sum(v.nbytes for v in floats.values()) and len(report.tensors) == len(floats)


def test_trend_caches_remote_objects_by_etag(uploaded: tuple[Path, str], s3: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    import gradinspect.cache
    from gradinspect.cache import Cache
    from gradinspect.runs import trend

    _, url = uploaded
    monkeypatch.setattr(gradinspect.cache, "SETTLE_NS", 0)  # moto's objects were written just now
    pattern = f"{url}/run/step_*.safetensors"
    first = Cache(tmp_path / "c")
    a = trend(pattern, cache=first)
    assert (first.hits, first.misses, first.stored) == (0, 3, 3)
    entries = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*.json")]
    assert all(e["key"]["path"].startswith(url) and e["key"]["size"] > 0 for e in entries)
    assert all(e["key"]["object_version"]["ETag"] for e in entries) and len(entries) == 3
    again = Cache(tmp_path / "c")
    b = trend(pattern, cache=again)
    assert (again.hits, again.misses) == (3, 0)
    assert [repr(s.total) for s in b.steps] == [repr(s.total) for s in a.steps]  # NaN in step 2
    # a new object under the same URL (same size, new ETag) is read again, never answered from the cache
    g = _grads(rng)
    save_file(g, str(tmp_path / "new.safetensors"), metadata={"step": "2"})
    _put(s3, tmp_path / "new.safetensors", f"{url}/run/step_2.safetensors")
    third = Cache(tmp_path / "c")
    c = trend(pattern, cache=third)
    assert (third.hits, third.misses) == (2, 1)
    assert repr(c.steps[1].total) == repr(trend(str(tmp_path / "new.safetensors")).steps[0].total) \
        != repr(a.steps[1].total)


def test_the_cache_is_the_only_thing_written_locally(uploaded: tuple[Path, str], s3: Any, tmp_path: Path) -> None:
    """In a subprocess configured only by environment variables, as a user would (FSSPEC_S3_ENDPOINT_URL)."""
    _, url = uploaded
    home, tmp, cwd, cache = (tmp_path / n for n in ("home", "tmp", "cwd", "cache"))
    for d in (home, tmp, cwd):
        d.mkdir()
    env = {"FSSPEC_S3_ENDPOINT_URL": s3.endpoint, "HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": "",
           "GRADINSPECT_CACHE_DIR": str(cache), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    p = run_process("trend", f"{url}/run/step_*.safetensors", "--format", "json", cwd=cwd, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert strict_json(p.stdout.decode())["steps"][0]["step"] == 1
    assert [list(d.iterdir()) for d in (home, tmp, cwd)] == [[], [], []]


# --- HTTP -------------------------------------------------------------------------------------------------------

def _big(path: Path, rng: np.random.Generator) -> Path:
    save_file({"w": rng.standard_normal(5_000_000).astype(np.float32),  # 20 MB: 5 blocks
               "b": rng.standard_normal(1000).astype(np.float32)}, str(path))
    return path


def test_http_reads_only_ranges_never_the_whole_file(web: Any, rng: np.random.Generator) -> None:
    from gradinspect.sources import remote

    big = _big(web.root / "g.safetensors", rng)
    url = f"{web.url}/g.safetensors"
    for jobs in ("1", "4"):
        web.log.clear()
        assert _numbers(_json("norms", url, "--jobs", jobs), url) == _numbers(_json("norms", big), big)
        gets = [(m, r) for m, _, r in web.log if m == "GET"]
        assert gets and all(r is not None for _, r in gets), web.log
        spans = [tuple(map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", r).groups())) for _, r in gets]  # type: ignore
        assert max(b - a + 1 for a, b in spans) <= remote.BLOCK < big.stat().st_size
        head = (0, remote.HEAD - 1)
        assert spans.count(head) == 1  # the header and its length: one request
        data = [s for s in spans if s != head]
        assert sum(b - a + 1 for a, b in data) <= big.stat().st_size  # each byte fetched at most once


def test_http_transient_errors_are_retried(web: Any, rng: np.random.Generator, quick_retries: None) -> None:
    big = _big(web.root / "g.safetensors", rng)
    url = f"{web.url}/g.safetensors"
    web.fail = 2
    r = run("norms", url, "--format", "json")
    assert r.exit_code == 0, r.stderr
    assert _numbers(r.stdout, url) == _numbers(_json("norms", big), big)
    assert web.fail == 0 and sum(1 for e in web.log if e[0] == "GET" and e[2]) > 2


def test_http_errors_that_persist_are_one_line_naming_the_url(web: Any, rng: np.random.Generator,
                                                               quick_retries: None) -> None:
    _big(web.root / "g.safetensors", rng)
    url = f"{web.url}/g.safetensors"
    web.fail = -1
    r = run("norms", url)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"Error: {url}: read failed: HTTP 503 (gave up after 4 attempts)\n"
    web.fail, web.deny = 0, True
    web.log.clear()
    r = run("norms", url)
    assert r.stderr == f"Error: {url}: access denied (HTTP 403) (check the credentials fsspec uses)\n"
    assert len(web.log) <= 2  # HEAD, then fsspec's GET for the size: no retries
    web.deny = False
    r = run("norms", f"{web.url}/missing.safetensors")
    assert (r.exit_code, r.stderr) == (2, f"Error: {web.url}/missing.safetensors: no such file or object\n")


def test_http_server_ignoring_ranges_is_refused_without_downloading(web: Any, rng: np.random.Generator) -> None:
    _big(web.root / "g.safetensors", rng)
    web.ranges = False
    r = run("norms", f"{web.url}/g.safetensors")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (f"Error: {web.url}/g.safetensors: the server does not honour Range requests "
                        "(gradinspect reads objects by ranges, never whole)\n")


def test_messages_never_show_credentials(web: Any) -> None:
    secret = f"{web.url.replace('http://', 'http://alice:s3cr3t@')}/missing.safetensors?token=t0k3n"
    r = run("norms", secret)
    assert r.exit_code == 2
    assert "s3cr3t" not in r.stderr and "t0k3n" not in r.stderr
    assert r.stderr == f"Error: {web.url.replace('http://', 'http://alice:***@')}/missing.safetensors?…: " \
                       "no such file or object\n"


# --- file:// ---------------------------------------------------------------------------------------------------

def test_file_urls_read_through_fsspec_like_local_paths(tmp_path: Path, rng: np.random.Generator) -> None:
    _need("fsspec")
    (tmp_path / "run").mkdir()
    for step in (1, 2):
        save_file(_grads(rng, 50_000), str(tmp_path / f"run/step_{step}.safetensors"))
    url = (tmp_path / "run").as_uri()
    for args in [("norms", "ROOT/step_1.safetensors"), ("norms", "ROOT/", "--shards", "replicas"),
                 ("trend", "ROOT/step_*.safetensors")]:
        r = run(*(a.replace("ROOT", url) for a in args), "--format", "json")
        ll = run(*(a.replace("ROOT", str(tmp_path / "run")) for a in args), "--format", "json")
        assert r.exit_code == ll.exit_code == 0, r.stderr
        assert _numbers(r.stdout, url) == _numbers(ll.stdout, tmp_path / "run"), args


# --- without the extra ------------------------------------------------------------------------------------------

def test_without_fsspec_a_url_is_one_line_saying_what_to_install() -> None:
    code = ("import sys; sys.modules['fsspec'] = None; sys.modules['fsspec.core'] = None\n"
            "from gradinspect.cli import main; sys.argv = ['gradinspect', 'norms', 's3://bucket/g.safetensors']; "
            "main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (p.returncode, p.stdout) == (2, b"")
    assert p.stderr.decode() == ("Error: s3://bucket/g.safetensors: reading s3:// URLs needs fsspec: "
                                 "pip install 'gradinspect[remote]'\n")


def test_unknown_schemes_are_refused() -> None:
    r = run("norms", "foo://bucket/g.safetensors")
    assert (r.exit_code, r.stderr) == (2, "Error: foo://bucket/g.safetensors: foo:// URLs are not supported\n")


def test_urls_are_recognised_without_importing_fsspec() -> None:
    """The extra is imported only when a URL is read: ``--help`` and local files never load it."""
    code = ("import sys, gradinspect.cli, gradinspect.sources.store as s; "
            "assert s.store_class('s3://b/k').__name__ == 'FsspecStore'; print('fsspec' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout == b"False\n", p.stderr


def test_an_s3_directory_reads_no_torch_file_and_a_glob_does(s3: Any, bucket: str, tmp_path: Path,
                                                              rng: np.random.Generator) -> None:
    """As on disk: a directory URL skips its .pt/.bin files (optimizer state is not gradients) and names them;
    a glob URL of .pt files reads them, with the numbers of the local files."""
    from ptwriter import Storage, T, save

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    w = rng.standard_normal(300).astype(np.float32)
    save_file({"w": w}, str(ckpt / "model.safetensors"))
    save({"w": T(Storage(w * 2), 0, (300,), (1,))}, ckpt / "optimizer.pt")
    save({"g": T(Storage(w * 3), 0, (300,), (1,))}, ckpt / "grads.pt")
    url = f"s3://{bucket}/ckpt"
    for f in ckpt.iterdir():
        _put(s3, f, f"{url}/{f.name}")
    r = run("norms", f"{url}/", "--format", "json")
    local = run("norms", str(ckpt), "--format", "json")
    assert r.exit_code == local.exit_code == 0, r.stderr
    assert [t["name"] for t in strict_json(r.stdout)["tensors"]] == ["w"]
    assert "skipped 2 torch files (grads.pt, optimizer.pt)" in r.stderr and f"'{url}/*.pt'" in r.stderr
    g = run("norms", f"{url}/*.pt", "--format", "json")
    gl = run("norms", str(ckpt / "*.pt"), "--format", "json")
    assert g.exit_code == 0, g.stderr
    assert _numbers(g.stdout, url) == _numbers(gl.stdout, ckpt)
    assert len(strict_json(g.stdout)["sources"]) == 2


# --- parts (--part I/N, merge) ------------------------------------------------------------------------------------

def test_an_object_replaced_between_parts_is_refused_by_merge(s3: Any, bucket: str, tmp_path: Path,
                                                             rng: np.random.Generator) -> None:
    """Two uploads with the same header and size (new values of the same model) are different objects (ETag):
    parts read from each are not merged into a report of neither (as a local file's mtime shows the change)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for f in (a, b):
        save_file({"x": rng.standard_normal((300, 200)).astype(np.float32),
                   "y": rng.standard_normal((300, 200)).astype(np.float32)}, str(f))
    head = 8 + int.from_bytes(a.read_bytes()[:8], "little")  # the same header, the same size, other values
    assert a.read_bytes()[:head] == b.read_bytes()[:head] and a.stat().st_size == b.stat().st_size
    assert a.read_bytes() != b.read_bytes()
    url = f"s3://{bucket}/g.safetensors"
    parts = [tmp_path / "p0.json", tmp_path / "p1.json"]
    for i, f in enumerate((a, b)):
        _put(s3, f, url)
        r = run("norms", url, "--part", f"{i}/2", "--partial", parts[i])
        assert (r.exit_code, r.stdout) == (0, ""), r.stderr
    r = run("merge", *parts)
    assert (r.exit_code, r.stdout) == (2, "")
    assert re.fullmatch(rf"Error: {url}: changed between parts: its header in \S+p1\.json differ from those in "
                        r"\S+p0\.json\n", r.stderr), r.stderr
    parts2 = [tmp_path / "q0.json", tmp_path / "q1.json"]  # the same object in both parts: merged as one run
    for i in range(2):
        assert run("norms", url, "--part", f"{i}/2", "--partial", parts2[i]).exit_code == 0
    whole, merged = run("norms", url, "-f", "json"), run("merge", *parts2, "-f", "json")
    assert (whole.exit_code, merged.exit_code) == (0, 0) and merged.stdout == whole.stdout


def test_a_file_url_replaced_between_parts_is_refused_by_merge(tmp_path: Path, rng: np.random.Generator) -> None:
    """file:// has no ETag: its modification time in the listing tells a file replaced between parts."""
    _need("fsspec")
    a, b, g = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "g.safetensors"
    for f in (a, b):
        save_file({"x": rng.standard_normal((300, 200)).astype(np.float32)}, str(f))
    os.utime(b, ns=(b.stat().st_atime_ns, a.stat().st_mtime_ns + 5_000_000_000))
    url = g.as_uri()
    parts = [tmp_path / "p0.json", tmp_path / "p1.json"]
    for i, f in enumerate((a, b)):
        shutil.copy2(f, g)
        r = run("norms", url, "--part", f"{i}/2", "--partial", parts[i])
        assert (r.exit_code, r.stdout) == (0, ""), r.stderr
    r = run("merge", *parts)
    assert (r.exit_code, r.stdout) == (2, "") and "changed between parts" in r.stderr, r.stderr
    same = [tmp_path / "q0.json", tmp_path / "q1.json"]
    for i in range(2):
        assert run("norms", url, "--part", f"{i}/2", "--partial", same[i]).exit_code == 0
    assert run("merge", *same, "-f", "json").stdout == run("norms", url, "-f", "json").stdout
