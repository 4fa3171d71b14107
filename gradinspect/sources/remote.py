"""Remote objects (``s3://``, ``gs://``, ``hf://``, ``http(s)://``, ``file://``) read through fsspec.

Needs the optional extra ``gradinspect[remote]`` (fsspec and each protocol's
package); without it a URL is one ``Error:`` line saying what to install.
fsspec's configuration applies as for any fsspec user: credentials from the
usual places (``AWS_*`` variables, ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``HF_TOKEN``), options from ``FSSPEC_<PROTOCOL>_<OPTION>`` variables or
``~/.config/fsspec/*.json`` (``FSSPEC_S3_ENDPOINT_URL=http://localhost:9000``
for a MinIO or other S3-compatible endpoint).

:class:`FsspecStore` reads ranges, never a whole object: headers by ranged
reads of what the parser asks for; tensor data (reads of at least
:data:`BLOCK_MIN` bytes: the engine's chunks) in aligned blocks of
:data:`BLOCK` bytes, fetched once and shared by the ``--jobs`` threads, with
the next :data:`AHEAD` blocks fetched in the background; at most
:data:`KEEP` blocks are held (bounded memory), and nothing is written to
disk.  No fsspec file cache is used (``cat_file`` with a range; for HTTP a
file opened with ``cache_type="none"``, which refuses a server that ignores
``Range`` rather than downloading the whole object).

Within the first :data:`HEAD` bytes, small reads are served from one fetch
of them (a safetensors header and its length: one request).

Identity: the object's size and whatever fsspec's ``info`` reports of its
version (ETag, version id or generation, content hashes, modification
time), recorded at open and compared after the last read (a fresh ``info``,
listing caches dropped): an object replaced meanwhile is
``changed while being read``.  An HTTP server that reports neither an ETag
nor a Last-Modified date leaves only the size to compare.

Errors: a missing object (404) or refused access (401/403) is one line at
once; transient errors (HTTP 408/429/5xx, timeouts, dropped connections)
are retried :data:`RETRIES` times with exponential backoff, then one line
naming the URL.  Messages name the URL with any password and query string
removed, never credentials.
"""

from __future__ import annotations

import collections
import datetime
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import GradInspectError, InputError
from .store import ByteStore, scheme_of

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["FsspecStore", "REMOTE_EXTRA", "SCHEMES", "display", "is_url", "resolve_url", "url_size", "url_state"]

REMOTE_EXTRA = "pip install 'gradinspect[remote]'"
#: URL schemes read through fsspec (the extra installs s3fs, gcsfs, huggingface_hub and aiohttp for these).
SCHEMES = ("s3", "s3a", "gs", "gcs", "hf", "http", "https", "file", "az", "abfs", "abfss")
RETRIES = 3  #: retries of a transient error (so at most RETRIES + 1 attempts)
BACKOFF = 0.5  #: seconds before the first retry, doubled before each next one
BLOCK = 4 << 20  #: bytes per ranged read of tensor data
BLOCK_MIN = 64 << 10  #: smaller reads (headers, small tensors) fetch exactly what they ask for ...
HEAD = 64 << 10  #: ... except within the first HEAD bytes, fetched once (a header in one request)
AHEAD = 2  #: blocks fetched ahead of the one being read
KEEP = 12  #: blocks held at most per store

T = TypeVar("T")

# Version and content fields of fsspec's info() across backends: s3fs, gcsfs, huggingface_hub, http, local.
_ID_FIELDS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "crc32c", "blob_id", "lfs",
              "LastModified", "Last-Modified", "last_modified", "updated", "mtime", "ino")
_TOKENS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "crc32c", "blob_id", "lfs")
_MTIMES = ("LastModified", "Last-Modified", "last_modified", "updated", "mtime")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL this module reads."""
    return scheme_of(path) in SCHEMES


def display(url: str) -> str:
    """``url`` as error messages and reports show it: no password, no query string (signatures, tokens)."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    netloc = u.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}" if ":" in user else f"{user}@{host}"
    query = "?…" if u.query else ""
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", "")) + query


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _scrub(text: str) -> str:
    return _URL.sub(lambda m: display(m.group(0)), text)[:200]


# --- errors and retries ---------------------------------------------------------------------------------------

_TRANSIENT_NAMES = {"TimeoutError", "ConnectionError", "ClientConnectionError", "ClientPayloadError",
                    "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError", "EndpointConnectionError",
                    "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ResponseStreamingError",
                    "IncompleteReadError", "ChunkedEncodingError", "ReadTimeout", "ConnectTimeout",
                    "RemoteProtocolError", "ProtocolError"}


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and len(out) < 8 and x not in out:
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


def _status(e: BaseException) -> int | None:
    """The HTTP status an exception (or one it came from) carries: aiohttp, botocore, requests/httpx."""
    for x in _chain(e):
        s = getattr(x, "status", None)
        if isinstance(s, int) and 100 <= s < 600:
            return s
        r = getattr(x, "response", None)
        if isinstance(r, dict):  # botocore ClientError
            s = r.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(s, int):
                return s
        s = getattr(r, "status_code", None)
        if isinstance(s, int):
            return s
    return None


def classify(e: BaseException) -> tuple[str, str]:
    """(kind, what) of an error from fsspec: kind is missing, denied, transient or fatal."""
    status = _status(e)
    if status is not None:
        what = f"HTTP {status}"
        if status in (404, 410):
            return "missing", what
        if status in (401, 403):
            return "denied", what
        if status in (408, 429) or status >= 500:
            return "transient", what
        if status == 416:
            return "fatal", f"{what} (range not satisfiable)"
        if status == 412:
            return "fatal", f"{what} (precondition failed)"
    names = {c.__name__ for x in _chain(e) for c in type(x).__mro__}
    if names & _TRANSIENT_NAMES:
        return "transient", type(e).__name__
    if isinstance(e, FileNotFoundError):
        return "missing", ""
    if isinstance(e, PermissionError):
        return "denied", ""
    msg = _scrub(str(e))
    return "fatal", f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def call(where: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, transient errors retried with backoff; any error as one InputError naming ``where``."""
    delay = BACKOFF
    for attempt in range(RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except GradInspectError:
            raise
        except Exception as e:
            kind, what = classify(e)
            if kind == "transient" and attempt < RETRIES:
                time.sleep(delay)
                delay *= 2
                continue
            if kind == "missing":
                problem = "no such file or object"
            elif kind == "denied":
                problem = "access denied" + (f" ({what})" if what else "") + " (check the credentials fsspec uses)"
            elif kind == "transient":
                problem = f"read failed: {what} (gave up after {RETRIES + 1} attempts)"
            else:
                problem = f"read failed: {what}"
            raise InputError(where, problem) from None
    raise AssertionError("unreachable")  # pragma: no cover


# --- filesystems ----------------------------------------------------------------------------------------------

def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of ``url``; one-line InputError when fsspec or the protocol's
    package is missing."""
    scheme = scheme_of(url)
    try:
        import fsspec.core
    except ImportError:
        raise InputError(display(url), f"reading {scheme}:// URLs needs fsspec: {REMOTE_EXTRA}") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs, str(path)
    except ImportError as e:
        need = f" ({_scrub(str(e))})" if str(e) else ""
        raise InputError(display(url), f"reading {scheme}:// URLs needs a package that is not installed{need}: "
                         f"{REMOTE_EXTRA}") from None
    except GradInspectError:
        raise
    except Exception as e:
        raise InputError(display(url), f"cannot open: {classify(e)[1]}") from None


def _is_http(fs: Any) -> bool:
    protocol = fs.protocol
    return bool({"http", "https"} & set(protocol if isinstance(protocol, (tuple, list)) else (protocol,)))


def _info(fs: Any, path: str, where: str) -> dict[str, Any]:
    fs.invalidate_cache(path)  # a listing cached earlier would answer for the past
    info: dict[str, Any] = call(where, fs.info, path)
    return info


def _text(v: Any) -> str:
    if isinstance(v, datetime.datetime):  # the same instant, whatever time zone it is given in
        return repr(v.timestamp()) if v.tzinfo is not None else v.isoformat()
    if isinstance(v, dict):
        return repr(sorted((str(k), _text(x)) for k, x in v.items()))
    return str(v)


Ident = tuple[int, tuple[tuple[str, str], ...]]


def identity_of(info: dict[str, Any], size: int) -> Ident:
    """The size and the version fields ``info`` holds, as plain data."""
    fields = tuple((k, _text(info[k])) for k in _ID_FIELDS if info.get(k) is not None)
    return (size, fields)


def _mtime_ns(info: dict[str, Any]) -> int | None:
    for k in _MTIMES:
        v = info.get(k)
        try:
            if isinstance(v, datetime.datetime):
                return int(v.timestamp() * 1e9) if v.tzinfo is not None else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return int(v * 1e9)
            if isinstance(v, str):
                import email.utils

                return int(email.utils.parsedate_to_datetime(v).timestamp() * 1e9)
        except (TypeError, ValueError, OverflowError):
            continue
    return None


# --- the store ------------------------------------------------------------------------------------------------

class _Block:
    __slots__ = ("data", "done", "error", "served", "started")

    def __init__(self) -> None:
        self.data = b""
        self.started = False
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.served = 0


class FsspecStore(ByteStore):
    """An object read by ranges through fsspec; see the module docstring."""

    schemes = SCHEMES

    def __init__(self, url: str, fs: Any, fspath: str, info: dict[str, Any], size: int) -> None:
        self.url = url
        self.key = url
        self.path = display(url)
        self.fs = fs
        self.fspath = fspath
        self.size = size
        self.ident = identity_of(info, size)
        self.mtime_ns = _mtime_ns(info)
        self.http = _is_http(fs)
        self.lock = threading.Lock()
        self.blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()
        self.pool: ThreadPoolExecutor | None = None
        self.head: bytes | None = None  # the first HEAD bytes, once a small read asked for some of them

    @classmethod
    def open(cls, path: str) -> FsspecStore:
        fs, fspath = filesystem(path)
        where = display(path)
        info = _info(fs, fspath, where)
        if info.get("type") == "directory":
            raise InputError(where, "is a directory")
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise InputError(where, "the server does not say the object's size (ranged reads need it)")
        if size == 0:
            raise InputError(where, "empty file")
        return cls(path, fs, fspath, info, size)

    @classmethod
    def reopen(cls, path: str, ident: Any, key: str | None = None) -> FsspecStore:
        store = cls.open(path)
        if store.ident != ident:
            raise InputError(store.path, "changed while being read")
        return store

    def reopen_spec(self) -> tuple[type[ByteStore], str, Any]:
        return (FsspecStore, self.url, self.ident)

    def cache_key(self) -> dict[str, Any] | None:
        """What keys this object in the statistics cache, or None when nothing identifies its version
        (no ETag, version id or content hash; an HTTP server without a modification time)."""
        fields = dict(self.ident[1])
        if not any(k in fields for k in _TOKENS) or (self.http and self.mtime_ns is None):
            return None
        opts = getattr(self.fs, "storage_options", {}) or {}
        endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
        key: dict[str, Any] = {"path": self.url, "size": self.size, "object_version": dict(sorted(fields.items())),
                               "endpoint": str(endpoint) if endpoint else None}
        if self.mtime_ns is not None:
            key["mtime_ns"] = self.mtime_ns  # the cache does not store an object changed seconds ago
        return key

    # --- reads ---

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes [start, end) in one ranged request (retried; never more than asked for)."""
        def get() -> bytes:
            if self.http:  # cat_file would read a whole object from a server that ignores Range
                with self.fs.open(self.fspath, "rb", block_size=max(end - start, 1), cache_type="none",
                                  size=self.size) as f:
                    f.seek(start)
                    try:
                        data: bytes = f.read(end - start)
                    except ValueError as e:
                        if "range" not in str(e):
                            raise
                        raise InputError(self.path, "the server does not honour Range requests "
                                         "(gradinspect reads objects by ranges, never whole)") from None
                    return data
            out: bytes = self.fs.cat_file(self.fspath, start=start, end=end)
            return out

        return call(self.path, get)

    def read_into(self, view: memoryview, offset: int) -> None:
        n = len(view)
        if offset + n > self.size:
            raise InputError(self.path, f"unexpected end of file at byte {self.size}")
        if n < BLOCK_MIN:
            head = self.head
            if head is None and offset < HEAD:  # the first read of a header: one request for the usual header
                head = self.head = self.fetch(0, min(HEAD, self.size))
            if head is not None and offset + n <= len(head):
                view[:] = head[offset : offset + n]
                return
            data = self.fetch(offset, offset + n)
            if len(data) != n:
                self.verify()
                raise InputError(self.path, f"unexpected end of data at byte {offset + len(data)}")
            view[:] = data
            return
        pos = 0
        while pos < n:
            k = (offset + pos) // BLOCK
            data = self.block(k)
            rel = offset + pos - k * BLOCK
            m = min(n - pos, len(data) - rel)
            if m <= 0:
                self.verify()
                raise InputError(self.path, f"unexpected end of data at byte {offset + pos}")
            view[pos : pos + m] = data[rel : rel + m]
            self.served(k, m)
            pos += m

    def block(self, k: int) -> bytes:
        """Block ``k``'s bytes, fetched once whichever thread asks first; the next ones are fetched ahead."""
        with self.lock:
            b = self.blocks.get(k)
            if b is None:
                b = self.blocks[k] = _Block()
            self.blocks.move_to_end(k)
            ahead = [(j, _Block()) for j in range(k + 1, min(k + 1 + AHEAD, -(-self.size // BLOCK)))
                     if j not in self.blocks]
            self.blocks.update(ahead)
            self.evict()
            if ahead and self.pool is None:
                from concurrent.futures import ThreadPoolExecutor  # not at import: most runs read local files

                self.pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="gradinspect-fetch")
            pool = self.pool
        for j, a in ahead:
            assert pool is not None
            try:
                pool.submit(self.load, a, j)
            except RuntimeError:  # closed meanwhile: whoever needs the block fetches it
                break
        self.load(b, k)  # unless another thread has started it
        b.done.wait()
        if b.error is not None:
            with self.lock:
                if self.blocks.get(k) is b:
                    del self.blocks[k]
            raise b.error
        return b.data

    def load(self, b: _Block | None, k: int) -> None:
        with self.lock:
            if b is None or b.started:
                return
            b.started = True
        try:
            b.data = self.fetch(k * BLOCK, min((k + 1) * BLOCK, self.size))
        except BaseException as e:
            b.error = e
        finally:
            b.done.set()

    def served(self, k: int, m: int) -> None:
        """A block whose every byte was read once is dropped (the engine reads each byte once)."""
        with self.lock:
            b = self.blocks.get(k)
            if b is not None:
                b.served += m
                if b.served >= len(b.data):
                    del self.blocks[k]

    def evict(self) -> None:
        """Hold at most KEEP blocks: drop the least recently used that are fetched (lock held)."""
        while len(self.blocks) > KEEP:
            victim = next((j for j, b in self.blocks.items() if b.done.is_set()), None)
            if victim is None:
                return
            del self.blocks[victim]

    # --- lifecycle ---

    def verify(self) -> None:
        try:
            info = _info(self.fs, self.fspath, self.path)
        except InputError as e:
            if e.problem.startswith("no such file"):
                raise InputError(self.path, "changed while being read (it is gone)") from None
            raise
        size = info.get("size")
        if identity_of(info, size if isinstance(size, int) else -1) != self.ident:
            raise InputError(self.path, "changed while being read")

    def finish(self) -> None:
        try:
            self.verify()
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.blocks.clear()
            self.head = None
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _entries(fs: Any, found: Any) -> list[tuple[str, bool]]:
    """(URL, is a file) of fsspec listing or glob results, sorted by URL."""
    items = found.items() if isinstance(found, dict) else ((e["name"], e) for e in found)
    return sorted((fs.unstrip_protocol(name), info.get("type") != "directory") for name, info in items)


def _has_magic(url: str) -> bool:
    """A glob: ``*``, ``?`` or ``[`` (only ``*`` in an http(s) URL, where ``?`` starts the query)."""
    if scheme_of(url) in ("http", "https"):
        return "*" in url
    return any(c in url for c in "*?[")


def resolve_url(url: str, recognised: Callable[[str], bool]) -> tuple[str, list[str], list[str]]:
    """What a URL PATH is: ``("glob", matches, [])``, ``("dir", files, other names)`` (``recognised(name)``
    says which names are read) or ``("file", [url], [])``.  Listed through fsspec, sorted by URL."""
    where = display(url)
    fs, fspath = filesystem(url)
    if _has_magic(url):
        return "glob", [u for u, _ in _entries(fs, call(where, fs.glob, fspath, detail=True))], []
    name = fspath.rstrip("/").rsplit("/", 1)[-1]
    if recognised(name) and not url.endswith("/"):  # a file by its name: no request
        return "file", [url], []
    if _is_http(fs) and not url.endswith("/"):
        return "file", [url], []
    try:
        is_dir = url.endswith("/") or _info(fs, fspath, where).get("type") == "directory"
    except InputError as e:
        if e.problem.startswith("no such file"):
            return "file", [url], []  # opening it says so
        raise
    if not is_dir:
        return "file", [url], []
    files: list[str] = []
    other: list[str] = []
    for u, is_file in _entries(fs, call(where, fs.ls, fspath, detail=True)):
        if not is_file:
            continue
        base = u.rstrip("/").rsplit("/", 1)[-1]
        (files if recognised(base) else other).append(base if not recognised(base) else u)
    return "dir", files, other


def url_size(url: str) -> int:
    """The size of the object at ``url`` (for a progress total)."""
    fs, fspath = filesystem(url)
    size = _info(fs, fspath, display(url)).get("size")
    return size if isinstance(size, int) else 0


def url_state(url: str) -> tuple[Any, ...]:
    """What ``trend --follow`` compares between looks: the object's identity (None: gone)."""
    fs, fspath = filesystem(url)
    try:
        info = _info(fs, fspath, display(url))
    except InputError:
        return (url, None)
    size = info.get("size")
    return (url, identity_of(info, size if isinstance(size, int) else -1))
