"""systemd integration: socket activation, sd_notify, the unit files.

The end-to-end test starts the daemon exactly as systemd does: the listening socket as fd 3,
``LISTEN_FDS=1`` and ``LISTEN_PID`` set to the daemon's own pid (a small wrapper sets it and
then ``exec``s the daemon, keeping its pid), and a ``NOTIFY_SOCKET`` the test listens on.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cas_daemon.systemd import (
    Notifier,
    listen_sockets,
    notify_address,
    parse_listen_fds,
    watchdog_interval,
)
from loader.client import DaemonClient
from tests.daemon_support import ROOT, daemon_settings, write_config

UNITS = ROOT / "systemd"

# Runs in the child: put the inherited socket on fd 3 and announce it for this very pid,
# then become the daemon (exec keeps the pid, as systemd's own exec does).
_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "cas_daemon", *sys.argv[2:]])
"""


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(short_tmp / "notify"))
        sock.settimeout(20)
        yield sock


def _messages_until(sock: socket.socket, wanted: str) -> list[str]:
    seen: list[str] = []
    while wanted not in seen:
        seen += sock.recv(4096).decode().splitlines()
    return seen


def test_listen_fds_are_only_taken_for_this_pid() -> None:
    assert parse_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == [3, 4]
    assert parse_listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42) == []
    assert parse_listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []
    assert parse_listen_fds({}, 42) == []
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert listen_sockets(env) == []  # pid 1's sockets are not ours: none taken
    assert env == {"OTHER": "kept"}  # and our children never see the variables


def test_notify_addresses_and_watchdog_interval() -> None:
    assert notify_address({"NOTIFY_SOCKET": "@wheelcas/x"}) == b"\0wheelcas/x"
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert notify_address({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert not Notifier({}).ready()  # outside systemd: nothing sent, nothing raised


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"wheelcas-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).ready("serving")
        assert sock.recv(4096).decode().splitlines() == ["READY=1", "STATUS=serving"]


def test_socket_activation_and_notifications(
    short_tmp: Path, tmp_path: Path, notify_socket: socket.socket
) -> None:
    path = short_tmp / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    config = write_config(short_tmp / "d.toml", daemon_settings())
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(short_tmp / "notify"),
        "WATCHDOG_USEC": "400000",
    }
    fd = listening.fileno()
    argv = [sys.executable, "-c", _ACTIVATE, str(fd)]
    argv += ["--store", str(tmp_path / "store"), "--config", str(config)]
    with (short_tmp / "d.log").open("wb") as log:
        daemon = subprocess.Popen(argv, pass_fds=(fd,), env=env, stdout=log, stderr=log, cwd=ROOT)
    listening.close()  # only the daemon holds the socket now, as with systemd
    try:
        assert "READY=1" in _messages_until(notify_socket, "READY=1")
        assert DaemonClient(path).health()["ok"]
        assert "WATCHDOG=1" in _messages_until(notify_socket, "WATCHDOG=1")
        daemon.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _messages_until(notify_socket, "STOPPING=1")
        assert daemon.wait(15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert path.exists()  # systemd's socket: the daemon never removes it
    assert (short_tmp / "d.log").read_text().count("serving") == 1


def test_watchdog_pings_keep_coming(
    short_tmp: Path, tmp_path: Path, notify_socket: socket.socket
) -> None:
    config = write_config(short_tmp / "w.toml", daemon_settings())
    env = {**os.environ, "NOTIFY_SOCKET": str(short_tmp / "notify"), "WATCHDOG_USEC": "200000"}
    argv = [sys.executable, "-m", "cas_daemon", "--socket", str(short_tmp / "w.sock")]
    argv += ["--store", str(tmp_path / "store"), "--config", str(config)]
    daemon = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _messages_until(notify_socket, "READY=1")
        started = time.monotonic()
        pings = 0
        while pings < 4:
            pings += _messages_until(notify_socket, "WATCHDOG=1").count("WATCHDOG=1")
        assert time.monotonic() - started < 2.0  # every 0.1 s, not once
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this interpreter, change nothing else.
    service = (UNITS / "wheelcas.service").read_text()
    assert "ExecStart=/opt/wheelcas/bin/python -m cas_daemon --system" in service
    (tmp_path / "wheelcas.service").write_text(
        service.replace("/opt/wheelcas/bin/python", sys.executable)
    )
    shutil.copy(UNITS / "wheelcas.socket", tmp_path / "wheelcas.socket")
    done = subprocess.run(
        ["systemd-analyze", "verify", "./wheelcas.service", "./wheelcas.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wheelcas" not in done.stderr, done.stderr  # no warning about our units


def test_units_say_what_the_daemon_relies_on() -> None:
    service = (UNITS / "wheelcas.service").read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RuntimeDirectoryPreserve=yes",
    ):
        assert f"\n{line}\n" in service, line
    assert "\nWatchdogSec=" in service
    assert "\nUser=wheelcas\n" in service
    socket_unit = (UNITS / "wheelcas.socket").read_text()
    assert "\nListenStream=/run/wheelcas/wheelcas.sock\n" in socket_unit
    assert "\nSocketMode=0660\n" in socket_unit
