"""Watched model dirs: the rules on plain values, the lock child's clean exit, and real
daemons that re-lock with real pip against the loopback index when requirements.txt changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from cas_daemon.config import ConfigError, defaults, load_config
from cas_daemon.fswatch import FsBridge
from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import Metadata
from cas_daemon.protocol import BadRequest, NotPermitted, Peer, parse_watch_request
from cas_daemon.service import Service
from cas_daemon.store import Store
from cas_daemon.watch import (
    Decision,
    Phase,
    PythonTarget,
    Round,
    Step,
    WatchMachine,
    decide,
    error_text,
    is_relevant,
    relock_targets,
)
from loader.client import DaemonError
from loader.packages import ready_package_dirs
from lockgen.lock import lock
from lockgen.lockfile import LOCKFILE_RELPATH, current_environment, read_lockfile
from tests.daemon_support import ROOT, Daemon, start_daemon
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

HOST = {"sys_platform": "linux", "platform_machine": "x86_64", "os_name": "posix"}
PY311 = PythonTarget("CPython", "3.11")
PY312 = PythonTarget("CPython", "3.12")


# --- the rules, on plain values ------------------------------------------------------------


def test_a_burst_of_changes_settles_into_one_round() -> None:
    machine = WatchMachine(settle=0.5)
    for i in range(10):  # ten saves 20 ms apart: each one moves the deadline
        step, ended = machine.change(now=i * 0.02, wall=1000 + i * 0.02)
        assert (step, ended, machine.phase) == (Step.SETTLE, None, Phase.SETTLING)
    assert machine.remaining(0.6) == pytest.approx(0.08)
    assert machine.remaining(0.7) == 0.0
    begun = machine.begin(wall=1000.7)
    assert (begun.detected_at, begun.settled_at) == (1000.0, 1000.7)  # the first change's time
    assert machine.decided(Decision.RELOCK) is Phase.LOCKING
    machine.lock_written(1001.0)
    done = machine.finished(ready=True)
    assert (done.lock_written_at, machine.phase, machine.stale) == (1001.0, Phase.IDLE, False)
    assert machine.remaining(5.0) is None


def test_a_change_while_relocking_supersedes_it_and_settles_again() -> None:
    machine = WatchMachine(settle=0.5)
    machine.change(0.0, 1000.0)
    first = machine.begin(1000.5)
    machine.decided(Decision.RELOCK)
    step, ended = machine.change(2.0, 1002.0)
    assert (step, ended, machine.phase) == (Step.SUPERSEDE, first, Phase.SETTLING)
    assert ended is not None
    assert ended.event("superseded", 1002.1).kind == "superseded"
    assert machine.round is not None
    assert machine.round.detected_at == 1002.0  # the new round counts from the new change
    assert machine.remaining(2.2) == pytest.approx(0.3)


def test_a_change_while_only_checking_restarts_without_a_record() -> None:
    machine = WatchMachine(settle=0.5)
    machine.change(0.0, 1000.0)
    machine.begin(1000.5)
    step, ended = machine.change(0.6, 1000.6)
    assert (step, ended, machine.phase) == (Step.RESTART, None, Phase.SETTLING)
    assert machine.round is not None
    assert machine.round.detected_at == 1000.0  # still the same burst


def test_an_unchanged_lock_is_made_ready_once_then_left_alone() -> None:
    machine = WatchMachine(settle=0.5)
    machine.change(0.0, 1000.0, trigger="start")
    assert machine.remaining(0.0) == 0.0  # a check at start is due at once
    machine.begin(1000.0)
    assert machine.decided(Decision.UNCHANGED) is Phase.PREFETCHING  # never made ready yet
    machine.finished(ready=True)
    machine.change(1.0, 1001.0)
    machine.begin(1001.5)
    assert machine.decided(Decision.UNCHANGED) is Phase.IDLE
    assert machine.round is None


def test_a_failed_relock_leaves_the_lock_to_be_made_ready_later() -> None:
    machine = WatchMachine(settle=0.1)
    machine.change(0.0, 1000.0)
    machine.begin(1000.1)
    machine.decided(Decision.RELOCK)
    machine.finished(ready=False)
    assert (machine.phase, machine.stale) == (Phase.IDLE, True)
    with pytest.raises(RuntimeError, match="expected locking"):
        machine.lock_written(1000.2)


def test_what_a_settled_round_decides() -> None:
    sha_a, sha_b = "a" * 64, "b" * 64
    assert decide(sha_a, sha_a, missing_entries=False) is Decision.UNCHANGED
    assert decide(sha_a, sha_b, missing_entries=False) is Decision.RELOCK
    assert decide(sha_a, None, missing_entries=True) is Decision.RELOCK  # no lockfile yet
    assert decide(sha_a, sha_a, missing_entries=True) is Decision.RELOCK  # a Python added
    assert decide(None, sha_a, missing_entries=False) is Decision.MISSING


def test_which_pythons_a_relock_is_for() -> None:
    entries = [
        {**HOST, "python_version": "3.12", "platform_python_implementation": "CPython"},
        {**HOST, "sys_platform": "darwin", "python_version": "3.11"},
        {**HOST, "python_full_version": "3.11.7"},
        {**HOST, "python_version": "3.12", "platform_python_implementation": "CPython"},
        {**HOST, "python_version": "3.10", "platform_python_implementation": "Jython"},
    ]
    targets, skipped = relock_targets(entries, HOST, default=PY311)
    assert targets == [PY312, PY311]  # in the file's order, each once: the first starts anew
    assert len(skipped) == 2
    assert "sys_platform=darwin" in skipped[0]
    assert "Jython" in skipped[1]
    assert relock_targets([], HOST, default=PY311) == ([PY311], [])  # no lockfile yet
    assert relock_targets([], HOST, remembered=[PY312], default=PY311)[0] == [PY312]
    assert relock_targets([{}], HOST, default=PY311)[0] == [PY311]  # an entry for any Python
    assert (PY311.cache_tag, PythonTarget("PyPy", "3.10").cache_tag) == ("cpython-311", "pypy310")


def test_which_file_system_events_count() -> None:
    paths = ["/m/requirements.txt", "/shared/reqs.txt"]
    assert is_relevant("modified", False, "/m/requirements.txt", "", paths)
    assert is_relevant("closed", False, "/shared/reqs.txt", "", paths)  # a symlink's target
    assert is_relevant("moved", False, "/m/.requirements.txt.tmp", "/m/requirements.txt", paths)
    assert is_relevant("deleted", False, "/m/requirements.txt", "", paths)
    assert not is_relevant("opened", False, "/m/requirements.txt", "", paths)  # a reader
    assert not is_relevant("closed_no_write", False, "/m/requirements.txt", "", paths)
    assert not is_relevant("modified", False, "/m/model.py", "", paths)
    assert not is_relevant("modified", True, "/m/requirements.txt", "", paths)


def test_the_lock_childs_error_is_what_follows_its_error_mark() -> None:
    stderr = (
        "wheelcas: resolving /m/requirements.txt with /usr/bin/python3\n"
        "wheelcas: error: resolving /m/requirements.txt failed (pip exit status 1); ...\n"
        "ERROR: No matching distribution found for nope\n"
    )
    assert error_text(stderr, 2).startswith("resolving /m/requirements.txt failed")
    assert error_text(stderr, 2).endswith("No matching distribution found for nope")
    assert error_text("Traceback ...\nBoom\n", 1) == "Traceback ...\nBoom"
    assert "status 1" in error_text("", 1)
    assert len(error_text("x" * 10_000, 1)) < 4100


def test_an_event_has_the_times_the_benchmark_needs() -> None:
    done = Round("change", 1000.0, settled_at=1000.5, lock_written_at=1002.0, ready_at=1003.0)
    event = done.event("relocked", 1003.0).to_json()
    assert event["seconds"] == 3.0
    assert {"detected_at", "lock_written_at", "ready_at", "requirements_sha256"} <= set(event)
    json.dumps(event)


def test_watch_requests_are_validated() -> None:
    assert parse_watch_request({"model_dir": "/srv/m", "python": "3.12"}).python == "3.12"
    for body, field in (
        ({"model_dir": "srv/m"}, "model_dir"),
        ({"model_dir": "/srv/../etc"}, "model_dir"),
        ({"model_dir": "/srv/m/"}, "model_dir"),
        ({"model_dir": "//srv/m"}, "model_dir"),
        ({"model_dir": "/srv/m", "python": "/usr/bin/python3"}, "python"),
        ({"model_dir": "/srv/m", "python": 3.12}, "python"),
        ([], "(body)"),
    ):
        with pytest.raises(BadRequest) as caught:
            parse_watch_request(body)
        assert caught.value.where == field
    with pytest.raises(BadRequest):
        parse_watch_request({"model_dir": "/srv/m", "python": "3.12"}, allow_python=False)


def test_watch_settings(tmp_path: Path) -> None:
    file = tmp_path / "d.toml"
    file.write_text('[watch]\nmodel_dirs = ["/srv/a/"]\nsettle = "2m"\n')
    with pytest.raises(ConfigError, match=r"watch\.settle"):
        load_config(file, environ={})
    file.write_text('[watch]\nmodel_dirs = ["/srv/a/"]\nsettle = 0.2\npip_args = ["-i", "u"]\n')
    config = load_config(file, environ={})
    assert config.watch_model_dirs == (Path("/srv/a"),)
    assert (config.watch_settle, config.watch_pip_args) == (0.2, ("-i", "u"))
    file.write_text('[watch]\npip_args = ["--pre"]\n')
    with pytest.raises(ConfigError, match=r"watch\.pip_args"):
        load_config(file, environ={})
    file.write_text('[watch]\nmodel_dirs = ["relative/m"]\n')
    with pytest.raises(ConfigError, match="not an absolute path"):
        load_config(file, environ={})
    assert defaults({}, system=False).watch_settle == 0.5


def test_only_the_daemons_user_and_root_may_watch(tmp_path: Path) -> None:
    config = replace(defaults({}, system=False), store_dir=tmp_path / "s")
    service = Service(config, Store(StoreLayout(tmp_path / "s")), None)
    stranger = 4242 if os.geteuid() != 4242 else 4243
    with pytest.raises(NotPermitted, match="Run your own user daemon"):
        service._watches_for(Peer(pid=1, uid=stranger, gid=stranger))
    with pytest.raises(NotPermitted):
        service._watches_for(None)


def test_the_bridge_delivers_changes_and_leaves_no_thread_behind(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("a\n")
    before = set(threading.enumerate())

    async def scenario() -> list[tuple[Path, bool]]:
        got: list[tuple[Path, bool]] = []
        arrived = asyncio.Event()

        def deliver(model_dir: Path, relinked: bool) -> None:
            got.append((model_dir, relinked))
            arrived.set()

        bridge = FsBridge(asyncio.get_running_loop(), deliver)
        await asyncio.to_thread(bridge.arm, model)
        (model / "requirements.txt").read_text()  # a read is no change
        (model / "model.py").write_text("")  # nor is another file
        await asyncio.sleep(0.2)
        assert got == []
        (model / "requirements.txt").write_text("b\n")
        await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.to_thread(bridge.disarm, model)
        await asyncio.to_thread(bridge.close)
        return got

    got = asyncio.run(scenario())
    assert got[0] == (model, False)  # in place: the link itself did not change
    assert set(threading.enumerate()) <= before


# --- the lock child stops cleanly ------------------------------------------------------------


def _lock_child(model: Path, index: PackageIndex) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-I", "-m", "loader.cli", "--no-daemon", "lock", str(model)]
    return subprocess.Popen(
        [*argv, "--index-url", index.simple_url],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _stagings(model: Path) -> list[str]:
    carton = model / ".carton"
    return sorted(p.name for p in carton.glob(".staging-*")) if carton.is_dir() else []


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


@pytest.fixture
def slow_alpha(wheel_dir: Path, package_index: PackageIndex, tmp_path: Path) -> Path:
    """A model needing alpha, whose download the index holds back for a minute."""
    wheel = build_wheel(wheel_dir, "alpha", "1.0")
    package_index.delay(wheel.name, 60)
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("alpha\n")
    return model


@pytest.mark.slow
def test_sigterm_stops_a_lock_cleanly(slow_alpha: Path, package_index: PackageIndex) -> None:
    child = _lock_child(slow_alpha, package_index)
    _wait_for(lambda: package_index.downloads("alpha-1.0-py3-none-any.whl") == 1, what="pip")
    assert _stagings(slow_alpha)
    child.send_signal(signal.SIGTERM)  # the lock process only: it must stop pip itself
    _, err = child.communicate(timeout=20)
    assert child.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert _stagings(slow_alpha) == []
    assert not (slow_alpha / LOCKFILE_RELPATH).exists()


@pytest.mark.slow
def test_a_killed_locks_leftovers_are_swept_by_the_next_lock(
    slow_alpha: Path, package_index: PackageIndex
) -> None:
    child = _lock_child(slow_alpha, package_index)
    _wait_for(lambda: package_index.downloads("alpha-1.0-py3-none-any.whl") == 1, what="pip")
    os.killpg(child.pid, signal.SIGKILL)
    child.communicate(timeout=20)
    left = _stagings(slow_alpha)
    assert left  # what SIGKILL leaves behind

    package_index.clear_faults()
    assert lock(slow_alpha, pip_args=package_index.pip_args()).action == "new"
    assert _stagings(slow_alpha) == []


# --- real daemons ----------------------------------------------------------------------------


@dataclass
class Watched:
    """A model dir watched by a real daemon, and ways to look at what the daemon did."""

    daemon: Daemon
    model: Path
    index: PackageIndex
    settle: float

    @property
    def requirements(self) -> Path:
        return self.model / "requirements.txt"

    def state(self) -> dict[str, Any]:
        found = [w for w in self.daemon.client().watches() if w["model_dir"] == str(self.model)]
        assert len(found) == 1, found
        return found[0]

    def events(self, kind: str | None = None, trigger: str = "change") -> list[dict[str, Any]]:
        return [
            e
            for e in self.state()["events"]
            if e["trigger"] == trigger and (kind is None or e["kind"] == kind)
        ]

    def wait_rounds(self, count: int, trigger: str = "change") -> list[dict[str, Any]]:
        """Wait for ``count`` rounds of ``trigger`` to have ended, the watch idle again."""

        def done() -> bool:
            state = self.state()
            ended = [e for e in state["events"] if e["trigger"] == trigger]
            return state["state"] == "idle" and len(ended) >= count

        try:
            _wait_for(done, what=f"{count} {trigger} round(s)")
        except AssertionError:
            raise AssertionError(f"{self.state()}\n{self.daemon.log()}") from None
        return self.events(trigger=trigger)

    def quiet(self) -> None:
        """Long enough for a change the daemon missed to have settled and started a round."""
        time.sleep(self.settle * 3 + 0.3)

    def lockfile_hash(self) -> str | None:
        lockfile = read_lockfile(self.model)
        return None if lockfile is None else lockfile.orig_deps_hash

    def locked_names(self) -> list[str]:
        lockfile = read_lockfile(self.model)
        assert lockfile is not None
        entry = lockfile.find_entry(current_environment())
        assert entry is not None
        return sorted(d.filename.split("-")[0] for d in entry.locked_deps)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def wheels(wheel_dir: Path) -> dict[str, Path]:
    return {
        name: build_wheel(wheel_dir, name, "1.0", files={f"{name}/__init__.py": f"N = {name!r}\n"})
        for name in ("alpha", "beta", "gamma")
    }


def _settings(index: PackageIndex, settle: float, **watch: Any) -> dict[str, dict[str, Any]]:
    return {"watch": {"settle": settle, "pip_args": ["--index-url", index.simple_url], **watch}}


@pytest.fixture
def watched(
    short_tmp: Path, tmp_path: Path, package_index: PackageIndex, wheels: dict[str, Path]
) -> Iterator[Callable[..., Watched]]:
    """``watched(settle=...)``: a daemon watching a model of ``alpha``, its first lock done."""
    started: list[Daemon] = []

    def make(settle: float = 0.25) -> Watched:
        model = tmp_path / "model"
        model.mkdir()
        (model / "requirements.txt").write_text("alpha\n")
        settings = _settings(package_index, settle)
        daemon = start_daemon(short_tmp, tmp_path / "store", settings=settings)
        started.append(daemon)
        state = daemon.client().watch(model)
        assert state["model_dir"] == str(model)
        watch = Watched(daemon, model, package_index, settle)
        (first,) = watch.wait_rounds(1, trigger="watch")
        assert first["kind"] == "relocked", first
        return watch

    yield make
    for daemon in started:
        daemon.kill()


@pytest.mark.slow
def test_an_in_place_save_relocks_once(watched: Callable[..., Watched]) -> None:
    watch = watched()
    watch.requirements.write_text("alpha\nbeta\n")
    (event,) = watch.wait_rounds(1)
    watch.quiet()
    assert watch.events() == [event]
    assert event["kind"] == "relocked", event
    assert event["requirements_sha256"] == _sha("alpha\nbeta\n") == watch.lockfile_hash()
    assert event["detected_at"] <= event["settled_at"] <= event["lock_written_at"]
    assert event["lock_written_at"] <= event["ready_at"] <= event["ended_at"]
    assert (event["wheels"], event["error"]) == (2, None)
    assert watch.locked_names() == ["alpha", "beta"]
    metrics = watch.daemon.client().metrics()
    assert 'wheelcas_relocks_total{result="relocked"} 2' in metrics  # the watch's, this one


@pytest.mark.slow
def test_an_editor_style_rename_relocks_once(watched: Callable[..., Watched]) -> None:
    watch = watched()
    temporary = watch.model / ".requirements.txt.swp"
    temporary.write_text("alpha\ngamma\n")
    temporary.replace(watch.requirements)
    (event,) = watch.wait_rounds(1)
    watch.quiet()
    assert len(watch.events()) == 1
    assert event["kind"] == "relocked", event
    assert watch.locked_names() == ["alpha", "gamma"]


@pytest.mark.slow
def test_a_burst_of_ten_saves_relocks_once(watched: Callable[..., Watched]) -> None:
    watch = watched(settle=0.5)  # 20 ms apart: a save never waits long enough to settle
    for i in range(10):
        watch.requirements.write_text(f"alpha\nbeta\n# save {i}\n")
        time.sleep(0.02)
    (event,) = watch.wait_rounds(1)
    watch.quiet()
    assert len(watch.events()) == 1
    assert event["kind"] == "relocked", event
    assert watch.lockfile_hash() == _sha("alpha\nbeta\n# save 9\n")


@pytest.mark.slow
def test_saving_the_same_bytes_relocks_nothing(watched: Callable[..., Watched]) -> None:
    watch = watched()
    before = (watch.model / LOCKFILE_RELPATH).read_bytes()
    watch.requirements.write_text("alpha\n")
    (event,) = watch.wait_rounds(1)
    assert (event["kind"], event["lock_written_at"]) == ("unchanged", None)
    assert (watch.model / LOCKFILE_RELPATH).read_bytes() == before


@pytest.mark.slow
def test_an_unresolvable_edit_keeps_the_old_lock(watched: Callable[..., Watched]) -> None:
    watch = watched()
    lockfile = watch.model / LOCKFILE_RELPATH
    before = lockfile.read_bytes()
    watch.requirements.write_text("alpha\nno-such-package\n")
    (event,) = watch.wait_rounds(1)
    assert event["kind"] == "failed", event
    assert "No matching distribution found for no-such-package" in event["error"]
    assert "previous lockfile was kept" in event["error"]
    assert lockfile.read_bytes() == before
    assert _stagings(watch.model) == []
    (summary,) = watch.daemon.client().status()["watched"]
    assert summary["last_event"]["error"] == event["error"]

    watch.requirements.write_text("alpha\nbeta\n")  # fixed: the watch goes on
    assert watch.wait_rounds(2)[-1]["kind"] == "relocked"


@pytest.mark.slow
def test_after_a_watched_change_the_next_load_is_warm(
    watched: Callable[..., Watched], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = watched()
    local = build_wheel(tmp_path / "local", "delta", "0.1")  # bundled into the model dir
    watch.requirements.write_text(f"alpha\nbeta\n{local}\n")
    (event,) = watch.wait_rounds(1)
    assert (event["kind"], event["wheels"]) == ("relocked", 3), event
    names = [w.name for w in watch.index.files_dir.glob("*.whl")]
    fetched = {name: watch.index.downloads(name) for name in names}
    counters = watch.daemon.client().status()["counters"]

    views = StoreLayout(watch.daemon.store).views_dir
    assert any(views.iterdir())  # the watch built the new lock's view
    made = watch.daemon.client().status()["store"]["views"]

    monkeypatch.setenv("WHEELCAS_SOCKET", str(watch.daemon.socket_path))
    dirs = ready_package_dirs(watch.model, daemon=True, lease=False)

    assert watch.daemon.client().status()["store"]["views"] == made  # found, not built
    assert len(dirs) == 1
    assert dirs[0].parent.parent == views, dirs  # the view
    assert {name: watch.index.downloads(name) for name in names} == fetched
    after = watch.daemon.client().status()["counters"]
    assert (after["downloads"], after["published"]) == (
        counters["downloads"],
        counters["published"],
    )
    assert after["cache_hits"] - counters["cache_hits"] == 3
    code = "import alpha, beta, delta; print(alpha.N, beta.N)"
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path[:0] = {[str(d) for d in dirs]}; {code}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.split() == ["alpha", "beta"], done.stderr


@pytest.mark.slow
def test_a_symlinked_requirements_file_is_followed(
    watched: Callable[..., Watched], tmp_path: Path
) -> None:
    watch = watched()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "a.txt").write_text("alpha\nbeta\n")
    (shared / "b.txt").write_text("gamma\n")
    link = watch.model / ".requirements.link"
    link.symlink_to(shared / "a.txt")
    link.replace(watch.requirements)  # a symlink now, to a file elsewhere
    assert watch.wait_rounds(1)[-1]["kind"] == "relocked"
    assert watch.locked_names() == ["alpha", "beta"]

    (shared / "a.txt").write_text("alpha\ngamma\n")  # an edit of the target
    assert watch.wait_rounds(2)[-1]["kind"] == "relocked"
    assert watch.locked_names() == ["alpha", "gamma"]

    link.symlink_to(shared / "b.txt")
    link.replace(watch.requirements)  # retargeted, as `ln -sfn` does
    assert watch.wait_rounds(3)[-1]["kind"] == "relocked"
    assert watch.locked_names() == ["gamma"]

    (shared / "b.txt").write_text("beta\n")  # the new target is watched now
    assert watch.wait_rounds(4)[-1]["kind"] == "relocked"
    assert watch.locked_names() == ["beta"]


@pytest.mark.slow
def test_concurrent_watch_requests_make_one_watch(
    short_tmp: Path, tmp_path: Path, package_index: PackageIndex, wheels: dict[str, Path]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("alpha\n")
    daemon = start_daemon(short_tmp, tmp_path / "store", settings=_settings(package_index, 0.25))
    try:
        start, errors = threading.Barrier(4), []

        def ask() -> None:
            start.wait()
            try:
                daemon.client().watch(model)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        watch = Watched(daemon, model, package_index, 0.25)
        (event,) = watch.wait_rounds(1, trigger="watch")
        watch.quiet()
        assert event["kind"] == "relocked", event
        assert daemon.client().status()["counters"]["relocks"] == 1  # one DirWatch, one round
        assert daemon.stop() == 0
        assert "Task was destroyed" not in daemon.log()
    finally:
        daemon.kill()


def _roots(store: Path) -> dict[str, tuple[str, ...]]:
    with Metadata.open(StoreLayout(store)) as metadata:
        return {r.path: r.shas for r in metadata.roots() if r.kind == "watched"}


@pytest.mark.slow
def test_unwatch_stops_relocks_and_drops_the_root(
    watched: Callable[..., Watched], wheels: dict[str, Path]
) -> None:
    watch = watched()
    assert _roots(watch.daemon.store) == {str(watch.model): (sha256_file(wheels["alpha"]),)}
    before = (watch.model / LOCKFILE_RELPATH).read_bytes()

    reply = watch.daemon.client().unwatch(watch.model)
    assert (reply["was_watched"], reply["configured"]) == (True, False)
    watch.requirements.write_text("alpha\nbeta\n")
    watch.quiet()
    assert watch.daemon.client().watches() == []
    assert watch.daemon.client().status()["watched"] == []
    assert (watch.model / LOCKFILE_RELPATH).read_bytes() == before
    assert _roots(watch.daemon.store) == {}
    assert watch.daemon.client().unwatch(watch.model)["was_watched"] is False


@pytest.mark.slow
def test_a_watch_outlives_a_restart_and_sees_what_changed_meanwhile(
    watched: Callable[..., Watched], short_tmp: Path, wheels: dict[str, Path]
) -> None:
    watch = watched()
    assert watch.daemon.stop() == 0
    watch.requirements.write_text("beta\n")  # while no daemon runs

    watch.daemon = start_daemon(
        short_tmp, watch.daemon.store, settings=_settings(watch.index, watch.settle), name="again"
    )
    try:
        (event,) = watch.wait_rounds(1, trigger="start")
        assert event["kind"] == "relocked", event
        assert watch.locked_names() == ["beta"]
        assert _roots(watch.daemon.store) == {str(watch.model): (sha256_file(wheels["beta"]),)}
        watch.requirements.write_text("gamma\n")  # and it is watched again
        assert watch.wait_rounds(1)[-1]["kind"] == "relocked"
    finally:
        watch.daemon.kill()


@pytest.mark.slow
def test_a_newer_change_supersedes_a_relock_in_progress(
    watched: Callable[..., Watched], wheels: dict[str, Path]
) -> None:
    watch = watched()
    watch.index.delay(wheels["beta"].name, 60)  # pip hangs on beta: the re-lock stays busy
    watch.requirements.write_text("alpha\nbeta\n")
    _wait_for(lambda: watch.index.downloads(wheels["beta"].name) == 1, what="pip fetching beta")
    assert watch.state()["state"] == "locking"

    watch.requirements.write_text("alpha\ngamma\n")
    events = watch.wait_rounds(2)
    watch.quiet()
    assert [e["kind"] for e in watch.events()] == ["superseded", "relocked"], events
    superseded, relocked = watch.events()
    assert superseded["requirements_sha256"] == _sha("alpha\nbeta\n")
    assert superseded["lock_written_at"] is None
    assert relocked["requirements_sha256"] == _sha("alpha\ngamma\n") == watch.lockfile_hash()
    assert watch.locked_names() == ["alpha", "gamma"]
    assert _stagings(watch.model) == []  # the stopped child cleaned up after itself
    assert "ignored SIGTERM" not in watch.daemon.log()  # it did not need SIGKILL


@pytest.mark.slow
def test_stopping_the_daemon_stops_its_relock(
    watched: Callable[..., Watched], wheels: dict[str, Path]
) -> None:
    watch = watched()
    before = (watch.model / LOCKFILE_RELPATH).read_bytes()
    watch.index.delay(wheels["beta"].name, 60)
    watch.requirements.write_text("alpha\nbeta\n")
    _wait_for(lambda: watch.index.downloads(wheels["beta"].name) == 1, what="pip fetching beta")
    started = time.monotonic()
    assert watch.daemon.stop() == 0
    assert time.monotonic() - started < 5  # the lock child was stopped, not waited for
    assert (watch.model / LOCKFILE_RELPATH).read_bytes() == before
    assert _stagings(watch.model) == []


@pytest.mark.slow
def test_configured_dirs_are_watched_from_the_start(
    short_tmp: Path, tmp_path: Path, package_index: PackageIndex, wheels: dict[str, Path]
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "requirements.txt").write_text("alpha\n")
    settings = _settings(package_index, 0.25, model_dirs=[str(model)])
    daemon = start_daemon(short_tmp, tmp_path / "store", settings=settings)
    try:
        watch = Watched(daemon, model, package_index, 0.25)
        (event,) = watch.wait_rounds(1, trigger="start")
        assert (event["kind"], watch.state()["source"]) == ("relocked", "config")
        assert watch.locked_names() == ["alpha"]
        reply = daemon.client().unwatch(model)
        assert (reply["was_watched"], reply["configured"]) == (True, True)
    finally:
        daemon.kill()


def test_watch_requests_that_cannot_be_served(short_tmp: Path, tmp_path: Path) -> None:
    daemon = start_daemon(short_tmp, tmp_path / "store")
    try:
        client = daemon.client()
        empty = tmp_path / "empty"
        empty.mkdir()
        for model_dir, python, message, status in (
            (tmp_path / "missing", None, "is not a directory", 400),
            (empty, None, "has no requirements.txt", 400),
            (empty, "3.99", "cpython-399", 422),  # with a requirements.txt, written below
        ):
            if python is not None:
                (empty / "requirements.txt").write_text("")
            with pytest.raises(DaemonError) as caught:
                client.watch(model_dir, python=python)
            assert caught.value.status == status, caught.value
            assert message in str(caught.value)
        with pytest.raises(DaemonError, match="absolute, normalized"):
            client.watch(Path("relative"))
        assert client.watches() == []
    finally:
        daemon.kill()
