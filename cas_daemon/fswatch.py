"""inotify (through watchdog) to asyncio: the only module that imports watchdog.

:class:`FsBridge` runs one watchdog ``Observer`` for every watched model dir: a
non-recursive watch on the dir, and one on the directory of ``requirements.txt``'s target
when it is a symlink (re-armed when the link changes). Relevant events
(:func:`cas_daemon.watch.is_relevant`) reach the event loop by ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from cas_daemon.watch import is_relevant, requirements_path

#: The inotify events asked for: none for reads (IN_OPEN, IN_CLOSE_NOWRITE), so the lock
#: child reading requirements.txt is not even seen.
_FILTER = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent]


class FsBridge:
    """One watchdog Observer for all watched dirs; relevant events go to ``deliver``.

    ``deliver(model_dir, relinked)`` is called on ``loop``; ``relinked`` says the event was
    about the ``requirements.txt`` entry itself being created, replaced or deleted, after
    which :meth:`arm` must run again (a retargeted symlink moves what is watched).
    Methods other than the handler block (they start and join emitter threads): call them in
    a worker thread, never from the observer's own thread.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deliver: Callable[[Path, bool], None]
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._handler = _Handler(self)
        self._observer: BaseObserver | None = None
        self._paths: dict[Path, frozenset[str]] = {}  # per model dir: the files that matter
        self._dirs: dict[Path, frozenset[str]] = {}  # per model dir: the dirs watched for it
        self._scheduled: dict[str, tuple[ObservedWatch, int]] = {}  # dir -> (watch, users)
        self._paths_lock = threading.Lock()  # read by the observer thread
        self._arm_lock = threading.Lock()  # never taken by the observer thread

    def arm(self, model_dir: Path, *, again: bool = False) -> None:
        """Watch what decides ``model_dir``'s requirements; OSError if impossible.

        ``again``: after a change of the link itself, and only if still armed (an unwatch
        may have come first).
        """
        with self._arm_lock:
            if again and model_dir not in self._dirs:
                return
            paths, dirs = _watched_paths(model_dir)
            old = self._dirs.get(model_dir, frozenset())
            added: list[str] = []
            try:
                for directory in sorted(dirs - old):
                    self._schedule(directory)
                    added.append(directory)
            except BaseException:
                for directory in added:
                    self._unschedule(directory)
                raise
            for directory in old - dirs:
                self._unschedule(directory)
            self._dirs[model_dir] = dirs
            with self._paths_lock:
                self._paths[model_dir] = paths

    def disarm(self, model_dir: Path) -> None:
        with self._arm_lock:
            with self._paths_lock:
                self._paths.pop(model_dir, None)
            for directory in self._dirs.pop(model_dir, frozenset()):
                self._unschedule(directory)

    def close(self) -> None:
        """Stop the observer and join its threads (none is left running)."""
        with self._arm_lock:
            with self._paths_lock:
                self._paths.clear()
            self._dirs.clear()
            self._scheduled.clear()
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    def _schedule(self, directory: str) -> None:
        watch, users = self._scheduled.get(directory, (None, 0))
        if watch is None:
            if self._observer is None:
                self._observer = Observer()
                self._observer.start()
            watch = self._observer.schedule(
                self._handler, directory, recursive=False, event_filter=_FILTER
            )
        self._scheduled[directory] = (watch, users + 1)

    def _unschedule(self, directory: str) -> None:
        watch, users = self._scheduled.pop(directory, (None, 0))
        if watch is None:
            return
        if users > 1:
            self._scheduled[directory] = (watch, users - 1)
        elif self._observer is not None:
            with contextlib.suppress(KeyError):  # its emitter stopped itself (dir deleted)
                self._observer.unschedule(watch)

    def dispatch(self, event: FileSystemEvent) -> None:
        """In the observer's thread: pass relevant events to the loop."""
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        with self._paths_lock:
            watched = list(self._paths.items())
        for model_dir, paths in watched:
            if is_relevant(event.event_type, event.is_directory, src, dest, paths):
                link = requirements_path(str(model_dir)) in (src, dest)
                relinked = link and event.event_type in ("created", "moved", "deleted")
                with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                    self._loop.call_soon_threadsafe(self._deliver, model_dir, relinked)


class _Handler(FileSystemEventHandler):
    def __init__(self, bridge: FsBridge) -> None:
        super().__init__()
        self._bridge = bridge

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._bridge.dispatch(event)


def _watched_paths(model_dir: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The files whose change matters for ``model_dir``, and the dirs to watch for them.

    ``requirements.txt`` itself; when it is a symlink, also its final target (an edit of the
    target changes what the model dir's file reads).
    """
    requirements = requirements_path(str(model_dir))
    paths, dirs = {requirements}, {str(model_dir)}
    if os.path.islink(requirements):  # noqa: PTH114 - the strings are what events carry
        target = os.path.realpath(requirements)
        parent = os.path.dirname(target)  # noqa: PTH120
        if os.path.isdir(parent):  # noqa: PTH112 - a dangling link: nothing more to watch
            paths.add(target)
            dirs.add(parent)
    return frozenset(paths), frozenset(dirs)
