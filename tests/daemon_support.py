"""Real daemons for tests: ``python -m cas_daemon`` in a subprocess, on a short socket path.

:func:`start_daemon` writes a configuration (loopback index allowed, no interpreter
discovery), starts the daemon and waits until ``/v1/health`` answers; the returned
:class:`Daemon` stops it with real signals. Its stderr goes to a file, shown on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from loader.client import DaemonClient
from lockgen.errors import WheelcasError
from lockgen.lockfile import (
    LockedDep,
    LockEntry,
    LockFile,
    current_environment,
    entry_markers,
    sha256_hex,
    write_lockfile,
)
from tests.support.index import PackageIndex
from tests.support.wheels import sha256_file

START_TIMEOUT_S = 20.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    socket_path: Path
    store: Path
    log_path: Path

    @property
    def tmp_dir(self) -> Path:
        return self.store / "v1" / "tmp"

    def client(self, **kwargs: Any) -> DaemonClient:
        return DaemonClient(self.socket_path, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        """``kill -9``: no clean-up of any kind runs in the daemon."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait(10)


def write_config(path: Path, settings: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(tomli_w.dumps({k: dict(v) for k, v in settings.items()}), encoding="utf-8")
    return path


def daemon_settings(extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The tests' configuration: the loopback index allowed, no interpreter discovery."""
    settings: dict[str, dict[str, Any]] = {
        "fetch": {"allowed_hosts": ["127.0.0.1"]},
        "python": {"discover": False},
        "server": {"shutdown_timeout": "10s"},
    }
    for section, values in (extra or {}).items():
        settings.setdefault(section, {}).update(values)
    return settings


def daemon_argv(socket_path: Path | None, store: Path, config: Path) -> list[str]:
    argv = [sys.executable, "-m", "cas_daemon", "--store", str(store), "--config", str(config)]
    return argv if socket_path is None else [*argv, "--socket", str(socket_path)]


def wait_healthy(daemon: Daemon, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    client = daemon.client()
    while True:
        if daemon.process.poll() is not None:
            raise RuntimeError(
                f"the daemon exited with {daemon.process.returncode}:\n{daemon.log()}"
            )
        try:
            client.health(timeout=0.5)
            return
        except WheelcasError:
            if time.monotonic() > deadline:
                daemon.kill()
                raise RuntimeError(f"the daemon never became healthy:\n{daemon.log()}") from None
            time.sleep(0.05)


def start_daemon(
    short_tmp: Path,
    store: Path,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "d",
    env: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Daemon:
    """Start a daemon on ``short_tmp/{name}.sock`` over ``store`` (see the module docstring)."""
    socket_path = short_tmp / f"{name}.sock"
    config = write_config(short_tmp / f"{name}.toml", daemon_settings(settings))
    log_path = short_tmp / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            daemon_argv(socket_path, store, config),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    daemon = Daemon(process, socket_path, store, log_path)
    if wait:
        wait_healthy(daemon)
    return daemon


@contextmanager
def running_daemon(short_tmp: Path, store: Path, **kwargs: Any) -> Iterator[Daemon]:
    daemon = start_daemon(short_tmp, store, **kwargs)
    try:
        yield daemon
    finally:
        daemon.kill()


def url_dep(index: PackageIndex, wheel: Path) -> LockedDep:
    return LockedDep(sha256=sha256_hex(sha256_file(wheel)), url=index.file_url(wheel.name))


def bundled_dep(model_dir: Path, source: Path, sha256: str | None = None) -> LockedDep:
    """``source`` copied into the model's bundled wheels, locked with ``sha256`` (or its own)."""
    sha = sha256 or sha256_file(source)
    relpath = f".carton/bundled_wheels/{sha}/{source.name}"
    (model_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / relpath).write_bytes(source.read_bytes())
    return LockedDep(sha256=sha256_hex(sha), bundled_whl_path=relpath)


def lock_model(model_dir: Path, deps: Sequence[LockedDep]) -> LockEntry:
    """Write a lockfile with one entry, for this interpreter; that entry."""
    model_dir.mkdir(parents=True, exist_ok=True)
    entry = LockEntry(markers=entry_markers(current_environment()), locked_deps=tuple(deps))
    write_lockfile(model_dir, LockFile(orig_deps_hash="0" * 64, entries=(entry,)))
    return entry


def files_under(directory: Path) -> list[str]:
    """Every path under ``directory`` (relative), or nothing if it does not exist."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
