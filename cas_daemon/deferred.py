"""Deferred bytecode: the daemon compiles the test dirs of published trees while it is idle.

A store that defers test bytecode (``store.defer_test_bytecode``) publishes a tree as soon
as every module outside its test dirs has ``.pyc``, and leaves a ``deferred-{tag}`` marker
(:meth:`cas_daemon.layout.StoreLayout.deferred_marker`). :class:`DeferredBytecode` is the one
task that clears those markers: trees published by this daemon are queued as they appear,
and every marker on disk is queued at start-up, so the work of a daemon that was stopped or
killed half-way is finished by the next one.

It works one tree at a time and only while no request is making wheels ready
(:meth:`cas_daemon.store.Store.busy`); a resolve that arrives meanwhile has its compile
batches served first (the pool takes background batches only when nothing else waits), so
it waits for one background batch at most, not for a test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cas_daemon.store import Store
from lockgen.errors import WheelcasError

log = logging.getLogger("wheelcas.daemon")

#: How often a busy store is looked at again before deferred work goes on.
IDLE_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class DeferredStats:
    """What ``GET /v1/status`` says about deferred bytecode."""

    pending: int  # trees queued or being compiled
    trees_done: int
    modules_done: int
    failures: int
    last_error: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "pending_trees": self.pending,
            "trees_done": self.trees_done,
            "modules_done": self.modules_done,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class DeferredBytecode:
    """The queue of trees whose test dirs wait for bytecode, and the task that works it."""

    def __init__(self, store: Store, *, idle_poll: float = IDLE_POLL_S) -> None:
        self._store = store
        self._idle_poll = idle_poll
        self._queue: dict[tuple[str, str], None] = {}  # an ordered set of (sha256, cache tag)
        self._current: tuple[str, str] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._trees_done = 0
        self._modules_done = 0
        self._failures = 0
        self._last_error: str | None = None

    async def start(self) -> None:
        """Queue every deferred marker on disk, then start working."""
        for sha, tag in await asyncio.to_thread(self._store.deferred_trees):
            self.add(sha, tag)
        if self._queue:
            log.info("deferred bytecode: %d tree(s) left by an earlier run", len(self._queue))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="deferred bytecode")

    async def aclose(self) -> None:
        """Stop; a tree being compiled finishes first (its thread cannot be stopped)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def add(self, sha: str, cache_tag: str) -> None:
        key = (sha, cache_tag)
        if key != self._current and key not in self._queue:
            self._queue[key] = None
            self._wake.set()

    def note_published(self, shas: Iterable[str], cache_tag: str) -> None:
        """Queue those of ``shas`` that were published with test bytecode deferred."""
        layout = self._store.layout
        for sha in shas:
            if layout.deferred_marker(sha, cache_tag).exists():
                self.add(sha, cache_tag)

    def stats(self) -> DeferredStats:
        return DeferredStats(
            pending=len(self._queue) + (self._current is not None),
            trees_done=self._trees_done,
            modules_done=self._modules_done,
            failures=self._failures,
            last_error=self._last_error,
        )

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            # A poll, not an event: flights come and go on any loop that uses the store, and
            # the store keeps no asyncio objects of its own (its warm path imports no asyncio).
            while self._store.busy():  # noqa: ASYNC110
                await asyncio.sleep(self._idle_poll)
            key = next(iter(self._queue))
            del self._queue[key]
            self._current = key
            try:
                await self._complete(*key)
            finally:
                self._current = None

    async def _complete(self, sha: str, cache_tag: str) -> None:
        try:
            count = await self._store.acomplete_deferred(sha, cache_tag)
        except (WheelcasError, OSError) as exc:  # a StoreError, a Python that cannot run
            self._failed(sha, str(exc))
            log.warning("deferred bytecode of %s: %s", sha, exc)
        except Exception as exc:  # a bug must not end the task: the next tree may work
            self._failed(sha, f"internal error ({type(exc).__name__}), see the log")
            log.exception("deferred bytecode of %s failed", sha)
        else:
            if count is not None:
                self._trees_done += 1
                self._modules_done += count
                log.debug("deferred bytecode of %s: %d module(s) compiled", sha, count)

    def _failed(self, sha: str, why: str) -> None:
        """Count a failure; the tree's marker stays, for the next start-up to try again."""
        self._failures += 1
        self._last_error = f"{sha}: {why}"
