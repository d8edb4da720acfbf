"""Persistent compile workers: the processes that write every ``.pyc`` of the store.

Compiling is most of the cold path's CPU time (R40: ~4,800 modules, ~11 CPU-seconds), so it
runs in a persistent pool of worker processes per interpreter (:class:`CompilerPools`),
started on first use and shared by every tree being published, file batch by file batch: a
numpy-sized tree keeps every core busy, a five-file tree costs one message, and nobody pays
an interpreter start-up per wheel. "Precompilation" in docs/design.md has the measurements.
:mod:`cas_daemon.precompile` decides what a tree gets and seals it; this module only
schedules the workers: :mod:`cas_daemon.compile_sources` finds and batches a tree's modules,
:mod:`cas_daemon.compile_worker` is one worker process and its protocol.
"""

from __future__ import annotations

import atexit
import collections
import errno
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from cas_daemon.compile_sources import cut_batches, find_sources, largest_first
from cas_daemon.compile_worker import (
    Failure,
    ProtocolError,
    Source,
    WorkerProcess,
    encode_batch,
    parse_failures,
    remove_partial_writes,
)
from cas_daemon.errors import StoreError

log = logging.getLogger(__name__)

# Batches a worker holds at once: while it compiles one, the next waits in its pipe, so it
# never idles while this process (busy unpacking, holding the GIL) gets round to answering.
_DEPTH: Final = 2
# A batch whose worker dies is given to a new worker once; a second death fails the tree.
_MAX_ATTEMPTS: Final = 2
# Workers left idle this long exit (a daemon should not hold N interpreters forever); the
# next tree starts them again, ~30 ms.
IDLE_TIMEOUT: Final = 120.0
# Errors writing a .pyc that say the store itself is broken: a tree marked compiled whose
# bytecode was never written would make every later import of it slow, silently.
_FATAL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def default_pools() -> CompilerPools:
    """The process-wide pools behind :func:`cas_daemon.precompile.compile_tree` without
    ``pools``; closed at exit."""
    global _default_pools
    with _default_lock:
        if _default_pools is None:
            _default_pools = CompilerPools()
            atexit.register(_default_pools.close)
        return _default_pools


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # the CPUs this process may use
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- the pools ----------------------------------------------------------------------------


class _Job:
    """One :meth:`CompilerPools.compile_tree` call; its state is guarded by its pool's lock.

    It is done when every batch has come back or been dropped, never earlier, even when it
    failed: the caller deletes a failed staging dir, which no worker may still be writing in.
    """

    __slots__ = ("background", "done", "error", "outstanding", "retried", "site_dir", "skipped")

    def __init__(self, site_dir: Path, *, background: bool = False) -> None:
        self.site_dir = site_dir
        #: Deferred bytecode: its batches go to a worker only when no other batch waits.
        self.background = background
        self.outstanding = 0
        self.skipped: list[tuple[str, str]] = []
        self.error: StoreError | None = None
        self.retried = False  # a worker died holding some of its files
        self.done = threading.Event()


@dataclass(slots=True, eq=False)
class _Batch:
    job: _Job
    sources: list[Source]
    payload: bytes
    attempts: int = 0


class _Worker:
    """One worker process and the batches it holds; only its own serving thread talks to it."""

    __slots__ = ("inflight", "process", "thread")

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.inflight: collections.deque[_Batch] = collections.deque()
        self.thread: threading.Thread | None = None


class _Retire(Exception):
    """The worker is no longer needed (idle, or its pool is closing)."""


class _Pool:
    """Up to ``size`` workers of one interpreter, fed from one queue of batches.

    Each worker has a daemon thread here that hands it batches and reads its answers, so a
    worker takes the next batch as soon as it has room, whichever tree it belongs to. One
    condition guards everything shared: the queue, the worker list and the jobs' state.
    """

    def __init__(self, python: str, size: int, idle_timeout: float) -> None:
        self.python = python
        self._size = size
        self._idle_timeout = idle_timeout
        self._cond = threading.Condition()
        self._pending: collections.deque[_Batch] = collections.deque()
        #: Batches of background jobs: taken only when ``_pending`` is empty.
        self._background: collections.deque[_Batch] = collections.deque()
        self._workers: list[_Worker] = []
        self._closing = False

    # --- called by the threads that publish trees ----------------------------------------

    def run(self, job: _Job, batches: list[_Batch]) -> None:
        """Queue ``batches`` (all of ``job``'s), wait for them; raise the job's error."""
        with self._cond:
            if self._closing:
                raise StoreError(
                    f"cannot precompile {job.site_dir}: the store's compile workers for "
                    f"{self.python} are shut down (the store was closed while in use)"
                )
            job.outstanding = len(batches)
            self._queue_of(job).extend(batches)
            try:
                self._spawn_for_pending()
            except OSError as exc:
                self._drop_pending(job)
                raise StoreError(
                    f"cannot run {self.python} to precompile {job.site_dir}: {exc}"
                ) from None
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [w.process.pid for w in self._workers]

    def close(self, timeout: float) -> None:
        """Finish the queued batches, stop every worker and reap it.

        Workers still busy after ``timeout`` seconds are killed; their trees fail.
        """
        with self._cond:
            self._closing = True
            workers = list(self._workers)
            self._cond.notify_all()
        current = threading.current_thread()
        for worker in workers:
            if worker.thread is not None and worker.thread is not current:
                worker.thread.join(timeout)
        for worker in workers:
            if worker.thread is not None and worker.thread.is_alive():
                worker.process.kill()  # its thread sees EOF, fails what it held and reaps it
                if worker.thread is not current:
                    worker.thread.join()
        with self._cond:
            for batch in [*self._pending, *self._background]:
                self._fail(batch.job, self._closed_error(batch.job))

    # --- the serving threads -------------------------------------------------------------

    def _spawn_for_pending(self) -> None:
        """Start workers for queued batches no idle worker will take (lock held).

        Lazily, one per batch up to the pool's size: a small tree starts one worker, and a
        pool only grows to one per CPU when there is that much work at once. Raises OSError
        only if the pool is left without any worker: with one, the work still gets done.
        """
        wanted = min(self._size - len(self._workers), self._queued() - self._idle())
        for _ in range(wanted):
            try:
                self._spawn()
            except OSError as exc:
                if not self._workers:
                    raise
                log.warning("cannot start another compile worker of %s: %s", self.python, exc)
                return

    def _spawn(self) -> None:
        worker = _Worker(WorkerProcess.start(self.python))
        worker.thread = threading.Thread(
            target=self._serve,
            args=(worker,),
            name=f"compile worker {worker.process.pid}",
            daemon=True,
        )
        self._workers.append(worker)
        try:
            worker.thread.start()
        except RuntimeError as exc:  # no thread to be had: the worker is of no use
            self._workers.remove(worker)
            worker.process.reap(graceful=False)
            raise OSError(f"cannot start a thread for a compile worker: {exc}") from None

    def _serve(self, worker: _Worker) -> None:
        """The life of one worker: send batches, read answers, until retired or dead."""
        try:
            while True:
                batch = self._next(worker)
                if batch is not None:
                    self._send(worker, batch)
                else:
                    self._receive(worker)
        except _Retire:
            worker.process.reap(graceful=True)
        except ProtocolError:
            self._bury(worker)
        except BaseException:  # a bug here must not leave publishing threads waiting
            log.exception(
                "compile worker %d of %s: internal error", worker.process.pid, self.python
            )
            self._bury(worker)

    def _next(self, worker: _Worker) -> _Batch | None:
        """The next batch for ``worker`` to take, or None to read an answer first.

        A second batch is taken ahead only if no idle worker could start on it now: a tree
        of two batches should use two cores, not queue both in one pipe. Background batches
        are taken only when nothing else waits, and never ahead, so that a tree a loader
        waits for queues behind one background batch at most.
        """
        with self._cond:
            while True:
                if self._pending and (
                    not worker.inflight
                    or (len(worker.inflight) < _DEPTH and len(self._pending) > self._idle())
                ):
                    batch = self._pending.popleft()
                    worker.inflight.append(batch)
                    return batch
                if self._background and not self._pending and not worker.inflight:
                    batch = self._background.popleft()
                    worker.inflight.append(batch)
                    return batch
                if worker.inflight:
                    return None
                if self._closing:
                    self._workers.remove(worker)
                    raise _Retire
                if not self._cond.wait(self._idle_timeout) and not self._queued():
                    self._workers.remove(worker)
                    raise _Retire

    def _idle(self) -> int:
        return sum(1 for w in self._workers if not w.inflight)

    def _queued(self) -> int:
        return len(self._pending) + len(self._background)

    def _queue_of(self, job: _Job) -> collections.deque[_Batch]:
        return self._background if job.background else self._pending

    def _send(self, worker: _Worker, batch: _Batch) -> None:
        worker.process.send(batch.payload)

    def _receive(self, worker: _Worker) -> None:
        """Read one answer; everything is checked before any job's state changes."""
        answer = worker.process.read_answer()
        if not worker.process.started:  # the hello: [cache_tag, pid]
            worker.process.started = True
            log.debug("compile worker %s of %s started", answer, self.python)
            return
        with self._cond:
            batch = worker.inflight[0]
            failures = parse_failures(answer, len(batch.sources))
            worker.inflight.popleft()
            self._settle(batch, failures)

    def _settle(self, batch: _Batch, failures: list[Failure]) -> None:
        job = batch.job
        for index, kind, message, code in failures:
            source = batch.sources[index][0]
            if kind == "os" and code in _FATAL_ERRNOS:
                self._fail(
                    job,
                    StoreError(
                        f"cannot write the bytecode of {source} (with {self.python}): "
                        f"{message}. Free space or fix the store's file system, then retry."
                    ),
                )
            else:
                job.skipped.append((source, message))
        self._finished(job)

    def _bury(self, worker: _Worker) -> None:
        """A worker died: give its batches to another worker once, or fail their trees."""
        if not worker.process.started:
            worker.process.read_hello_of_dead()
        status, said = worker.process.reap(graceful=False)
        with self._cond:
            if worker in self._workers:
                self._workers.remove(worker)
            held = list(worker.inflight)
            worker.inflight.clear()
            if not worker.process.started:
                # The interpreter does not run at all: every queued tree would fail the same.
                for batch in [*held, *self._pending, *self._background]:
                    error = (
                        self._closed_error(batch.job)
                        if self._closing
                        else self._unrunnable_error(batch.job, status, said)
                    )
                    self._fail(batch.job, error)
                for batch in held:
                    self._finished(batch.job)
                return
            retried = 0
            for batch in reversed(held):
                batch.attempts += 1
                if batch.attempts < _MAX_ATTEMPTS and not self._closing:
                    batch.job.retried = True
                    self._queue_of(batch.job).appendleft(batch)
                    retried += 1
                    continue
                error = (
                    self._closed_error(batch.job)
                    if self._closing
                    else StoreError(
                        f"precompiling {batch.job.site_dir} with {self.python} failed: its "
                        f"compile worker died ({status}) twice on the same files, the first "
                        f"being {batch.sources[0][0]}. It said:\n{said or '(no output)'}"
                    )
                )
                self._fail(batch.job, error)
                self._finished(batch.job)
            log.warning(
                "a compile worker of %s died (%s); %d batch(es) it held go to another",
                self.python,
                status,
                retried,
            )
            if self._queued() and not self._closing:
                try:
                    self._spawn_for_pending()
                except OSError as exc:  # no worker left at all
                    for batch in [*self._pending, *self._background]:
                        self._fail(
                            batch.job,
                            StoreError(
                                f"cannot run {self.python} to precompile "
                                f"{batch.job.site_dir}: {exc}"
                            ),
                        )
            self._cond.notify_all()

    # --- job bookkeeping (lock held) -----------------------------------------------------

    def _finished(self, job: _Job) -> None:
        job.outstanding -= 1
        if job.outstanding <= 0:
            job.done.set()

    def _fail(self, job: _Job, error: StoreError) -> None:
        """Record ``job``'s first error and drop its queued batches (lock held)."""
        if job.error is None:
            job.error = error
        self._drop_pending(job)

    def _drop_pending(self, job: _Job) -> None:
        queue = self._queue_of(job)
        kept = [b for b in queue if b.job is not job]
        dropped = len(queue) - len(kept)
        if dropped:
            queue.clear()
            queue.extend(kept)
            job.outstanding -= dropped
            if job.outstanding <= 0:
                job.done.set()

    def _unrunnable_error(self, job: _Job, status: str, said: str) -> StoreError:
        return StoreError(
            f"precompiling {job.site_dir} with {self.python} failed: the interpreter ended "
            f"({status}) before it could compile anything. Check that the interpreter works. "
            f"It said:\n{said or '(no output)'}"
        )

    def _closed_error(self, job: _Job) -> StoreError:
        return StoreError(
            f"precompiling {job.site_dir} with {self.python} was cut short: the store's "
            "compile workers were shut down (the store was closed while in use)"
        )


class CompilerPools:
    """Persistent compile workers: one pool per interpreter, ``workers`` processes each.

    Thread-safe: any number of threads may compile trees at once, their files share the
    workers. Workers start on first use and exit after ``idle_timeout`` seconds without
    work; :meth:`close` (or leaving a ``with`` block) stops them all and reaps them. A pools
    object can be used again after closing: it starts new workers.

    A forked child never uses its parent's workers: it starts its own (see
    :func:`_after_fork_in_child`).
    """

    def __init__(self, *, workers: int | None = None, idle_timeout: float = IDLE_TIMEOUT) -> None:
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        self._size = workers if workers is not None else _cpu_count()
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._pools: dict[str, _Pool] = {}
        _all_pools.add(self)

    def compile_tree(
        self, site_dir: Path, python: str, *, display_dir: Path | None = None, defer: bool = False
    ) -> int:
        """:func:`cas_daemon.precompile.compile_tree` with these pools."""
        now, deferred = find_sources(site_dir, display_dir)
        if not defer:
            now = largest_first([*now, *deferred])
            deferred = []
        self._run(_Job(site_dir), now, python)
        return len(deferred)

    def compile_deferred(
        self, site_dir: Path, python: str, *, display_dir: Path | None = None
    ) -> int:
        """Compile what ``compile_tree(..., defer=True)`` left out, as background work (its
        batches wait for every other tree's); how many modules that was."""
        _now, deferred = find_sources(site_dir, display_dir)
        if deferred:
            self._run(_Job(site_dir, background=True), deferred, python)
        return len(deferred)

    def _run(self, job: _Job, sources: list[Source], python: str) -> None:
        site_dir = job.site_dir
        batches = [_Batch(job, chunk, encode_batch(chunk)) for chunk in cut_batches(sources)]
        self._pool(python).run(job, batches)
        if job.retried:
            remove_partial_writes(site_dir)
        if job.skipped:
            log.info(
                "%s: %d file(s) do not compile with %s; left as source",
                site_dir,
                len(job.skipped),
                python,
            )
            for source, message in job.skipped:
                log.debug("%s: %s", source, message)

    def worker_pids(self) -> dict[str, list[int]]:
        """The live workers' process ids, by interpreter (for tests and diagnostics)."""
        with self._lock:
            pools = dict(self._pools)
        return {python: pool.worker_pids() for python, pool in pools.items()}

    def close(self, timeout: float = 30.0) -> None:
        """Stop every worker after the work already queued; idempotent."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools = {}
        for pool in pools:
            pool.close(timeout)

    def __enter__(self) -> CompilerPools:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _pool(self, python: str) -> _Pool:
        with self._lock:
            pool = self._pools.get(python)
            if pool is None:
                pool = self._pools[python] = _Pool(python, self._size, self._idle_timeout)
            return pool


_default_pools: CompilerPools | None = None
_default_lock = threading.Lock()
_all_pools: weakref.WeakSet[CompilerPools] = weakref.WeakSet()
_inherited: list[_Pool] = []


def _after_fork_in_child() -> None:
    """In a forked child, let go of the parent's workers without touching them.

    The child must not keep copies of the parent's pipes (a worker ends when its stdin does,
    which needs every copy of the write end closed), and must never collect the parent's
    ``Popen`` objects (their finalizers would warn, or close reused descriptors). The
    child's pools start empty and start workers of their own.
    """
    global _default_lock
    _default_lock = threading.Lock()
    for pools in list(_all_pools):
        for pool in pools._pools.values():
            _inherited.append(pool)
            for worker in pool._workers:
                worker.process.forget_in_fork_child()
        pools._pools = {}
        pools._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
