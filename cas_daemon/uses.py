"""Recording uses for GC's age limit: gathered in memory, written off the resolve's path.

Every resolve marks its trees and its view used now. Written before answering, that cost a
thread hop and a transaction per resolve (about a tenth of a warm R40 resolve), and with many
loaders at once one transaction each. Nothing needs a use on disk that soon: a resolve's
trees are protected by its lease while its process lives, and a use only decides when the
age limit starts counting. So :class:`UseRecorder` gathers the uses noted on the event loop
and one task writes them, one transaction for all that arrived meanwhile. Before GC plans,
and before the daemon closes the index, :meth:`UseRecorder.flush` waits until every use noted
so far is written: GC never decides on older uses than the ones the daemon has answered.

A daemon killed with -9 loses the uses of its last few milliseconds: those trees' age then
counts from their previous use, or from when they were published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: Writes uses: ``(tree sha256s, view keys)``; blocking, run in a thread.
UseWriter = Callable[[frozenset[str], frozenset[str]], None]


class UseRecorder:
    """Uses noted on one event loop, written by one task at a time."""

    def __init__(self, write: UseWriter) -> None:
        self._write = write
        self._shas: set[str] = set()
        self._views: set[str] = set()
        self._writer: asyncio.Task[None] | None = None
        #: Batches written (for tests and status): one per write, however many uses it held.
        self.writes = 0

    def note(self, shas: Iterable[str], view_key: str | None = None) -> None:
        """Mark ``shas`` (and the view) used now; written soon, in a batch. Loop thread only."""
        self._shas.update(shas)
        if view_key is not None:
            self._views.add(view_key)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._drain(), name="wheelcas record uses"
            )

    async def flush(self) -> None:
        """Return once every use noted before this call is written (or failed to be)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])

    async def _drain(self) -> None:
        while self._shas or self._views:
            shas, views = frozenset(self._shas), frozenset(self._views)
            self._shas.clear()
            self._views.clear()
            try:
                await asyncio.to_thread(self._write, shas, views)
            except Exception:  # a lost use only makes GC count an age from an earlier one
                log.exception("could not record the use of %d trees", len(shas))
            self.writes += 1
