"""The loader's client of the wheelcas daemon: standard library only, on the load path.

:func:`find_daemon` looks for a daemon (``$WHEELCAS_SOCKET``, then the user's
``$XDG_RUNTIME_DIR/wheelcas.sock``, then the system's ``/run/wheelcas/wheelcas.sock``) and
returns a :class:`DaemonClient` only if one answers ``/v1/health`` quickly; otherwise the
loader stays embedded.

The transport is a few lines of HTTP/1.1 over the unix socket (one request per connection,
``Connection: close``) rather than ``http.client``: that module imports ``ssl`` and the
``email`` parser, about 30 ms, more than the whole warm load it would serve. So a warm
resolve costs a lockfile parse, one ``connect`` and one round trip, and imports no asyncio,
aiohttp, ssl or numpy.

Errors come back as the exception the daemon raised when this process has its class (the
same one-line message as in embedded mode), else as :class:`DaemonError`; a daemon that is
gone or dies mid-request is a :class:`DaemonUnavailable`, never a socket traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import cas_daemon.errors
import loader.errors
from cas_daemon.errors import HashMismatch
from lockgen.errors import WheelcasError
from lockgen.lockfile import LockedDep, LockEntry

TYPE_CHECKING = False
if TYPE_CHECKING:  # the progress module imports typing helpers; only callers of progress pay
    from cas_daemon.progress import ProgressCallback

SOCKET_ENV = "WHEELCAS_SOCKET"
#: ``WHEELCAS_SOCKET=off`` makes :func:`find_daemon` find nothing: always embedded.
DISABLED = frozenset({"off", "none", "0"})
SYSTEM_SOCKET = Path("/run/wheelcas/wheelcas.sock")
HEALTH_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # the daemon sends a heartbeat line every 10 s while it works
FILENAME_HEADER = "X-Wheelcas-Filename"
API_VERSION = 1
_MAX_UPLOAD_ROUNDS = 3
_CHUNK = 1 << 20
_MAX_HEADER_LINES = 100
_EVENT_KINDS = frozenset({"start", "bytes", "ready", "cached"})
#: Where the errors the client raises as their own class live (others: DaemonError).
_ERROR_MODULES = frozenset({"lockgen.errors", cas_daemon.errors.__name__, loader.errors.__name__})


class DaemonError(WheelcasError):
    """An error the daemon reported that this client has no class for, or a protocol error."""

    def __init__(self, message: str, *, error_type: str = "DaemonError", status: int = 0) -> None:
        self.error_type = error_type
        self.status = status
        super().__init__(message)


class DaemonUnavailable(DaemonError):
    """No daemon at the socket, or it went away before answering."""

    def __init__(self, socket_path: Path, problem: str) -> None:
        self.socket_path = socket_path
        super().__init__(
            f"the wheelcas daemon at {socket_path} {problem}. Check that it runs "
            "(`systemctl status wheelcas`, or start one with `wheelcas daemon`), or set "
            f"{SOCKET_ENV}=off to load without it.",
            error_type="DaemonUnavailable",
        )


@dataclass(frozen=True, slots=True)
class ResolveResult:
    """Ready paths for a lock entry: a view (one sys.path entry) or one dir per wheel."""

    view: Path | None
    site_dirs: tuple[Path, ...]
    lease_id: int | None
    wheels: int = 0
    already_ready: int = 0
    view_error: str | None = None  # why there is no view, when the daemon could not build it

    @property
    def package_dirs(self) -> list[Path]:
        """What goes on ``sys.path`` after the model dir: the view, else every site dir."""
        return [self.view] if self.view is not None else list(self.site_dirs)


class _Response:
    """One HTTP/1.1 response read from a socket: status, headers, then the body.

    Raises :class:`ConnectionError` for a response cut short or garbled, so that callers
    handle it like any other broken connection.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        parts = stream.readline().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError("no HTTP status line")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = stream.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("the headers were cut short")
            name, _sep, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        else:
            raise ConnectionError("too many header lines")

    def _exactly(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) < size:
            raise ConnectionError("the body was cut short")
        return data

    def chunks(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._stream.readline()
                try:
                    size = int(size_line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ConnectionError("the chunked body was cut short") from None
                if size == 0:
                    return
                yield self._exactly(size)
                self._exactly(2)  # the CRLF after each chunk
        elif "content-length" in self.headers:
            yield self._exactly(int(self.headers["content-length"]))
        else:
            yield self._stream.read()

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self.chunks():
            *complete, pending = (pending + chunk).split(b"\n")
            yield from (line for line in complete if line.strip())
        if pending.strip():
            yield pending


def _python() -> dict[str, str]:
    return {
        "cache_tag": sys.implementation.cache_tag or "",
        "version": sys.version.split()[0],
        "implementation": sys.implementation.name,
    }


def _dep_json(dep: LockedDep) -> dict[str, Any]:
    if dep.url is not None:
        return {"sha256": dep.sha256, "url": dep.url}
    return {"sha256": dep.sha256, "filename": dep.filename, "bundled": True}


def _error_class(name: str) -> type[WheelcasError] | None:
    """The class ``name`` among the errors of :data:`_ERROR_MODULES`, or None.

    Only those modules, which this one imports itself: the class a caller gets must not
    depend on what else happens to be imported in the process.
    """
    pending: list[type[WheelcasError]] = [WheelcasError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name and cls.__module__ in _ERROR_MODULES:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def raise_error(body: object, status: int) -> NoReturn:
    """Raise what an error body describes, with the daemon's message and fields."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise DaemonError(f"the wheelcas daemon answered HTTP {status} without an error body")
    name, message = str(error.get("type", "")), str(error.get("message", ""))
    cls = _error_class(name)
    if cls is None:
        raise DaemonError(message, error_type=name, status=status)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)  # the daemon's text as is: the class's own __init__ varies
    fields = error.get("fields")
    for key, value in fields.items() if isinstance(fields, dict) else ():
        setattr(exc, str(key), value)
    raise exc


class DaemonClient:
    """Requests to the daemon at ``socket_path``; one connection per request."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = READ_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout

    def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        reply = self._call("GET", "/v1/health", timeout=timeout)
        if not isinstance(reply, dict) or reply.get("api") != API_VERSION:
            raise DaemonError(f"the daemon at {self.socket_path} speaks another API: {reply!r}")
        return reply

    def status(self) -> dict[str, Any]:
        reply: dict[str, Any] = self._call("GET", "/v1/status")
        return reply

    def metrics(self) -> str:
        """The Prometheus text exposition of ``/v1/metrics``."""
        text: str = self._exchange(
            "GET", "/v1/metrics", None, {}, None, lambda r: r.read().decode()
        )
        return text

    def gc(self, *, dry_run: bool = True) -> dict[str, Any]:
        reply: dict[str, Any] = self._call("POST", "/v1/gc", {"dry_run": dry_run})
        return reply

    def take_lease(self, sha256s: Sequence[str], view: Path | None = None) -> int:
        """Protect trees (and a view) from GC for as long as this process lives."""
        body = {"sha256s": list(sha256s), "view": None if view is None else str(view)}
        return int(self._call("POST", "/v1/leases", body)["lease"])

    def release_lease(self, lease_id: int) -> None:
        self._call("DELETE", f"/v1/leases/{int(lease_id)}")

    def resolve(
        self,
        model_dir: Path,
        entry: LockEntry,
        *,
        lease: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ResolveResult:
        """Ready paths for ``entry`` of the lockfile of ``model_dir``, fetched if needed.

        ``lease``: the daemon takes a lease for this process with the resolve, so GC keeps
        the paths while it runs. Bundled wheels are read from ``model_dir`` only when the
        daemon asks for them. ``progress`` gets the store's events while a cold resolve works.
        """
        return self._resolve("/v1/resolve", model_dir, entry, lease, progress)

    def prefetch(
        self, model_dir: Path, entry: LockEntry, *, progress: ProgressCallback | None = None
    ) -> ResolveResult:
        """Make ``entry``'s wheels ready in the daemon's store (no view, no lease)."""
        return self._resolve("/v1/prefetch", model_dir, entry, False, progress)

    def _resolve(
        self,
        path: str,
        model_dir: Path,
        entry: LockEntry,
        lease: bool,
        progress: ProgressCallback | None,
    ) -> ResolveResult:
        deps = [_dep_json(d) for d in entry.locked_deps]
        body = {"deps": deps, "python": _python(), "lease": lease}
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for _ in range(_MAX_UPLOAD_ROUNDS):
            outcome = self._exchange(
                "POST", path, payload, headers, None, lambda r: self._answer(r, progress)
            )
            if isinstance(outcome, ResolveResult):
                return outcome
            self._upload(model_dir, entry, outcome)
        raise DaemonError(f"the daemon kept asking for bundled wheels of {model_dir}; giving up")

    def _answer(
        self, response: _Response, progress: ProgressCallback | None
    ) -> ResolveResult | list[str]:
        """The result, or the bundled wheels to upload first (HTTP 409)."""
        if response.status != 200:
            reply = _json(response.read())
            missing = reply.get("missing_bundles") if isinstance(reply, dict) else None
            if response.status == 409 and isinstance(missing, list):
                return [str(sha) for sha in missing]
            raise_error(reply, response.status)
        for line in response.lines():
            message = _json(line)
            if "event" in message and progress is not None:
                _forward(message["event"], progress)
            elif "result" in message:
                result = message["result"]
                view, view_error = result.get("view"), result.get("view_error")
                return ResolveResult(
                    view=None if view is None else Path(view),
                    site_dirs=tuple(Path(p) for p in result["site_dirs"]),
                    lease_id=result.get("lease"),
                    wheels=int(result.get("wheels", 0)),
                    already_ready=int(result.get("already_ready", 0)),
                    view_error=None if view_error is None else str(view_error.get("message")),
                )
            elif "error" in message:
                raise_error(message, 200)
        raise ConnectionError("the connection closed before the result")

    def _upload(self, model_dir: Path, entry: LockEntry, shas: Sequence[str]) -> None:
        from loader.errors import MissingBundleError

        bundled = {str(d.sha256): d for d in entry.locked_deps if d.bundled_whl_path}
        for sha in shas:
            dep = bundled.get(sha)
            if dep is None:
                raise DaemonError(f"the daemon asked for a bundled wheel the lock lacks: {sha}")
            source = model_dir.absolute() / str(dep.bundled_whl_path)
            try:
                handle = source.open("rb")
            except OSError as exc:
                raise MissingBundleError(
                    f"the bundled wheel {source} named by the lockfile cannot be read "
                    f"({exc.strerror}). Restore `.carton/bundled_wheels/` from where the model "
                    "came from, or run `wheelcas lock` to rebuild it."
                ) from None
            headers = {FILENAME_HEADER: dep.filename, "Content-Type": "application/octet-stream"}
            try:
                with handle:
                    self._call("PUT", f"/v1/bundles/{sha}", handle, headers=headers)
            except HashMismatch as exc:  # name the model dir's file, as embedded mode does
                raise HashMismatch(str(source), exc.expected, exc.actual) from None

    # --- transport ------------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One request with a JSON (or file) body and a JSON reply; raises its error."""
        sent = dict(headers or {})
        payload: bytes | IO[bytes] | None
        if body is None or isinstance(body, bytes) or hasattr(body, "read"):
            payload = body  # type: ignore[assignment]
        else:
            payload = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"

        def answer(response: _Response) -> Any:
            reply = _json(response.read()) if response.status != 204 else None
            if response.status >= 400:
                raise_error(reply, response.status)
            return reply

        return self._exchange(method, path, payload, sent, timeout, answer)

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None,
        headers: Mapping[str, str],
        timeout: float | None,
        handle: Callable[[_Response], Any],
    ) -> Any:
        """Connect, send, and let ``handle`` read the response; socket errors become ours."""
        limit = self.timeout if timeout is None else timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(self.connect_timeout, limit))
            sock.connect(str(self.socket_path))
            sock.settimeout(limit)
            # A failed send may still have an answer to read: an early refusal (a too large
            # upload) is answered before the daemon stops reading.
            with contextlib.suppress(OSError):
                _send(sock, method, path, body, headers)
            with sock.makefile("rb") as stream:
                return handle(_Response(stream))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(self.socket_path, "is not running (nobody listens)") from None
        except TimeoutError:
            raise DaemonUnavailable(self.socket_path, "did not answer in time") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise DaemonUnavailable(self.socket_path, f"went away mid-request ({reason})") from None
        finally:
            sock.close()


def _send(
    sock: socket.socket,
    method: str,
    path: str,
    body: bytes | IO[bytes] | None,
    headers: Mapping[str, str],
) -> None:
    if body is None:
        length = 0
    elif isinstance(body, bytes):
        length = len(body)
    else:
        length = os.fstat(body.fileno()).st_size
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None or isinstance(body, bytes):
        sock.sendall(head + (body or b""))
        return
    sock.sendall(head)
    while chunk := body.read(_CHUNK):
        sock.sendall(chunk)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise DaemonError("the wheelcas daemon answered something that is not JSON") from None


def _forward(event: object, progress: ProgressCallback) -> None:
    from cas_daemon.progress import ProgressEvent

    if isinstance(event, dict) and event.get("kind") in _EVENT_KINDS:
        kind, sha, name = event["kind"], str(event["sha256"]), str(event["name"])
        progress(ProgressEvent(kind, sha, name, int(event.get("nbytes", 0))))


def candidate_sockets(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where to look for a daemon, in order (see the module docstring)."""
    env = os.environ if environ is None else environ
    paths = []
    if env.get(SOCKET_ENV):
        paths.append(Path(env[SOCKET_ENV]))
    if env.get("XDG_RUNTIME_DIR"):
        paths.append(Path(env["XDG_RUNTIME_DIR"]) / "wheelcas.sock")
    paths.append(SYSTEM_SOCKET)
    return paths


def find_daemon(
    environ: Mapping[str, str] | None = None, *, timeout: float = HEALTH_TIMEOUT_S
) -> DaemonClient | None:
    """A client of the first daemon that answers its health check within ``timeout``.

    Cheap when there is none: one ``stat`` per candidate; a stale socket file costs one
    refused ``connect``. None when ``$WHEELCAS_SOCKET`` is ``off``.
    """
    env = os.environ if environ is None else environ
    if env.get(SOCKET_ENV, "").lower() in DISABLED:
        return None
    for path in candidate_sockets(env):
        try:
            if not stat.S_ISSOCK(path.stat().st_mode):
                continue
        except OSError:
            continue
        client = DaemonClient(path)
        try:
            client.health(timeout=timeout)
        except WheelcasError:
            continue
        return client
    return None
