"""The embedded path: no daemon; this process locks, fills the store and assembles sys.path.

The warm path — a lockfile with an entry for this environment and every wheel ready in the
store — costs a requirements hash, a TOML parse and a few ``stat`` calls; nothing heavy
(aiohttp, zstandard, numpy) is imported.

A cold store is filled by a child process (``wheelcas prefetch``), never in this one: the
fetcher imports aiohttp, yarl, idna and friends, and a model that locks other versions of
those must not find ours already imported.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cas_daemon.errors import StoreError
from cas_daemon.store import Store, WheelRef
from loader import localpkgs
from loader.errors import MissingBundleError
from loader.localpkgs import LocalPackageDirs
from loader.syspath import SysPathPlan, plan_sys_path, scan_package_dir
from lockgen.lock import lock
from lockgen.lockfile import LockEntry

log = logging.getLogger("wheelcas.load")


def locked_entry(
    model_dir: Path, *, pip_args: Sequence[str] = (), python: str | None = None
) -> LockEntry:
    """The lockfile entry of ``python``'s environment (default: this one's), locking first
    when Carton's rules say so."""
    result = lock(model_dir, pip_args=pip_args, python=python)
    if result.action == "appended":
        markers = result.entry.markers
        log.warning(
            "%s had no lockfile entry for this environment (Python %s on %s); "
            "locked one and appended it.",
            model_dir,
            markers.get("python_version", "?"),
            markers.get("sys_platform", sys.platform),
        )
    elif result.action == "new":
        log.info("locked %s (%d wheels)", model_dir, len(result.entry.locked_deps))
    return result.entry


def wheel_refs(model_dir: Path, entry: LockEntry) -> list[WheelRef]:
    refs = [WheelRef.from_locked_dep(dep, model_dir) for dep in entry.locked_deps]
    missing = [r for r in refs if r.bundle_path is not None and not r.bundle_path.is_file()]
    if missing:
        names = ", ".join(str(r.bundle_path) for r in missing[:3])
        raise MissingBundleError(
            f"{len(missing)} bundled wheel(s) named by the lockfile are missing from the model "
            f"dir ({names}). Restore `.carton/bundled_wheels/` from where the model came from, "
            "or run `wheelcas lock` to rebuild them."
        )
    return refs


def fill_store_in_child(model_dir: Path, python: str = sys.executable) -> None:
    """Run ``wheelcas prefetch`` for ``python`` in a child process (see module doc).

    On a terminal the child's progress bar is shown as it runs; otherwise its output is kept
    and becomes the error message if it fails.
    """
    # -I: a `loader` module in the working dir must not shadow ours.
    argv = [sys.executable, "-I", "-m", "loader.cli", "--no-daemon", "prefetch", str(model_dir)]
    argv += ["--python", python]
    interactive = sys.stderr.isatty()
    done = subprocess.run(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=None if interactive else subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stderr or "").strip()
        message = output.rsplit("wheelcas: error: ", 1)[-1] if output else ""
        raise StoreError(
            message or f"filling the store failed (exit status {done.returncode}); see above."
        )


def package_dirs(
    model_dir: Path, entry: LockEntry, *, store: Store | None = None, python: str | None = None
) -> list[Path]:
    """The ready, unpacked package dirs of ``entry`` for ``python`` (default: this
    interpreter), in lock order."""
    store = store or Store.open_default()
    refs = wheel_refs(model_dir, entry)
    if python is None or python == sys.executable:
        python, cache_tag = sys.executable, sys.implementation.cache_tag or ""
    else:
        from lockgen.interpreters import interpreter_facts

        cache_tag = interpreter_facts(python)["cache_tag"]
    warm = store.warm_site_dirs(refs, cache_tag)
    if warm is None:
        log.info("filling the store for %s (%d wheels)", model_dir, len(refs))
        fill_store_in_child(model_dir, python)
        warm = store.warm_site_dirs(refs, cache_tag)
    if warm is None:
        raise StoreError(
            f"the store at {store.layout.root} has no ready tree for {model_dir} after "
            "filling it; run `wheelcas prefetch DIR -v` to see why."
        )
    return warm


def plan_for(
    model_dir: Path, dirs: Sequence[Path], local: LocalPackageDirs | None = None
) -> SysPathPlan:
    """The ``sys.path`` plan of a model: its code dir, its ``local`` package dirs (see
    :mod:`loader.localpkgs`; None: none), then the locked package ``dirs`` with their ``.pth``
    dirs.

    With local dirs, a top-level module that two of them, or one of them and a locked package,
    provide is a :class:`~loader.errors.ModelConfigError` naming both. Without (no bundled dir
    on disk, no external dirs) this costs one ``stat`` more than before.
    """
    packages = [scan_package_dir(d) for d in dirs]
    local_dirs: list[Path] = []
    if local is not None:
        local_dirs = localpkgs.importable_dirs(local)
        if local_dirs:
            localpkgs.check_local_clashes(model_dir, local, packages)
    return plan_sys_path(str(model_dir), packages, [str(d) for d in local_dirs])
