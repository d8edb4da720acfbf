"""What a client may send the daemon, checked before any work: requests and the API's errors.

Values (:class:`ResolveRequest`, :class:`DepSpec`, :class:`PythonSpec`, :class:`Peer`,
:class:`WatchRequest`) are plain data; :func:`parse_resolve_request` and
:func:`parse_watch_request` build them from a JSON body and name the field at fault
(:class:`BadRequest`). :func:`check_host` is the allow-list of index hosts. The errors
here are the API's own; the server maps each to its HTTP status (docs/api.md).
"""

from __future__ import annotations

import functools
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas_daemon.watch import parse_version
from lockgen.errors import WheelcasError
from lockgen.lockfile import LockedDep, Sha256, sha256_hex

_MAX_DEPS = 20_000
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """Bundled wheels the daemon has neither published nor received: upload, then retry.

    Named by their keys (:attr:`DepSpec.key`): what the client uploads them under.
    """

    def __init__(self, shas: Sequence[str]) -> None:
        self.missing_bundles = list(shas)
        super().__init__(f"{len(shas)} bundled wheel(s) must be uploaded first")


class UploadRefused(WheelcasError):
    """An upload the daemon will not take: larger than ``uploads.max_bytes``."""


class LeaseNotFound(WheelcasError):
    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        super().__init__(f"no lease {lease_id} (it was released, or its process ended)")


class NotPermitted(WheelcasError):
    """A request about something that belongs to another user (a process, a model dir)."""


class Unavailable(WheelcasError):
    """A feature this daemon cannot offer right now (a module or the index is missing)."""


@dataclass(frozen=True, slots=True)
class PythonSpec:
    cache_tag: str
    version: str
    implementation: str


@dataclass(frozen=True, slots=True)
class DepSpec:
    """One wheel of a request: the lock's sha256, and where its bytes come from.

    A bundled wheel (``url`` None) arrives as uploaded bytes. A compressed bundle has its own
    key, ``bundle_sha256`` (the sha256 of the bundle file): the daemon looks its tree up and
    publishes it under that key, never under the wheel's sha256 the bundle claims, which its
    bytes cannot be checked against (see :mod:`cas_daemon.bundle_keys`).
    """

    sha256: Sha256
    filename: str
    url: str | None  # None: a bundled wheel, uploaded as bytes
    bundle_sha256: Sha256 | None = None

    @property
    def key(self) -> Sha256:
        """The store key: the sha256 of the bytes to unpack (and to upload, if asked)."""
        return self.sha256 if self.bundle_sha256 is None else self.bundle_sha256


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


def _sha256_field(data: dict[str, Any], key: str, where: str) -> Sha256:
    try:
        return sha256_hex(_field(data, key, str, where))
    except ValueError:
        raise BadRequest(f"{where}.{key}", "is not a lower-case sha256 hex digest") from None


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
        sha = _sha256_field(raw, "sha256", where)
        if raw.get("bundled") is True:
            filename = check_filename(_field(raw, "filename", str, where), f"{where}.filename")
            key = _sha256_field(raw, "bundle_sha256", where) if "bundle_sha256" in raw else None
            deps.append(DepSpec(sha, filename, None, key))
        else:
            if "bundle_sha256" in raw:
                raise BadRequest(f"{where}.bundle_sha256", "is only for a bundled wheel")
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


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """A model dir to watch (or to stop watching), and the Python version to lock it for.

    The version is only a version (``"3.12"``): the daemon picks the interpreter itself.
    """

    model_dir: Path
    python: str | None = None


def parse_watch_request(data: object, *, allow_python: bool = True) -> WatchRequest:
    """Validate a ``/v1/watch`` (or unwatch) body: ``{"model_dir": ABS_PATH, "python"?}``."""
    if not isinstance(data, dict):
        raise BadRequest("(body)", "must be a JSON object")
    raw = _field(data, "model_dir", str, "")
    normal = Path(raw).is_absolute() and os.path.normpath(raw) == raw
    if "\0" in raw or not normal or raw.startswith("//"):
        raise BadRequest(
            "model_dir", f"must be an absolute, normalized path (no `..`, `.` or `//`): {raw!r}"
        )
    python = data.get("python")
    if python is not None:
        if not allow_python:
            raise BadRequest("python", "is not taken by this request")
        if not isinstance(python, str):
            raise BadRequest("python", "must be a version such as 3.12")
        try:
            parse_version(python)
        except ValueError:
            raise BadRequest("python", "must be a version such as 3.12, never a path") from None
    return WatchRequest(Path(raw), python)


def check_sha256s(values: Sequence[str], where: str) -> None:
    """Refuse any value that is not a lower-case sha256 hex digest (the API's only form)."""
    for i, value in enumerate(values):
        if not _SHA256.fullmatch(value):
            raise BadRequest(f"{where}[{i}]", "is not a lower-case sha256 hex digest")


def check_host(url: str, allowed: Sequence[str]) -> None:
    """Refuse a URL unless it is http(s) on an allowed host (``host`` or ``host:port``).

    ``file://`` and other schemes are refused too: a daemon reading local files for a client
    would tell the client the sha256 of files it may not read itself.
    """
    scheme, host, netloc = _url_host(url)
    if (
        scheme not in ("http", "https")
        or not host
        or (host not in allowed and netloc not in allowed)
    ):
        from cas_daemon.fetch import redact_url

        raise HostNotAllowed(redact_url(url), netloc or f"({scheme or 'no'} URL)", allowed)


@functools.lru_cache(maxsize=4096)
def _url_host(url: str) -> tuple[str, str, str]:
    """``(scheme, host, host[:port])`` of ``url``, lower-case host; empty if it has none.

    Cached: a warm resolve checks every wheel's URL, the same ones each time.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        host = (parts.hostname or "").lower()
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:  # a port that is not a number
        host = netloc = ""
    return parts.scheme, host, netloc
