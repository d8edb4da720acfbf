"""Where a model's packages come from: the daemon when one answers, else the embedded store.

Order (see docs/daemon.md): ``$WHEELCAS_SOCKET``, then the user's and the system's default
sockets, if a daemon answers its health check there; otherwise this process uses the store
itself (the default for a new user). ``WHEELCAS_SOCKET=off`` (the CLI's ``--no-daemon``)
forces embedded mode. Either way the lockfile is read, and locked if needed, right here:
pip runs with the user's own configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cas_daemon.progress import ProgressCallback
from loader import embedded

log = logging.getLogger("wheelcas.load")

DaemonChoice = bool | None  # True: the daemon or an error; False: embedded; None: either


def ready_package_dirs(
    model_dir: Path,
    *,
    daemon: DaemonChoice = None,
    lease: bool = True,
    pip_args: Sequence[str] = (),
    progress: ProgressCallback | None = None,
    python: str | None = None,
) -> list[Path]:
    """The dirs to put on ``sys.path`` after the code dir: a view, or one per wheel.

    ``lease`` asks the daemon to keep these paths from GC for as long as this process lives
    (right for a process that imports from them; pointless for one that only prints them).
    ``python``: the interpreter that imports them (a model worker's; default: this one). The
    lock entry is that interpreter's, and the ``.pyc`` files are compiled for it.
    """
    entry = embedded.locked_entry(model_dir, pip_args=pip_args, python=python)
    if daemon is not False:
        from loader.client import DaemonUnavailable, find_daemon

        client = find_daemon()
        if client is None and daemon:
            raise DaemonUnavailable(
                Path(os.environ.get("WHEELCAS_SOCKET") or "(default sockets)"),
                "no daemon answers",
            )
        if client is not None:
            try:
                return client.resolve(
                    model_dir, entry, lease=lease, progress=progress, python=python
                ).package_dirs
            except DaemonUnavailable as exc:
                if daemon:
                    raise
                # The daemon went away mid-request: the model still loads, from this process.
                log.warning("%s; loading without the daemon", exc)
    return embedded.package_dirs(model_dir, entry, python=python)
