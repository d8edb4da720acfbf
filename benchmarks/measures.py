"""One sample of each thing measured: a function ``(Session) -> seconds``.

Yardsticks (uv, pip) and wheelcas alike are timed as whole processes, spawn to exit, so that
interpreter start-up and imports count on both sides. Set-up and clean-up around a sample
(making an empty venv, deleting a store) are never inside the timed span.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import wheelcas_adapter as wc
from benchmarks.procs import REPO_ROOT, isolated_env, run, timed_run
from benchmarks.session import CHECKED_MODULES, R40_IMPORTS, Session

# --- yardsticks -----------------------------------------------------------------------------


def uv_cold(session: Session) -> float:
    """``uv pip sync --compile-bytecode`` of the pins into a new venv, fresh uv cache."""
    venv, cache = session.new_uv_venv(), session.scratch("uv-cache-cold")
    try:
        env = isolated_env({"UV_CACHE_DIR": str(cache)})
        return timed_run(session.uv_sync_argv(venv, compile_bytecode=True), env=env).seconds
    finally:
        session.discard(venv)
        session.discard(cache)


def uv_warm(session: Session) -> float:
    """``uv pip sync`` (no bytecode) of the pins into a new venv, from a warm uv cache."""
    cache = session.warm_uv_cache()
    venv = session.new_uv_venv(cache)
    try:
        env = isolated_env({"UV_CACHE_DIR": str(cache)})
        return timed_run(session.uv_sync_argv(venv, compile_bytecode=False), env=env).seconds
    finally:
        session.discard(venv)


def _import_argv(python: Path, prelude: str, code: str) -> list[str | Path]:
    # -s: no user site-packages. The environment has no PYTHON* variable but
    # PYTHONDONTWRITEBYTECODE=1, so nothing measured can write .pyc.
    return [python, "-s", "-c", prelude + code]


def _check_origins(name: str, session: Session, python: Path, prelude: str, root: Path) -> None:
    """Once per layout: every checked module must come from ``root``, not from elsewhere."""
    code = f"{R40_IMPORTS}; import sys, json; print(json.dumps("
    code += f"{{m: sys.modules[m].__file__ for m in {list(CHECKED_MODULES)!r}}}))"
    out = run(_import_argv(python, prelude, code), env=isolated_env())
    files: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    strays = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(root)}
    if strays:
        raise RuntimeError(f"{name}: modules imported from outside {root}: {strays}")


def pip_import(session: Session) -> float:
    """The R40 imports in a fresh interpreter of the pip-installed venv (all .pyc present)."""
    venv = session.pip_venv()
    python = venv / "bin" / "python"
    session.once("pip_import_checked", lambda: _checked(session, "pip_import", python, "", venv))
    return timed_run(_import_argv(python, "", R40_IMPORTS), env=isolated_env()).seconds


def _checked(session: Session, name: str, python: Path, prelude: str, root: Path) -> Path:
    _check_origins(name, session, python, prelude, root.resolve())
    return root


# --- wheelcas -------------------------------------------------------------------------------


def _worker(argv: list[str | Path], env_extra: dict[str, str] | None = None) -> tuple[float, Any]:
    """Run the worker; (whole-process wall seconds, its JSON answer)."""
    cmd: list[str | Path] = [sys.executable, "-m", "benchmarks.wheelcas_worker", *argv]
    result = timed_run(cmd, env=isolated_env(env_extra), cwd=REPO_ROOT)
    return result.seconds, json.loads(result.stdout.strip().splitlines()[-1])


def _verify_ready(session: Session, store: Path, site_dirs: list[str]) -> None:
    pins = session.mirror.pins
    if len(site_dirs) != len(pins):
        raise RuntimeError(f"ready returned {len(site_dirs)} site dirs for {len(pins)} wheels")
    absent = [d for d in site_dirs if not Path(d).is_dir()]
    if absent:
        raise RuntimeError(f"ready returned site dirs that do not exist: {absent[:3]}")
    uncompiled = wc.trees_missing_pyc(store, [p.sha256 for p in pins], sys.implementation.cache_tag)
    if uncompiled:
        raise RuntimeError(f"trees without .pyc for {sys.implementation.cache_tag}: {uncompiled}")


def cold_ready(session: Session) -> float:
    """Lockfile to every tree ready (.pyc compiled, sealed) into a fresh, empty store."""
    model = session.model_dir()
    store = session.scratch("store-cold")
    keep = not session.has("warm_store")
    try:
        wall, answer = _worker(["ready", model, store], {"WHEELCAS_HOME": str(store)})
        _verify_ready(session, store, answer["site_dirs"])
        session.inner_sample("cold_ready", float(answer["seconds"]))
    except BaseException:
        session.discard(store)
        raise
    if keep:  # the first cold store becomes this run's warm store
        session.once("warm_store", lambda: store)
    else:
        session.discard(store)
    return wall


def warm_store(session: Session) -> Path:
    def make() -> Path:
        store = session.scratch("store-warm")
        _wall, answer = _worker(
            ["ready", session.model_dir(), store], {"WHEELCAS_HOME": str(store)}
        )
        _verify_ready(session, store, answer["site_dirs"])
        return store

    return session.once("warm_store", make)


def warm_ready(session: Session) -> float:
    """Read the lockfile and get the site dirs from an already warm store (stat calls only)."""
    store = warm_store(session)
    wall, answer = _worker(["warm", session.model_dir(), store], {"WHEELCAS_HOME": str(store)})
    if answer["site_dirs"] is None:
        raise RuntimeError("warm_site_dirs returned None for a store made ready this run")
    session.inner_sample("warm_ready", float(answer["seconds"]))
    return wall


def store_site_dirs(session: Session) -> list[Path]:
    store = warm_store(session)
    found = wc.warm_site_dirs(session.model_dir(), store)
    if found is None:
        raise RuntimeError("warm_site_dirs returned None for a store made ready this run")
    return found


def _store_import(session: Session, name: str, prelude: str) -> float:
    python = session.empty_venv() / "bin" / "python"
    store = warm_store(session)
    session.once(f"{name}_checked", lambda: _checked(session, name, python, prelude, store))
    return timed_run(_import_argv(python, prelude, R40_IMPORTS), env=isolated_env()).seconds


def store_import(session: Session) -> float:
    """The R40 imports with the loader's sys.path plan: model dir, then one entry per tree,
    all before the standard library (as ``loader.syspath.apply`` does)."""
    entries = wc.loader_sys_path(session.model_dir(), store_site_dirs(session))
    return _store_import(session, "import", wc.sys_path_prelude(entries, prepend=True))


def store_import_appended(session: Session) -> float:
    """The R40 imports with one sys.path entry per tree appended after the standard library."""
    site_dirs = store_site_dirs(session)
    return _store_import(session, "import_appended", wc.sys_path_prelude(site_dirs, prepend=False))


LOCK_REPEAT = 20


def _lock_sample(session: Session) -> dict[str, Any]:
    _wall, answer = _worker(["lock", session.model_dir(), str(LOCK_REPEAT)])
    if answer["actions"] != ["unchanged"]:
        raise RuntimeError(f"lock() of a locked model dir did {answer['actions']}")
    if answer["popen"]:
        raise RuntimeError(f"lock() of a locked model dir started processes: {answer['popen']}")
    return dict(answer)


def lock_unchanged(session: Session) -> float:
    """``lock()`` of an already-locked model dir, in a process that has called it before."""
    answer = _lock_sample(session)
    for seconds in answer["steady"]:
        session.inner_sample("lock_unchanged", float(seconds))
    return float(statistics.median(answer["steady"]))


def lock_unchanged_fresh(session: Session) -> float:
    """``import lockgen.lock`` plus the first ``lock()`` call, in a fresh process."""
    return float(_lock_sample(session)["first"])
