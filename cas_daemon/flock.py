"""Taking a store lock without waiting: the sweepers' (GC, fsck, start-up) side of the flocks.

Writers hold a wheel's or view's lock while they publish it (see :mod:`cas_daemon.store`); a
sweeper that finds one held leaves that entry alone rather than wait for a live process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def try_flock(path: Path) -> Iterator[bool]:
    """Hold ``path``'s exclusive flock for the block if it is free; whether it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
