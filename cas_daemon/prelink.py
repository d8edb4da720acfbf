"""A cold resolve's view, hard-linked tree by tree while the other trees are still compiling.

A hard-link view links every file of every tree: R40's is ~10,000 links and ~850 dirs, a
quarter of a second after the last tree is ready, on one core while the other idles
(benchmarks/README.md). The trees of a lock entry are known before any is ready, so each is
linked whole into a *part* of the view's staging area as soon as it is ready (a ready tree
never changes), while compile workers keep both cores busy with the rest. The build that
follows the last tree is then the one :func:`cas_daemon.views.build_view` always does, except
that a subtree its plan links whole is renamed out of its part instead of linked again.

The parts live in ``tmp/view-{key}.parts-*``, a name of the view's staging prefix: only
touched under the view's lock, removed by :func:`cas_daemon.views.remove_leftovers` and the
daemon's start-up sweep after a crash. The lock is taken without waiting: if another process
is building the view, the resolve builds nothing ahead and waits for it at the end as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from cas_daemon import view_plan, views
from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout
from cas_daemon.precompile import remove_sealed

log = logging.getLogger(__name__)


class Prelinker:
    """The parts of one view being staged; one per cold resolve that builds a view.

    :meth:`add` and :meth:`finish` block (run them in threads); :meth:`close` must follow in
    every case, and may be called any number of times.
    """

    def __init__(self, layout: StoreLayout, key: str, lock_fd: int, staging: Path) -> None:
        self.layout = layout
        self.key = key
        self._lock_fd = lock_fd
        self._staging = staging
        self._parts: dict[str, views.TreePart] = {}
        self._mutex = threading.Lock()  # an add, finish and close never overlap
        self._closed = False
        #: Trees linked whole into a part, for the daemon's metrics.
        self.trees_linked = 0

    @classmethod
    def claim(cls, layout: StoreLayout, key: str) -> Prelinker | None:
        """Take view ``key``'s lock and a staging dir; None if the view exists or is locked."""
        if layout.view_site_dir(key).is_dir():
            return None
        lock_path = layout.view_lock_path(key)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            views.remove_leftovers(layout, key)
            layout.tmp_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"{layout.view_staging_prefix(key)}parts-"
            staging = Path(tempfile.mkdtemp(prefix=prefix, dir=layout.tmp_dir))
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, key, fd, staging)

    def add(self, sha: str, site_dir: Path) -> None:
        """Link the ready tree ``sha`` (at ``site_dir``) whole into its part.

        Only an optimisation: on any failure the part is dropped, and the view's build links
        that tree itself.
        """
        with self._mutex:
            if self._closed or str(site_dir) in self._parts:
                return
            root = f"{self._staging}/{sha}"
            made: list[str] = []
            final_site = str(self.layout.view_site_dir(self.key))
            try:
                views.hardlink_tree(str(site_dir), root, "", made, final_site)
            except (OSError, StoreError) as exc:
                log.warning("could not link %s ahead of its view: %s", site_dir, exc)
                with contextlib.suppress(OSError):
                    remove_sealed(Path(root))
                return
            skip = len(root) + 1
            dirs = tuple(sorted(path[skip:] for path in made[1:]))  # made[0] is root itself
            self._parts[str(site_dir)] = views.TreePart(root, dirs)
            self.trees_linked += 1

    def finish(self, entries: Sequence[tuple[str, Path]]) -> Path:
        """The view of ``entries`` (as :func:`cas_daemon.views.ensure_view` takes them),
        built with the parts; the lock is released and the parts removed after, whatever
        happens. Raises :class:`cas_daemon.view_plan.ViewConflict` as ``ensure_view`` does."""
        with self._mutex:
            try:
                site = self.layout.view_site_dir(self.key)
                if site.is_dir():
                    return site
                plan = view_plan.plan_view(views.scan_trees(entries))
                views.verify_plan(plan)
                return views.build_view(
                    self.layout, self.key, plan, link_mode="hardlink", parts=self._parts
                )
            finally:
                self._release()

    def close(self) -> None:
        """Drop the parts and release the lock (after a failed resolve, or to be sure)."""
        with self._mutex:
            self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            remove_sealed(self._staging)
        finally:
            os.close(self._lock_fd)  # the only descriptor of the lock: closing releases it
