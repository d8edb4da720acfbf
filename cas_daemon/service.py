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

The one exception is watching a model dir (:meth:`Service.watch`): the daemon then reads and
writes that dir (its lockfile, bundled wheels) and runs pip on its requirements.txt as the
daemon's own user, and pip may build an sdist, i.e. run its code. So a watch is taken only
from a peer whose uid (``SO_PEERCRED``) is the daemon's or root's, for a dir the daemon can
write; the dirs of the configuration file are trusted as the file is. Even then the client
names only a Python *version*; the interpreter is one the daemon knows (its own, configured
or discovered). Another user gets :class:`~cas_daemon.protocol.NotPermitted`: they run their
own user daemon for their own dirs.

The other store modules are called from one place each: metadata from the ``_record``
methods, views from :meth:`Service._view`, gc from :meth:`Service.gc`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cas_daemon import view_plan, views
from cas_daemon.config import DaemonConfig, KnownInterpreters
from cas_daemon.deferred import DeferredBytecode
from cas_daemon.diskscan import measure_tree
from cas_daemon.errors import StoreError
from cas_daemon.leases import process_start_time
from cas_daemon.metadata import Metadata
from cas_daemon.metrics import Meter, Metrics
from cas_daemon.prelink import Prelinker
from cas_daemon.progress import ProgressCallback, ProgressEvent
from cas_daemon.protocol import (
    BadRequest,
    LeaseNotFound,
    MissingBundles,
    NotPermitted,
    Peer,
    PythonSpec,
    ResolveRequest,
    Unavailable,
    WatchRequest,
    check_host,
    check_sha256s,
)
from cas_daemon.store import Store, StoreStats, WheelRef
from cas_daemon.uploads import Uploads
from cas_daemon.uses import UseRecorder
from cas_daemon.watch import EventKind, PythonTarget
from cas_daemon.watcher import Watches
from cas_daemon.watchpaths import check_model_dir, trust_problems, warn_if_untrusted
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
        self.watches: Watches | None = None
        self.deferred = DeferredBytecode(store)
        self.uses = UseRecorder(self._write_uses)

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
        await self.stop_watching()
        await self.deferred.aclose()
        await self.uses.flush()
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
        view: bool | None = None,
    ) -> Outcome:
        """Make the plan's wheels ready; for a resolve, then its view and lease.

        ``view``: build the view (default: unless ``prefetch``); a watched dir's prefetch
        builds it, so the next load finds it made (:meth:`ready_model`). The lease is taken
        first: a GC that runs meanwhile either sees it, or removed a tree before it, which
        the store then publishes again (see ``Metadata.add_lease``).
        """
        tag = plan.request.python.cache_tag
        unique = {ref.sha256: ref for ref in plan.refs}
        shas = list(unique)
        with_view = not prefetch if view is None else view
        key = view_plan.view_key(shas, tag) if shas and with_view else None
        lease = None
        if plan.request.lease and not prefetch and peer is not None:
            lease = await self._record_lease(peer, shas, key)
        prelinker: Prelinker | None = None
        try:
            warm = self.store.warm_site_dirs(plan.refs, tag)
            if warm is not None:
                already = len(shas)
                self.metrics.cache_hits += already
                sites = warm
            else:
                already = sum(self.layout.pyc_marker(s, tag).exists() for s in shas)
                prelinker = await self._claim_prelinker(key)
                sites = await self._ready_recording(plan, tag, on_event, prelinker)
                self.deferred.note_published(shas, tag)
            await self.uploads.forget_used(plan.refs)
            site, view_error = (
                (None, None) if key is None else await self._view(plan, key, prelinker)
            )
            self._record_use(shas, key if site is not None else None)
        except BaseException as exc:
            if lease is not None:
                await self._drop_lease_record(lease)
            await self.uploads.forget_failed(exc)
            raise
        finally:
            if prelinker is not None:
                await asyncio.to_thread(prelinker.close)
                self.metrics.trees_linked_ahead += prelinker.trees_linked
        if prefetch:
            self.metrics.prefetches += 1
        else:
            self.metrics.resolves += 1
        return Outcome(site, tuple(sites), lease, len(shas), already, view_error)

    async def _claim_prelinker(self, key: str | None) -> Prelinker | None:
        """A :class:`~cas_daemon.prelink.Prelinker` for a cold resolve's hard-link view."""
        if key is None or self.config.view_link_mode == "symlink" or key in self._conflicts:
            return None
        try:
            return await asyncio.to_thread(Prelinker.claim, self.layout, key)
        except OSError as exc:  # only an optimisation: the view is built at the end anyway
            log.warning("cannot stage view %s ahead: %s", key, exc)
            return None

    async def _view(
        self, plan: Plan, key: str, prelinker: Prelinker | None = None
    ) -> tuple[Path | None, WheelcasError | None]:
        """The view of the plan's trees (one sys.path entry); None and why if impossible.

        Wheels that clash (:class:`~cas_daemon.view_plan.ViewConflict`) still load as separate
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
            if prelinker is not None:
                site = await asyncio.to_thread(prelinker.finish, entries)
            else:
                site = await asyncio.to_thread(
                    views.ensure_view, self.layout, entries, key, link_mode=mode
                )
        except view_plan.ViewConflict as exc:
            log.warning("no view for %d wheels: %s", len(entries), exc)
            self._conflicts[key] = exc
            return None, exc
        if self.metadata is not None:
            await asyncio.to_thread(self.metadata.record_view, key, list(seen))
        return site, None

    async def _ready_recording(
        self,
        plan: Plan,
        tag: str,
        forward: ProgressCallback | None,
        prelinker: Prelinker | None = None,
    ) -> list[Path]:
        """``store.aready`` of the plan, recording each tree in the index as it is published.

        Each tree is measured (a walk of its files) and recorded as soon as its ``ready``
        event comes, in a thread, while the other trees are still being compiled: after the
        last one, only its own record is left to wait for, not a walk of all of them (R40:
        ~0.18 s between the last tree and the view, benchmarks/README.md). With a
        ``prelinker``, each ready tree is linked into the view's staging area too, one tree
        at a time (:mod:`cas_daemon.prelink`).
        """
        pending: list[asyncio.Future[None]] = []  # records and links, awaited before returning
        last_link: asyncio.Future[None] | None = None

        def listen(event: ProgressEvent) -> None:
            nonlocal last_link
            self._meter.count(event)
            if event.kind == "ready" and self.metadata is not None:
                pending.append(asyncio.ensure_future(self._record_published(event, tag)))
            if prelinker is not None and event.kind in ("ready", "cached"):
                site = self.layout.site_dir(event.sha256)
                last_link = asyncio.ensure_future(
                    _prelink(prelinker, event.sha256, site, last_link)
                )
                pending.append(last_link)
            if forward is not None:
                forward(event)

        try:
            sites = await self.store.aready(plan.refs, python=plan.python, progress=listen)
        except BaseException:
            # The trees that were published are still recorded; the failure is the resolve's.
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        await asyncio.gather(*pending)
        return sites

    # --- metadata: the one place that records into the store's index ------------------------

    async def _record_published(self, event: ProgressEvent, tag: str) -> None:
        if self.metadata is None:
            return
        metadata, layout = self.metadata, self.layout

        def record() -> None:
            blob = layout.blob_path(event.sha256)
            blob_bytes = blob.stat().st_size if blob.is_file() else 0
            tree_bytes, files = measure_tree(layout.site_dir(event.sha256))
            metadata.record_published(event.sha256, event.name, blob_bytes, tree_bytes, files, tag)

        await asyncio.to_thread(record)

    def _record_use(self, shas: Sequence[str], key: str | None) -> None:
        """Written soon, in a batch, not before the answer (:mod:`cas_daemon.uses`)."""
        if self.metadata is not None:
            self.uses.note(shas, key)

    def _write_uses(self, shas: frozenset[str], views: frozenset[str]) -> None:
        if self.metadata is not None:
            self.metadata.touch_all(shas, views)

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
            "deferred_bytecode": self.deferred.stats().as_dict(),
            "watched": []
            if self.watches is None
            else [w.state(events=False) for w in self.watches],
            "interpreters": self.interpreters.known(),
            "allowed_hosts": list(self.config.allowed_hosts),
            "counters": {
                "relocks": sum(m.relocks.values()),
                "resolves": m.resolves,
                "prefetches": m.prefetches,
                "downloads": m.downloads,
                "bytes_fetched": m.bytes_fetched,
                "published": m.published,
                "cache_hits": m.cache_hits,
                "uploads": m.uploads,
                "trees_linked_ahead": m.trees_linked_ahead,
                "errors": sum(m.errors.values()),
            },
        }

    # --- watching model dirs (docs/daemon.md, "Watching model dirs") ----------------------

    async def start_watching(self) -> None:
        """Watch the configured dirs and the ones watched before (the roots of kind
        "watched"), and check each once: a change made while the daemon was down is seen."""
        self.watches = Watches(
            self, settle=self.config.watch_settle, pip_args=self.config.watch_pip_args
        )
        uid = os.geteuid()
        for model_dir in self.config.watch_model_dirs:  # listed by the admin: a warning only
            await asyncio.to_thread(warn_if_untrusted, model_dir, uid)
            await self.watches.add(model_dir, source="config", trigger="start", strict=False)
        if self.metadata is not None:
            roots = await asyncio.to_thread(self.metadata.roots)
            for root in roots:
                path = Path(root.path)
                if root.kind != "watched" or path in self.watches:
                    continue
                problems = await asyncio.to_thread(_trust_problems, path, uid)
                if problems:  # a watch request would be refused now: so is its restart
                    log.error("watch %s: not watched again: %s", path, "; ".join(problems))
                    continue
                await self.watches.add(path, source="api", trigger="start", strict=False)

    async def stop_watching(self) -> None:
        """Stop every watch and its lock child (the watched list stays in the index)."""
        watches, self.watches = self.watches, None
        if watches is not None:
            await watches.aclose()

    async def watch(self, request: WatchRequest, peer: Peer | None) -> dict[str, Any]:
        """Watch a model dir for its owner (see the trust note in the module docstring)."""
        watches = self._watches_for(peer)
        model_dir = request.model_dir
        await asyncio.to_thread(check_model_dir, model_dir, os.geteuid())
        target = None
        if request.python is not None:
            target = PythonTarget(watches.own.implementation, request.python)
            await self.interpreter_for(target)  # no such interpreter: refused now (422)
        persist = None
        if self.metadata is not None:
            metadata = self.metadata

            def register() -> None:  # persisted, without replacing a root's trees
                roots = metadata.roots()
                if not any(r.kind == "watched" and r.path == str(model_dir) for r in roots):
                    metadata.set_root("watched", model_dir, [])

            async def persist_root() -> None:
                await asyncio.to_thread(register)

            persist = persist_root

        watch = await watches.add(
            model_dir,
            source="api",
            requested=target,
            trigger="watch",
            persist=persist,
        )
        return watch.state()

    async def unwatch(self, model_dir: Path, peer: Peer | None) -> dict[str, Any]:
        """Stop watching; its wheels are no longer kept for it (the root is dropped)."""
        watches = self._watches_for(peer)
        watch = watches.get(model_dir)
        metadata = self.metadata

        async def forget() -> None:
            if metadata is not None:
                await asyncio.to_thread(metadata.drop_root, "watched", model_dir)

        was_watched = await watches.remove(model_dir, forget)
        configured = watch is not None and watch.source == "config"
        return {"model_dir": str(model_dir), "was_watched": was_watched, "configured": configured}

    def watched(self) -> list[dict[str, Any]]:
        return [] if self.watches is None else [w.state() for w in self.watches]

    def _watches_for(self, peer: Peer | None) -> Watches:
        if peer is None or peer.uid not in (0, os.geteuid()):
            raise NotPermitted(
                "watching a model dir runs pip on it (which may build and run an sdist's code) "
                f"and writes its lockfile as this daemon's user (uid {os.geteuid()}), so only "
                "that user and root may ask. Run your own user daemon (`wheelcas daemon`) and "
                "watch your model dirs with it."
            )
        if self.watches is None:
            raise Unavailable("this daemon is not watching model dirs now (it is stopping)")
        return self.watches

    # WatchHost: what the watches need (cas_daemon.watcher.WatchHost)

    async def interpreter_for(self, target: PythonTarget) -> str:
        """The daemon's interpreter for ``target``: its own, configured or discovered."""
        tag = target.cache_tag
        if tag is None:
            raise BadRequest("python", f"names {target}, which the daemon cannot run")
        python = self.interpreters.known().get(tag)
        if python is None:  # probing interpreters runs them: not on the event loop
            python = await asyncio.to_thread(self.interpreters.find, tag, target.version)
        return python

    async def ready_model(
        self, model_dir: Path, pythons: Sequence[tuple[PythonTarget, str]]
    ) -> int:
        """Make a watched dir's lock ready for each Python and root it; how many wheels.

        Each Python's wheels and view are made as a resolve makes them (:meth:`execute`,
        without a lease), so the next load of the model through the daemon only finds them.
        Reads the lockfile and the bundled wheels in the model dir itself (the exception of
        the trust note). The root is set first, as a lease is taken before a resolve: a GC
        meanwhile either sees it or ran before, and the trees are then published again.
        """
        interpreters = [python for _, python in pythons]
        refs_for = await asyncio.to_thread(_model_refs, model_dir, interpreters)
        for _, refs in refs_for:
            for ref in refs:
                if ref.url is not None:
                    check_host(ref.url, self.config.allowed_hosts)
        keys = list(dict.fromkeys(ref.sha256 for _, refs in refs_for for ref in refs))
        if self.metadata is not None:
            await _uncancelled(self.metadata.set_root, "watched", model_dir, keys)
        for (target, python), (_, refs) in zip(pythons, refs_for, strict=True):
            tag = target.cache_tag
            if tag is None:  # interpreter_for never picks one: a bug if it happens
                raise BadRequest("python", f"names {target}, which the daemon cannot run")
            spec = PythonSpec(tag, target.version, target.implementation)
            plan = Plan(ResolveRequest((), spec), tuple(refs), python)
            await self.execute(plan, None, prefetch=True, view=True)
        return len(keys)

    def count_watch_event(self, kind: EventKind) -> None:
        self.metrics.relocks[kind] += 1

    async def gc(self, *, dry_run: bool) -> dict[str, Any]:
        """One GC pass with the configured limits (``gc.max_bytes``, ``gc.max_age``)."""
        from cas_daemon.gc import run_for_daemon

        if self.metadata is None:
            raise Unavailable("garbage collection needs the store index; run `wheelcas fsck`")
        self._stats = None
        await self.uses.flush()  # GC decides on every use answered so far
        return await run_for_daemon(self.layout, self.metadata, self.config, dry_run=dry_run)


def _trust_problems(model_dir: Path, uid: int) -> list[str]:
    try:
        return trust_problems(model_dir, uid)
    except OSError:
        return []  # gone or unreadable: its check round says so


def _model_refs(model_dir: Path, interpreters: Sequence[str]) -> list[tuple[str, list[WheelRef]]]:
    """Per interpreter, the refs of its entry in ``model_dir``'s lockfile (blocking)."""
    from cas_daemon.prefetch import NoMatchingEntryError, target_environment
    from lockgen.lockfile import LOCKFILE_RELPATH, read_lockfile

    lockfile = read_lockfile(model_dir)
    if lockfile is None:
        raise BadRequest("model_dir", f"{model_dir} has no {LOCKFILE_RELPATH}")
    plans = []
    for python in interpreters:
        environment = target_environment(python)
        entry = lockfile.find_entry(environment)
        if entry is None:
            path = model_dir / LOCKFILE_RELPATH
            markers = [e.markers for e in lockfile.entries]
            raise NoMatchingEntryError(path, environment, markers, python)
        plans.append((python, [WheelRef.from_locked_dep(d, model_dir) for d in entry.locked_deps]))
    return plans


async def _uncancelled(fn: Callable[..., None], *args: object) -> None:
    """Run blocking ``fn`` in a thread; if cancelled, still wait for it to end.

    A root set by a thread that outlives its cancelled caller (an unwatch) could otherwise
    land after the unwatch dropped it, and keep the dir's wheels forever.
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _owner_uid(pid: int) -> int | None:
    """The uid that owns process ``pid``; None if it is gone (its lease protects nothing)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid  # noqa: PTH116 - one stat, cheaper than a Path
    except OSError:
        return None


async def _prelink(
    prelinker: Prelinker, sha: str, site: Path, previous: asyncio.Future[None] | None
) -> None:
    """Link one ready tree ahead of its view, after the tree before it: one thread, not one
    per tree all waiting for the prelinker's lock."""
    if previous is not None:
        await asyncio.wait([previous])
    try:
        await asyncio.to_thread(prelinker.add, sha, site)
    except Exception:  # only an optimisation; the view's build links the tree itself
        log.exception("linking %s ahead of its view failed", site)
