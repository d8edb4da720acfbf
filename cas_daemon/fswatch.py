"""inotify (through watchdog) to asyncio: the only module that imports watchdog.

:class:`FsBridge` runs one watchdog ``Observer`` for every watched model dir, with
non-recursive watches on: the dir; its parent (inotify follows an inode, so a dir replaced
by rename, ``mv m.new m``, would go unseen: only events naming the dir count there); and,
when ``requirements.txt`` is a symlink, the dir holding each link of its chain and the file
reached (:func:`~cas_daemon.watchpaths.requirements_chain`). Any creation, removal or rename
among those re-arms (a dir whose inode changed is watched afresh). Relevant events reach the
event loop by ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
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

from cas_daemon.watch import is_relevant
from cas_daemon.watchpaths import requirements_chain

#: The inotify events asked for: none for reads (IN_OPEN, IN_CLOSE_NOWRITE), so the lock
#: child reading requirements.txt is not even seen; of dirs, only those that move one.
_FILTER = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
#: Events that change which inode a watched name is: the watch must be armed again.
_STRUCTURAL = frozenset({"created", "moved", "deleted"})


class FsBridge:
    """One watchdog Observer for all watched dirs; relevant events go to ``deliver``.

    ``deliver(model_dir, relinked)`` is called on ``loop``; ``relinked`` says a watched name
    (a link of the chain, the file reached, the model dir) was created, replaced or deleted,
    after which :meth:`arm` must run again (a retargeted symlink or a swapped dir moves
    what is watched).
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
        #: dir -> (watch, users, the inode watched: a new one at the path is watched afresh)
        self._scheduled: dict[str, tuple[ObservedWatch, int, tuple[int, int]]] = {}
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
                for directory in sorted(dirs & old):
                    self._refresh(directory)
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
        if directory in self._scheduled:
            self._refresh(directory)
            watch, users, inode = self._scheduled[directory]
            self._scheduled[directory] = (watch, users + 1, inode)
            return
        inode = _inode(directory)
        if self._observer is None:
            self._observer = Observer()
            self._observer.start()
        watch = self._observer.schedule(
            self._handler, directory, recursive=False, event_filter=_FILTER
        )
        self._scheduled[directory] = (watch, 1, inode)

    def _refresh(self, directory: str) -> None:
        """Watch ``directory`` afresh if another dir is at its path now (a swap by rename)."""
        watch, users, inode = self._scheduled[directory]
        now = _inode(directory)
        if now == inode or self._observer is None:
            return
        with contextlib.suppress(KeyError):  # its emitter stopped itself (dir deleted)
            self._observer.unschedule(watch)
        del self._scheduled[directory]
        watch = self._observer.schedule(
            self._handler, directory, recursive=False, event_filter=_FILTER
        )
        self._scheduled[directory] = (watch, users, now)

    def _unschedule(self, directory: str) -> None:
        watch, users, inode = self._scheduled.pop(directory, (None, 0, (0, 0)))
        if watch is None:
            return
        if users > 1:
            self._scheduled[directory] = (watch, users - 1, inode)
        elif self._observer is not None:
            with contextlib.suppress(KeyError):  # its emitter stopped itself (dir deleted)
                self._observer.unschedule(watch)

    def dispatch(self, event: FileSystemEvent) -> None:
        """In the observer's thread: pass relevant events to the loop."""
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        kind = event.event_type
        with self._paths_lock:
            watched = list(self._paths.items())
        for model_dir, paths in watched:
            if event.is_directory:  # the model dir (or a dir of the chain) moved or went
                relevant = kind in _STRUCTURAL and str(model_dir) in (src, dest)
            else:
                relevant = is_relevant(kind, False, src, dest, paths)
            if relevant:
                with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                    self._loop.call_soon_threadsafe(self._deliver, model_dir, kind in _STRUCTURAL)


class _Handler(FileSystemEventHandler):
    def __init__(self, bridge: FsBridge) -> None:
        super().__init__()
        self._bridge = bridge

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._bridge.dispatch(event)


def _watched_paths(model_dir: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The files whose change matters for ``model_dir``, and the dirs to watch for them.

    ``requirements.txt``, every link of its chain and the file reached; the dirs holding
    them that exist, the model dir (when there is one: it may be gone mid-swap) and its
    parent, which sees the dir replaced or coming back.
    """
    chain = requirements_chain(model_dir)
    here = str(model_dir)
    parent = os.path.dirname(here)  # noqa: PTH120
    dirs = {d for d in chain.holders | {here, parent} if os.path.isdir(d)}  # noqa: PTH112
    if not os.path.isdir(here) and not dirs:  # noqa: PTH112
        raise FileNotFoundError(f"neither {here} nor its parent dir exists")
    return chain.names, frozenset(dirs)


def _inode(directory: str) -> tuple[int, int]:
    st = os.stat(directory)  # noqa: PTH116 - inotify follows symlinks: so does this
    return st.st_dev, st.st_ino
