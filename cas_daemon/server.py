"""The daemon's HTTP/JSON API on a unix socket: the only module that imports ``aiohttp.web``.

Handlers translate between HTTP and :class:`~cas_daemon.service.Service`; errors become JSON
in one place, :func:`error_middleware` (and, once a progress stream has started, in the
stream's last line, through the same :func:`error_body`). Routes and bodies: docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from cas_daemon.config import ConfigError, DaemonConfig, NoInterpreter
from cas_daemon.errors import (
    FetchError,
    HashMismatch,
    RecordMismatch,
    StoreError,
    UnsafeWheelError,
    WheelTooLarge,
)
from cas_daemon.layout import StoreLayout
from cas_daemon.metrics import render_metrics
from cas_daemon.progress import ProgressEvent
from cas_daemon.protocol import (
    BadRequest,
    HostNotAllowed,
    LeaseNotFound,
    MissingBundles,
    NotPermitted,
    Peer,
    Unavailable,
    UploadRefused,
    parse_resolve_request,
    parse_watch_request,
)
from cas_daemon.service import Outcome, Service
from cas_daemon.store import Store
from cas_daemon.systemd import Notifier
from lockgen.errors import BundleError, InterpreterError, WheelcasError
from lockgen.lockfile import sha256_hex

log = logging.getLogger("wheelcas.daemon")

API_VERSION = 1
FILENAME_HEADER = "X-Wheelcas-Filename"
NDJSON = "application/x-ndjson"
HEARTBEAT_S = 10.0
MAX_JSON_BODY = 64 * 2**20
SERVICE = web.AppKey("service", Service)
TASKS = web.AppKey("tasks", set[asyncio.Task[None]])

# First match wins: subclasses before their bases.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (BadRequest, 400),
    (ConfigError, 400),
    (HostNotAllowed, 403),
    (NotPermitted, 403),
    (LeaseNotFound, 404),
    (MissingBundles, 409),
    (UploadRefused, 413),
    (HashMismatch, 422),
    (RecordMismatch, 422),
    (UnsafeWheelError, 422),
    (WheelTooLarge, 422),
    (BundleError, 422),
    (NoInterpreter, 422),
    (InterpreterError, 422),
    (FetchError, 502),
    (Unavailable, 503),
    (StoreError, 500),
    (WheelcasError, 400),
)


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and ``{"type", "module", "message", "fields"}`` for an exception.

    ``fields`` carries the error's plain attributes (``HashMismatch``'s ``url``, ``expected``,
    ``actual``) so the client can raise the same class with the same message. Anything that
    is not a :class:`WheelcasError` is a bug: its text stays in the daemon's log.
    """
    if isinstance(exc, web.HTTPException):
        return exc.status, {"type": type(exc).__name__, "message": exc.text or exc.reason}
    if not isinstance(exc, WheelcasError):
        message = f"internal error in the wheelcas daemon ({type(exc).__name__}); see its log"
        return 500, {"type": "InternalError", "message": message}
    status = next(code for kind, code in _STATUS if isinstance(exc, kind))
    fields = {
        k: v
        for k, v in vars(exc).items()
        if not k.startswith("_") and isinstance(v, str | int | float | bool | list | type(None))
    }
    body = {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}
    return status, {**body, "fields": fields}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        status, body = error_body(exc)
        _count_error(request.app, body["type"], exc)
        extra = {"missing_bundles": exc.missing_bundles} if isinstance(exc, MissingBundles) else {}
        return web.json_response({"error": body, **extra}, status=status)


def _count_error(app: web.Application, kind: str, exc: BaseException) -> None:
    if isinstance(exc, MissingBundles):
        return  # a step of the upload protocol, not a failure
    app[SERVICE].metrics.errors[kind] += 1
    if isinstance(exc, WheelcasError | web.HTTPException):
        log.info("%s: %s", kind, exc)
    else:
        log.error("unexpected error", exc_info=exc)


def peer_of(request: web.Request) -> Peer | None:
    """The client process, from the kernel (``SO_PEERCRED``); never from the request."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


async def _json(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except ValueError:
        raise BadRequest("(body)", "is not JSON") from None


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    result: dict[str, Any] = {
        "view": None if outcome.view is None else str(outcome.view),
        "site_dirs": [str(p) for p in outcome.site_dirs],
        "lease": outcome.lease,
        "wheels": outcome.wheels,
        "already_ready": outcome.already_ready,
    }
    if outcome.view_error is not None:
        result["view_error"] = error_body(outcome.view_error)[1]
    return result


def _event_json(event: ProgressEvent) -> dict[str, Any]:
    return {"kind": event.kind, "sha256": event.sha256, "name": event.name, "nbytes": event.nbytes}


async def _stream(
    request: web.Request, work: Callable[[Callable[[ProgressEvent], None]], Awaitable[Outcome]]
) -> web.StreamResponse:
    """Run ``work`` while streaming its progress as NDJSON; the last line is the outcome.

    Lines: ``{"event": {...}}`` per progress event, ``{"heartbeat": true}`` when nothing
    happened for a while (a long compile), then ``{"result": {...}}`` or ``{"error": {...}}``.
    A client that goes away does not stop the work: other clients may share it.
    """
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def run() -> None:
        try:
            outcome = await work(lambda event: lines.put_nowait({"event": _event_json(event)}))
            lines.put_nowait({"result": _outcome_json(outcome)})
        except Exception as exc:
            _count_error(request.app, error_body(exc)[1]["type"], exc)
            lines.put_nowait({"error": error_body(exc)[1]})
        finally:
            lines.put_nowait(None)

    task = asyncio.get_running_loop().create_task(run())
    tasks = request.app[TASKS]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    with contextlib.suppress(ConnectionError):
        while True:
            try:
                line = await asyncio.wait_for(lines.get(), HEARTBEAT_S)
            except TimeoutError:
                line = {"heartbeat": True}
            if line is None:
                break
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "api": API_VERSION})


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE].status())


async def resolve(request: web.Request) -> web.StreamResponse:
    return await _resolve(request, prefetch=False)


async def prefetch(request: web.Request) -> web.StreamResponse:
    return await _resolve(request, prefetch=True)


async def _resolve(request: web.Request, *, prefetch: bool) -> web.StreamResponse:
    service = request.app[SERVICE]
    plan = await service.plan(parse_resolve_request(await _json(request)))
    peer = peer_of(request)
    return await _stream(request, lambda on: service.execute(plan, peer, on, prefetch=prefetch))


async def put_bundle(request: web.Request) -> web.Response:
    try:
        sha = sha256_hex(request.match_info["sha256"])
    except ValueError:
        raise BadRequest("{sha256}", "is not a lower-case sha256 hex digest") from None
    filename = request.headers.get(FILENAME_HEADER, "")
    size = await request.app[SERVICE].upload(sha, filename, request.content.iter_chunked(1 << 20))
    return web.json_response({"sha256": sha, "bytes": size})


async def post_lease(request: web.Request) -> web.Response:
    body = await _json(request)
    shas = body.get("sha256s", []) if isinstance(body, dict) else None
    view = body.get("view") if isinstance(body, dict) else None
    if not isinstance(shas, list) or not all(isinstance(s, str) for s in shas):
        raise BadRequest("sha256s", "must be a list of sha256 hex digests")
    if view is not None and not isinstance(view, str):
        raise BadRequest("view", "must be a path the daemon returned, or absent")
    peer = peer_of(request)
    if peer is None:
        raise BadRequest("(socket)", "leases are only taken over the unix socket")
    lease = await request.app[SERVICE].take_lease(peer, shas, view)
    return web.json_response({"lease": lease})


async def delete_lease(request: web.Request) -> web.Response:
    try:
        lease_id = int(request.match_info["lease"])
    except ValueError:
        raise BadRequest("{lease}", "must be a lease id (an integer)") from None
    await request.app[SERVICE].drop_lease(lease_id, peer_of(request))
    return web.json_response({"released": lease_id})


async def gc(request: web.Request) -> web.Response:
    body = await _json(request)
    dry_run = body.get("dry_run", True) if isinstance(body, dict) else None
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run", "must be true or false")
    return web.json_response(await request.app[SERVICE].gc(dry_run=dry_run))


async def post_watch(request: web.Request) -> web.Response:
    watch = parse_watch_request(await _json(request))
    return web.json_response(await request.app[SERVICE].watch(watch, peer_of(request)))


async def unwatch(request: web.Request) -> web.Response:
    """``DELETE /v1/watch`` or ``POST /v1/unwatch``, with ``{"model_dir": ...}``."""
    watch = parse_watch_request(await _json(request), allow_python=False)
    return web.json_response(await request.app[SERVICE].unwatch(watch.model_dir, peer_of(request)))


async def get_watch(request: web.Request) -> web.Response:
    return web.json_response({"watched": request.app[SERVICE].watched()})


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    stats, leases = await service.store_stats(), await service.live_leases()
    text = render_metrics(
        service.metrics,
        stats,
        leases,
        service.count_views(),
        deferred_trees=service.deferred.stats().pending,
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def make_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JSON_BODY)
    app[SERVICE] = service
    app[TASKS] = set()
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/metrics", metrics)
    app.router.add_post("/v1/resolve", resolve)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_put("/v1/bundles/{sha256}", put_bundle)
    app.router.add_post("/v1/leases", post_lease)
    app.router.add_delete("/v1/leases/{lease}", delete_lease)
    app.router.add_post("/v1/gc", gc)
    app.router.add_get("/v1/watch", get_watch)
    app.router.add_post("/v1/watch", post_watch)
    app.router.add_delete("/v1/watch", unwatch)
    app.router.add_post("/v1/unwatch", unwatch)
    return app


async def serve(
    config: DaemonConfig, sock: socket.socket, notifier: Notifier, *, access_log: bool = False
) -> None:
    """Serve on ``sock`` until SIGTERM or SIGINT, then stop gracefully.

    Watched model dirs (``watch.model_dirs`` and the persisted ones) are watched before the
    socket serves. Stopping: STOPPING=1, watches and their lock children stop, no new
    connections, in-flight requests get up to ``server.shutdown_timeout`` to finish, then
    the service closes.
    """
    loop = asyncio.get_running_loop()
    store = Store(
        StoreLayout(config.store_dir),
        max_parallel_downloads=config.max_parallel_downloads,
        defer_test_bytecode=config.defer_test_bytecode,
    )
    service = await Service.open(config, store)
    app = make_app(service)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("wheelcas.access") if access_log else None,
        shutdown_timeout=config.shutdown_timeout,
    )
    await runner.setup()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    background: list[asyncio.Task[None]] = []
    try:
        await service.start_watching()  # before serving: a watch request finds them ready
        await service.deferred.start()
        await web.SockSite(runner, sock).start()
        if notifier.watchdog_interval is not None:
            background.append(loop.create_task(_watchdog(notifier, notifier.watchdog_interval)))
        if config.gc_max_bytes is not None or config.gc_max_age is not None:
            background.append(loop.create_task(_periodic_gc(service, config.gc_interval)))
        notifier.ready(f"serving {config.store_dir}")
        log.info("serving the store %s on %s", config.store_dir, sock.getsockname() or "fd")
        await stop.wait()
        log.info("stopping: finishing requests in flight (at most %ss)", config.shutdown_timeout)
        notifier.stopping()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await service.stop_watching()  # lock children stopped first: they are not requests
        await runner.cleanup()
        orphans: set[asyncio.Task[None]] = app[TASKS]  # work whose client went away
        if orphans:
            await asyncio.wait(orphans, timeout=config.shutdown_timeout)
        await service.aclose()
        await store.aclose()  # stops the compile workers now rather than at exit
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a loop that hangs stops the pings."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _periodic_gc(service: Service, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            report = await service.gc(dry_run=False)
            log.info("gc: %s", report.get("summary", report))
        except WheelcasError as exc:
            log.warning("gc: %s", exc)
        except Exception:  # the next pass may work: a failed one must not end the task
            log.exception("gc failed")
