"""systemd's socket activation and ``sd_notify`` protocol, with the standard library only.

Socket activation: systemd starts the service with the listening socket(s) as fd 3, 4, ...
and ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the pid they are meant for: a child that
inherited the environment must not take them). The variables are removed once read so that
the daemon's own children (compileall) do not see them.

Notification: datagrams such as ``READY=1`` sent to the unix socket named by
``NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract namespace. ``WATCHDOG_USEC``
asks for ``WATCHDOG=1`` pings within that many microseconds; we ping at half of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> list[int]:
    """The inherited descriptors meant for process ``pid``; empty when there are none.

    Pure: a wrong or missing ``LISTEN_PID`` means the variables were inherited from a parent
    that was socket-activated, and the descriptors are not ours.
    """
    try:
        listen_pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if listen_pid != pid or count < 1:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed to this process (see the module docstring), as objects.

    The variables are unset whatever they said, and each descriptor is marked close-on-exec
    (systemd hands them over inheritable).
    """
    env = os.environ if environ is None else environ
    fds = parse_listen_fds(env, os.getpid())
    for name in _LISTEN_VARS:
        env.pop(name, None)
    sockets = []
    for fd in fds:
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def notify_address(environ: Mapping[str, str]) -> str | bytes | None:
    """The address ``NOTIFY_SOCKET`` names: a path, or bytes for the abstract namespace."""
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return None
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other families are not for a local service


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``; None if not asked."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (watchdog_pid and watchdog_pid != str(pid)):
        return None
    return usec / 2 / 1_000_000


class Notifier:
    """Sends ``sd_notify`` messages; a no-op outside systemd (no ``NOTIFY_SOCKET``).

    The address is read once, at construction: the environment variable is left in place
    (systemd expects the service to keep it) but children get it removed by :func:`scrub`.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = notify_address(env)
        self.watchdog_interval = watchdog_interval(env, os.getpid())

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``READY=1``-style lines in one datagram; False if not sent (never raises).

        A lost notification must not take the daemon down: systemd's timeouts report it.
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def scrub(environ: MutableMapping[str, str] | None = None) -> None:
    """Remove the variables of this module from ``environ`` (for children we start)."""
    env = os.environ if environ is None else environ
    for name in (*_LISTEN_VARS, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
