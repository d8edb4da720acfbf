"""Uses are written in batches off the resolve's path, and flush() waits for all noted so far;
with a real index (SQLite) behind the recorder, as the daemon has."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import Metadata
from cas_daemon.uses import UseRecorder
from tests.support.clock import FakeClock

TAG = "cpython-311"
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def meta(tmp_path: Path, clock: FakeClock) -> Iterator[Metadata]:
    with Metadata.open(StoreLayout(tmp_path / "store"), clock=clock) as opened:
        for sha in (SHA_A, SHA_B, SHA_C):
            opened.record_published(sha, f"{sha[0]}.whl", 1, 1, 1, TAG)
        opened.record_view("k1", [SHA_A, SHA_B])
        opened.record_view("k2", [SHA_C])
        yield opened


def _used(meta: Metadata) -> dict[str, float]:
    found = {row.sha256[0]: row.last_used_at for row in meta.wheels()}
    found.update({view.key: view.last_used_at for view in meta.views()})
    return found


def test_uses_noted_together_are_one_write_and_flush_waits_for_it(
    meta: Metadata, clock: FakeClock
) -> None:
    recorder = UseRecorder(meta.touch_all)
    clock.now += 100

    async def scenario() -> None:
        recorder.note([SHA_A], "k1")
        recorder.note([SHA_B], "k1")
        recorder.note([SHA_C], "k2")
        assert recorder.writes == 0  # not written before the answer
        await recorder.flush()

    asyncio.run(scenario())

    assert recorder.writes == 1
    assert _used(meta) == dict.fromkeys(["a", "b", "c", "k1", "k2"], 1_000_100.0)


def test_uses_noted_while_a_write_runs_go_in_the_next_one(meta: Metadata) -> None:
    writing, go_on = threading.Event(), threading.Event()
    batches: list[tuple[frozenset[str], frozenset[str]]] = []

    def write(shas: frozenset[str], views: frozenset[str]) -> None:
        batches.append((shas, views))
        writing.set()
        assert go_on.wait(10)
        meta.touch_all(shas, views)

    recorder = UseRecorder(write)

    async def scenario() -> None:
        recorder.note([SHA_A], "k1")
        await asyncio.to_thread(writing.wait, 10)
        recorder.note([SHA_B])
        recorder.note([SHA_C], "k2")
        go_on.set()
        await recorder.flush()

    asyncio.run(scenario())

    assert batches == [
        (frozenset({SHA_A}), frozenset({"k1"})),
        (frozenset({SHA_B, SHA_C}), frozenset({"k2"})),
    ]


def test_a_failed_write_is_logged_and_later_uses_are_still_written(
    meta: Metadata, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [OSError("disk I/O error")]

    def write(shas: frozenset[str], views: frozenset[str]) -> None:
        if failures:
            raise failures.pop()
        meta.touch_all(shas, views)

    recorder = UseRecorder(write)
    clock.now += 5

    async def scenario() -> None:
        recorder.note([SHA_A])
        await recorder.flush()
        recorder.note([SHA_B], "k1")
        await recorder.flush()

    with caplog.at_level(logging.ERROR, logger="cas_daemon.uses"):
        asyncio.run(scenario())

    assert "could not record the use of 1 trees" in caplog.text
    used = _used(meta)
    assert (used["a"], used["b"], used["k1"]) == (1_000_000.0, 1_000_005.0, 1_000_005.0)


def test_flush_with_nothing_noted_returns_at_once() -> None:
    recorder = UseRecorder(lambda shas, views: None)

    asyncio.run(asyncio.wait_for(recorder.flush(), 1))

    assert recorder.writes == 0
