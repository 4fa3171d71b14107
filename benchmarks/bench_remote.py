"""Throughput of ``gradinspect norms`` from a local S3 endpoint (moto in server mode) against the same file on disk.

    python benchmarks/bench_remote.py                       # a 512 MiB float32 safetensors file
    python benchmarks/bench_remote.py --size-mib 1024 --jobs 1 4 8 --runs 3

Needs the ``remote`` extra and ``moto[server]``.  The file is made once in ``--data``
(default benchmarks/data/).  moto runs in this process on 127.0.0.1 and keeps the object
in memory; so does a small HTTP server answering Range requests from the file (an
endpoint whose cost per request does not grow with the object).  Each run of the CLI is
a fresh process (``FSSPEC_S3_ENDPOINT_URL`` points it at moto, as a user would point it
at MinIO), timed with its peak RSS; the local runs read a file in the page cache.  Every
run must give the same global norm as the local one, bit for bit.  The last rows read
the same 4 MiB ranges with s3fs alone (no gradinspect): the endpoint's own ceiling.
moto is a Python server sharing the cores with the client, and it copies the whole
object for every ranged GET, so its time per request grows with the object: its figures
say what this endpoint gives, not what S3 would.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def make_file(path: Path, size_mib: int) -> Path:
    """A float32 safetensors file of about ``size_mib`` MiB: 8 tensors of gradient-like values."""
    if path.exists():
        return path
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    n = (size_mib << 20) // 4 // 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"layers.{i}.weight": (rng.standard_normal(n, dtype=np.float32) * np.float32(10.0 ** -i))
               for i in range(8)}, str(path))
    return path


def timed(args: list[str], env: dict[str, str]) -> tuple[float, int, dict[str, object]]:
    """(wall seconds, peak RSS KiB, JSON report) of one CLI run in a fresh process."""
    cmd = [sys.executable, str(HERE / "_rss.py"), sys.executable, "-m", "gradinspect", *args, "--format", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    out = p.stdout.strip().splitlines()
    rss = json.loads(out[-1])
    return rss["wall"], rss["peak_rss_kib"], json.loads("\n".join(out[:-1]))


_BASELINE = """
import fsspec
from concurrent.futures import ThreadPoolExecutor
fs, path = fsspec.core.url_to_fs("{url}")
block = 4 << 20
with ThreadPoolExecutor({workers}) as ex:
    got = sum(ex.map(lambda i: len(fs.cat_file(path, start=i, end=min(i + block, {size}))), range(0, {size}, block)))
assert got == {size}
"""


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files of ``server.root`` with one ``bytes=a-b`` Range (206), read with seek: an efficient endpoint."""

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(False)

    def do_GET(self) -> None:
        self.answer(True)

    def answer(self, body: bool) -> None:
        p = self.server.root / self.path.lstrip("/")  # type: ignore[attr-defined]
        size = p.stat().st_size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        start, end = (int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)) if m else (0, size - 1)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{p.stat().st_mtime_ns:x}-{size:x}"')
        self.end_headers()
        if body:
            with open(p, "rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    path = make_file(args.data / f"remote_f32_{args.size_mib}mib.safetensors", args.size_mib)
    size = path.stat().st_size

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(size + (1 << 20)))  # the object in RAM, not a temp file
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import s3fs
    from moto.server import ThreadedMotoServer

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    web.root = path.parent  # type: ignore[attr-defined]
    threading.Thread(target=web.serve_forever, daemon=True).start()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        fs.pipe_file(f"bench/{path.name}", path.read_bytes(), chunksize=size + 1)  # one PUT, no multipart
        url = f"s3://bench/{path.name}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FSSPEC_S3_ENDPOINT_URL": endpoint}
        print(f"file: {path.name}, {size / 2**20:.0f} MiB float32 safetensors; {args.runs} runs each, median\n")
        print("| source | --jobs | wall (s) | MB/s | peak RSS (MiB) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        reference = None
        http_url = f"http://127.0.0.1:{web.server_address[1]}/{path.name}"
        for source in (str(path), http_url, url):
            for jobs in args.jobs:
                runs = [timed(["norms", source, "--jobs", str(jobs)], env) for _ in range(args.runs)]
                totals = {json.dumps(r[2]["total"], sort_keys=True) for r in runs}
                if reference is None:
                    reference = totals.pop() if len(totals) == 1 else None
                    if reference is None:
                        raise SystemExit("local runs disagree")
                elif totals != {reference}:
                    raise SystemExit(f"{source} --jobs {jobs}: totals differ from the local file's")
                wall = statistics.median(r[0] for r in runs)
                rss = max(r[1] for r in runs) / 1024
                where = {str(path): "local disk", url: "moto S3 (127.0.0.1)"}.get(source, "HTTP ranges (127.0.0.1)")
                print(f"| {where} | {jobs} | {wall:.2f} | {size / wall / 1e6:.0f} | {rss:.0f} |")
        # the endpoint's ceiling: the same 4 MiB ranges read by s3fs alone, sequentially and 4 at a time
        for workers in (1, 4):
            code = _BASELINE.format(url=url, size=size, workers=workers)
            walls = []
            for _ in range(args.runs):
                p = subprocess.run([sys.executable, str(HERE / "_rss.py"), sys.executable, "-c", code],
                                   capture_output=True, text=True, env=env, cwd=ROOT, check=True)
                walls.append(json.loads(p.stdout.strip().splitlines()[-1])["wall"])
            wall = statistics.median(walls)
            print(f"| s3fs cat_file of 4 MiB ranges alone, {workers} at a time | - | {wall:.2f} | "
                  f"{size / wall / 1e6:.0f} | - |")
        print("\nevery run's global norms are bit-for-bit those of the local file")
    finally:
        server.stop()
        web.shutdown()


if __name__ == "__main__":
    main()
