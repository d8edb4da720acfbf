"""What the compile workers get: a tree's modules, split into now and later, cut into batches.

:func:`find_sources` walks a tree once; :func:`cut_batches` is the pure scheduling rule the
pools of :mod:`cas_daemon.compile_pool` send work by.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cas_daemon.compile_worker import Source
from cas_daemon.errors import StoreError
from cas_daemon.layout import is_deferred_dir

# A batch is sent to one worker. Small enough that the last batches of the last tree spread
# over the cores (64 KiB of source compiles in ~10 ms), big enough that a message per batch
# is noise. Files are sent largest first, so a 700 kB module is a batch of its own.
BATCH_BYTES: Final = 64 * 1024
BATCH_FILES: Final = 32


def find_sources(site_dir: Path, display_dir: Path | None) -> tuple[list[Source], list[Source]]:
    """Every ``*.py`` file under ``site_dir`` as compileall would pick them, largest first:
    those outside test dirs, and those inside one (:func:`cas_daemon.layout.is_deferred_dir`).

    ``display_dir``: where the tree will be, for the paths tracebacks show (None: as found).
    """
    found: tuple[list[Source], list[Source]] = ([], [])
    stack: list[tuple[str, str | None, bool]] = [
        (
            os.fspath(site_dir.absolute()),
            None if display_dir is None else os.fspath(display_dir),
            False,
        )
    ]
    while stack:
        directory, shown, deferred = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name != "__pycache__":
                            inner = None if shown is None else f"{shown}/{entry.name}"
                            stack.append(
                                (entry.path, inner, deferred or is_deferred_dir(entry.name))
                            )
                    elif entry.name.endswith(".py") and entry.is_file():
                        display = None if shown is None else f"{shown}/{entry.name}"
                        found[deferred].append((entry.path, display, entry.stat().st_size))
        except OSError as exc:
            raise StoreError(f"cannot list {directory} to precompile it: {exc}") from None
    return largest_first(found[0]), largest_first(found[1])


def largest_first(sources: Sequence[Source]) -> list[Source]:
    return sorted(sources, key=lambda source: source[2], reverse=True)


def cut_batches(sources: Sequence[Source]) -> list[list[Source]]:
    """``sources``, in order, cut after :data:`BATCH_BYTES` of source or :data:`BATCH_FILES`
    files; one empty batch if there are none.

    The empty batch still goes to a worker, so an interpreter that cannot run is reported
    for a tree without modules too.
    """
    batches: list[list[Source]] = []
    current: list[Source] = []
    size = 0
    for source in sources:
        current.append(source)
        size += source[2]
        if size >= BATCH_BYTES or len(current) >= BATCH_FILES:
            batches.append(current)
            current, size = [], 0
    if current or not batches:
        batches.append(current)
    return batches
