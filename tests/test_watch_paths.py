"""Watched model dirs, without pip: symlink chains, dirs swapped by rename, partial failures,
who may be trusted, and the CLI without a daemon.

The rounds here run in-process (:class:`~cas_daemon.watcher.Watches` with a fake host and a
fake lock child), so each scenario takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cas_daemon import watcher
from cas_daemon.protocol import NotPermitted
from cas_daemon.relock import RelockFailed
from cas_daemon.watch import EventKind, Phase, PythonTarget
from cas_daemon.watcher import DirWatch, Watches
from cas_daemon.watchpaths import (
    check_model_dir,
    requirements_chain,
    trust_problems,
    unsafe_reason,
)
from loader.cli import main

SETTLE = 0.05


class FakeHost:
    """A service that has an interpreter for every version and readies nothing."""

    async def interpreter_for(self, target: PythonTarget) -> str:
        return f"/nonexistent/python{target.version}"

    async def ready_model(
        self, model_dir: Path, pythons: Sequence[tuple[PythonTarget, str]]
    ) -> int:
        return 0

    def count_watch_event(self, kind: EventKind) -> None:
        pass


LockFn = Callable[..., Awaitable[str]]


def _run(
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[Watches], Awaitable[None]],
    lock: LockFn | None = None,
) -> None:
    """Run ``scenario`` with watches whose lock child succeeds at once (writing nothing: every
    round re-locks) unless ``lock`` says otherwise."""

    async def succeed(model_dir: Path, interpreter: str, pip_args: Sequence[str]) -> str:
        return ""

    monkeypatch.setattr(watcher, "run_lock", lock or succeed)

    async def main_() -> None:
        watches = Watches(FakeHost(), settle=SETTLE, pip_args=())
        try:
            await scenario(watches)
        finally:
            await watches.aclose()

    asyncio.run(main_())


async def _rounds(watch: DirWatch, count: int, timeout: float = 10.0) -> list[Any]:
    """The events, once ``count`` rounds have ended and the watch is idle."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (len(watch.events) >= count and watch.machine.phase is Phase.IDLE):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{count} rounds expected, got {list(watch.events)}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(SETTLE * 3)  # long enough for a stray round to have started
    return list(watch.events)


def _swap_link(link: Path, target: str) -> None:
    """Retarget ``link`` atomically, as ``ln -sfn`` does."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.replace(link)


def test_a_swapped_dir_link_in_the_chain_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, model = tmp_path / "shared", tmp_path / "model"
    for version in ("v1", "v2"):
        (shared / version).mkdir(parents=True)
        (shared / version / "requirements.txt").write_text(f"{version}\n")
    (shared / "current").symlink_to("v1")
    model.mkdir()
    (model / "requirements.txt").symlink_to("../shared/current/requirements.txt")
    chain = requirements_chain(model)
    assert chain.links == (str(model / "requirements.txt"), str(shared / "current"))
    assert chain.target == str(shared / "v1" / "requirements.txt")

    async def scenario(watches: Watches) -> None:
        watch = await watches.add(model, source="api")
        await _rounds(watch, 1)
        _swap_link(shared / "current", "v2")  # `ln -sfn v2 current`
        assert len(await _rounds(watch, 2)) == 2
        (shared / "v2" / "requirements.txt").write_text("v2\nedited\n")  # the new target
        assert [e.kind for e in await _rounds(watch, 3)] == ["relocked"] * 3

    _run(monkeypatch, scenario)


def test_a_retargeted_link_in_a_file_chain_is_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    (model / "reqs").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (model / "reqs" / name).write_text(f"{name}\n")
    (model / "reqs" / "current.txt").symlink_to("a.txt")
    (model / "requirements.txt").symlink_to("reqs/current.txt")

    async def scenario(watches: Watches) -> None:
        watch = await watches.add(model, source="api")
        await _rounds(watch, 1)
        _swap_link(model / "reqs" / "current.txt", "b.txt")
        assert len(await _rounds(watch, 2)) == 2
        (model / "reqs" / "b.txt").write_text("b\nedited\n")
        assert len(await _rounds(watch, 3)) == 3

    _run(monkeypatch, scenario)


def test_a_chain_that_loops_ends_after_forty_links(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").symlink_to("loop")
    (tmp_path / "loop").symlink_to("requirements.txt")
    chain = requirements_chain(tmp_path)
    assert (len(chain.links), chain.target) == (40, None)


def test_a_model_dir_swapped_by_rename_is_watched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m1"
    for path in (model, tmp_path / "m1.new"):
        path.mkdir()
        (path / "requirements.txt").write_text(f"{path.name}\n")

    async def scenario(watches: Watches) -> None:
        watch = await watches.add(model, source="api")
        await _rounds(watch, 1)
        model.rename(tmp_path / "m1.old")  # a deploy-style swap
        (tmp_path / "m1.new").rename(model)
        assert len(await _rounds(watch, 2)) == 2
        (model / "requirements.txt").write_text("the new dir, edited\n")
        assert len(await _rounds(watch, 3)) == 3

        model.rename(tmp_path / "m1.gone")  # gone: the watch says so, and waits
        gone = (await _rounds(watch, 4))[-1]
        assert (gone.kind, watches.get(model)) == ("failed", watch)
        assert gone.error is not None
        assert "is gone" in gone.error
        assert "wheelcas unwatch" in gone.error
        (tmp_path / "m1.gone").rename(model)  # back: checked again, and watched
        assert (await _rounds(watch, 5))[-1].kind == "relocked"
        (model / "requirements.txt").write_text("back, edited\n")
        assert len(await _rounds(watch, 6)) == 6

    _run(monkeypatch, scenario)


def test_a_later_pythons_failure_says_which_entries_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("alpha\n")
    first, other = PythonTarget("CPython", "3.98"), PythonTarget("CPython", "3.99")

    async def lock(model_dir: Path, interpreter: str, pip_args: Sequence[str]) -> str:
        if interpreter.endswith("3.99"):
            error = "locking failed (pip exit status 1); the previous lockfile was kept. E"
            raise RelockFailed(model_dir, error)
        return ""

    async def scenario(watches: Watches) -> None:
        watch = await watches.add(model, source="api", requested=first)
        watch.targets.append(other)  # before its first round: as if the lockfile had both
        (event,) = await _rounds(watch, 1)
        assert event.kind == "failed"
        assert event.error is not None
        assert "previous lockfile was kept" not in event.error
        assert "now has the entries for CPython 3.98 only" in event.error
        assert "the lockfile written for CPython 3.98 was kept" in event.error
        assert watch.targets == [first, other]  # both tried again next time

    _run(monkeypatch, scenario, lock)


# --- trust -----------------------------------------------------------------------------------


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, uid, 0, 0, 0, 0))


def test_what_another_user_could_change_is_not_trusted() -> None:
    me = 1000
    assert unsafe_reason("/m", _stat(stat.S_IFDIR | 0o755, me), me) is None
    assert unsafe_reason("/m", _stat(stat.S_IFDIR | 0o755, 0), me) is None  # root's
    assert "owned by uid 1001" in str(unsafe_reason("/m", _stat(stat.S_IFREG | 0o644, 1001), me))
    assert "its group" in str(unsafe_reason("/m", _stat(stat.S_IFDIR | 0o775, me), me))
    assert "other users" in str(unsafe_reason("/f", _stat(stat.S_IFREG | 0o646, me), me))
    assert unsafe_reason("/tmp", _stat(stat.S_IFDIR | 0o1777, 0), me) is None  # sticky
    assert unsafe_reason("/l", _stat(stat.S_IFLNK | 0o777, me), me, link=True) is None


def test_a_watch_of_a_dir_others_may_change_is_refused(tmp_path: Path) -> None:
    me = os.geteuid()
    model, shared = tmp_path / "model", tmp_path / "shared"
    model.mkdir(mode=0o755)
    shared.mkdir(mode=0o755)
    (shared / "reqs.txt").write_text("alpha\n")
    (model / "requirements.txt").symlink_to(shared / "reqs.txt")
    check_model_dir(model, me)

    model.chmod(0o775)
    with pytest.raises(NotPermitted, match=r"model is writable by its group.*chmod go-w"):
        check_model_dir(model, me)
    model.chmod(0o755)
    (shared / "reqs.txt").chmod(0o646)  # the symlink's target
    with pytest.raises(NotPermitted, match=r"reqs\.txt is writable by other users"):
        check_model_dir(model, me)
    (shared / "reqs.txt").chmod(0o644)
    if me == 0:  # root may give the target away
        os.chown(shared / "reqs.txt", 4242, -1)
        assert trust_problems(model, me) == [f"{shared / 'reqs.txt'} is owned by uid 4242"]


def test_watching_without_a_daemon_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WHEELCAS_SOCKET", "off")  # restored after: --no-daemon sets it
    assert main(["--no-daemon", "watch", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "needs the daemon" in err
    assert "--no-daemon" in err
    assert "no daemon answers" not in err
