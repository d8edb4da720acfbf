"""Watching model dirs, the asyncio part: one task per dir, and the set of them.

:class:`DirWatch` is one dir's task: it drives :class:`~cas_daemon.watch.WatchMachine` from
the events :class:`~cas_daemon.fswatch.FsBridge` delivers, runs the lock children
(:func:`~cas_daemon.relock.run_lock`) and asks the service to make the new lock's wheels
ready (:class:`WatchHost`). :class:`Watches` is the set of them. The rules themselves (when
to re-lock, for which Pythons) are in :mod:`cas_daemon.watch`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from cas_daemon.fswatch import FsBridge
from cas_daemon.protocol import Unavailable
from cas_daemon.relock import RelockFailed, partial_failure, run_lock
from cas_daemon.watch import (
    Decision,
    EventKind,
    Phase,
    PythonTarget,
    Round,
    Step,
    Trigger,
    WatchEvent,
    WatchMachine,
    decide,
    relock_targets,
    requirements_path,
    target_of,
)
from lockgen.errors import LockfileError, WheelcasError
from lockgen.lockfile import LockFile, read_lockfile

log = logging.getLogger("wheelcas.daemon")

#: Events kept per dir (the API shows them, newest last).
EVENTS_KEPT = 20
Source = Literal["config", "api"]


class WatchHost(Protocol):
    """What a watch needs from the daemon's service (:class:`~cas_daemon.service.Service`)."""

    async def interpreter_for(self, target: PythonTarget) -> str:
        """The path of the daemon's interpreter for ``target``; ``NoInterpreter`` if none."""
        ...

    async def ready_model(
        self, model_dir: Path, pythons: Sequence[tuple[PythonTarget, str]]
    ) -> int:
        """Make the lock's wheels (and their view) ready for each Python (its target and
        interpreter), root them for GC; how many."""
        ...

    def count_watch_event(self, kind: EventKind) -> None: ...


class DirWatch:
    """One watched model dir: its state machine, its events, and the task that works."""

    def __init__(
        self,
        model_dir: Path,
        *,
        source: Source,
        requested: PythonTarget | None,
        host: WatchHost,
        settle: float,
        pip_args: Sequence[str],
        own: PythonTarget,
        environment: dict[str, str],
    ) -> None:
        self.model_dir = model_dir
        self.source = source
        self.requested = requested
        self.machine = WatchMachine(settle)
        self.events: collections.deque[WatchEvent] = collections.deque(maxlen=EVENTS_KEPT)
        #: Every Python this watch locked for, so a partial failure does not drop one.
        self.targets: list[PythonTarget] = [] if requested is None else [requested]
        self._host = host
        self._pip_args = tuple(pip_args)
        self._own = own
        self._environment = environment  # the daemon's own: its platform
        self._wake = asyncio.Event()
        self._work: asyncio.Task[None] | None = None
        self._superseded: list[Round] = []
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch {model_dir}")

    def notify(self, trigger: Trigger = "change") -> None:
        """A change (or a check to make); on the loop, never blocks."""
        step, ended = self.machine.change(time.monotonic(), time.time(), trigger)
        if ended is not None:
            self._superseded.append(ended)
        if step is not Step.SETTLE and self._work is not None:
            self._work.cancel()  # the runner awaits it, and so its lock child's end
        self._wake.set()

    async def aclose(self) -> None:
        """Stop: the task and any lock child (killed, and waited for)."""
        self._task.cancel()
        await asyncio.wait([self._task])

    def state(self, *, events: bool = True) -> dict[str, Any]:
        last = self.events[-1].to_json() if self.events else None
        state: dict[str, Any] = {
            "model_dir": str(self.model_dir),
            "source": self.source,
            "python": None if self.requested is None else self.requested.version,
            "state": self.machine.phase.value,
            "pythons": [str(t) for t in self.targets],
            "last_event": last,
        }
        if events:
            state["events"] = [e.to_json() for e in self.events]
        return state

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (left := self.machine.remaining(time.monotonic())) is not None:
                    if left > 0:
                        await asyncio.sleep(left)  # a change meanwhile moves the deadline
                        continue
                    work = asyncio.get_running_loop().create_task(
                        self._round(self.machine.begin(time.time()))
                    )
                    self._work = work
                    await asyncio.wait([work])  # a cancelled one first stops its child
                    self._work = None
                    for superseded in self._superseded:
                        self._record(superseded.event("superseded", time.time()))
                    self._superseded.clear()
                    if not work.cancelled() and work.exception() is not None:
                        self._crashed(work.exception())
        finally:
            if self._work is not None:
                self._work.cancel()
                await asyncio.wait([self._work])

    def _crashed(self, exc: BaseException | None) -> None:
        """A bug in a round: logged with its traceback; the watch goes on."""
        log.error("watch %s: internal error", self.model_dir, exc_info=exc)
        if self.machine.round is not None and self.machine.phase not in (
            Phase.IDLE,
            Phase.SETTLING,
        ):
            done = self.machine.finished(ready=False)
            self._record(done.event("failed", time.time(), f"internal error: {exc!r}"))

    async def _round(self, current: Round) -> None:
        """Check, then re-lock and prefetch as the machine says. Cancelled when superseded."""
        if not await asyncio.to_thread(self.model_dir.is_dir):
            self._fail(
                f"{self.model_dir} is gone (renamed or deleted); the watch goes on, and checks "
                "it again when a dir appears at that path. `wheelcas unwatch` it if it is "
                "gone for good."
            )
            return
        requirements, lockfile = await asyncio.to_thread(_read_state, self.model_dir)
        current.requirements_sha256 = requirements
        entries = [] if lockfile is None else [e.markers for e in lockfile.entries]
        targets, skipped = relock_targets(
            entries, self._environment, remembered=self.targets, default=self._own
        )
        pythons: list[tuple[PythonTarget, str]] = []
        for target in targets:
            try:
                pythons.append((target, await self._host.interpreter_for(target)))
            except WheelcasError as exc:
                skipped.append(f"{target}: {exc}")
        current.skipped = skipped
        current.interpreters = [path for _, path in pythons]
        missing = lockfile is None
        if lockfile is not None:
            for _, path in pythons:
                if lockfile.find_entry(await _environment(path)) is None:
                    missing = True
        locked = None if lockfile is None else lockfile.orig_deps_hash
        decision = decide(requirements, locked, missing)
        if decision is Decision.MISSING:
            self._fail(f"{requirements_path(str(self.model_dir))} is missing; the lock was kept")
            return
        if not pythons:
            self._fail("no interpreter to lock with: " + "; ".join(skipped))
            return
        phase = self.machine.decided(decision)
        if phase is Phase.IDLE:
            self._record(current.event("unchanged", time.time()))
            return
        if phase is Phase.LOCKING:
            written: list[PythonTarget] = []
            for target, path in pythons:
                try:
                    await run_lock(self.model_dir, path, self._pip_args)
                except RelockFailed as exc:
                    if written:  # the new lockfile lacks the others: remember to retry them
                        self.targets = [t for t, _ in pythons]
                    self._fail(partial_failure(exc.error, target, written))
                    return
                written.append(target)
            self.machine.lock_written(time.time())
            self.targets = written
        try:
            current.wheels = await self._host.ready_model(self.model_dir, pythons)
        except WheelcasError as exc:
            self._fail(f"the lock's wheels could not be made ready: {exc}")
            return
        current.ready_at = time.time()
        done = self.machine.finished(ready=True)
        self._record(done.event("relocked" if done.relocking else "unchanged", time.time()))

    def _fail(self, error: str) -> None:
        done = self.machine.finished(ready=False)
        self._record(done.event("failed", time.time(), error))

    def _record(self, event: WatchEvent) -> None:
        self.events.append(event)
        self._host.count_watch_event(event.kind)
        level = logging.WARNING if event.kind == "failed" else logging.INFO
        log.log(level, "watch %s: %s", self.model_dir, event.summary())


def _read_state(model_dir: Path) -> tuple[str | None, LockFile | None]:
    """requirements.txt's sha256 (None: missing) and the lockfile (None: none or unreadable).

    An unreadable lockfile counts as none: the re-lock that follows fails with lockgen's own
    message, which says what is wrong with it.
    """
    try:
        requirements: str | None = hashlib.sha256(
            Path(requirements_path(str(model_dir))).read_bytes()
        ).hexdigest()
    except OSError:
        requirements = None
    try:
        lockfile = read_lockfile(model_dir)
    except (LockfileError, OSError):
        lockfile = None
    return requirements, lockfile


async def _environment(python: str) -> dict[str, str]:
    from cas_daemon.prefetch import target_environment

    return await asyncio.to_thread(target_environment, python)


class Watches:
    """Every watched dir of the daemon. Make it inside the running loop."""

    def __init__(self, host: WatchHost, *, settle: float, pip_args: Sequence[str]) -> None:
        from lockgen.lockfile import current_environment

        self._host = host
        self._settle = settle
        self._pip_args = tuple(pip_args)
        self._environment = current_environment()
        self.own = target_of(self._environment)
        self._dirs: dict[Path, DirWatch] = {}
        #: Held across add and remove: their check, arming and insert are one step, so
        #: concurrent requests for one dir make one DirWatch (and one round), never orphans.
        self._lock = asyncio.Lock()
        self._closed = False
        self._rearming: set[asyncio.Task[None]] = set()
        self._bridge = FsBridge(asyncio.get_running_loop(), self._on_change)

    def __contains__(self, model_dir: Path) -> bool:
        return model_dir in self._dirs

    def __iter__(self) -> Iterator[DirWatch]:
        return iter(list(self._dirs.values()))

    def get(self, model_dir: Path) -> DirWatch | None:
        return self._dirs.get(model_dir)

    async def add(
        self,
        model_dir: Path,
        *,
        source: Source,
        requested: PythonTarget | None = None,
        trigger: Trigger = "watch",
        strict: bool = True,
        persist: Callable[[], Awaitable[None]] | None = None,
    ) -> DirWatch:
        """Watch ``model_dir`` and check it once now; the existing watch if there is one.

        ``strict``: an OSError while arming inotify is raised (an API request); otherwise
        logged, and the check reports what is wrong (a configured dir that is gone).
        ``persist``: awaited for a new watch before its first round starts, under the same
        lock as :meth:`remove` (so an unwatch cannot come between and be undone).
        """
        async with self._lock:
            return await self._add(model_dir, source, requested, trigger, strict, persist)

    async def _add(
        self,
        model_dir: Path,
        source: Source,
        requested: PythonTarget | None,
        trigger: Trigger,
        strict: bool,
        persist: Callable[[], Awaitable[None]] | None,
    ) -> DirWatch:
        if self._closed:
            raise Unavailable("this daemon is not watching model dirs now (it is stopping)")
        found = self._dirs.get(model_dir)
        if found is not None:
            if requested is not None and requested not in found.targets:
                found.requested = requested
                found.targets.append(requested)
                found.notify(trigger)
            return found
        try:
            await asyncio.to_thread(self._bridge.arm, model_dir)
        except OSError as exc:
            if strict:
                raise
            log.warning("watch %s: cannot watch it (%s); checked once only", model_dir, exc)
        watch = DirWatch(
            model_dir,
            source=source,
            requested=requested,
            host=self._host,
            settle=self._settle,
            pip_args=self._pip_args,
            own=self.own,
            environment=self._environment,
        )
        self._dirs[model_dir] = watch
        if persist is not None:
            await persist()
        watch.notify(trigger)
        return watch

    async def remove(
        self, model_dir: Path, forget: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        """Stop watching ``model_dir`` (its lock child, if any, is stopped); was it watched?

        ``forget``: awaited after, under the lock :meth:`add` takes too.
        """
        async with self._lock:
            watch = self._dirs.pop(model_dir, None)
            if watch is not None:
                await watch.aclose()
                await asyncio.to_thread(self._bridge.disarm, model_dir)
            if forget is not None:
                await forget()
            return watch is not None

    async def aclose(self) -> None:
        """Stop every watch, lock child and watchdog thread; later adds are refused."""
        async with self._lock:
            self._closed = True
            watches, self._dirs = list(self._dirs.values()), {}
        await asyncio.gather(*(w.aclose() for w in watches))
        if self._rearming:
            await asyncio.wait(self._rearming)
        await asyncio.to_thread(self._bridge.close)

    def _on_change(self, model_dir: Path, relinked: bool) -> None:
        watch = self._dirs.get(model_dir)
        if watch is None:
            return
        watch.notify("change")
        if relinked:
            task = asyncio.get_running_loop().create_task(self._rearm(model_dir))
            self._rearming.add(task)
            task.add_done_callback(self._rearming.discard)

    async def _rearm(self, model_dir: Path) -> None:
        try:
            await asyncio.to_thread(self._bridge.arm, model_dir, again=True)
        except OSError as exc:
            log.warning("watch %s: cannot watch it again: %s", model_dir, exc)
