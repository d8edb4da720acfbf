"""The lower bound of a cold resolve: the work ``daemon_cold`` must do, with no overhead at all.

``python -m benchmarks.floor_worker WHEELS_DIR OUT_DIR [JOBS]`` unpacks every ``*.whl`` of
``WHEELS_DIR`` into ``OUT_DIR/<wheel file name>/`` and compiles to ``.pyc`` every module that
the daemon compiles before it answers (every ``*.py`` outside test dirs,
``cas_daemon.layout.is_deferred_dir``), with ``JOBS`` processes (default: the usable CPUs),
then prints one JSON object (``{"wheels", "files", "modules", "skipped", "seconds"}``).

It is a yardstick for the implementation, not a product: it leaves out everything a store
must do and a benchmark of the bare work need not: no download (the wheels are read from the
page cache), no hashing or verifying, no limits or path checks, no atomic publish, no seal,
no dedupe, no index, no view, no daemon, no socket. Each ``.pyc`` is written in place, once.
What it keeps is what nothing can skip: inflating every member (with zlib-ng where the store
uses it, ``cas_daemon.unpack``), writing every file, compiling every module outside test dirs,
writing its ``.pyc``. The ratio of this to ``uv_cold`` is the best ``daemon_cold`` could reach
on the machine that runs it (benchmarks/README.md, figure (e0)).

Scheduling is the best this work allows: wheels are unpacked largest first, one per process,
and each unpacked wheel's modules go back to the same pool as batches of about 64 KiB of
source, so the last wheel's compile spreads over every process.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import json  # noqa: E402  (after _T0 on purpose: imports are part of the process's time)
import marshal  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait  # noqa: E402
from importlib.util import MAGIC_NUMBER, cache_from_source  # noqa: E402
from pathlib import Path  # noqa: E402

from cas_daemon.layout import is_deferred_dir  # noqa: E402

try:  # the inflater the store's unpacker uses where it has wheels (cas_daemon/unpack.py)
    from zlib_ng import zlib_ng as _inflate_lib
except ImportError:  # pragma: no cover - platforms without zlib-ng wheels
    import zlib as _inflate_lib  # type: ignore[no-redef]

BATCH_BYTES = 64 * 1024
USAGE = "usage: python -m benchmarks.floor_worker WHEELS_DIR OUT_DIR [JOBS]"


def _inflating(raw: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes; deflated ones inflated by :data:`_inflate_lib`."""
    if info.compress_type == zipfile.ZIP_STORED:
        return raw.read(info)
    if info.compress_type != zipfile.ZIP_DEFLATED:
        raise ValueError(f"{info.filename}: compression type {info.compress_type} is not deflate")
    # The local header's name and extra field lengths decide where the data starts.
    fp = raw.fp
    if fp is None:
        raise ValueError("the wheel is closed")
    fp.seek(info.header_offset + 26)
    name_len, extra_len = int.from_bytes(fp.read(2), "little"), int.from_bytes(fp.read(2), "little")
    fp.seek(info.header_offset + 30 + name_len + extra_len)
    return _inflate_lib.decompress(fp.read(info.compress_size), -15)


def unpack(wheel: str, dest: str) -> tuple[list[tuple[str, int]], int]:
    """Write every member of ``wheel`` under ``dest``; the modules to compile, with their
    sizes, and how many files were written."""
    modules: list[tuple[str, int]] = []
    made: set[str] = set()
    files = 0
    with zipfile.ZipFile(wheel) as raw:
        for info in raw.infolist():
            if info.is_dir():
                continue
            path = os.path.join(dest, info.filename)
            parent = os.path.dirname(path)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            data = _inflating(raw, info)
            with open(path, "wb") as out:
                out.write(data)
            files += 1
            dirs = info.filename.split("/")[:-1]
            if info.filename.endswith(".py") and not any(is_deferred_dir(d) for d in dirs):
                modules.append((path, len(data)))
    return modules, files


def timestamp_pyc_header(mtime: int, size: int) -> bytes:
    """A timestamp-checked ``.pyc``'s 16 bytes (PEP 552), as py_compile writes by default."""
    fields = (0, mtime & 0xFFFFFFFF, size & 0xFFFFFFFF)  # flags 0: checked by mtime and size
    return MAGIC_NUMBER + b"".join(f.to_bytes(4, "little") for f in fields)


def compile_batch(paths: list[str]) -> int:
    """Write each module's timestamp ``.pyc`` next to it; how many could not be compiled."""
    skipped = 0
    for path in paths:
        with open(path, "rb") as source:
            data = source.read()
        try:
            code = compile(data, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):  # as the daemon does: skipped, reported by count
            skipped += 1
            continue
        stat = os.stat(path)
        pyc = timestamp_pyc_header(int(stat.st_mtime), stat.st_size) + marshal.dumps(code)
        target = cache_from_source(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as out:
            out.write(pyc)
    return skipped


def batches(modules: list[tuple[str, int]]) -> list[list[str]]:
    """Modules grouped into batches of about :data:`BATCH_BYTES` of source, largest first."""
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path, nbytes in sorted(modules, key=lambda m: m[1], reverse=True):
        current.append(path)
        size += nbytes
        if size >= BATCH_BYTES:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def run(wheels_dir: Path, out_dir: Path, jobs: int) -> dict[str, int]:
    """Unpack and compile every wheel of ``wheels_dir`` into ``out_dir`` with ``jobs``
    processes; counts of wheels, files, modules compiled and modules skipped."""
    wheels = sorted(wheels_dir.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)
    counts = {"wheels": len(wheels), "files": 0, "modules": 0, "skipped": 0}
    with ProcessPoolExecutor(jobs) as pool:
        pending: dict[Future[object], str] = {
            pool.submit(unpack, str(w), str(out_dir / w.name)): "unpack" for w in wheels
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind = pending.pop(future)
                result = future.result()
                if kind == "unpack" and isinstance(result, tuple):
                    modules, files = result
                    counts["modules"] += len(modules)
                    counts["files"] += files
                    for batch in batches(modules):
                        pending[pool.submit(compile_batch, batch)] = "compile"
                elif isinstance(result, int):
                    counts["skipped"] += result
    counts["modules"] -= counts["skipped"]
    return counts


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(USAGE, file=sys.stderr)
        return 2
    jobs = int(argv[2]) if len(argv) == 3 else _usable_cpus()
    counts = run(Path(argv[0]), Path(argv[1]), jobs)
    print(json.dumps({**counts, "jobs": jobs, "seconds": time.perf_counter() - _T0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
