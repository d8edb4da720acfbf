"""Is the process that holds a lease still the one that took it?

A lease protects the trees on a loader process's ``sys.path`` from garbage collection, and it
dies with that process. A pid alone cannot say so: pids are reused, and after a reboot or a
busy day the pid of a dead loader may belong to some unrelated process. The kernel's start
time of the process (``/proc/<pid>/stat`` field 22, in clock ticks since boot) is fixed for the
life of a process, so the pair ``(pid, start time)`` names one process and never another.

When the answer cannot be known (``/proc`` mounted with ``hidepid``, a foreign pid namespace),
the process counts as alive: keeping a tree too long costs disk, removing one that is on a
running model's ``sys.path`` breaks the model.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

PROC = Path("/proc")

# Field 3 of /proc/<pid>/stat: a process that has exited but not been reaped yet (zombie,
# dead) still has an entry there, with its old start time. Its sys.path is gone.
_EXITED_STATES = frozenset({"Z", "X", "x"})
# Fields after the closing parenthesis of comm: 3 (state) is the first, 22 (starttime) ...
_STATE_INDEX = 0
_STARTTIME_INDEX = 22 - 3


def parse_stat(text: str) -> tuple[str, int] | None:
    """``(state, start time)`` from the text of ``/proc/<pid>/stat``; None if malformed.

    Field 2 (``comm``, the executable name in parentheses) may itself hold spaces and
    parentheses (``(my) (prog)``), so the fields are counted from after the *last* ``)``.
    """
    _, paren, rest = text.rpartition(")")
    if not paren:
        return None
    fields = rest.split()
    if len(fields) <= _STARTTIME_INDEX:
        return None
    try:
        return fields[_STATE_INDEX], int(fields[_STARTTIME_INDEX])
    except ValueError:
        return None


def process_start_time(pid: int, *, proc: Path = PROC) -> int | None:
    """The start time of running process ``pid`` (clock ticks since boot); None if it is gone.

    An exited process that is not reaped yet (a zombie) is gone too. None also when the
    entry cannot be read or parsed: see :func:`is_alive` for how that is told apart.
    """
    try:  # os calls, not Path.read_text: every resolve with a lease asks (~5x cheaper)
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    parsed = parse_stat(data.decode("utf-8", errors="replace"))
    if parsed is None or parsed[0] in _EXITED_STATES:
        return None
    return parsed[1]


def is_alive(pid: int, start_time: int, *, proc: Path = PROC) -> bool:
    """Whether ``pid`` is still the process that started at ``start_time``.

    False when the process is gone or exited, or when the pid now belongs to another process
    (its start time differs). True when ``/proc`` will not say but the pid exists. A
    ``start_time`` of 0 or less means it was unknown when the lease was taken: then only
    "does the pid exist (and not as a zombie)" can be asked.
    """
    if pid <= 0:
        return False
    try:
        text = (proc / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return _gone_unless_hidden(pid, proc)
    except OSError:
        return _pid_exists(pid)
    parsed = parse_stat(text)
    if parsed is None:
        return _pid_exists(pid)
    state, started = parsed
    if state in _EXITED_STATES:
        return False
    return start_time <= 0 or started == start_time


def _gone_unless_hidden(pid: int, proc: Path) -> bool:
    """No ``/proc/<pid>``: the process is gone, unless this ``/proc`` cannot show it."""
    # pid 1 exists in every pid namespace: a /proc that does not list it is absent, or
    # mounted with hidepid and hiding other users' processes. Then only the kernel knows.
    if (proc / "1").exists():
        return False
    return _pid_exists(pid)


def _pid_exists(pid: int) -> bool:
    """Signal 0: the kernel's answer to "is there a process ``pid``", without /proc."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it belongs to someone else
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True
