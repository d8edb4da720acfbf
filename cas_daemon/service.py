"""What the daemon does, independent of HTTP: resolve, bundle uploads, leases, status, GC.

One :class:`Service` (one :class:`~cas_daemon.store.Store`, used from one event loop) serves
every request, so the store's single flight covers all clients: any number of requests for a
wheel share one download and one unpack.

Trust boundary: requests come from any user who may open the socket. So the daemon never
opens a path a client names (bundled wheels arrive as bytes,
:class:`~cas_daemon.uploads.Uploads`), never runs an interpreter a client names (it compiles
with one it found itself whose cache tag matches, :class:`~cas_daemon.config.KnownInterpreters`),
and fetches only http(s) URLs on the allowed index hosts (:func:`~cas_daemon.protocol.check_host`).
Requests are parsed and checked in :mod:`cas_daemon.protocol`.

The other store modules are called from one place each: metadata from the ``_record``
methods, views from :meth:`Service._view`, gc from :meth:`Service.gc`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas_daemon import views
from cas_daemon.config import DaemonConfig, KnownInterpreters
from cas_daemon.diskscan import measure_tree
from cas_daemon.errors import StoreError
from cas_daemon.leases import process_start_time
from cas_daemon.metadata import Metadata
from cas_daemon.metrics import Meter, Metrics
from cas_daemon.progress import ProgressCallback, ProgressEvent
from cas_daemon.protocol import (
    BadRequest,
    LeaseNotFound,
    MissingBundles,
    NotPermitted,
    Peer,
    ResolveRequest,
    Unavailable,
    check_host,
    check_sha256s,
)
from cas_daemon.store import Store, StoreStats, WheelRef
from cas_daemon.uploads import Uploads
from lockgen.errors import WheelcasError
from lockgen.lockfile import Sha256

log = logging.getLogger("wheelcas.daemon")
_STATS_TTL_S = 10.0


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


class Service:
    """The daemon's state. Build it with :meth:`open` inside the running loop."""

    def __init__(self, config: DaemonConfig, store: Store, metadata: Metadata | None) -> None:
        self.config = config
        self.store = store
        self.layout = store.layout
        self.metadata = metadata
        self.metrics = Metrics()
        self._meter = Meter(self.metrics)
        self.started = time.time()
        self.interpreters = KnownInterpreters(config.interpreters, config.discover_interpreters)
        self.uploads = Uploads(store.layout, max_bytes=config.upload_max_bytes)
        self._stats: tuple[float, StoreStats] | None = None
        self._conflicts: dict[str, WheelcasError] = {}

    @classmethod
    async def open(cls, config: DaemonConfig, store: Store) -> Service:
        """The service over ``store``; without the metadata index if it cannot be opened.

        Loading models matters more than usage records: a broken index is logged (with the
        fsck that repairs it) and the daemon serves on, without leases and GC.
        """
        try:
            metadata: Metadata | None = await asyncio.to_thread(Metadata.open, store.layout)
        except StoreError as exc:
            log.error("%s", exc)
            metadata = None
        return cls(config, store, metadata)

    async def aclose(self) -> None:
        if self.metadata is not None:
            await asyncio.to_thread(self.metadata.close)

    # --- resolve ---------------------------------------------------------------------------

    async def plan(self, request: ResolveRequest) -> Plan:
        """Check a request before any work starts, so a refusal gets its own HTTP status."""
        for dep in request.deps:
            if dep.url is not None:
                check_host(dep.url, self.config.allowed_hosts)
        spec = request.python
        python = self.interpreters.known().get(spec.cache_tag)
        if python is None:  # probing interpreters runs them: not on the event loop
            python = await asyncio.to_thread(self.interpreters.find, spec.cache_tag, spec.version)
        refs = tuple(
            WheelRef(dep.sha256, dep.filename, url=dep.url)
            if dep.url is not None
            else self.uploads.ref(dep)
            for dep in request.deps
        )
        missing = self.uploads.missing(refs)
        if missing:
            raise MissingBundles(missing)
        return Plan(request, refs, python)

    async def execute(
        self,
        plan: Plan,
        peer: Peer | None,
        on_event: ProgressCallback | None = None,
        *,
        prefetch: bool = False,
    ) -> Outcome:
        """Make the plan's wheels ready; for a resolve, then its view and lease.

        The lease is taken first: a GC that runs meanwhile either sees it, or removed a tree
        before it, which the store then publishes again (see ``Metadata.add_lease``).
        """
        tag = plan.request.python.cache_tag
        unique = {ref.sha256: ref for ref in plan.refs}
        shas = list(unique)
        key = views.view_key(shas, tag) if shas and not prefetch else None
        lease = None
        if plan.request.lease and not prefetch and peer is not None:
            lease = await self._record_lease(peer, shas, key)
        try:
            already = sum(self.layout.pyc_marker(s, tag).exists() for s in shas)
            if already == len(shas):
                self.metrics.cache_hits += already
                sites = [self.layout.site_dir(ref.sha256) for ref in plan.refs]
            else:
                readied: list[ProgressEvent] = []
                sites = await self.store.aready(
                    plan.refs, python=plan.python, progress=self._listener(on_event, readied)
                )
                await self._record_published(readied, tag)
            await self.uploads.forget_used(plan.refs)
            view, view_error = (None, None) if key is None else await self._view(plan, key)
            await self._record_use(shas, key if view is not None else None)
        except BaseException as exc:
            if lease is not None:
                await self._drop_lease_record(lease)
            await self.uploads.forget_failed(exc)
            raise
        if prefetch:
            self.metrics.prefetches += 1
        else:
            self.metrics.resolves += 1
        return Outcome(view, tuple(sites), lease, len(shas), already, view_error)

    async def _view(self, plan: Plan, key: str) -> tuple[Path | None, WheelcasError | None]:
        """The view of the plan's trees (one sys.path entry); None and why if impossible.

        Wheels that clash (:class:`~cas_daemon.views.ViewConflict`) still load as separate
        site dirs, as they do in embedded mode; the client is told why there is no view.
        """
        site = self.layout.view_site_dir(key)
        if site.is_dir():  # the warm path: one stat, no thread, nothing to record
            return site, None
        if key in self._conflicts:  # known not to merge: not worth scanning the trees again
            return None, self._conflicts[key]
        seen: dict[str, WheelRef] = {ref.sha256: ref for ref in plan.refs}
        entries = [(ref.filename, self.layout.site_dir(sha)) for sha, ref in seen.items()]
        mode: views.LinkMode = "symlink" if self.config.view_link_mode == "symlink" else "hardlink"
        try:
            site = await asyncio.to_thread(
                views.ensure_view, self.layout, entries, key, link_mode=mode
            )
        except views.ViewConflict as exc:
            log.warning("no view for %d wheels: %s", len(entries), exc)
            self._conflicts[key] = exc
            return None, exc
        if self.metadata is not None:
            await asyncio.to_thread(self.metadata.record_view, key, list(seen))
        return site, None

    def _listener(
        self, forward: ProgressCallback | None, readied: list[ProgressEvent]
    ) -> ProgressCallback:
        def listen(event: ProgressEvent) -> None:
            self._meter.count(event)
            if event.kind == "ready":
                readied.append(event)
            if forward is not None:
                forward(event)

        return listen

    # --- metadata: the one place that records into the store's index ------------------------

    async def _record_published(self, readied: Sequence[ProgressEvent], tag: str) -> None:
        if self.metadata is None or not readied:
            return
        metadata, layout = self.metadata, self.layout

        def record() -> None:
            for event in readied:
                blob = layout.blob_path(event.sha256)
                blob_bytes = blob.stat().st_size if blob.is_file() else 0
                tree_bytes, files = measure_tree(layout.site_dir(event.sha256))
                metadata.record_published(
                    event.sha256, event.name, blob_bytes, tree_bytes, files, tag
                )

        await asyncio.to_thread(record)

    async def _record_use(self, shas: Sequence[str], key: str | None) -> None:
        if self.metadata is not None:
            await asyncio.to_thread(self.metadata.touch, shas, key)

    async def _record_lease(self, peer: Peer, shas: Sequence[str], key: str | None) -> int | None:
        if self.metadata is None:
            log.warning("no lease for pid %d: the store index is unavailable", peer.pid)
            return None
        # 0 when /proc will not say: leases.is_alive then falls back to "does the pid exist".
        start = process_start_time(peer.pid) or 0
        return await asyncio.to_thread(self.metadata.add_lease, peer.pid, start, shas, key)

    async def _drop_lease_record(self, lease_id: int) -> None:
        if self.metadata is not None:
            await asyncio.to_thread(self.metadata.drop_lease, lease_id)

    # --- uploads and leases ---------------------------------------------------------------

    async def upload(self, sha: Sha256, filename: str, body: AsyncIterable[bytes]) -> int:
        size = await self.uploads.receive(sha, filename, body)
        self.metrics.uploads += 1
        return size

    async def take_lease(self, peer: Peer, shas: Sequence[str], view: str | None) -> int:
        """A lease on trees (and a view the daemon returned) for the peer's process."""
        check_sha256s(shas, "sha256s")
        key = None
        if view is not None:
            key = Path(view).parent.name
            if Path(view) != self.layout.view_site_dir(key):
                raise BadRequest("view", "is not a view this daemon returned")
        lease = await self._record_lease(peer, shas, key)
        if lease is None:
            raise Unavailable("leases are unavailable: the store index could not be opened")
        return lease

    async def drop_lease(self, lease_id: int, peer: Peer | None) -> None:
        """Release a lease: by its own process, its process's owner, root or the daemon."""
        if self.metadata is None:
            raise LeaseNotFound(lease_id)
        leases = await asyncio.to_thread(self.metadata.leases)
        lease = next((held for held in leases if held.id == lease_id), None)
        if lease is None:
            raise LeaseNotFound(lease_id)
        if peer is not None and not (
            peer.pid == lease.pid
            or peer.uid in (0, os.geteuid())
            or _owner_uid(lease.pid) in (None, peer.uid)
        ):
            raise NotPermitted(f"lease {lease_id} belongs to another user's process")
        await self._drop_lease_record(lease_id)

    async def live_leases(self) -> int:
        """How many leases hold trees; the leases of ended processes are dropped first."""
        if self.metadata is None:
            return 0
        from cas_daemon.leases import is_alive

        metadata = self.metadata

        def count() -> int:
            metadata.drop_dead_leases(is_alive)
            return len(metadata.leases())

        return await asyncio.to_thread(count)

    # --- status and gc --------------------------------------------------------------------

    async def store_stats(self) -> StoreStats:
        """The store's sizes, walked at most every few seconds (it stats every file)."""
        now = time.monotonic()
        if self._stats is None or now - self._stats[0] > _STATS_TTL_S:
            self._stats = (now, await asyncio.to_thread(self.store.stats))
        return self._stats[1]

    def count_views(self) -> int:
        try:
            return sum(1 for _ in self.layout.views_dir.iterdir())
        except FileNotFoundError:
            return 0

    async def status(self) -> dict[str, Any]:
        stats = await self.store_stats()
        m = self.metrics
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "store": {
                "root": str(self.layout.root),
                "blobs": stats.blobs,
                "blob_bytes": stats.blob_bytes,
                "trees": stats.trees,
                "tree_bytes": stats.tree_bytes,
                "views": self.count_views(),
                "index": None if self.metadata is None else str(self.metadata.path),
            },
            "leases": await self.live_leases(),
            "interpreters": self.interpreters.known(),
            "allowed_hosts": list(self.config.allowed_hosts),
            "counters": {
                "resolves": m.resolves,
                "prefetches": m.prefetches,
                "downloads": m.downloads,
                "bytes_fetched": m.bytes_fetched,
                "published": m.published,
                "cache_hits": m.cache_hits,
                "uploads": m.uploads,
                "errors": sum(m.errors.values()),
            },
        }

    async def gc(self, *, dry_run: bool) -> dict[str, Any]:
        """One GC pass with the configured limits (``gc.max_bytes``, ``gc.max_age``)."""
        from cas_daemon.gc import run_for_daemon

        if self.metadata is None:
            raise Unavailable("garbage collection needs the store index; run `wheelcas fsck`")
        self._stats = None
        return await run_for_daemon(self.layout, self.metadata, self.config, dry_run=dry_run)


def _owner_uid(pid: int) -> int | None:
    """The uid that owns process ``pid``; None if it is gone (its lease protects nothing)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid  # noqa: PTH116 - one stat, cheaper than a Path
    except OSError:
        return None
