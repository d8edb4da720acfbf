"""Running ``wheelcas lock`` for a watched model dir in a child process, and stopping it.

Why a child and not :func:`lockgen.lock.lock` in a thread: a re-lock that a newer change
supersedes must stop now, and a thread cannot be stopped; a process group can. It also keeps
pip's imports (and whatever an sdist's build runs) out of the daemon.

The child is ``python -I -m loader.cli --no-daemon lock DIR --python INTERPRETER [pip args]``
in a new session (its own process group, so pip and its builds are stopped with it). It is
run with the daemon's own interpreter (``-I``: no ``PYTHONPATH``, no user site), and locks
*for* ``INTERPRETER``, which the daemon picked among the ones it knows. Stopping: SIGTERM to
the group (the CLI turns it into a clean exit that removes its staging dir), then SIGKILL
after :data:`KILL_GRACE_S`. A killed child can leave a ``.carton/.staging-*`` dir; the next
lock of that dir removes it (``lockgen.resolve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from cas_daemon.watch import PythonTarget, error_text
from lockgen.errors import WheelcasError

log = logging.getLogger("wheelcas.daemon")

#: How long a child has to exit after SIGTERM before it gets SIGKILL.
KILL_GRACE_S = 3.0


class RelockFailed(WheelcasError):
    """The lock child failed: ``error`` is its message (for pip, ending with pip's words)."""

    def __init__(self, model_dir: Path, error: str) -> None:
        self.model_dir = str(model_dir)
        self.error = error
        super().__init__(f"re-locking {model_dir} failed; the previous lockfile was kept: {error}")


def partial_failure(error: str, failed: PythonTarget, written: Sequence[PythonTarget]) -> str:
    """The error of a round whose lock for ``failed`` failed after those for ``written``.

    Each lock child says "the previous lockfile was kept", which is true of its own run
    only: the first child of the round already replaced the lockfile, so the user must hear
    which entries it holds now.
    """
    if not written:
        return error
    done = ", ".join(str(t) for t in written)
    error = error.replace(
        "the previous lockfile was kept", f"the lockfile written for {done} was kept"
    )
    return (
        f"locking for {failed} failed after the lockfile had been rewritten: it now has the "
        f"entries for {done} only, and {failed} (and any Python after it) is tried again on "
        f"the next change. {error}"
    )


def lock_argv(model_dir: Path, interpreter: str, pip_args: Sequence[str]) -> list[str]:
    """The child's command line; ``pip_args`` are the lock command's own pip options."""
    return [
        sys.executable,
        "-I",
        "-m",
        "loader.cli",
        "--no-daemon",
        "lock",
        str(model_dir),
        "--python",
        interpreter,
        *pip_args,
    ]


async def run_lock(
    model_dir: Path,
    interpreter: str,
    pip_args: Sequence[str],
    *,
    grace: float = KILL_GRACE_S,
) -> str:
    """Lock ``model_dir`` for ``interpreter`` in a child; its one-line report (stdout).

    Raises :class:`RelockFailed` with the child's error. Cancelled: the child's process group
    is stopped (:func:`stop_group`) before the cancellation goes on, so a caller that awaits
    this never has two lock children of one dir at once.
    """
    process = await asyncio.create_subprocess_exec(
        *lock_argv(model_dir, interpreter, pip_args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=model_dir,
        start_new_session=True,
    )
    try:
        out, err = await process.communicate()
    except BaseException:
        await stop_group(process, grace)
        raise
    stdout = out.decode("utf-8", "replace").strip()
    status = process.returncode or 0
    if status != 0:
        raise RelockFailed(model_dir, error_text(err.decode("utf-8", "replace"), status))
    return stdout


async def stop_group(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` s; returns once reaped.

    Shielded from further cancellation: returning before the child is gone would let the
    next re-lock of the dir start beside it. The group is signalled only while its leader
    is alive (not yet reaped), so its number cannot have been reused by another group.
    """

    async def stop() -> None:
        if process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning(
                    "lock child %d ignored SIGTERM for %.1f s: killing it", process.pid, grace
                )
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()

    task = asyncio.ensure_future(stop())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _kill_group(pgid: int, signum: int) -> None:
    """Signal a process group that may be gone already (then nothing happens)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
