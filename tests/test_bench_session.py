"""The benchmarks' sample hygiene: nothing deleted during a run, and waiting for a slow disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks import session as session_module
from benchmarks import settle
from benchmarks.session import Session, Settings
from benchmarks.settle import Settler


def _session(work: Path, *, keep_work: bool = False) -> Session:
    settings = Settings(runs=1, cheap_runs=1, cache=work / "cache", keep_work=keep_work)
    return Session(settings=settings, mirror=None, index=None, work=work)  # type: ignore[arg-type]


def _sample_dir(session: Session) -> Path:
    made = session.scratch("store")
    (made / "sub").mkdir()
    (made / "sub" / "f").write_text("1")
    return made


def test_a_discarded_sample_goes_to_the_trash_until_the_run_ends(tmp_path: Path) -> None:
    session = _session(tmp_path)
    first, second = _sample_dir(session), _sample_dir(session)

    session.discard(first)
    session.discard(second)

    assert not first.exists()
    assert not second.exists()
    kept = sorted(p.name for p in (tmp_path / "trash").iterdir())
    assert kept == [f"0-{first.name}", f"1-{second.name}"]
    assert (tmp_path / "trash" / f"1-{second.name}" / "sub" / "f").read_text() == "1"


def test_without_room_the_sample_and_the_trash_are_deleted_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = _session(tmp_path)
    session.discard(_sample_dir(session))
    monkeypatch.setattr(session_module, "TRASH_FREE_MIN_BYTES", 1 << 62)
    last = _sample_dir(session)

    session.discard(last)

    assert not last.exists()
    assert not (tmp_path / "trash").exists()


def test_keep_work_keeps_a_discarded_sample_where_it_is(tmp_path: Path) -> None:
    session = _session(tmp_path, keep_work=True)
    sample = _sample_dir(session)

    session.discard(sample)

    assert (sample / "sub" / "f").is_file()


def test_the_probe_creates_files_and_leaves_them(tmp_path: Path) -> None:
    settler = Settler(tmp_path / "probes")

    cost = settler.create_cost()

    assert 0 < cost < 1
    (probe,) = (tmp_path / "probes").iterdir()
    assert len(list(probe.iterdir())) == settle.PROBE_FILES


def test_samples_wait_while_file_creation_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs = iter([500e-6, 300e-6, 30e-6])
    monkeypatch.setattr(Settler, "create_cost", lambda self: next(costs))
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    monkeypatch.setattr(settle, "POLL_S", 0.0)
    settler = Settler(tmp_path)
    log: list[str] = []

    settler.wait(log)

    assert sleeps == [0.0, 0.0]  # polled twice, then fast enough
    assert settler.probes == [30e-6]
    (line,) = log
    assert "for file creation to settle (30 us)" in line
    assert "at most 30 us per file" in settler.summary()


def test_a_disk_that_never_settles_is_waited_for_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Settler, "create_cost", lambda self: 1e-3)
    monkeypatch.setattr(settle, "MAX_WAIT_S", 0.0)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("must not sleep"))
    settler = Settler(tmp_path)

    settler.wait()

    assert settler.probes == [1e-3]
    assert "at most 1000 us per file" in settler.summary()
