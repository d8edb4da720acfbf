"""A wheelcas daemon for the benchmarks: ``python -m cas_daemon`` in a child process.

:func:`start_daemon` writes a configuration (the loopback index allowed, no interpreter
discovery: the daemon compiles with its own interpreter, the benchmarks' venv python, whose
cache tag is the clients'), starts the daemon on a short socket path under ``/tmp`` (unix
socket paths must be shorter than 108 bytes) and waits until ``/v1/health`` answers.
:meth:`DaemonProcess.stop` ends it with SIGTERM (SIGKILL if it does not go within 15 s) and
removes its runtime dir. Every daemon started here is also stopped at interpreter exit, so an
interrupted run leaves none behind.

The daemon's environment is the benchmarks' isolated one (no ``WHEELCAS_*``, ``PYTHON*``,
``PIP_*``, ``UV_*`` variables; ``PIP_CONFIG_FILE=/dev/null``); its output goes to a log file
whose tail any error shows. A daemon that watches model dirs (:class:`WatchSettings`) gets a
``[watch]`` section: its re-locks run pip with that environment plus ``watch.pip_args``, so
the index (the loopback one) must be named there.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import REPO_ROOT, isolated_env

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_RUNTIME_PARENT = Path("/tmp")  # a short socket path, in a private mkdtemp dir
_LIVE: dict[int, DaemonProcess] = {}


@dataclass(slots=True)
class DaemonProcess:
    process: subprocess.Popen[bytes]
    socket_path: Path
    store: Path
    runtime_dir: Path

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "daemon.log"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; the runtime dir goes too."""
        _LIVE.pop(id(self), None)
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            return self.process.wait(STOP_TIMEOUT_S)
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string for these values


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchSettings:
    """The daemon's ``[watch]`` section: ``settle`` seconds, and the pip options of a re-lock
    (``--index-url`` of the loopback index: the isolated environment has no pip config)."""

    settle: float
    pip_args: tuple[str, ...]

    def toml_lines(self) -> list[str]:
        args = ", ".join(_toml_string(a) for a in self.pip_args)
        return ["[watch]", f"settle = {self.settle!r}", f"pip_args = [{args}]", ""]


def config_text(
    allowed_hosts: tuple[str, ...] = ("127.0.0.1",), watch: WatchSettings | None = None
) -> str:
    hosts = ", ".join(_toml_string(h) for h in allowed_hosts)
    return "\n".join(
        [
            "[fetch]",
            f"allowed_hosts = [{hosts}]",
            "max_parallel_downloads = 8",
            "",
            "[python]",
            "discover = false",
            "",
            "[server]",
            'shutdown_timeout = "10s"',
            "",
            *(watch.toml_lines() if watch is not None else []),
        ]
    )


def _wait_healthy(daemon: DaemonProcess, timeout: float) -> None:
    from loader.client import DaemonClient
    from lockgen.errors import WheelcasError

    client = DaemonClient(daemon.socket_path)
    deadline = time.monotonic() + timeout
    while True:
        if not daemon.alive():
            raise RuntimeError(
                f"the daemon exited with {daemon.process.returncode}:\n{daemon.log_tail()}"
            )
        try:
            client.health(timeout=0.5)
            return
        except WheelcasError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the daemon never answered /v1/health in {timeout:.0f} s:\n{daemon.log_tail()}"
                ) from None
            time.sleep(0.02)


def start_daemon(
    store: Path, *, timeout: float = START_TIMEOUT_S, watch: WatchSettings | None = None
) -> DaemonProcess:
    """A daemon over ``store`` (made if absent), healthy when this returns; with ``watch``,
    configured to watch model dirs with those settings (none is watched until asked)."""
    store.mkdir(parents=True, exist_ok=True)
    runtime = Path(tempfile.mkdtemp(prefix="wcb-", dir=_RUNTIME_PARENT))
    socket_path, config = runtime / "d.sock", runtime / "daemon.toml"
    config.write_text(config_text(watch=watch), encoding="utf-8")
    argv = [sys.executable, "-m", "cas_daemon", "--store", str(store)]
    argv += ["--socket", str(socket_path), "--config", str(config)]
    with (runtime / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=isolated_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    daemon = DaemonProcess(process, socket_path, store, runtime)
    _LIVE[id(daemon)] = daemon
    try:
        _wait_healthy(daemon, timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon


@atexit.register
def _stop_all() -> None:
    for daemon in list(_LIVE.values()):
        daemon.stop()
