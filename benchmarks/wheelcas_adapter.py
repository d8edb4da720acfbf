"""Every call the benchmarks make into wheelcas, in one place.

The store and the locker are imported inside the functions that use them: the worker
processes pay only for what their figure needs (the warm path must not import aiohttp), and
:func:`missing` lets a figure be reported as skipped, with the reason, while a module it needs
is not there yet.

This module is imported by the measured worker processes (:mod:`benchmarks.wheelcas_worker`):
keep its top-level imports to the standard library and ``lockgen.lockfile``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen.lockfile import (
    LockedDep,
    LockEntry,
    LockFile,
    current_environment,
    entry_markers,
    read_lockfile,
    requirements_hash,
    sha256_hex,
    write_lockfile,
)

if TYPE_CHECKING:
    from cas_daemon.progress import ProgressCallback
    from cas_daemon.store import Store, WheelRef
    from loader.client import DaemonClient, ResolveResult

#: The modules each capability needs (the store's cold path imports the last three lazily).
_NEEDS: Mapping[str, tuple[str, ...]] = {
    "store": (
        "cas_daemon.store",
        "cas_daemon.fetch",
        "cas_daemon.unpack",
        "cas_daemon.precompile",
    ),
    "lock": ("lockgen.lock",),
    "loader": ("loader.syspath",),
    "daemon": ("cas_daemon.server", "cas_daemon.service", "loader.client", "loader.syspath"),
}


def missing(capability: str) -> list[str]:
    """The modules the capability needs that cannot be imported (empty: ready to measure)."""
    absent: list[str] = []
    for module_name in _NEEDS[capability]:
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            absent.append(f"{module_name} ({exc})")
    return absent


# --- lockfiles ------------------------------------------------------------------------------


def build_lockfile(model_dir: Path, deps: Sequence[tuple[str, str]]) -> LockFile:
    """A lockfile for ``model_dir``'s requirements.txt with one entry for this interpreter.

    ``deps`` are ``(sha256, url)`` pairs, in the order they go into the entry.
    """
    entry = LockEntry(
        markers=entry_markers(current_environment()),
        locked_deps=tuple(LockedDep(sha256=sha256_hex(sha), url=url) for sha, url in deps),
    )
    return LockFile(orig_deps_hash=requirements_hash(model_dir), entries=(entry,))


def write_model_dir(
    model_dir: Path, requirements_text: str, deps: Sequence[tuple[str, str]]
) -> None:
    """Make ``model_dir`` an already-locked model dir: requirements.txt plus a matching lock."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "requirements.txt").write_text(requirements_text, encoding="utf-8")
    write_lockfile(model_dir, build_lockfile(model_dir, deps))


def lock_entry(model_dir: Path) -> LockEntry:
    """Read and parse ``model_dir``'s lockfile; its entry for the running interpreter."""
    lockfile = read_lockfile(model_dir)
    if lockfile is None:
        raise RuntimeError(f"{model_dir} has no lockfile")
    entry = lockfile.find_entry(current_environment())
    if entry is None:
        raise RuntimeError(f"{model_dir}'s lockfile has no entry for this interpreter")
    return entry


def locked_deps(model_dir: Path) -> tuple[LockedDep, ...]:
    """The locked wheels of ``model_dir`` for the running interpreter (read from disk)."""
    return lock_entry(model_dir).locked_deps


# --- the store ------------------------------------------------------------------------------


def _store(store_root: Path) -> Store:
    from cas_daemon.layout import StoreLayout
    from cas_daemon.store import Store

    return Store(StoreLayout(store_root), max_parallel_downloads=8)


def _refs(model_dir: Path) -> list[WheelRef]:
    from cas_daemon.store import WheelRef

    refs: list[WheelRef] = []
    for dep in locked_deps(model_dir):
        refs.append(WheelRef.from_locked_dep(dep, model_dir))
    return refs


def ready(model_dir: Path, store_root: Path) -> list[Path]:
    """Cold or not: fetch, verify, unpack, precompile and seal every locked wheel."""
    return _store(store_root).ready(_refs(model_dir), python=sys.executable)


def warm_site_dirs(model_dir: Path, store_root: Path) -> list[Path] | None:
    """The warm path: the site dirs if every tree is ready for this interpreter, else None."""
    return _store(store_root).warm_site_dirs(_refs(model_dir), sys.implementation.cache_tag)


def trees_missing_pyc(store_root: Path, shas: Sequence[str], cache_tag: str) -> list[str]:
    """The sha256s whose tree lacks the ``pyc-{cache_tag}`` marker (empty: all compiled)."""
    from cas_daemon.layout import StoreLayout

    layout = StoreLayout(store_root)
    return [s for s in shas if not layout.pyc_marker(s, cache_tag).exists()]


def store_parts(store_root: Path) -> list[tuple[str, Path]]:
    """The store's parts whose disk usage is reported apart: (label, dir), in that order."""
    from cas_daemon.layout import StoreLayout

    layout = StoreLayout(store_root)
    return [
        ("blobs", layout.blobs_dir),
        ("trees", layout.trees_dir),
        ("views", layout.views_dir),
        ("dedupe index", layout.dedupe_dir),
    ]


def min_dedupe_size() -> int:
    """The smallest file ``cas_daemon.dedupe`` links (1 KiB if it names no such constant)."""
    try:
        from cas_daemon.dedupe import MIN_DEDUPE_SIZE
    except ImportError:
        return 1024
    return MIN_DEDUPE_SIZE


def dedupe_savings(store_root: Path) -> int | None:
    """``cas_daemon.dedupe.dedupe_savings`` of the store; None if that module lacks it."""
    from cas_daemon.layout import StoreLayout

    try:
        from cas_daemon.dedupe import dedupe_savings as savings
    except ImportError:
        return None
    return savings(StoreLayout(store_root))


# --- the daemon's client: what a loader does with a daemon -----------------------------------


def daemon_client(socket_path: Path) -> DaemonClient:
    from loader.client import DaemonClient

    return DaemonClient(socket_path)


def wait_for_deferred_bytecode(socket_path: Path, timeout: float = 300.0) -> float:
    """Wait until the daemon has compiled every test dir it deferred; the seconds waited.

    A daemon that defers (``store.defer_test_bytecode``, the default) answers a cold resolve
    before its trees' test dirs have ``.pyc`` and compiles them when idle: the benchmarks
    wait for that before measuring anything else, so that no later sample shares the CPU
    with it, and report how long it took.
    """
    import time

    client = daemon_client(socket_path)
    started = time.perf_counter()
    while client.status()["deferred_bytecode"]["pending_trees"]:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the daemon's deferred bytecode was not done in {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - started


def resolve_and_apply(
    client: DaemonClient,
    model_dir: Path,
    entry: LockEntry,
    *,
    lease: bool,
    path: MutableSequence[str],
    environ: MutableMapping[str, str],
    progress: ProgressCallback | None = None,
) -> ResolveResult:
    """Ask the daemon for ``entry``'s ready paths and apply the loader's ``sys.path`` plan to
    ``path`` and ``environ`` (throwaway copies: the calling process's own are left alone).

    The same steps as the loader's (``ready_package_dirs`` then ``plan_sys_path`` and
    ``apply``): the view (or site dirs), scanned for ``.pth`` files, after the model dir.
    """
    from loader.syspath import apply, plan_sys_path, scan_package_dir

    result = client.resolve(model_dir, entry, lease=lease, progress=progress)
    plan = plan_sys_path(str(model_dir), [scan_package_dir(p) for p in result.package_dirs])
    apply(plan, path=path, environ=environ)
    return result


# --- the locker -----------------------------------------------------------------------------


def lock_action(model_dir: Path) -> str:
    """``lock(model_dir)`` with the running interpreter; returns the result's ``action``."""
    from lockgen.lock import lock

    return lock(model_dir).action


# --- sys.path for the import figures ---------------------------------------------------------


def loader_sys_path(code_dir: Path, site_dirs: Sequence[Path]) -> list[str]:
    """The entries the loader puts first on ``sys.path`` (its own pure planning function)."""
    from loader.syspath import plan_sys_path, scan_package_dir

    plan = plan_sys_path(str(code_dir), [scan_package_dir(p) for p in site_dirs])
    if plan.pth_imports:
        raise RuntimeError(f"the import figure does not run .pth imports: {plan.pth_imports}")
    return list(plan.entries)


def sys_path_prelude(entries: Sequence[str | Path], *, prepend: bool) -> str:
    """Python source that puts ``entries`` on ``sys.path`` before the measured imports.

    ``prepend=True`` is what ``loader.syspath.apply`` does (entries before the standard
    library); ``prepend=False`` appends them, after the standard library, where a venv's
    site-packages sits.
    """
    listed = [str(p) for p in entries]
    if prepend:
        return f"import sys; sys.path[0:0] = {listed!r}; "
    return f"import sys; sys.path.extend({listed!r}); "
