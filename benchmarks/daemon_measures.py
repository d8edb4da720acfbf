"""One sample of each daemon figure: a function ``(Session) -> seconds`` (or bytes).

Every daemon is ``python -m cas_daemon`` in a child process (:mod:`benchmarks.daemon_proc`),
started untimed, healthy before anything is measured, and stopped when the run ends (or,
for a cold sample, right after it). The loader side is :mod:`benchmarks.daemon_worker`, a
fresh interpreter like every other measured process.

* ``daemon_warm`` / ``daemon_warm_lockfile``: per-call latency inside one client process
  (``WARM_CALLS`` calls after a first one), the sample being their median; the notes pool
  every call of every sample (p50, p99).
* ``daemon_warm_concurrent``: ``CONCURRENT_PROCESSES`` client processes released at once,
  ``CONCURRENT_CALLS`` calls each; the sample is the median over all their calls.
* ``daemon_cold``: a fresh daemon over an empty store; the sample is the client process,
  spawn to exit, whose one resolve returns when every tree is published with ``.pyc`` and
  the view is built.
* ``cold_floor``: not the daemon but the lower bound of ``daemon_cold`` on this machine: the
  bare work it implies (unpack the local wheels, compile what the daemon compiles before it
  answers) in :mod:`benchmarks.floor_worker`, the sample being that process, spawn to exit.
* ``view_import`` / ``view_import_appended``: the R40 imports with the daemon's view on
  ``sys.path``.
* ``store_bytes`` / ``venvs_bytes``: disk usage of a store holding three models, and of the
  three models' venvs.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks import disk_usage
from benchmarks import wheelcas_adapter as wc
from benchmarks.daemon_proc import DaemonProcess, start_daemon
from benchmarks.index_server import IndexInfo, IndexProcess
from benchmarks.measures import _checked, _import_argv
from benchmarks.procs import REPO_ROOT, isolated_env, run, timed_run, uv_binary
from benchmarks.report import format_bytes, format_seconds
from benchmarks.session import R40_IMPORTS, Session
from benchmarks.variants import Model, ensure_variants

WARM_CALLS = 200
CONCURRENT_PROCESSES = 32
CONCURRENT_CALLS = 25
CONCURRENT_TIMEOUT_S = 600.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.99: the value 99 % of the calls do not exceed)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _spread(values: list[float]) -> str:
    return (
        f"p50 {format_seconds(statistics.median(values))}, "
        f"p99 {format_seconds(percentile(values, 0.99))}, "
        f"max {format_seconds(max(values))} over {len(values)} calls"
    )


def _worker(argv: list[str | Path]) -> tuple[float, Any]:
    """Run the daemon worker; (whole-process wall seconds, its JSON answer)."""
    cmd: list[str | Path] = [sys.executable, "-m", "benchmarks.daemon_worker", *argv]
    result = timed_run(cmd, env=isolated_env(), cwd=REPO_ROOT)
    return result.seconds, json.loads(result.stdout.strip().splitlines()[-1])


# --- fixtures ---------------------------------------------------------------------------------


def _stop(daemon: DaemonProcess) -> None:
    daemon.stop()


def _keep_running(session: Session, daemon: DaemonProcess) -> Path:
    """Make ``daemon`` (whose store holds R40) the run's warm daemon; its socket."""
    session.on_close(lambda: _stop(daemon))
    session.once("daemon_warm_store", lambda: daemon.store)
    return session.once("daemon_warm_socket", lambda: daemon.socket_path)


def warm_daemon(session: Session) -> Path:
    """The socket of a daemon whose store holds R40 with its view (filled once, untimed)."""

    def make() -> Path:
        daemon = start_daemon(session.scratch("daemon-store-warm"))
        try:
            model = session.model_dir()
            result = wc.daemon_client(daemon.socket_path).resolve(model, wc.lock_entry(model))
            if result.view is None:
                raise RuntimeError(f"the daemon built no view for R40: {result.view_error}")
            wc.wait_for_deferred_bytecode(daemon.socket_path)
        except BaseException:
            daemon.stop()
            raise
        return _keep_running(session, daemon)

    return session.once("daemon_warm_socket", make)


def daemon_view(session: Session) -> Path:
    """The view the warm daemon returns for R40 (one directory with every wheel)."""

    def make() -> Path:
        model = session.model_dir()
        client = wc.daemon_client(warm_daemon(session))
        result = client.resolve(model, wc.lock_entry(model))
        if result.view is None:
            raise RuntimeError(f"the daemon built no view for R40: {result.view_error}")
        return result.view

    return session.once("daemon_view", make)


# --- warm -------------------------------------------------------------------------------------


def _warm_sample(session: Session, name: str, mode: str) -> float:
    socket_path = warm_daemon(session)
    _wall, answer = _worker(["warm", socket_path, session.model_dir(), str(WARM_CALLS), mode, "1"])
    calls = [float(s) for s in answer["calls"]]
    if answer["already_ready"] != answer["wheels"]:
        raise RuntimeError(f"a warm resolve found only {answer['already_ready']} trees ready")
    pooled = session.inner.setdefault(f"{name}:calls", [])
    pooled.extend(calls)
    firsts = session.inner.setdefault(f"{name}:first", [])
    firsts.append(float(answer["first"]))
    session.notes[name] = [
        f"every call of every sample: {_spread(pooled)}",
        "first call in a process (not in the figure): "
        f"median {format_seconds(statistics.median(firsts))}",
        "lease taken on every call, as the loader asks",
    ]
    return float(statistics.median(calls))


def daemon_warm(session: Session) -> float:
    """Median latency of ``resolve`` + sys.path plan and apply, lockfile already parsed."""
    return _warm_sample(session, "daemon_warm", "parsed")


def daemon_warm_lockfile(session: Session) -> float:
    """The same, with reading and parsing the lockfile inside every call."""
    return _warm_sample(session, "daemon_warm_lockfile", "lockfile")


def _read_ready(proc: subprocess.Popen[str], errors: IO[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.wait(30)
        errors.seek(0)
        raise RuntimeError(f"a concurrent worker failed before starting:\n{errors.read()[-3000:]}")


def daemon_warm_concurrent(session: Session) -> float:
    """Median latency over all calls of many client processes released at once."""
    socket_path, model = warm_daemon(session), session.model_dir()
    argv = [sys.executable, "-m", "benchmarks.daemon_worker", "conc"]
    argv += [str(socket_path), str(model), str(CONCURRENT_CALLS)]
    procs: list[subprocess.Popen[str]] = []
    answers: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conc-", dir=session.work) as scratch:
        logs = [(Path(scratch) / f"{i}.err").open("w+") for i in range(CONCURRENT_PROCESSES)]
        try:
            for log in logs:
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=REPO_ROOT,
                        env=isolated_env(),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                    )
                )
            for proc, log in zip(procs, logs, strict=True):
                _read_ready(proc, log)
            for proc in procs:  # the start signal: every worker is waiting for this line
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            for proc, log in zip(procs, logs, strict=True):
                assert proc.stdout is not None
                out = proc.stdout.read()
                if proc.wait(CONCURRENT_TIMEOUT_S) != 0:
                    log.seek(0)
                    raise RuntimeError(f"a concurrent worker failed:\n{log.read()[-3000:]}")
                answers.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()
            for log in logs:
                log.close()
    calls = [float(s) for a in answers for s in a["calls"]]
    span = max(float(a["ended"]) for a in answers) - min(float(a["began"]) for a in answers)
    throughput = session.inner.setdefault("daemon_warm_concurrent:throughput", [])
    throughput.append(len(calls) / span)
    pooled = session.inner.setdefault("daemon_warm_concurrent:calls", [])
    pooled.extend(calls)
    session.notes["daemon_warm_concurrent"] = [
        f"{CONCURRENT_PROCESSES} processes x {CONCURRENT_CALLS} calls, started together",
        f"every call of every sample: {_spread(pooled)}",
        f"throughput: median {statistics.median(throughput):.0f} resolves/s "
        f"({min(throughput):.0f} - {max(throughput):.0f})",
    ]
    return float(statistics.median(calls))


# --- cold -------------------------------------------------------------------------------------


def _verify_cold(session: Session, store: Path, answer: dict[str, Any]) -> None:
    pins = session.mirror.pins
    view = answer["view"]
    if view is None or not Path(view).is_dir():
        raise RuntimeError(f"the cold resolve returned no view: {answer['view_error']}")
    if len(answer["site_dirs"]) != len(pins) or answer["already_ready"] != 0:
        raise RuntimeError(
            f"cold resolve: {len(answer['site_dirs'])} site dirs for {len(pins)} wheels, "
            f"{answer['already_ready']} already ready in an empty store"
        )
    uncompiled = wc.trees_missing_pyc(store, [p.sha256 for p in pins], sys.implementation.cache_tag)
    if uncompiled:
        raise RuntimeError(f"trees without .pyc for {sys.implementation.cache_tag}: {uncompiled}")
    pyc = Path(view) / "numpy" / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
    if not pyc.is_file():
        raise RuntimeError(f"the view has no {pyc.relative_to(view)}")


def _cold_phases(session: Session, answer: dict[str, Any], deferred_s: float) -> None:
    """Notes: when (from the client's start) the resolve was sent, the last wheel's bytes
    arrived and the last tree was ready, the result came, and the daemon had compiled the
    test dirs it deferred (median over samples)."""
    events: dict[str, float] = answer["events"]
    marks = {
        "resolve sent": float(answer["asked"]),
        "last download byte": events.get("bytes"),
        "first tree ready": events.get("first_ready"),
        "last tree ready": events.get("ready"),
        "result (view built)": float(answer["seconds"]),
        "test dirs' bytecode done too": float(answer["seconds"]) + deferred_s,
    }
    for label, when in marks.items():
        if when is not None:
            session.inner.setdefault(f"daemon_cold:{label}", []).append(when)
    shown = [
        f"{label} {format_seconds(statistics.median(session.inner[f'daemon_cold:{label}']))}"
        for label in marks
        if f"daemon_cold:{label}" in session.inner
    ]
    session.notes["daemon_cold"] = [
        "daemon started (and healthy) before the client, untimed",
        "client timeline, medians from its start: " + ", ".join(shown),
    ]


def daemon_cold(session: Session) -> float:
    """A fresh daemon (started untimed) over an empty store; the client process's wall time
    from spawn to exit, its one resolve returning a view of every tree compiled to .pyc."""
    model = session.model_dir()
    store = session.scratch("daemon-store-cold")
    daemon = start_daemon(store)
    kept = False
    try:
        wall, answer = _worker(["cold", daemon.socket_path, model])
        # Not timed: the answer came before it. Waited for, so no later sample competes.
        deferred_s = wc.wait_for_deferred_bytecode(daemon.socket_path)
        _verify_cold(session, store, answer)
        session.inner_sample("daemon_cold", float(answer["seconds"]))
        _cold_phases(session, answer, deferred_s)
        if not session.has("daemon_warm_socket"):  # the first cold store becomes the warm one
            _keep_running(session, daemon)
            kept = True
    finally:
        if not kept:
            daemon.stop()
            session.discard(store)
    return wall


def cold_floor(session: Session) -> float:
    """The bare unpack and compile of the mirror's wheels (:mod:`benchmarks.floor_worker`):
    the whole process, spawn to exit, into an empty dir."""
    out = session.scratch("floor")
    try:
        wheels_dir = session.mirror.wheels_dir
        argv: list[str | Path] = [sys.executable, "-m", "benchmarks.floor_worker", wheels_dir, out]
        result = timed_run(argv, env=isolated_env(), cwd=REPO_ROOT)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        pins = session.mirror.pins
        if answer["wheels"] != len(pins) or answer["skipped"]:
            raise RuntimeError(f"the floor worker did not do the whole job: {answer}")
        numpy = next(out.glob("numpy-*.whl"), out) / "numpy"
        pyc = numpy / "__pycache__" / f"__init__.{sys.implementation.cache_tag}.pyc"
        if not pyc.is_file():
            raise RuntimeError(f"the floor worker wrote no {pyc}")
        session.inner_sample("cold_floor", float(answer["seconds"]))
        session.notes["cold_floor"] = [
            f"{answer['wheels']} wheels, {answer['files']} files written, {answer['modules']} "
            f"modules compiled, {answer['jobs']} processes; the best daemon_cold could reach "
            "here: read daemon_cold's ratio against this one's",
        ]
    finally:
        session.discard(out)
    return result.seconds


# --- imports from the view --------------------------------------------------------------------


def _view_import(session: Session, name: str, prelude: str) -> float:
    python = session.empty_venv() / "bin" / "python"
    view = daemon_view(session)
    session.once(f"{name}_checked", lambda: _checked(session, name, python, prelude, view))
    return timed_run(_import_argv(python, prelude, R40_IMPORTS), env=isolated_env()).seconds


def view_import(session: Session) -> float:
    """The R40 imports with the loader's plan over the view: model dir, then the view, both
    before the standard library (as ``loader.syspath.apply`` puts them)."""
    entries = wc.loader_sys_path(session.model_dir(), [daemon_view(session)])
    return _view_import(session, "view_import", wc.sys_path_prelude(entries, prepend=True))


def view_import_appended(session: Session) -> float:
    """The R40 imports with the view appended after the standard library."""
    prelude = wc.sys_path_prelude([daemon_view(session)], prepend=False)
    return _view_import(session, "view_import_appended", prelude)


# --- disk usage of three models ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ThreeModels:
    models: tuple[Model, ...]
    index: IndexInfo


def _three_models(session: Session) -> _ThreeModels:
    """The three models and a loopback index over their wheels, for this run (the index
    process is stopped when the run ends)."""
    found = session.resources.get("three_models")
    if isinstance(found, _ThreeModels):
        return found
    variants = ensure_variants(session.settings.cache, session.mirror, session.log)
    server = IndexProcess(variants.serve_dir)
    fixture = _ThreeModels(variants.models, server.__enter__())
    session.on_close(lambda: server.__exit__(None, None, None))
    session.resources["three_models"] = fixture
    return fixture


def _model_dirs(session: Session) -> list[Path]:
    three = _three_models(session)
    dirs: list[Path] = []
    for model in three.models:
        directory = session.work / "models3" / model.name
        if not directory.exists():
            deps = [(p.sha256, three.index.file_urls[p.filename]) for p in model.pins]
            wc.write_model_dir(directory, model.requirements_text(), deps)
        dirs.append(directory)
    return dirs


def _store_bytes_notes(session: Session, part: str, lines: list[str]) -> None:
    """The row's notes: the store's part, then the venvs' (whichever is measured first)."""
    session.notes[f"store_bytes:{part}"] = lines
    keys = ("store_bytes:store", "store_bytes:venvs")
    session.notes["store_bytes"] = [n for k in keys for n in session.notes.get(k, [])]


def store_bytes(session: Session) -> float:
    """Disk bytes of a daemon's store after it resolved the three models (views included),
    every inode counted once."""
    store = session.scratch("daemon-store-3models")
    daemon = start_daemon(store)
    wheels: list[int] = []
    try:
        client = wc.daemon_client(daemon.socket_path)
        for model_dir in _model_dirs(session):
            result = client.resolve(model_dir, wc.lock_entry(model_dir))
            if result.view is None:
                raise RuntimeError(f"no view for {model_dir.name}: {result.view_error}")
            wheels.append(result.wheels)
        wc.wait_for_deferred_bytecode(daemon.socket_path)  # every .pyc, as in the venvs
    finally:
        daemon.stop()
    try:
        parts = wc.store_parts(store)
        split = disk_usage.usage_by_part(store, parts)
        savings = wc.dedupe_savings(store)
        trees = dict(parts)["trees"]
        could = disk_usage.duplicate_bytes(trees, min_size=wc.min_dedupe_size())
    finally:
        session.discard(store)
    whole = disk_usage.total(split)
    models = _three_models(session).models
    unique = len({p.sha256 for m in models for p in m.pins})
    named = ", ".join(f"{m.name} ({n} wheels)" for m, n in zip(models, wheels, strict=True))
    shown = ", ".join(f"{label} {format_bytes(u.disk)}" for label, u in split.items())
    dedupe = "not available" if savings is None else format_bytes(savings)
    _store_bytes_notes(
        session,
        "store",
        [
            f"models: {named}; {unique} distinct wheels",
            f"store by part (disk): {shown}",
            f"store apparent size {format_bytes(whole.apparent)}, {whole.inodes} inodes",
            f"dedupe savings (cas_daemon.dedupe.dedupe_savings): {dedupe}",
            "identical files of at least MIN_DEDUPE_SIZE bytes in several trees (at most what "
            f"dedupe could save, its .py mtime rule aside): {format_bytes(could)}",
        ],
    )
    return float(whole.disk)


def venvs_bytes(session: Session) -> float:
    """Disk bytes of the three models' venvs: ``uv pip sync --link-mode=copy
    --compile-bytecode`` each, from one uv cache (not counted)."""
    three = _three_models(session)
    cache = session.scratch("uv-cache-3venvs")
    venvs: list[Path] = []
    seen: set[disk_usage.Inode] = set()
    sizes: list[disk_usage.Usage] = []
    try:
        env = isolated_env({"UV_CACHE_DIR": str(cache)})
        for model in three.models:
            pins = session.work / f"pins-{model.name}.txt"
            pins.write_text(model.pins_text(), encoding="utf-8")
            venv = session.new_uv_venv(cache)
            venvs.append(venv)
            argv: list[str | Path] = [uv_binary(), "pip", "sync", "-q"]
            argv += ["--python", venv / "bin" / "python", "--index-url", three.index.simple_url]
            run([*argv, "--link-mode=copy", "--compile-bytecode", pins], env=env)
        sizes = [disk_usage.usage(v, seen) for v in venvs]
    finally:
        for venv in venvs:
            session.discard(venv)
        session.discard(cache)
    whole = sum(sizes, disk_usage.Usage())
    each = ", ".join(
        f"{m.name} {format_bytes(u.disk)}" for m, u in zip(three.models, sizes, strict=True)
    )
    _store_bytes_notes(
        session, "venvs", [f"venvs (disk): {each}; apparent {format_bytes(whole.apparent)}"]
    )
    return float(whole.disk)
