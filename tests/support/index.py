"""A real PEP 503 "simple" package index on loopback, with fault injection.

The server is aiohttp in a background thread with its own event loop, so synchronous tests
(and pip in a subprocess) can talk to it while the test itself blocks. The dist files are
found by scanning ``files_dir`` at request time: a test may add or replace files after
``start()``. Pages carry ``#sha256=`` fragments and ``data-requires-python`` like PyPI's.

Faults are per file name and apply to ``/files/{filename}`` only; the simple page always
advertises the real file's hash, which is the point of ``corrupt``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.parser
import html
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import aiofiles
from aiohttp import web
from aiohttp.typedefs import Handler
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from tests.support.wheels import sha256_file

__all__ = ["PackageIndex", "index_pip_args"]

_CHUNK = 64 * 1024
_SDIST_SUFFIXES = (".tar.gz", ".zip")
_START_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class _DistInfo:
    filename: str
    project: str  # canonical name
    sha256: str
    requires_python: str | None


def _project_of(filename: str) -> str | None:
    """Canonical project name of a dist file name, or None if it is not a dist file.

    Wheel and sdist names are parsed by ``packaging``; a name it rejects (a deliberately
    broken test file) falls back to the wheel rule (name ends at the first ``-``) or the sdist
    rule (version starts after the last ``-``, since names may contain ``-`` but versions
    may not), so odd files are still served.
    """
    if filename.endswith(".whl"):
        try:
            return str(parse_wheel_filename(filename)[0])
        except InvalidWheelFilename:
            return canonicalize_name(filename.split("-", 1)[0])
    for suffix in _SDIST_SUFFIXES:
        if filename.endswith(suffix):
            try:
                return str(parse_sdist_filename(filename)[0])
            except (InvalidSdistFilename, ValueError):
                stem = filename[: -len(suffix)]
                name, sep, _ = stem.rpartition("-")
                return canonicalize_name(name) if sep else None
    return None


def _requires_python(path: Path) -> str | None:
    """Requires-Python from a wheel's METADATA or an sdist's PKG-INFO; None if unknown."""
    raw: bytes | None = None
    try:
        if path.name.endswith(".whl"):
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    top, _, rest = member.partition("/")
                    if top.endswith(".dist-info") and rest == "METADATA":
                        raw = zf.read(member)
                        break
        elif path.name.endswith(".tar.gz"):
            with tarfile.open(path, "r:gz") as tf:
                for tar_member in tf.getmembers():
                    if tar_member.name.count("/") == 1 and tar_member.name.endswith("/PKG-INFO"):
                        fh = tf.extractfile(tar_member)
                        if fh is not None:
                            raw = fh.read()
                        break
    except (OSError, zipfile.BadZipFile, tarfile.TarError, KeyError):
        return None
    if raw is None:
        return None
    value = email.parser.BytesParser().parsebytes(raw, headersonly=True).get("Requires-Python")
    return None if value is None else str(value)


def index_pip_args(index: PackageIndex) -> list[str]:
    """The pip arguments that make pip use ``index`` and nothing else."""
    return ["--index-url", index.simple_url]


class PackageIndex:
    """A PEP 503 index serving the dist files of ``files_dir`` on ``127.0.0.1``.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Thread-safe: the fault
    setters and counters may be used from any thread while the server runs.
    """

    def __init__(self, files_dir: Path) -> None:
        self.files_dir = files_dir
        #: GET requests per file name under ``/files/`` (faulted and missing files count too).
        self.download_counts: collections.Counter[str] = collections.Counter()
        self._log: list[str] = []
        self._lock = threading.Lock()
        self._truncate: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._delay: dict[str, float] = {}
        self._info_cache: dict[tuple[str, int, int, int], _DistInfo] = {}
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PackageIndex:
        """Start serving; returns once the port is bound. Returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("PackageIndex already started")
        self._thread = threading.Thread(target=self._run, name="PackageIndex", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("PackageIndex did not start in time")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("PackageIndex failed to start") from self._error
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; in-flight responses are cut off. Idempotent."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            # RuntimeError: the loop closed between the check and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> PackageIndex:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        if self._port is None:
            raise RuntimeError("PackageIndex is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def simple_url(self) -> str:
        return f"{self.url}/simple/"

    def file_url(self, filename: str) -> str:
        return f"{self.url}/files/{quote(filename)}"

    def pip_args(self) -> list[str]:
        return index_pip_args(self)

    # -- observations ----------------------------------------------------------------------

    def downloads(self, filename: str) -> int:
        with self._lock:
            return self.download_counts[filename]

    @property
    def requests_log(self) -> list[str]:
        """Paths of every request served so far, in order (a copy)."""
        with self._lock:
            return list(self._log)

    def reset_counters(self) -> None:
        """Forget download counts and the request log."""
        with self._lock:
            self.download_counts.clear()
            self._log.clear()

    # -- faults ----------------------------------------------------------------------------

    def truncate(self, filename: str, at: int) -> None:
        """Send the full Content-Length, then only ``at`` bytes, then close the connection."""
        with self._lock:
            self._truncate[filename] = at

    def corrupt(self, filename: str) -> None:
        """Serve the file with one byte flipped (in the middle): same length, other sha256."""
        with self._lock:
            self._corrupt.add(filename)

    def delay(self, filename: str, seconds: float) -> None:
        """Wait ``seconds`` after the response starts and before the body is sent."""
        with self._lock:
            self._delay[filename] = seconds

    def clear_faults(self) -> None:
        with self._lock:
            self._truncate.clear()
            self._corrupt.clear()
            self._delay.clear()

    # -- server ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); a thread must not raise
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._log_middleware])
        app.router.add_get("/simple/", self._handle_root)
        app.router.add_get("/simple/{project}/", self._handle_project)
        app.router.add_get("/simple/{project}", self._redirect_to_slash)
        app.router.add_get("/files/{filename}", self._handle_file)
        # A short shutdown: stop() must not wait on a delayed or stalled download.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._port = int(runner.addresses[0][1])
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await runner.cleanup()

    @web.middleware
    async def _log_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self._lock:
            self._log.append(request.path)
        return await handler(request)

    def _dists(self) -> list[_DistInfo]:
        """Scan ``files_dir`` now (blocking; run in a worker thread)."""
        if not self.files_dir.is_dir():
            return []
        found: list[_DistInfo] = []
        for path in sorted(self.files_dir.iterdir()):
            project = _project_of(path.name)
            if project is None or not path.is_file():
                continue
            st = path.stat()
            key = (path.name, st.st_size, st.st_mtime_ns, st.st_ino)
            with self._lock:
                info = self._info_cache.get(key)
            if info is None:
                info = _DistInfo(path.name, project, sha256_file(path), _requires_python(path))
                with self._lock:
                    self._info_cache[key] = info
            found.append(info)
        return found

    async def _handle_root(self, request: web.Request) -> web.Response:
        projects = sorted({d.project for d in await asyncio.to_thread(self._dists)})
        links = "".join(f'<a href="/simple/{p}/">{p}</a><br/>\n' for p in projects)
        return web.Response(text=_page("Simple index", links), content_type="text/html")

    async def _handle_project(self, request: web.Request) -> web.Response:
        project = canonicalize_name(request.match_info["project"])
        dists = [d for d in await asyncio.to_thread(self._dists) if d.project == project]
        if not dists:
            raise web.HTTPNotFound(text=f"no such project: {project}")
        links = []
        for d in dists:
            attrs = f'href="/files/{quote(d.filename)}#sha256={d.sha256}"'
            if d.requires_python is not None:
                attrs += f' data-requires-python="{html.escape(d.requires_python)}"'
            links.append(f"<a {attrs}>{html.escape(d.filename)}</a><br/>\n")
        return web.Response(
            text=_page(f"Links for {project}", "".join(links)), content_type="text/html"
        )

    async def _redirect_to_slash(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(location=f"{request.path}/")

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        filename = request.match_info["filename"]
        with self._lock:
            if request.method == "GET":
                self.download_counts[filename] += 1
            truncate_at = self._truncate.get(filename)
            corrupt = filename in self._corrupt
            delay = self._delay.get(filename, 0.0)
        path = self.files_dir / filename
        if filename in {"", ".", ".."} or "/" in filename or not path.is_file():
            raise web.HTTPNotFound(text=f"no such file: {filename}")
        size = path.stat().st_size
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        if delay > 0:
            await asyncio.sleep(delay)
        limit = size if truncate_at is None else max(0, min(truncate_at, size))
        flip_at = size // 2 if corrupt else -1
        sent = 0
        try:
            async with aiofiles.open(path, "rb") as fh:
                while sent < limit:
                    chunk = await fh.read(min(_CHUNK, limit - sent))
                    if not chunk:
                        break
                    if sent <= flip_at < sent + len(chunk):
                        i = flip_at - sent
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                    await resp.write(chunk)
                    sent += len(chunk)
        except ConnectionError:
            return resp  # the client went away (a test's timeout): nothing left to do
        if truncate_at is not None and request.transport is not None:
            # close() flushes what was written, then ends the connection short of the
            # promised Content-Length; aiohttp's final write_eof then sees a closed transport
            # and gives up quietly.
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        '<meta name="pypi:repository-version" content="1.0">\n'
        f"<title>{html.escape(title)}</title>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}</body>\n</html>\n"
    )
