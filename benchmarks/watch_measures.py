"""The daemon's watch and re-lock: ``watch_relock`` and its yardstick ``pip_resolve``.

* ``watch_relock``: a daemon (:mod:`benchmarks.daemon_proc`, started untimed, with
  ``[watch] settle = SETTLE_S`` and ``pip_args = ["--index-url", <loopback index>]``) watches
  an R40 model dir whose ``requirements.txt`` is R40's, as the mirror keeps it; the daemon's
  first check locks it and makes its wheels ready, untimed. A sample writes a one-line change
  to ``requirements.txt`` in place (one R40 name pinned to the version the mirror has, or the
  pin taken off again: the two texts alternate, so every sample is a real change that
  resolves to the same wheels), then polls ``GET /v1/watch`` every :data:`POLL_S` until
  the round that followed has ended. The sample is the event's ``ready_at`` (the daemon's
  ``time.time()``) less the ``time.time()`` taken right after the write returned: the save to
  "new lock written and every wheel ready". Checked: the event is ``relocked``, the
  lockfile on disk has the new text's hash and, for this interpreter, every R40 wheel.
* ``pip_resolve``: the pip resolution alone, exactly as ``lockgen.pip_report`` runs it
  (``python -m pip --disable-pip-version-check install --dry-run --ignore-installed --quiet
  --report FILE -r requirements.txt --index-url <loopback index>``, cwd the requirements'
  dir), with the interpreter the daemon locks with (its own: this one) and the same isolated
  environment; whole process timed. Its report is checked to name R40's pins.

Once per run, before the samples, the notes also get one change whose wheel is not in the
store yet: a second model dir watched by the same daemon, resolving against the index of the
``store_bytes`` variants (:mod:`benchmarks.variants`, through an ``--index-url`` line in its
requirements), goes from R40 to R40 with ``pandas==3.0.6``: the daemon fetches, unpacks and
compiles that pandas.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from benchmarks import wheelcas_adapter as wc
from benchmarks.daemon_measures import _three_models
from benchmarks.daemon_proc import DaemonProcess, WatchSettings, start_daemon
from benchmarks.mirror import Pin
from benchmarks.procs import isolated_env, timed_run
from benchmarks.report import format_seconds
from benchmarks.session import Session
from lockgen.lockfile import read_lockfile

#: The daemon's ``watch.settle``: small, so that the figure is mostly the work after it.
SETTLE_S = 0.2
#: How often the benchmark asks the daemon for its watches' events while it waits. The sample
#: is read from the daemon's own timestamps, so this only decides when the benchmark notices
#: the end; every 20 ms, the polls themselves (a connection and a request each, both sides on
#: the same 2 cores as pip and the index) made the figure about 5 % slower.
POLL_S = 0.25
#: The R40 name whose line changes (pinned to the mirror's version, or not).
CHANGED_NAME = "pandas"
#: The variant whose pandas is not R40's, for the note on a change that fetches a wheel.
FETCH_VARIANT = "r40-pandas-3.0.6"
FIRST_LOCK_TIMEOUT_S = 900.0  # the first check makes R40 ready in an empty store
RELOCK_TIMEOUT_S = 300.0
_REQ_NAME = re.compile(r"[\s\[<>=!~;@]")
#: The phases of a round, as (label, start field, end field) of its event; "write" is the
#: benchmark's own time.time() right after the write returned.
PHASES = (
    ("write → detected", "write", "detected_at"),
    ("detected → settled", "detected_at", "settled_at"),
    ("settled → lock written", "settled_at", "lock_written_at"),
    ("lock written → ready", "lock_written_at", "ready_at"),
)


@dataclass(slots=True)
class _Watched:
    daemon: DaemonProcess
    model_dir: Path
    #: R40's requirements as the mirror keeps them, and the same with one line changed.
    texts: tuple[str, str]
    #: Changes written so far (the next one writes ``texts[(turn + 1) % 2]``).
    turn: int = 0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _line_name(line: str) -> str:
    return canonicalize_name(_REQ_NAME.split(line.strip(), maxsplit=1)[0])


def _with_pin(text: str, pin: Pin) -> str:
    """``text`` with the requirement line of ``pin``'s project replaced by ``name==version``."""
    lines = text.splitlines(keepends=True)
    wanted = canonicalize_name(pin.name)
    for i, line in enumerate(lines):
        requirement = line.strip() and not line.lstrip().startswith(("#", "-"))
        if requirement and _line_name(line) == wanted:
            lines[i] = f"{pin.name}=={pin.version}\n"
            return "".join(lines)
    raise RuntimeError(f"no requirement line for {pin.name} in:\n{text}")


def _changed_pin(session: Session) -> Pin:
    pins = {canonicalize_name(p.name): p for p in session.mirror.pins}
    requested = [canonicalize_name(r) for r in session.mirror.requested]
    for name in (canonicalize_name(CHANGED_NAME), *requested):
        if name in requested and name in pins:
            return pins[name]
    raise RuntimeError("no requested R40 name has a pinned wheel to change")


def r40_texts(session: Session) -> tuple[str, str]:
    """R40's requirements.txt, and the same with one line pinned to the mirror's version."""
    original = session.mirror.requirements_path.read_text(encoding="utf-8")
    return original, _with_pin(original, _changed_pin(session))


# --- the daemon and its events --------------------------------------------------------------


def _watch_state(daemon: DaemonProcess, model_dir: Path) -> dict[str, Any]:
    for state in wc.daemon_client(daemon.socket_path).watches():
        if state["model_dir"] == str(model_dir):
            return state
    raise RuntimeError(f"the daemon does not watch {model_dir}")


def _wait(daemon: DaemonProcess, model_dir: Path, since: float, timeout: float) -> dict[str, Any]:
    """The first event of ``model_dir`` that ended after ``since`` (a ``time.time()``),
    polling every :data:`POLL_S`."""
    deadline = time.monotonic() + timeout
    while True:
        for event in _watch_state(daemon, model_dir)["events"]:
            if float(event["ended_at"]) >= since:
                return dict(event)
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no watch event for {model_dir} in {timeout:.0f} s:\n{daemon.log_tail()}"
            )
        time.sleep(POLL_S)


def _wait_idle(daemon: DaemonProcess, model_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _watch_state(daemon, model_dir)["state"] != "idle":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the watch of {model_dir} never went idle:\n{daemon.log_tail()}")
        time.sleep(POLL_S)


def _check_relocked(
    event: dict[str, Any], model_dir: Path, text: str, pins: tuple[Pin, ...]
) -> None:
    """The round re-locked ``text``: the event says so, and so does the lockfile on disk."""
    if event["kind"] != "relocked":
        raise RuntimeError(f"the round after the change was {event['kind']}: {event}")
    if event["lock_written_at"] is None or event["ready_at"] is None:
        raise RuntimeError(f"a relocked event without its times: {event}")
    expected = _sha256(text)
    if event["requirements_sha256"] != expected:
        raise RuntimeError(f"the round locked {event['requirements_sha256']}, not {expected}")
    lockfile = read_lockfile(model_dir)
    if lockfile is None or lockfile.orig_deps_hash != expected:
        found = None if lockfile is None else lockfile.orig_deps_hash
        raise RuntimeError(f"the lockfile on disk is for {found}, not the new {expected}")
    deps = wc.lock_entry(model_dir).locked_deps
    if sorted(d.sha256 for d in deps) != sorted(p.sha256 for p in pins):
        raise RuntimeError(f"the new lock has {len(deps)} wheels, not the {len(pins)} expected")
    if int(event["wheels"]) != len(pins):
        raise RuntimeError(f"{event['wheels']} wheels made ready, not {len(pins)}")


def _watch_first(daemon: DaemonProcess, model_dir: Path, text: str, pins: tuple[Pin, ...]) -> None:
    """Watch ``model_dir`` (its requirements.txt ``text``, no lockfile yet) and wait for the
    daemon's first check to lock it and make it ready."""
    since = time.time()
    wc.daemon_client(daemon.socket_path).watch(model_dir)
    event = _wait(daemon, model_dir, since, FIRST_LOCK_TIMEOUT_S)
    _check_relocked(event, model_dir, text, pins)
    if event["interpreters"] != [sys.executable]:
        raise RuntimeError(
            f"the daemon locked with {event['interpreters']}, pip_resolve runs {sys.executable}"
        )


def _change(
    daemon: DaemonProcess, model_dir: Path, text: str, pins: tuple[Pin, ...]
) -> tuple[float, dict[str, Any]]:
    """Write ``text`` over requirements.txt in place; (the time right after the write, the
    round's event), once the round is over and checked."""
    _wait_idle(daemon, model_dir, RELOCK_TIMEOUT_S)
    requirements = model_dir / "requirements.txt"
    since = time.time()
    requirements.write_text(text, encoding="utf-8")
    written = time.time()
    event = _wait(daemon, model_dir, since, RELOCK_TIMEOUT_S)
    _check_relocked(event, model_dir, text, pins)
    return written, event


def _phases(written: float, event: dict[str, Any]) -> dict[str, float]:
    times = {"write": written, **{k: v for k, v in event.items() if k.endswith("_at")}}
    return {label: float(times[end]) - float(times[start]) for label, start, end in PHASES}


def _stop(daemon: DaemonProcess) -> None:
    daemon.stop()


def _watched(session: Session) -> _Watched:
    """The run's watching daemon and R40 model dir, locked and ready (made once, untimed)."""
    found = session.resources.get("watched")
    if isinstance(found, _Watched):
        return found
    texts = r40_texts(session)
    model_dir = session.scratch("watch").resolve() / "model"
    model_dir.mkdir()
    (model_dir / "requirements.txt").write_text(texts[0], encoding="utf-8")
    pip_args = ("--index-url", session.index.simple_url)
    store = session.scratch("daemon-store-watch")
    daemon = start_daemon(store, watch=WatchSettings(settle=SETTLE_S, pip_args=pip_args))
    session.on_close(lambda: _stop(daemon))
    _watch_first(daemon, model_dir, texts[0], session.mirror.pins)
    wc.wait_for_deferred_bytecode(daemon.socket_path)  # no sample shares the CPU with it
    watched = _Watched(daemon, model_dir, texts)
    session.resources["watched"] = watched
    session.notes["watch_relock:fetch"] = _fetch_note(session, daemon)
    wc.wait_for_deferred_bytecode(daemon.socket_path)
    return watched


def _fetch_note(session: Session, daemon: DaemonProcess) -> list[str]:
    """One change whose new wheel is not in the store yet (untimed for the figure; a note)."""
    try:
        three = _three_models(session)
        variant = next(m for m in three.models if m.name == FETCH_VARIANT)
        r40 = {p.filename for p in session.mirror.pins}
        (new,) = [p for p in variant.pins if p.filename not in r40]
        model_dir = session.scratch("watch-fetch").resolve() / "model"
        model_dir.mkdir()
        before = f"--index-url {three.index.simple_url}\n" + r40_texts(session)[0]
        (model_dir / "requirements.txt").write_text(before, encoding="utf-8")
        _watch_first(daemon, model_dir, before, session.mirror.pins)
        written, event = _change(daemon, model_dir, _with_pin(before, new), variant.pins)
        wc.daemon_client(daemon.socket_path).unwatch(model_dir)
    except Exception as exc:  # the note is optional: say why it is missing
        return [f"a change that fetches a wheel: not measured ({exc!r})"[:300]]
    phases = ", ".join(f"{k} {format_seconds(v)}" for k, v in _phases(written, event).items())
    total = float(event["ready_at"]) - written
    return [
        f"one change that fetches a wheel ({new.name} -> {new.version}, {new.size / 1e6:.1f} MB, "
        f"not in the store; once, before the samples): {format_seconds(total)} ({phases})"
    ]


# --- the figure and its yardstick -----------------------------------------------------------


def _notes(session: Session) -> None:
    mine = session.inner.get("watch_relock:sample", [])
    theirs = session.inner.get("watch_relock:pip", [])
    change = " <-> ".join(_changed_lines(session))
    notes = [
        f"watch.settle = {SETTLE_S:g} s; the change: {change}; times are the daemon's event "
        f"timestamps (polled every {POLL_S:g} s)"
    ]
    if mine:
        median = statistics.median(mine)
        spans = ", ".join(
            f"{label} {format_seconds(statistics.median(session.inner[f'watch_relock:{label}']))}"
            for label, _start, _end in PHASES
        )
        notes.append(f"medians: {spans}")
        less = median - SETTLE_S
        ratio = f", ratio {less / statistics.median(theirs):.2f}" if theirs else ""
        notes.append(f"less the settle: median {format_seconds(less)}{ratio}")
    session.notes["watch_relock"] = [*notes, *session.notes.get("watch_relock:fetch", [])]


def _changed_lines(session: Session) -> tuple[str, str]:
    pin = _changed_pin(session)
    return pin.name, f"{pin.name}=={pin.version}"


def watch_relock(session: Session) -> float:
    """From a one-line save of a watched dir's requirements.txt to the new lock written and
    every wheel ready (the daemon's ``ready_at``), the daemon already running."""
    watched = _watched(session)
    watched.turn += 1
    text = watched.texts[watched.turn % 2]
    written, event = _change(watched.daemon, watched.model_dir, text, session.mirror.pins)
    for label, seconds in _phases(written, event).items():
        session.inner_sample(f"watch_relock:{label}", seconds)
    value = float(event["ready_at"]) - written
    session.inner_sample("watch_relock:sample", value)
    _notes(session)
    return value


def _resolve_argv(requirements: Path, report: Path, index_url: str) -> list[str | Path]:
    """``lockgen.pip_report.resolve_requirements``'s pip command (run_pip adds the flag)."""
    argv: list[str | Path] = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    argv += ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", report]
    return [*argv, "-r", requirements, "--index-url", index_url]


def _check_report(session: Session, report: Path) -> None:
    data = json.loads(report.read_text(encoding="utf-8"))
    found = sorted(
        (canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"])
        for i in data["install"]
    )
    expected = sorted((canonicalize_name(p.name), p.version) for p in session.mirror.pins)
    if found != expected:
        raise RuntimeError(f"pip resolved {len(found)} distributions, not R40's {len(expected)}")


def _pip_once(session: Session, text: str) -> float:
    with tempfile.TemporaryDirectory(prefix="pip-resolve.", dir=session.work) as scratch:
        requirements, report = Path(scratch) / "requirements.txt", Path(scratch) / "report.json"
        requirements.write_text(text, encoding="utf-8")
        argv = _resolve_argv(requirements, report, session.index.simple_url)
        seconds = timed_run(argv, env=isolated_env(), cwd=Path(scratch)).seconds
        _check_report(session, report)
    return seconds


def pip_resolve(session: Session) -> float:
    """The pip resolution of the changed requirements alone, as the lock runs it."""
    texts = r40_texts(session)
    done = session.inner.setdefault("watch_relock:pip", [])
    if "pip_resolve_warm" not in session.resources:  # one untimed run first (page cache)
        _pip_once(session, texts[1])
        session.resources["pip_resolve_warm"] = True
    seconds = _pip_once(session, texts[(len(done) + 1) % 2])
    done.append(seconds)
    _notes(session)
    return seconds
