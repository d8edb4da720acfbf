"""The store: every locked wheel unpacked once, by sha256, into a read-only importable tree.

``Store.aready`` follows "Publishing a tree" in docs/design.md. Processes coordinate by the
per-sha256 ``flock`` (the second one waits, then finds the tree: one download per wheel);
inside a process, concurrent requests for a wheel and interpreter share one task; the
blocking steps of publishing a tree run in the store's threads, from :mod:`cas_daemon.publish`.
The warm path (``warm_site_dirs``) is ``stat`` calls only, and the module imports nothing
heavy: the cold path imports asyncio, aiohttp, unpacking and compiling itself.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import functools
import os
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from cas_daemon.bundle_keys import DigestCache
from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout, default_store_root
from cas_daemon.progress import EventKind, ProgressCallback, ProgressEvent
from lockgen.lockfile import LockedDep, Sha256

if TYPE_CHECKING:
    # asyncio costs ~30 ms to import and the warm path never needs it: the cold-path
    # functions import it themselves.
    import asyncio
    from concurrent.futures import Executor, ThreadPoolExecutor
    from types import TracebackType

    from cas_daemon.compile_pool import CompilerPools
    from cas_daemon.fetch import Downloader
    from cas_daemon.unpack import UnpackLimits

P = ParamSpec("P")
T = TypeVar("T")


class _Emit(Protocol):
    def __call__(self, kind: EventKind, nbytes: int = 0) -> None: ...


#: Threads for the store's blocking steps (:meth:`Store._steps`): wheels published at once.
STEP_THREADS = 16
#: Site dir paths the warm path keeps made (a few hundred bytes each); dropped all at once.
_SITE_PATHS_KEPT = 65536
_LOCK_POLL_FIRST = 0.005
_LOCK_POLL_MAX = 0.1


@dataclass(frozen=True, slots=True)
class WheelRef:
    """Where one locked wheel's bytes come from (an index URL or a bundled file), and its key.

    ``sha256`` is the store key, the name of the tree: the sha256 of the bytes the tree is
    unpacked from, which the store checks before unpacking them. For a URL and for a plain
    bundled ``.whl`` it is the lock's sha256. For a compressed bundle it is the bundle file's,
    and ``locked_sha256`` keeps the lock's (of the original wheel), which the bundle's header
    must name. Why, and how a bundle's key is found cheaply: :mod:`cas_daemon.bundle_keys`.
    """

    sha256: Sha256
    filename: str
    url: str | None = None
    bundle_path: Path | None = None
    locked_sha256: Sha256 | None = None  # None: the same as sha256

    def __post_init__(self) -> None:
        if (self.url is None) == (self.bundle_path is None):
            raise ValueError("a WheelRef has exactly one of url and bundle_path")
        if self.bundle_path is not None and not self.bundle_path.is_absolute():
            raise ValueError(f"bundle_path must be absolute: {self.bundle_path}")
        if self.locked_sha256 is not None and self.bundle_path is None:
            raise ValueError("only a bundled file has a key other than the lock's sha256")

    @property
    def wheel_sha256(self) -> Sha256:
        """The lock's sha256: that of the original ``.whl``."""
        return self.sha256 if self.locked_sha256 is None else self.locked_sha256

    @classmethod
    def from_locked_dep(
        cls, dep: LockedDep, model_dir: Path, *, digests: DigestCache | None = None
    ) -> WheelRef:
        """The ref of a lock entry's wheel; a bundled file's key from ``digests``.

        ``digests`` defaults to the user's cache (:meth:`DigestCache.for_user`): a stat per
        bundled file on a warm load, a hash only for a compressed bundle not seen before.
        """
        if dep.url is not None:
            return cls(dep.sha256, dep.filename, url=dep.url)
        bundle = model_dir.absolute() / str(dep.bundled_whl_path)
        key = (digests or DigestCache.for_user()).key(bundle, dep.sha256)
        locked = None if key == dep.sha256 else dep.sha256
        return cls(key, dep.filename, bundle_path=bundle, locked_sha256=locked)


@dataclass(frozen=True, slots=True)
class StoreStats:
    blobs: int
    blob_bytes: int
    trees: int
    tree_bytes: int


@dataclass(frozen=True, slots=True)
class _Flight:
    """One wheel being made ready; every caller waiting on it listens to its progress."""

    task: asyncio.Task[None]
    listeners: list[ProgressCallback]


@dataclass(slots=True)
class _LoopState:
    """What the calls on one event loop share: flights and the downloader.

    The downloader (and its session) is made by the first download and closed when the
    last flight lands, so a caller that gives up early cannot close it under another's.
    """

    flights: dict[tuple[str, str], _Flight] = field(default_factory=dict)
    downloader: Downloader | None = None


class Store:
    """The content-addressed store under one root (see :mod:`cas_daemon.layout`).

    The cold path compiles with persistent worker processes (one pool per interpreter, see
    :class:`cas_daemon.compile_pool.CompilerPools`), started on first use and kept for later
    calls. :meth:`close` / :meth:`aclose` (or ``with`` / ``async with``) stops them; a store
    that is garbage collected, or still open at interpreter exit, stops them then.

    ``defer_test_bytecode``: a tree is ready once every module outside its test dirs has
    bytecode; the test dirs get theirs from :meth:`acomplete_deferred`, which a long-running
    owner (the daemon) calls when it is idle. Off by default: an embedded store has nobody to
    finish the job. See "Deferred bytecode" in docs/design.md.
    """

    def __init__(
        self,
        layout: StoreLayout,
        *,
        max_parallel_downloads: int = 8,
        limits: UnpackLimits | None = None,
        defer_test_bytecode: bool = False,
    ) -> None:
        if max_parallel_downloads < 1:
            raise ValueError("max_parallel_downloads must be at least 1")
        self.layout = layout
        self.defer_test_bytecode = defer_test_bytecode
        self.max_parallel_downloads = max_parallel_downloads
        self._limits = limits  # None: unpack's defaults, imported only when unpacking
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        # Made on the cold path only: precompile is not imported on the warm path. _thread
        # rather than threading for the same reason (threading is not loaded there either).
        self._compilers: CompilerPools | None = None
        self._compilers_closer: weakref.finalize[[], Store] | None = None
        self._compilers_lock = _thread.allocate_lock()
        self._executor: ThreadPoolExecutor | None = None  # the cold path's, see _steps()
        self._executor_pid = 0
        # sha256 -> its site dir: a path never changes, and building a Path costs more than
        # checking the tree's marker (warm_site_dirs).
        self._site_paths: dict[str, Path] = {}

    @classmethod
    def open_default(
        cls, *, max_parallel_downloads: int = 8, limits: UnpackLimits | None = None
    ) -> Store:
        """The store at ``$WHEELCAS_HOME`` (or the user cache dir)."""
        layout = StoreLayout(default_store_root())
        return cls(layout, max_parallel_downloads=max_parallel_downloads, limits=limits)

    # --- shutting down -------------------------------------------------------------------

    def close(self) -> None:
        """Stop this store's compile workers, after the work already given to them.

        The store stays usable: the next cold path starts workers again.
        """
        with self._compilers_lock:
            closer, self._compilers_closer, self._compilers = self._compilers_closer, None, None
            executor, self._executor = self._executor, None
        if closer is not None:
            closer()  # CompilerPools.close, once
        if executor is not None:
            executor.shutdown(wait=False)  # idle by now: the compile workers were stopped

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop (a daemon's shutdown)."""
        import asyncio

        await asyncio.to_thread(self.close)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _compile_pools(self) -> CompilerPools:
        """This store's compile workers, made on first use (from any thread)."""
        from cas_daemon.compile_pool import CompilerPools

        with self._compilers_lock:
            if self._compilers is None:
                pools = CompilerPools()
                # The finalizer closes them when the store is collected or at exit; it holds
                # the pools, not the store.
                self._compilers_closer = weakref.finalize(self, pools.close)
                self._compilers = pools
            return self._compilers

    def _steps(self) -> Executor:
        """The threads that run this store's long blocking steps (unpack, compile, seal).

        Not the event loop's default executor: a publish holds its thread for seconds (most
        of it waiting for compile workers), and the downloads' writes and every other
        ``asyncio.to_thread`` of the process would queue behind a few of them, so that
        downloads stalled while the trees already fetched were compiled. Threads are cheap
        and mostly wait; the compile workers and the disk bound the real concurrency.
        """
        from concurrent.futures import ThreadPoolExecutor

        with self._compilers_lock:
            # A forked child has none of the parent's threads: the parent's executor would
            # count them as idle and never run a step there.
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(
                    max_workers=STEP_THREADS, thread_name_prefix="wheelcas-store"
                )
                self._executor_pid = os.getpid()
            return self._executor

    # --- the warm path -----------------------------------------------------------------

    def warm_site_dirs(self, refs: Sequence[WheelRef], cache_tag: str) -> list[Path] | None:
        """The site dirs of ``refs`` if all are published and compiled for ``cache_tag``.

        One ``stat`` per wheel: the marker lives inside the tree, which appears by one rename,
        so an existing marker means a complete tree. None as soon as one is missing.
        """
        layout, known = self.layout, self._site_paths
        marker = f"pyc-{cache_tag}"
        for ref in refs:
            # Strings, not Path joins: a warm resolve of R40 asks 40 times, every load.
            if not os.path.exists(f"{layout.tree_path(ref.sha256)}/{marker}"):  # noqa: PTH110
                return None
        sites = []
        for ref in refs:
            site = known.get(ref.sha256)
            if site is None:
                if len(known) >= _SITE_PATHS_KEPT:
                    known.clear()
                site = known[ref.sha256] = Path(f"{layout.tree_path(ref.sha256)}/site")
            sites.append(site)
        return sites

    # --- the cold path -----------------------------------------------------------------

    def ready(
        self,
        refs: Sequence[WheelRef],
        *,
        python: str = sys.executable,
        progress: ProgressCallback | None = None,
    ) -> list[Path]:
        """Blocking :meth:`aready` for callers without an event loop."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "Store.ready() cannot run inside a running event loop; "
                "use `await store.aready(...)` there instead."
            )
        return asyncio.run(self.aready(refs, python=python, progress=progress))

    async def aready(
        self,
        refs: Sequence[WheelRef],
        *,
        python: str = sys.executable,
        progress: ProgressCallback | None = None,
    ) -> list[Path]:
        """Make every wheel of ``refs`` importable by ``python``; their site dirs, in order.

        Raises :class:`StoreError` subclasses (``FetchError``, ``HashMismatch``, unpack
        errors) for the first wheel that fails; other wheels keep going in the background
        and are published if they can be.
        """
        import asyncio

        from cas_daemon.precompile import interpreter_cache_tag

        cache_tag = await asyncio.to_thread(interpreter_cache_tag, python)
        unique = {ref.sha256: ref for ref in refs}.values()
        warm = self.warm_site_dirs(refs, cache_tag)
        if warm is not None:
            for ref in unique:
                if progress is not None:
                    progress(ProgressEvent("cached", ref.sha256, ref.filename))
            return warm
        for directory in self.layout.all_dirs():
            directory.mkdir(parents=True, exist_ok=True)
        state = self._states.setdefault(asyncio.get_running_loop(), _LoopState())
        joined: list[_Flight] = []
        try:
            for ref in unique:
                flight = state.flights.get((ref.sha256, cache_tag))
                if flight is None:
                    flight = self._launch(state, ref, python, cache_tag)
                if progress is not None:
                    flight.listeners.append(progress)
                joined.append(flight)
            # shield: a caller that is cancelled stops waiting, the shared work goes on.
            await asyncio.gather(*(asyncio.shield(f.task) for f in joined))
        finally:
            if progress is not None:
                for flight in joined:
                    with contextlib.suppress(ValueError):
                        flight.listeners.remove(progress)
        return [self.layout.site_dir(ref.sha256) for ref in refs]

    def busy(self) -> bool:
        """Whether a wheel is being made ready in this process now (on any event loop)."""
        return any(state.flights for state in list(self._states.values()))

    def deferred_trees(self) -> list[tuple[Sha256, str]]:
        """``(sha256, cache_tag)`` of every tree whose test dirs still wait for bytecode."""
        from cas_daemon.layout import DEFERRED_PREFIX

        found: list[tuple[Sha256, str]] = []
        for marker in self.layout.trees_dir.glob(f"??/*/{DEFERRED_PREFIX}*"):
            found.append((Sha256(marker.parent.name), marker.name.removeprefix(DEFERRED_PREFIX)))
        return sorted(found)

    async def acomplete_deferred(self, sha: str, cache_tag: str) -> int | None:
        """Compile the deferred test dirs of tree ``sha`` for ``cache_tag``; how many modules
        (None: nothing was deferred there, or the tree is gone).

        With the interpreter that published the tree (named in the marker, written by this
        store). Under the tree's lock, so it never races a publish, a GC or an fsck; the
        marker goes last, so a process killed half-way leaves it for the next start-up.
        """
        marker = self.layout.deferred_marker(sha, cache_tag)
        if not marker.exists():
            return None
        async with _exclusive(self.layout.lock_path(sha)):
            from cas_daemon.publish import complete_deferred_tree

            return await _locked_step(
                self._steps(),
                complete_deferred_tree,
                self.layout,
                sha,
                cache_tag,
                pools=self._compile_pools(),
            )

    def stats(self) -> StoreStats:
        blobs, blob_bytes = _count_files(self.layout.blobs_dir)
        trees_dir = self.layout.trees_dir
        trees = sum(1 for _ in trees_dir.glob("*/*")) if trees_dir.is_dir() else 0
        _, tree_bytes = _count_files(trees_dir)
        return StoreStats(blobs=blobs, blob_bytes=blob_bytes, trees=trees, tree_bytes=tree_bytes)

    def _launch(self, state: _LoopState, ref: WheelRef, python: str, cache_tag: str) -> _Flight:
        import asyncio

        key = (ref.sha256, cache_tag)
        listeners: list[ProgressCallback] = []

        def emit(kind: EventKind, nbytes: int = 0) -> None:
            event = ProgressEvent(kind, ref.sha256, ref.filename, nbytes)
            for listener in list(listeners):
                listener(event)

        async def fly() -> None:
            try:
                await self._make_ready(state, ref, python, cache_tag, emit)
            finally:
                state.flights.pop(key, None)
                if not state.flights and state.downloader is not None:
                    downloader, state.downloader = state.downloader, None
                    await downloader.aclose()

        task = asyncio.get_running_loop().create_task(fly(), name=f"ready {ref.filename}")
        # A failure nobody awaits any more (its callers were cancelled) is not worth a warning.
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        state.flights[key] = flight = _Flight(task, listeners)
        return flight

    async def _make_ready(
        self, state: _LoopState, ref: WheelRef, python: str, cache_tag: str, emit: _Emit
    ) -> None:
        sha = ref.sha256
        marker = self.layout.pyc_marker(sha, cache_tag)
        if marker.exists():
            emit("cached")
            return
        from cas_daemon.precompile import compile_published
        from cas_daemon.publish import publish_tree, remove_leftovers

        async with _exclusive(self.layout.lock_path(sha)):
            await _locked_step(self._steps(), remove_leftovers, self.layout, sha)
            if not self.layout.tree_dir(sha).exists():
                emit("start")
                source = await self._obtain(state, ref, emit)
                size = await _locked_step(
                    self._steps(),
                    publish_tree,
                    self.layout,
                    ref,
                    source,
                    python,
                    cache_tag,
                    limits=self._limits,
                    pools=self._compile_pools(),
                    defer_test_bytecode=self.defer_test_bytecode,
                )
                emit("ready", size)
            elif not marker.exists():
                emit("start")
                site = self.layout.site_dir(sha)
                pools = self._compile_pools()
                deferred = (
                    self.layout.deferred_marker(sha, cache_tag)
                    if self.defer_test_bytecode
                    else None
                )
                await _locked_step(
                    self._steps(),
                    compile_published,
                    site,
                    python,
                    marker,
                    pools=pools,
                    deferred_marker=deferred,
                )
                # Not deduplicated again: bytecode never matches another tree's.
                emit("ready")
            else:  # another process published it while this one waited for the lock
                emit("cached")

    async def _obtain(self, state: _LoopState, ref: WheelRef, emit: _Emit) -> Path:
        """The file to unpack: the bundle in the model dir, or the blob (fetched if needed)."""
        if ref.bundle_path is not None:
            if not ref.bundle_path.is_file():
                raise StoreError(
                    f"the bundled wheel {ref.bundle_path} is missing from the model dir. "
                    "Restore the model's .carton folder, or re-lock it (`wheelcas lock DIR`)."
                )
            return ref.bundle_path
        blob = self.layout.blob_path(ref.sha256)
        if blob.is_file():  # blobs are only ever renamed in verified
            return blob
        from cas_daemon.fetch import Downloader

        if state.downloader is None:
            state.downloader = Downloader(self.max_parallel_downloads)
        on_bytes = functools.partial(emit, "bytes")
        await state.downloader.fetch(
            str(ref.url), ref.sha256, blob, self.layout.tmp_dir, on_bytes=on_bytes
        )
        return blob


def _count_files(top: Path) -> tuple[int, int]:
    """Files and bytes under ``top``; one removed while it is listed (a compile worker's temp
    file renamed, a tree collected) is not counted."""
    count = size = 0
    for root, _dirs, files in os.walk(top):
        for name in files:
            try:
                size += Path(root, name).lstat().st_size
            except FileNotFoundError:
                continue
            count += 1
    return count, size


@contextlib.asynccontextmanager
async def _exclusive(path: Path) -> AsyncIterator[None]:
    """Hold the exclusive ``flock`` on ``path`` for the block, without blocking the loop.

    It polls with ``LOCK_NB`` rather than waiting in ``asyncio.to_thread``: threads blocked
    in ``flock`` would fill the shared executor, and two processes each waiting on the
    other's locks could then have no thread left to finish the work that releases them.
    Contention is rare (two processes publishing the same wheel) and a short poll is cheap.
    """
    import asyncio

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        delay = _LOCK_POLL_FIRST
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LOCK_POLL_MAX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


async def _locked_step(
    executor: Executor, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run blocking ``fn`` in a thread of ``executor``; if cancelled, still wait for it to end.

    A thread cannot be stopped. Returning early would release the wheel's lock while the
    thread still writes in ``tmp/``, and the next lock holder would delete files under it.
    """
    import asyncio

    call = functools.partial(fn, *args, **kwargs)
    future = asyncio.get_running_loop().run_in_executor(executor, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
