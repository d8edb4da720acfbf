"""Watching model dirs, the pure part: what an event is, when to re-lock, for which Pythons.

The daemon re-locks a watched model dir when its ``requirements.txt`` changes (see "Watching
model dirs" in docs/daemon.md). Everything here decides without doing any I/O, so each rule
is tested on plain values. The I/O: :mod:`cas_daemon.fswatch` (inotify to the event loop),
:mod:`cas_daemon.watcher` (a task per dir), :mod:`cas_daemon.relock` (the lock child).

One :class:`WatchMachine` per dir::

    idle --change--> settling --(no change for `settle` s)--> checking
    checking --hash == lock's--> idle ("unchanged"), or prefetching first if the current lock
                                 was never made ready by this daemon
    checking --hash differs--> locking --lock written--> prefetching --> idle ("relocked")
    locking|prefetching --failure--> idle ("failed": the previous lock stays)
    checking|locking|prefetching --change--> settling (the work is cancelled; a re-lock that
                                 had started is recorded as "superseded")

So a burst of saves is one re-lock, a re-lock never races another of the same dir (the next
one starts only once the cancelled one has ended), and a save that leaves the bytes as the
lock knows them re-locks nothing.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lockgen.lockfile import REQUIREMENTS_FILENAME

EventKind = Literal["relocked", "unchanged", "failed", "superseded"]
EVENT_KINDS: tuple[EventKind, ...] = ("relocked", "unchanged", "failed", "superseded")
#: Why a round started: a file system event, the daemon's start, or a new watch.
Trigger = Literal["change", "start", "watch"]
#: watchdog's event types that can change requirements.txt ("opened", "closed_no_write" and
#: "attrib" cannot: reading the file, as the lock child does, must not trigger a re-lock).
RELEVANT_EVENT_TYPES = frozenset({"created", "modified", "moved", "deleted", "closed"})
#: The markers that say which machine an entry is for; one that differs from the daemon's
#: host means an entry this host cannot re-lock.
PLATFORM_MARKERS = ("sys_platform", "platform_machine", "os_name", "platform_system")
_VERSION = re.compile(r"[0-9]+\.[0-9]+")
_ERROR_MARK = "wheelcas: error:"
_MAX_ERROR_CHARS = 4000
#: sys.implementation.cache_tag's prefix per platform_python_implementation.
_TAG_PREFIX = {"CPython": "cpython-", "PyPy": "pypy"}
_IMPLEMENTATIONS = {"cpython": "CPython", "pypy": "PyPy"}


class Phase(enum.Enum):
    IDLE = "idle"
    SETTLING = "settling"
    CHECKING = "checking"
    LOCKING = "locking"
    PREFETCHING = "prefetching"


class Step(enum.Enum):
    """What the caller must do after :meth:`WatchMachine.change`."""

    SETTLE = "settle"  # (re)start the settle timer
    RESTART = "restart"  # cancel the work in progress silently, then settle
    SUPERSEDE = "supersede"  # cancel the re-lock in progress, record it as superseded


class Decision(enum.Enum):
    """What a settled round does, from :func:`decide`."""

    UNCHANGED = "unchanged"
    RELOCK = "relock"
    MISSING = "missing"  # no requirements.txt to lock: recorded as failed, the lock stays


@dataclass(frozen=True, slots=True, order=True)
class PythonTarget:
    """An interpreter a model is locked for: an implementation and a ``major.minor``."""

    implementation: str
    version: str

    @property
    def cache_tag(self) -> str | None:
        """The ``sys.implementation.cache_tag`` of such interpreters; None if unknown."""
        prefix = _TAG_PREFIX.get(self.implementation)
        return None if prefix is None else prefix + self.version.replace(".", "", 1)

    def __str__(self) -> str:
        return f"{self.implementation} {self.version}"


def parse_version(value: str, where: str = "python") -> str:
    """A ``major.minor`` version as a client may name one; ValueError for anything else."""
    if not _VERSION.fullmatch(value):
        raise ValueError(f"`{where}` must be a version such as 3.12 (never a path), not {value!r}")
    return value


def target_of(environment: Mapping[str, str]) -> PythonTarget:
    """The target of an interpreter, from its PEP 508 environment."""
    impl = environment.get("platform_python_implementation") or _IMPLEMENTATIONS.get(
        environment.get("implementation_name", ""), "CPython"
    )
    full = environment.get("python_full_version", "")
    version = environment.get("python_version") or ".".join(full.split(".")[:2])
    return PythonTarget(impl, version)


def relock_targets(
    entries: Sequence[Mapping[str, str]],
    host: Mapping[str, str],
    *,
    remembered: Iterable[PythonTarget] = (),
    default: PythonTarget,
) -> tuple[list[PythonTarget], list[str]]:
    """Which Pythons to re-lock for, in order, and the entries skipped (with why).

    ``entries`` are the markers of the current lockfile's entries; ``host`` the daemon's own
    environment (its platform). An entry for another platform cannot be locked here: it is
    skipped, and a new lockfile (the requirements changed) will not have it. An entry without
    a Python version fits any: it becomes ``default``. ``remembered`` are targets this watch
    locked for before (or the version the watch request named), kept even if a partial
    failure dropped them from the file. Nothing at all: ``default``. The first target starts
    the new lockfile, the others append to it.
    """
    targets: list[PythonTarget] = []
    skipped: list[str] = []
    for markers in entries:
        other = [k for k in PLATFORM_MARKERS if k in markers and markers[k] != host.get(k)]
        if other:
            where = ", ".join(f"{k}={markers[k]}" for k in other)
            skipped.append(f"the entry for {where}: another platform than this host's")
            continue
        if "python_version" in markers or "python_full_version" in markers:
            target = target_of({**markers, "implementation_name": ""})
        else:
            target = default
        if target.cache_tag is None:
            skipped.append(f"the entry for {target}: the daemon cannot run that implementation")
            continue
        if target not in targets:
            targets.append(target)
    for target in remembered:
        if target not in targets:
            targets.append(target)
    return (targets or [default]), skipped


def decide(
    requirements_sha256: str | None,
    locked_sha256: str | None,
    missing_entries: bool,
) -> Decision:
    """Re-lock when requirements.txt's bytes are not the ones the lockfile was made from.

    ``locked_sha256`` is the lockfile's ``orig_deps_hash`` (None: no lockfile);
    ``missing_entries``: a target has no entry in it (a Python added to the watch, or one a
    partial failure left out).
    """
    if requirements_sha256 is None:
        return Decision.MISSING
    if locked_sha256 != requirements_sha256 or missing_entries:
        return Decision.RELOCK
    return Decision.UNCHANGED


def is_relevant(
    event_type: str, is_directory: bool, src: str, dest: str, paths: Iterable[str]
) -> bool:
    """Whether a file system event may have changed one of ``paths`` (absolute strings)."""
    if is_directory or event_type not in RELEVANT_EVENT_TYPES:
        return False
    wanted = set(paths)
    return src in wanted or (bool(dest) and dest in wanted)


def requirements_path(model_dir: str) -> str:
    return f"{model_dir.rstrip('/')}/{REQUIREMENTS_FILENAME}"


def error_text(stderr: str, returncode: int) -> str:
    """The lock child's error, as the user should read it.

    The CLI prints ``wheelcas: error: <message>`` (for pip, the message ends with pip's own
    words); what follows the last such mark is kept. Anything else (a crash) is the tail of
    stderr.
    """
    _, mark, message = stderr.rpartition(_ERROR_MARK)
    text = message.strip() if mark else stderr.strip()
    if not text:
        text = f"`wheelcas lock` exited with status {returncode} and printed nothing"
    if len(text) > _MAX_ERROR_CHARS:
        text = "..." + text[-_MAX_ERROR_CHARS:]
    return text


@dataclass(slots=True)
class Round:
    """One pass from a change to its outcome; becomes a :class:`WatchEvent` when it ends.

    Times are wall-clock seconds (``time.time()``), so the benchmark and a human can line them
    up with other logs: ``detected_at`` is the first change of the burst, ``settled_at`` when
    the writes had settled, ``lock_written_at`` when the last lock child succeeded,
    ``ready_at`` when every wheel of the new lock was ready in the store.
    """

    trigger: Trigger
    detected_at: float
    settled_at: float | None = None
    lock_written_at: float | None = None
    ready_at: float | None = None
    relocking: bool = False
    requirements_sha256: str | None = None
    wheels: int = 0
    interpreters: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def event(self, kind: EventKind, ended_at: float, error: str | None = None) -> WatchEvent:
        return WatchEvent(
            kind=kind,
            trigger=self.trigger,
            detected_at=self.detected_at,
            settled_at=self.settled_at,
            lock_written_at=self.lock_written_at,
            ready_at=self.ready_at,
            ended_at=ended_at,
            requirements_sha256=self.requirements_sha256,
            wheels=self.wheels,
            interpreters=tuple(self.interpreters),
            skipped=tuple(self.skipped),
            error=error,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    """What one round did; kept in memory (the last few per dir) and shown by the API."""

    kind: EventKind
    trigger: Trigger
    detected_at: float
    settled_at: float | None
    lock_written_at: float | None
    ready_at: float | None
    ended_at: float
    requirements_sha256: str | None
    wheels: int
    interpreters: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    error: str | None = None

    @property
    def seconds(self) -> float:
        """From the first change detected to the end of the round."""
        return max(0.0, self.ended_at - self.detected_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "trigger": self.trigger,
            "detected_at": self.detected_at,
            "settled_at": self.settled_at,
            "lock_written_at": self.lock_written_at,
            "ready_at": self.ready_at,
            "ended_at": self.ended_at,
            "seconds": round(self.seconds, 3),
            "requirements_sha256": self.requirements_sha256,
            "wheels": self.wheels,
            "interpreters": list(self.interpreters),
            "skipped": list(self.skipped),
            "error": self.error,
        }

    def summary(self) -> str:
        """One log line."""
        text = f"{self.kind} after {self.seconds:.2f} s ({self.trigger})"
        if self.kind in ("relocked", "unchanged") and self.ready_at is not None:
            text += f", {self.wheels} wheels ready for {', '.join(self.interpreters)}"
        if self.skipped:
            text += f"; skipped {'; '.join(self.skipped)}"
        if self.error:
            text += f": {self.error}"
        return text


class WatchMachine:
    """The states of one watched dir (the diagram in the module docstring), without I/O.

    Times passed in are ``time.monotonic()`` for the settle deadline and ``time.time()`` for
    the records. ``stale`` says the current lock may not be ready in the store (nothing was
    made ready since the daemon started, or a re-lock started since), so that a round that
    finds the lock unchanged still prefetches it once.
    """

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self.phase = Phase.IDLE
        self.deadline: float | None = None
        self.round: Round | None = None
        self.stale = True

    def change(
        self, now: float, wall: float, trigger: Trigger = "change"
    ) -> tuple[Step, Round | None]:
        """A relevant change (or a check asked for): the step to take, and the round ended.

        The round ended is the superseded one for :attr:`Step.SUPERSEDE`, else None. A check
        (``trigger`` other than "change") is due at once; a change after ``settle``.
        """
        delay = self.settle if trigger == "change" else 0.0
        previous = self.round
        step = Step.SETTLE
        ended: Round | None = None
        if self.phase in (Phase.CHECKING, Phase.LOCKING, Phase.PREFETCHING):
            if previous is not None and previous.relocking:
                step, ended = Step.SUPERSEDE, previous
                self.round = Round(trigger, wall)
            else:  # nothing written yet worth a record: the same round starts over
                step = Step.RESTART
        if self.phase is Phase.IDLE or self.round is None:
            self.round = Round(trigger, wall)
        elif trigger != "change" and self.round.trigger == "change":
            self.round.trigger = trigger
        self.phase = Phase.SETTLING
        self.deadline = now + delay
        return step, ended

    def remaining(self, now: float) -> float | None:
        """Seconds until the settled round is due; None unless settling."""
        if self.phase is not Phase.SETTLING or self.deadline is None:
            return None
        return max(0.0, self.deadline - now)

    def begin(self, wall: float) -> Round:
        """The writes have settled: the round checks the requirements' hash now."""
        if self.phase is not Phase.SETTLING or self.round is None:
            raise RuntimeError(f"begin() while {self.phase.value}")
        self.phase = Phase.CHECKING
        self.deadline = None
        self.round.settled_at = wall
        return self.round

    def decided(self, decision: Decision) -> Phase:
        """Move on after :func:`decide`: the phase to work in, or IDLE when the round is over
        (nothing to do: the caller records it from the round it holds)."""
        current = self._expect(Phase.CHECKING)
        if decision is Decision.RELOCK:
            current.relocking = True
            self.stale = True
            self.phase = Phase.LOCKING
        elif decision is Decision.UNCHANGED and self.stale:
            self.phase = Phase.PREFETCHING
        else:
            self.round = None
            self.phase = Phase.IDLE
        return self.phase

    def lock_written(self, wall: float) -> None:
        self._expect(Phase.LOCKING).lock_written_at = wall
        self.phase = Phase.PREFETCHING

    def finished(self, *, ready: bool) -> Round:
        """The round is over (ready: the lock's wheels are ready); the machine is idle.

        Allowed from every working phase: a check or a re-lock may fail.
        """
        if self.phase in (Phase.IDLE, Phase.SETTLING) or self.round is None:
            raise RuntimeError(f"finished() while {self.phase.value}")
        if ready:
            self.stale = False
        done, self.round = self.round, None
        self.phase = Phase.IDLE
        return done

    def _expect(self, phase: Phase) -> Round:
        """The current round, when the machine is in ``phase`` (a bug otherwise)."""
        if self.phase is not phase or self.round is None:
            raise RuntimeError(f"expected {phase.value}, the machine is {self.phase.value}")
        return self.round
