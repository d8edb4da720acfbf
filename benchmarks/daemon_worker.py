"""The measured loader process of the daemon figures: one client of a running daemon.

``python -m benchmarks.daemon_worker COMMAND SOCKET MODEL_DIR [ARGS]`` prints one JSON object
(on its last line). Every resolve is the loader's: ``DaemonClient.resolve`` with a lease (as
``ready_package_dirs`` asks by default), then ``plan_sys_path`` over the returned view and
``apply`` onto a throwaway copy of ``sys.path`` and of the environment. Latencies are
``time.perf_counter`` spans inside this process.

Commands:
  warm   SOCKET MODEL_DIR CALLS MODE LEASE
         one first call (reported apart), then CALLS timed calls. MODE ``parsed``: the
         lockfile is read and parsed once, before; ``lockfile``: every call reads and parses
         it (``read_lockfile`` + ``find_entry``) inside its span. LEASE: 1 or 0.
  cold   SOCKET MODEL_DIR
         one resolve (lockfile read included), timed from before wheelcas is imported.
  conc   SOCKET MODEL_DIR CALLS
         imports, parses the lockfile and makes one first call, prints ``ready``, waits for a
         line on stdin (the parent starts all workers at once), then makes CALLS calls;
         reports their latencies and the ``time.monotonic`` span they took (comparable
         across processes: one clock for the whole machine).

Kept to the standard library and the adapter: what this module imports is measured too.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import json  # noqa: E402  (after _T0 on purpose)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _scratch() -> tuple[list[str], dict[str, str]]:
    return list(sys.path), {}


def _describe(result: Any) -> dict[str, Any]:
    return {
        "view": None if result.view is None else str(result.view),
        "site_dirs": [str(p) for p in result.site_dirs],
        "view_error": result.view_error,
        "wheels": result.wheels,
        "already_ready": result.already_ready,
    }


def _warm(socket_path: Path, model_dir: Path, calls: int, mode: str, lease: bool) -> dict[str, Any]:
    from benchmarks import wheelcas_adapter as wc

    client = wc.daemon_client(socket_path)
    entry = wc.lock_entry(model_dir)
    path, environ = _scratch()
    start = time.perf_counter()
    first = wc.resolve_and_apply(client, model_dir, entry, lease=lease, path=path, environ=environ)
    first_s = time.perf_counter() - start
    latencies: list[float] = []
    for _ in range(calls):
        path, environ = _scratch()
        start = time.perf_counter()
        if mode == "lockfile":
            entry = wc.lock_entry(model_dir)
        result = wc.resolve_and_apply(
            client, model_dir, entry, lease=lease, path=path, environ=environ
        )
        latencies.append(time.perf_counter() - start)
        if result.view is None or path[1] != str(result.view):
            raise RuntimeError(f"the view is not what the loader put on sys.path: {path[:3]}")
    return {"first": first_s, "calls": latencies, **_describe(first)}


def _cold(socket_path: Path, model_dir: Path) -> dict[str, Any]:
    from benchmarks import wheelcas_adapter as wc

    client = wc.daemon_client(socket_path)
    entry = wc.lock_entry(model_dir)
    path, environ = _scratch()
    last: dict[str, float] = {}  # event kind -> when its last one arrived (from _T0)

    def progress(event: Any) -> None:
        now = time.perf_counter() - _T0
        last.setdefault(f"first_{event.kind}", now)
        last[event.kind] = now

    asked = time.perf_counter() - _T0
    result = wc.resolve_and_apply(
        client, model_dir, entry, lease=True, path=path, environ=environ, progress=progress
    )
    seconds = time.perf_counter() - _T0
    return {"seconds": seconds, "asked": asked, "events": last, **_describe(result)}


def _concurrent(socket_path: Path, model_dir: Path, calls: int) -> dict[str, Any]:
    from benchmarks import wheelcas_adapter as wc

    client = wc.daemon_client(socket_path)
    entry = wc.lock_entry(model_dir)
    path, environ = _scratch()
    wc.resolve_and_apply(client, model_dir, entry, lease=True, path=path, environ=environ)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not sys.stdin.readline():
        raise RuntimeError("the parent went away before the start signal")
    began = time.monotonic()
    latencies: list[float] = []
    for _ in range(calls):
        path, environ = _scratch()
        start = time.perf_counter()
        wc.resolve_and_apply(client, model_dir, entry, lease=True, path=path, environ=environ)
        latencies.append(time.perf_counter() - start)
    return {"began": began, "ended": time.monotonic(), "calls": latencies}


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    arity = {"warm": 6, "cold": 3, "conc": 4}
    if arity.get(command) != len(argv):
        sys.stderr.write(__doc__ or "")
        return 2
    socket_path, model_dir = Path(argv[1]), Path(argv[2])
    if command == "warm":
        result = _warm(socket_path, model_dir, int(argv[3]), argv[4], argv[5] == "1")
    elif command == "cold":
        result = _cold(socket_path, model_dir)
    else:
        result = _concurrent(socket_path, model_dir, int(argv[3]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
