"""What the daemon does, independent of HTTP: resolve, bundle uploads, leases, status, GC.

One :class:`Service` (one :class:`~cas_daemon.store.Store`, used from one event loop) serves
every request, so the store's single flight covers all clients: any number of requests for a
wheel share one download and one unpack.

Trust boundary: requests come from any user who may open the socket. So the daemon never
opens a path a client names (bundled wheels arrive as bytes, :class:`Uploads`), never runs an
interpreter a client names (it compiles with one it found itself whose cache tag matches,
:class:`~cas_daemon.config.KnownInterpreters`), and fetches only http(s) URLs on the allowed
index hosts (:func:`check_host`).

The other store modules are called from one place each: metadata from the ``_record``
methods, views from :meth:`Service._view`, gc from :meth:`Service.gc`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cas_daemon import views
from cas_daemon.config import DaemonConfig, KnownInterpreters
from cas_daemon.errors import HashMismatch, StoreError
from cas_daemon.layout import StoreLayout
from cas_daemon.leases import process_start_time
from cas_daemon.metadata import Metadata
from cas_daemon.progress import ProgressCallback, ProgressEvent
from cas_daemon.store import Store, StoreStats, WheelRef
from lockgen.errors import WheelcasError
from lockgen.lockfile import LockedDep, Sha256, sha256_hex

log = logging.getLogger("wheelcas.daemon")
_STATS_TTL_S = 10.0
_MAX_DEPS = 20_000


class BadRequest(WheelcasError):
    """A request body that is not what the API takes; names the field at fault."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        super().__init__(f"bad request: `{where}` {problem} (see docs/api.md)")


class HostNotAllowed(WheelcasError):
    """A dep URL not on an allowed index host: refused, never fetched."""

    def __init__(self, url: str, host: str, allowed: Sequence[str]) -> None:
        self.url = url
        self.host = host
        super().__init__(
            f"the wheelcas daemon refuses to download {url}: its host {host!r} is not one of "
            f"the allowed index hosts ({', '.join(allowed) or 'none'}). If that index is "
            "trusted, add it to `fetch.allowed_hosts` in the daemon's configuration "
            "(docs/daemon.md) and restart the daemon."
        )


class MissingBundles(WheelcasError):
    """Bundled wheels the daemon has neither published nor received: upload, then retry."""

    def __init__(self, shas: Sequence[str]) -> None:
        self.missing_bundles = list(shas)
        super().__init__(f"{len(shas)} bundled wheel(s) must be uploaded first")


class UploadRefused(WheelcasError):
    """An upload the daemon will not take (too large, a bad name, a refused format)."""


class LeaseNotFound(WheelcasError):
    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        super().__init__(f"no lease {lease_id} (it was released, or its process ended)")


class NotPermitted(WheelcasError):
    """A request about something that belongs to another user's process."""


class Unavailable(WheelcasError):
    """A feature this daemon cannot offer right now (a module or the index is missing)."""


@dataclass(frozen=True, slots=True)
class PythonSpec:
    cache_tag: str
    version: str
    implementation: str


@dataclass(frozen=True, slots=True)
class DepSpec:
    sha256: Sha256
    filename: str
    url: str | None  # None: a bundled wheel, uploaded as bytes


@dataclass(frozen=True, slots=True)
class ResolveRequest:
    deps: tuple[DepSpec, ...]
    python: PythonSpec
    lease: bool = False


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of the socket, as the kernel says (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{where}.{key}" if where else key, f"must be a {kind.__name__}")
    return value


def check_filename(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise BadRequest(where, f"is not a plain file name: {name!r}")
    return name


def parse_resolve_request(data: object) -> ResolveRequest:
    """Validate a ``/v1/resolve`` (or ``/v1/prefetch``) body: see docs/api.md."""
    if not isinstance(data, dict):
        raise BadRequest("(body)", "must be a JSON object")
    raw_deps = _field(data, "deps", list, "")
    if len(raw_deps) > _MAX_DEPS:
        raise BadRequest("deps", f"has more than {_MAX_DEPS} entries")
    deps = []
    for i, raw in enumerate(raw_deps):
        where = f"deps[{i}]"
        if not isinstance(raw, dict):
            raise BadRequest(where, "must be an object")
        try:
            sha = sha256_hex(_field(raw, "sha256", str, where))
        except ValueError:
            raise BadRequest(f"{where}.sha256", "is not a lower-case sha256 hex digest") from None
        if raw.get("bundled") is True:
            filename = check_filename(_field(raw, "filename", str, where), f"{where}.filename")
            deps.append(DepSpec(sha, filename, None))
        else:
            url = _field(raw, "url", str, where)
            deps.append(DepSpec(sha, LockedDep(sha256=sha, url=url).filename, url))
    py = _field(data, "python", dict, "")
    python = PythonSpec(
        cache_tag=_field(py, "cache_tag", str, "python"),
        version=str(py.get("version", "")),
        implementation=str(py.get("implementation", "")),
    )
    lease = data.get("lease", False)
    if not isinstance(lease, bool):
        raise BadRequest("lease", "must be true or false")
    return ResolveRequest(tuple(deps), python, lease)


def check_host(url: str, allowed: Sequence[str]) -> None:
    """Refuse a URL unless it is http(s) on an allowed host (``host`` or ``host:port``).

    ``file://`` and other schemes are refused too: a daemon reading local files for a client
    would tell the client the sha256 of files it may not read itself.
    """
    from cas_daemon.fetch import redact_url

    parts = urllib.parse.urlsplit(url)
    try:
        host = (parts.hostname or "").lower()
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:  # a port that is not a number
        host = netloc = ""
    if parts.scheme not in ("http", "https") or not host or not {host, netloc} & set(allowed):
        raise HostNotAllowed(redact_url(url), netloc or f"({parts.scheme or 'no'} URL)", allowed)


class Uploads:
    """Bundled wheels received as bytes, in ``tmp/uploads/{sha256}/{name}`` until published.

    Verified on arrival, as the store checks a bundle in a model dir: a plain ``.whl`` must
    hash to its sha256; a compressed bundle's header must name it (its members are checked
    against RECORD when unpacked). The directory is the daemon's alone (it holds the store's
    daemon lock), so start-up empties it; its name is not a sha256, so the store's own
    leftover sweeps never touch it.
    """

    def __init__(self, layout: StoreLayout, *, max_bytes: int, accept_compressed: bool) -> None:
        self.root = layout.tmp_dir / "uploads"
        self.max_bytes = max_bytes
        self.accept_compressed = accept_compressed

    def path_for(self, sha: str, filename: str) -> Path:
        """Where the upload of ``sha`` is (whatever name it came with), or would be."""
        directory = self.root / sha
        try:
            return directory / min(os.listdir(directory))
        except (FileNotFoundError, ValueError):
            return directory / filename

    async def receive(self, sha: Sha256, filename: str, body: AsyncIterable[bytes]) -> int:
        """Store the upload of ``sha``, hashed while written; its size."""
        check_filename(filename, "X-Wheelcas-Filename")
        self.root.mkdir(parents=True, exist_ok=True)
        part = self.root / f"{sha}.{secrets.token_hex(8)}.part"
        handle = await asyncio.to_thread(part.open, "xb")
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in body:
                size += len(chunk)
                if size > self.max_bytes:
                    raise UploadRefused(
                        f"the upload of {filename} exceeds {self.max_bytes} bytes "
                        "(`uploads.max_bytes` in the daemon's configuration)"
                    )
                await asyncio.to_thread(_write, handle, digest, chunk)
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(self._keep, part, sha, filename, digest.hexdigest())
        finally:
            handle.close()
            part.unlink(missing_ok=True)
        return size

    def _keep(self, part: Path, sha: str, filename: str, digest: str) -> None:
        from lockgen.bundle import is_bundle, read_bundle_header

        actual = digest
        if is_bundle(part):
            if not self.accept_compressed:
                raise UploadRefused(
                    f"this daemon does not accept compressed bundles ({filename}; "
                    "`uploads.accept_compressed_bundles` is false). Re-lock the model with "
                    "`wheelcas lock DIR --bundle-format whl`."
                )
            actual = read_bundle_header(part).wheel_sha256
        if actual != sha:
            raise HashMismatch(f"the uploaded bundled wheel {filename}", sha, actual)
        (self.root / sha).mkdir(exist_ok=True)
        part.replace(self.root / sha / filename)

    def forget(self, shas: Sequence[str]) -> None:
        for sha in shas:
            shutil.rmtree(self.root / sha, ignore_errors=True)


def _write(handle: IO[bytes], digest: Any, chunk: bytes) -> None:
    handle.write(chunk)
    digest.update(chunk)


@dataclass(frozen=True, slots=True)
class Plan:
    """A checked request: the refs to make ready, and the interpreter to compile with."""

    request: ResolveRequest
    refs: tuple[WheelRef, ...]
    python: str


@dataclass(frozen=True, slots=True)
class Outcome:
    view: Path | None
    site_dirs: tuple[Path, ...]
    lease: int | None
    wheels: int
    already_ready: int
    view_error: WheelcasError | None = None


@dataclass(slots=True)
class Metrics:
    """Counters since start-up; they only go up (Prometheus counters)."""

    resolves: int = 0
    prefetches: int = 0
    downloads: int = 0
    bytes_fetched: int = 0
    published: int = 0
    cache_hits: int = 0
    uploads: int = 0
    errors: Counter[str] = field(default_factory=Counter)
