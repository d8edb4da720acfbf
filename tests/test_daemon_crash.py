"""``kill -9`` of a real daemon while it unpacks or precompiles a wheel, then a restart.

A wheel of 1,500 small modules is served by the loopback index, so both phases of building
its tree (unpacking into ``tmp/{sha256}.{token}/site``, then compiling ``.pyc`` beside the
sources) last long enough to be watched from outside. The test polls the staging tree until
the phase is observably under way, then stops the daemon (SIGSTOP, so that it cannot spawn
another compile worker while its children are listed) and kills it (SIGKILL: the daemon runs
no code between the two, so to the store this is a plain ``kill -9`` at that moment).

What must hold: the client's request fails with :class:`DaemonUnavailable` at once; nothing
is published; the compile workers the daemon leaves behind exit on their own; a restarted
daemon sweeps ``tmp/``, holds no wheel lock, and the next resolve builds a complete, sealed
tree from the blob that survived, without downloading the wheel again.

Deadlines only, no sleeps: every wait polls with a timeout, and after the kill the staging
tree is checked to be in the phase the test meant to interrupt (else the wheel has become
too small for this machine, and the test says so instead of testing something else).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cas_daemon.flock import try_flock
from cas_daemon.layout import StoreLayout
from cas_daemon.progress import ProgressEvent
from loader.client import DaemonUnavailable
from tests.daemon_support import Daemon, files_under, lock_model, start_daemon, url_dep
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds the daemon's children in /proc (Linux)"
)

TAG = sys.implementation.cache_tag
PKG = "crashy"
# Enough that unpacking takes ~0.1-0.4 s and compiling ~1 s on two cores: the test reacts in
# milliseconds, and checks afterwards that it did interrupt the phase it meant to.
MODULES = 1500
# Modules are unpacked in this order (after RECORD), __init__.py last of the package.
MODULE_NAMES = [f"m{i:05d}" for i in range(MODULES)]
WAIT_S = 20.0


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _module_source(i: int) -> str:
    return "".join(f"def f{j}(a, b=1):\n    return a * {i} + b - {j}\n" for j in range(10))


def _big_wheel(wheel_dir: Path) -> Path:
    files: dict[str, bytes | str] = {
        f"{PKG}/{name}.py": _module_source(i) for i, name in enumerate(MODULE_NAMES)
    }
    files[f"{PKG}/__init__.py"] = f"NAME = {PKG!r}\n"
    return build_wheel(wheel_dir, PKG, files=files)


def _wait_for(what: str, condition: Callable[[], bool], step: float = 0.001) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(step)


def _listdir(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in directory.iterdir()]
    except FileNotFoundError:
        return []


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone
        return None
    return text.rpartition(")")[2].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(entry.name)
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used so far; 0 once it is gone."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _running(pid: int) -> bool:
    fields = _proc_stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie writes nothing any more


def _staging(layout: StoreLayout, sha: str) -> Path | None:
    """The tree being built for ``sha`` in ``tmp/`` (``{sha}.{token}``, not a ``.part``)."""
    pattern = re.compile(rf"{sha}\.[0-9a-f]+$")
    names = [n for n in _listdir(layout.tmp_dir) if pattern.match(n)]
    return layout.tmp_dir / names[0] if names else None


def _wait_for_staging(layout: StoreLayout, sha: str) -> Path:
    _wait_for("the staging tree", lambda: _staging(layout, sha) is not None)
    building = _staging(layout, sha)
    assert building is not None
    return building


def _stop_and_kill(daemon: Daemon) -> list[int]:
    """``kill -9`` the daemon; its children (compile workers) as they were at that moment.

    SIGSTOP first, so that it starts no other worker while they are listed. It runs no code
    between the two signals: to the store this is a plain ``kill -9``.
    """
    daemon.signal(signal.SIGSTOP)
    children = _children(daemon.process.pid)
    daemon.kill()
    return children


def _pyc_names(site: Path) -> list[str]:
    return [n for n in _listdir(site / PKG / "__pycache__") if n.endswith(".pyc")]


def _unpacking(site: Path) -> bool:
    return (site / PKG / f"{MODULE_NAMES[10]}.py").exists()


def _compiling(site: Path) -> bool:
    return bool(_pyc_names(site))


def _check_unpack_was_cut(site: Path) -> None:
    written = [n for n in _listdir(site / PKG) if n.endswith(".py")]
    assert not (site / PKG / "__init__.py").exists(), (
        f"the unpack finished before the kill: make the wheel bigger than {MODULES} modules"
    )
    assert 10 < len(written) < MODULES
    assert not (site / PKG / "__pycache__").exists()  # compiling had not begun


def _check_precompile_was_cut(site: Path) -> None:
    compiled = _pyc_names(site)
    assert (site / PKG / "__init__.py").exists()  # unpacked completely
    assert 0 < len(compiled) < MODULES + 1, (
        f"compiling finished before the kill: make the wheel bigger than {MODULES} modules"
    )
    assert not (site.parent / f"pyc-{TAG}").exists()


PHASES: dict[str, tuple[Callable[[Path], bool], Callable[[Path], None]]] = {
    "unpack": (_unpacking, _check_unpack_was_cut),
    "precompile": (_compiling, _check_precompile_was_cut),
}


def _lock_is_free(path: Path) -> bool:
    with try_flock(path) as free:
        return free


def _writable(path: Path) -> bool:
    return bool(path.lstat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _check_complete_and_sealed(layout: StoreLayout, sha: str) -> None:
    """The published tree: every module compiled, its marker, ``site/`` sealed, no temp."""
    site = layout.site_dir(sha)
    assert layout.pyc_marker(sha, TAG).is_file()
    sources = sorted(p.stem for p in (site / PKG).glob("*.py"))
    assert sources == sorted([*MODULE_NAMES, "__init__"])
    assert sorted(_pyc_names(site)) == sorted(f"{name}.{TAG}.pyc" for name in sources)
    writable = []
    for root, dirs, names in os.walk(site):
        for name in [*dirs, *names]:
            path = Path(root, name)
            assert not re.search(r"\.pyc\.\d+$", name), f"a half-written .pyc: {path}"
            if _writable(path):
                writable.append(str(path))
    assert not _writable(site)
    assert writable == []


def _import_name(entries: list[Path]) -> str:
    path = [str(e) for e in entries]
    code = f"import sys; sys.path[:0] = {path!r}; import {PKG} as m; print(m.NAME)"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_mid_build_then_restart(
    phase: str,
    short_tmp: Path,
    store: Path,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
) -> None:
    reached, check_cut = PHASES[phase]
    wheel = _big_wheel(wheel_dir)
    sha = sha256_file(wheel)
    layout = StoreLayout(store)
    model = tmp_path / "m"
    entry = lock_model(model, [url_dep(package_index, wheel)])
    daemon = start_daemon(short_tmp, store)
    try:
        events: list[ProgressEvent] = []
        client = daemon.client()
        thread, out = _in_thread(lambda: client.resolve(model, entry, progress=events.append))
        site = _wait_for_staging(layout, sha) / "site"
        _wait_for(f"the {phase} to be under way in {site}", lambda: reached(site))
        workers = _stop_and_kill(daemon)

        # The client: a clean, prompt error naming the daemon, no socket error or hang.
        thread.join(10)
        assert not thread.is_alive(), "the client still waits for a daemon that died"
        error = out.get("error")
        assert isinstance(error, DaemonUnavailable), out
        assert "went away mid-request" in str(error)
        assert str(daemon.socket_path) in str(error)
        kinds = [e.kind for e in events]
        assert "start" in kinds
        assert "ready" not in kinds
        with pytest.raises(DaemonUnavailable, match="is not running"):
            daemon.client().status()

        # The compile workers it left behind see their stdin close and exit by themselves.
        # Waited for before the restart: one still compiling would write into the staging
        # tree after the start-up sweep (the test below shows it no longer does).
        if phase == "precompile":
            assert workers, "no compile worker was running at the kill"
        _wait_for("the killed daemon's children to exit", lambda: not any(map(_running, workers)))
        check_cut(site)
        assert not layout.tree_dir(sha).exists()  # nothing published, not even partly
        assert sha256_file(layout.blob_path(sha)) == sha  # the download was complete: kept
        assert _lock_is_free(layout.lock_path(sha))

        daemon = start_daemon(short_tmp, store)
        assert files_under(layout.tmp_dir) == []  # the start-up sweep took the staging tree
        assert files_under(layout.trees_dir) == []
        assert _lock_is_free(layout.lock_path(sha))
        assert not _lock_is_free(layout.daemon_lock)  # the new daemon's

        result = daemon.client().resolve(model, entry)
        assert result.site_dirs == (layout.site_dir(sha),)
        assert package_index.downloads(wheel.name) == 1  # built from the surviving blob
        _check_complete_and_sealed(layout, sha)
        assert files_under(layout.tmp_dir) == []
        assert _lock_is_free(layout.lock_path(sha))
        assert _import_name(result.package_dirs) == PKG
    finally:
        daemon.kill()


class LeftInTmp(AssertionError):
    """Staging dirs that a killed daemon's compile worker made after the start-up sweep."""


def test_a_compile_worker_outliving_a_killed_daemon_leaves_nothing_in_tmp(
    short_tmp: Path,
    store: Path,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
) -> None:
    """A module that takes a while to compile, killed mid-way, outlives the start-up sweep.

    Compiling is stretched deterministically: the daemon's workers are stopped along with
    it and continued only once the restarted daemon is healthy (its sweep done), which is
    the order of events a module that compiles for longer than a restart takes.
    """
    files: dict[str, bytes | str] = {f"{PKG}/small{i:02d}.py": f"X = {i}\n" for i in range(40)}
    # ~0.8 s of CPU to compile; sent first (largest first), alone in its batch. A worker that
    # has used a fifth of that is compiling it: it read the source, it has yet to write.
    files[f"{PKG}/slow.py"] = "".join(f"a{i} = {i} + b * {i}\n" for i in range(100_000))
    files[f"{PKG}/__init__.py"] = f"NAME = {PKG!r}\n"
    wheel = build_wheel(wheel_dir, PKG, files=files)
    sha = sha256_file(wheel)
    layout = StoreLayout(store)
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    daemon = start_daemon(short_tmp, store)
    workers: list[int] = []

    def continue_workers() -> None:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    try:
        client = daemon.client()
        _in_thread(lambda: client.resolve(tmp_path / "m", entry))
        site = _wait_for_staging(layout, sha) / "site"
        _wait_for(
            "a compile worker busy with slow.py",
            lambda: any(_cpu_seconds(p) >= 0.15 for p in _children(daemon.process.pid)),
            step=0.01,
        )
        daemon.signal(signal.SIGSTOP)
        workers = _children(daemon.process.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        assert f"slow.{TAG}.pyc" not in _pyc_names(site), "slow.py compiled too fast"
        daemon.kill()

        daemon = start_daemon(short_tmp, store)
        assert files_under(layout.tmp_dir) == []  # swept
        continue_workers()
        _wait_for("the killed daemon's children to exit", lambda: not any(map(_running, workers)))
        leftovers = files_under(layout.tmp_dir)
    finally:
        continue_workers()  # never leave a stopped process behind
        daemon.kill()
    # Fails today: tmp/{sha}.{token}/site/crashy/__pycache__/ is back, made by the worker that
    # finished slow.py after the sweep (its .pyc write then fails, the source being gone, but
    # the directories stay until that wheel is next built or fsck removes them).
    if leftovers:
        raise LeftInTmp(f"left in tmp/ after the start-up sweep: {leftovers}")
