"""Progress of making wheels ready: the events the store emits and two ways to show them.

The store calls a :data:`ProgressCallback` from its event loop thread only, so renderers need
no locking. Per wheel the events are ``start``, any number of ``bytes``, then ``ready``;
a wheel that was already usable gets a single ``cached`` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TextIO

EventKind = Literal["start", "bytes", "ready", "cached"]


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One step for one wheel.

    ``nbytes`` is the chunk size for ``bytes`` and the wheel's size (when known) for
    ``ready``; ``total`` is the expected download size when the server said it.
    """

    kind: EventKind
    sha256: str
    name: str
    nbytes: int = 0
    total: int | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def format_size(nbytes: int) -> str:
    """Decimal units, as download tools print them: ``12.3 MB``."""
    size = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


class _Tally:
    """Bytes fetched per wheel, so the final line can say whether it came over the network."""

    def __init__(self) -> None:
        self.fetched: dict[str, int] = {}
        self.done: set[str] = set()
        self.total_bytes = 0

    def record(self, event: ProgressEvent) -> bool:
        """Account for ``event``; True when it finishes a wheel not finished before."""
        if event.kind == "bytes":
            self.fetched[event.sha256] = self.fetched.get(event.sha256, 0) + event.nbytes
            self.total_bytes += event.nbytes
            return False
        if event.kind in ("ready", "cached") and event.sha256 not in self.done:
            self.done.add(event.sha256)
            return True
        return False

    def describe(self, event: ProgressEvent) -> str:
        fetched = self.fetched.get(event.sha256, 0)
        if event.kind == "cached":
            return "already in the store"
        if fetched:
            return f"{format_size(fetched)}, fetched"
        size = f"{format_size(event.nbytes)}, " if event.nbytes else ""
        return f"{size}unpacked"


@contextlib.contextmanager
def _line_renderer(stream: TextIO) -> Iterator[ProgressCallback]:
    tally = _Tally()

    def callback(event: ProgressEvent) -> None:
        if tally.record(event):
            word = "ready " if event.kind == "ready" else "cached"
            stream.write(f"{word} {event.name}  ({tally.describe(event)})\n")
            stream.flush()

    yield callback


@contextlib.contextmanager
def _tqdm_renderer(stream: TextIO, total_wheels: int) -> Iterator[ProgressCallback]:
    from tqdm import tqdm  # only terminals pay for the import

    tally = _Tally()
    bar: Any = tqdm(total=total_wheels, unit="wheel", file=stream, dynamic_ncols=True, leave=True)

    def callback(event: ProgressEvent) -> None:
        finished = tally.record(event)
        if event.kind == "start":
            bar.set_description_str(event.name[:40], refresh=False)
        if finished:
            bar.update(1)
        if event.kind in ("bytes", "ready", "cached"):
            bar.set_postfix_str(f"{format_size(tally.total_bytes)} fetched")

    try:
        yield callback
    finally:
        bar.close()


def make_renderer(
    stream: TextIO, total_wheels: int
) -> contextlib.AbstractContextManager[ProgressCallback]:
    """A callback that shows progress on ``stream``: a bar on a terminal, else one line a wheel.

    Lines (not a bar) when the stream is a file or a pipe, because logs and CI output keep
    every carriage-return redraw of a bar as garbage.
    """
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return _tqdm_renderer(stream, total_wheels)
    return _line_renderer(stream)
