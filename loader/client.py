"""The loader's client of the wheelcas daemon: standard library only, on the load path.

:func:`find_daemon` looks for a daemon (``$WHEELCAS_SOCKET``, then the user's
``$XDG_RUNTIME_DIR/wheelcas.sock``, then the system's ``/run/wheelcas/wheelcas.sock``) and
returns a :class:`DaemonClient` only if one answers ``/v1/health`` quickly; otherwise the
loader stays embedded.

The transport (:mod:`loader.transport`) is a few lines of HTTP/1.1 over the unix socket, not
``http.client``. So a warm resolve costs a lockfile parse, one ``connect`` and one round trip,
and imports no asyncio, aiohttp, ssl or numpy.

Errors come back as the exception the daemon raised when this process has its class (the
same one-line message as in embedded mode), else as :class:`DaemonError`; a daemon that is
gone or dies mid-request is a :class:`DaemonUnavailable`, never a socket traceback.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import cas_daemon.errors
import loader.errors
from cas_daemon.bundle_keys import DigestCache
from cas_daemon.errors import HashMismatch
from loader.transport import Body, Response, exchange
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


def _python(python: str | None = None) -> dict[str, str]:
    """The interpreter the paths are for: this one, or ``python`` (a model worker's)."""
    if python is not None and python != sys.executable:
        from lockgen.interpreters import interpreter_facts

        facts = interpreter_facts(python)
        return {
            "cache_tag": facts["cache_tag"],
            "version": facts["python_full_version"],
            "implementation": facts["implementation_name"],
        }
    return {
        "cache_tag": sys.implementation.cache_tag or "",
        "version": sys.version.split()[0],
        "implementation": sys.implementation.name,
    }


@dataclass(frozen=True, slots=True)
class _Bundled:
    """A bundled wheel of the request: what to upload under its key if the daemon asks."""

    dep: LockedDep
    source: Path


def _deps_json(
    model_dir: Path, entry: LockEntry, digests: DigestCache
) -> tuple[list[dict[str, Any]], dict[str, _Bundled]]:
    """The request's deps, and its bundled wheels by store key.

    A compressed bundle is named by its own sha256 (``bundle_sha256``): the daemon publishes
    its tree under that, never under the wheel's sha256, which the bundle's bytes cannot be
    checked against. ``digests`` remembers it, so a warm resolve costs one ``stat`` per
    bundled file, not a hash.
    """
    deps: list[dict[str, Any]] = []
    bundled: dict[str, _Bundled] = {}
    for dep in entry.locked_deps:
        if dep.url is not None:
            deps.append({"sha256": dep.sha256, "url": dep.url})
            continue
        source = model_dir.absolute() / str(dep.bundled_whl_path)
        key = digests.key(source, dep.sha256)
        item: dict[str, Any] = {"sha256": dep.sha256, "filename": dep.filename, "bundled": True}
        if key != dep.sha256:
            item["bundle_sha256"] = key
        deps.append(item)
        bundled[key] = _Bundled(dep, source)
    return deps, bundled


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
        digests: DigestCache | None = None,
    ) -> None:
        """``digests``: where bundles' keys are remembered (default: the user's cache)."""
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.digests = digests

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

    def watch(self, model_dir: Path, *, python: str | None = None) -> dict[str, Any]:
        """Have the daemon re-lock and prefetch ``model_dir`` when its requirements change.

        ``model_dir`` must be absolute and normalized; ``python`` is a version ("3.12") to
        lock for as well, never a path. Only the daemon's own user and root may watch
        (``NotPermitted`` otherwise). Returns the watch's state (docs/api.md).
        """
        body: dict[str, Any] = {"model_dir": str(model_dir)}
        if python is not None:
            body["python"] = python
        reply: dict[str, Any] = self._call("POST", "/v1/watch", body)
        return reply

    def unwatch(self, model_dir: Path) -> dict[str, Any]:
        """Stop watching ``model_dir``: ``{"model_dir", "was_watched", "configured"}``."""
        reply: dict[str, Any] = self._call("POST", "/v1/unwatch", {"model_dir": str(model_dir)})
        return reply

    def watches(self) -> list[dict[str, Any]]:
        """Every watched dir with its state and recent events (oldest first)."""
        reply: list[dict[str, Any]] = self._call("GET", "/v1/watch")["watched"]
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
        python: str | None = None,
    ) -> ResolveResult:
        """Ready paths for ``entry`` of the lockfile of ``model_dir``, fetched if needed.

        ``lease``: the daemon takes a lease for this process with the resolve, so GC keeps
        the paths while it runs. Bundled wheels are read from ``model_dir`` only when the
        daemon asks for them (a compressed bundle is hashed once before, for its key, see
        :func:`_deps_json`). ``progress`` gets the store's events while a cold resolve works.
        ``python``: the interpreter that will import from the paths (default: this one).
        """
        return self._resolve("/v1/resolve", model_dir, entry, lease, progress, python)

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
        python: str | None = None,
    ) -> ResolveResult:
        digests = self.digests or DigestCache.for_user()
        deps, bundled = _deps_json(model_dir, entry, digests)
        body = {"deps": deps, "python": _python(python), "lease": lease}
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for _ in range(_MAX_UPLOAD_ROUNDS):
            outcome = self._exchange(
                "POST", path, payload, headers, None, lambda r: self._answer(r, progress)
            )
            if isinstance(outcome, ResolveResult):
                return outcome
            self._upload(bundled, outcome, digests)
        raise DaemonError(f"the daemon kept asking for bundled wheels of {model_dir}; giving up")

    def _answer(
        self, response: Response, progress: ProgressCallback | None
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

    def _upload(
        self, bundled: Mapping[str, _Bundled], keys: Sequence[str], digests: DigestCache
    ) -> None:
        """Upload the bundled files the daemon asked for, each under its key."""
        from loader.errors import MissingBundleError

        for key in keys:
            wanted = bundled.get(key)
            if wanted is None:
                raise DaemonError(f"the daemon asked for a bundled wheel the lock lacks: {key}")
            dep, source = wanted.dep, wanted.source
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
                    self._call("PUT", f"/v1/bundles/{key}", handle, headers=headers)
            except HashMismatch as exc:  # name the model dir's file, as embedded mode does
                digests.forget(source)  # a key remembered wrongly is found again next time
                raise HashMismatch(str(source), exc.expected, exc.actual) from None

    # --- requests -------------------------------------------------------------------------

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
        payload: Body
        if body is None or isinstance(body, bytes) or hasattr(body, "read"):
            payload = body  # type: ignore[assignment]
        else:
            payload = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"

        def answer(response: Response) -> Any:
            reply = _json(response.read()) if response.status != 204 else None
            if response.status >= 400:
                raise_error(reply, response.status)
            return reply

        return self._exchange(method, path, payload, sent, timeout, answer)

    def _exchange(
        self,
        method: str,
        path: str,
        body: Body,
        headers: Mapping[str, str],
        timeout: float | None,
        handle: Callable[[Response], Any],
    ) -> Any:
        """One request through :mod:`loader.transport`; socket errors become ours."""
        limit = self.timeout if timeout is None else timeout
        try:
            return exchange(
                self.socket_path,
                method,
                path,
                body,
                headers,
                handle,
                timeout=limit,
                connect_timeout=self.connect_timeout,
            )
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(self.socket_path, "is not running (nobody listens)") from None
        except TimeoutError:
            raise DaemonUnavailable(self.socket_path, "did not answer in time") from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise DaemonUnavailable(self.socket_path, f"went away mid-request ({reason})") from None


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
