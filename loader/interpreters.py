"""Which interpreter runs a model's worker: the highest version in its required range.

Candidates, in this order (the first of equal versions wins):

1. the paths in ``$WHEELCAS_PYTHONS`` (``os.pathsep``-separated), and any given by the caller;
   then those in ``python.interpreters`` of the daemon's configuration file (the file
   ``wheelcas daemon`` reads by default, see :func:`cas_daemon.config.default_config_path`);
2. the running interpreter;
3. every ``python3.X`` on ``PATH``, except pyenv's shims (a shim runs only the versions pyenv
   has selected for the current directory, so what it runs depends on where we stand);
4. pyenv's real binaries, ``$PYENV_ROOT/versions/*/bin/python3.X`` (default ``~/.pyenv``).

Probing an interpreter is a subprocess (~20 ms), so it is done lazily: a name like
``python3.12`` already tells the minor version, and only candidates whose minor version can
satisfy the range are probed, highest minor first, stopping at the first minor that has a
satisfying interpreter. Results are cached in memory by path, mtime and size.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loader.semver import Version, VersionReq
from lockgen.errors import InterpreterError

PYTHONS_ENV = "WHEELCAS_PYTHONS"
CONFIG_SOURCE = "python.interpreters"
#: The worker's bootstrap and tensor code keep to Python 3.8 (see ``loader/tensors.py``).
MIN_WORKER_VERSION: Version = (3, 8, 0)
_NAME = re.compile(r"^python(3)\.(\d+)$")
_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3], sys.implementation.cache_tag)"
_PROBE_TIMEOUT_S = 20.0

Minor = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Candidate:
    path: str
    source: str  # where it was found: "WHEELCAS_PYTHONS", CONFIG_SOURCE, "current", "PATH"...
    minor: Minor | None  # what its name says, before probing


@dataclass(frozen=True, slots=True)
class Interpreter:
    path: str
    version: Version
    cache_tag: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


Probe = Callable[[str], Interpreter | None]


class NoInterpreterError(InterpreterError):
    """No candidate interpreter satisfies a model's ``required_framework_version``."""


# --- pure ----------------------------------------------------------------------------------


def minor_from_name(path: str) -> Minor | None:
    match = _NAME.match(os.path.basename(path))  # noqa: PTH119
    return (int(match[1]), int(match[2])) if match else None


def minor_may_match(requirement: VersionReq, minor: Minor) -> bool:
    """Whether some ``minor.patch`` release satisfies every comparator of ``requirement``."""
    low: Version = (minor[0], minor[1], 0)
    high: Version = (minor[0], minor[1] + 1, 0)
    for version_range in requirement.ranges:
        low = max(low, version_range.low)
        high = min(high, version_range.high)
    return low < high


def dedupe(candidates: Iterable[Candidate], key: Callable[[str], str]) -> list[Candidate]:
    """The first candidate of each ``key`` (e.g. the real path), in order."""
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        identity = key(candidate.path)
        if identity not in seen:
            seen.add(identity)
            unique.append(candidate)
    return unique


def select(requirement: VersionReq, candidates: Sequence[Candidate], probe: Probe) -> Interpreter:
    """The highest satisfying version among ``candidates``; probes as few as it can."""
    named: dict[Minor, list[Candidate]] = {}
    unnamed: list[Candidate] = []
    for candidate in candidates:
        if candidate.minor is None:
            unnamed.append(candidate)
        elif minor_may_match(requirement, candidate.minor):
            named.setdefault(candidate.minor, []).append(candidate)

    def acceptable(found: Interpreter | None) -> bool:
        return (
            found is not None
            and found.version >= MIN_WORKER_VERSION
            and requirement.matches(found.version)
        )

    best: tuple[Version, int, Interpreter] | None = None
    order = {c.path: i for i, c in enumerate(candidates)}

    def consider(group: Iterable[Candidate]) -> None:
        nonlocal best
        for candidate in group:
            found = probe(candidate.path)
            if found is None or not acceptable(found):
                continue
            # highest version; among equal versions the earlier candidate
            rank = (found.version, -order[candidate.path], found)
            if best is None or rank[:2] > best[:2]:
                best = rank

    consider(unnamed)
    for minor in sorted(named, reverse=True):
        if best is not None and best[0][:2] > minor:
            break
        consider(named[minor])
    if best is not None:
        return best[2]
    listing = [(c, probe(c.path)) for c in candidates]
    raise NoInterpreterError(no_interpreter_message(requirement, listing))


def no_interpreter_message(
    requirement: VersionReq, listing: Sequence[tuple[Candidate, Interpreter | None]]
) -> str:
    lines = [
        f"no Python interpreter satisfies the model's required_framework_version "
        f"{requirement.text!r} (workers need Python "
        f"{'.'.join(map(str, MIN_WORKER_VERSION[:2]))} or newer). Candidates found:"
    ]
    for candidate, found in listing:
        version = found.version_text if found is not None else "does not run"
        lines.append(f"  {candidate.path} ({candidate.source}): {version}")
    if not listing:
        lines.append("  (none)")
    lines.append(
        f"Install a matching Python (e.g. `pyenv install`), or list its path in {PYTHONS_ENV} "
        f"(or in {CONFIG_SOURCE} of the daemon's configuration file)."
    )
    return "\n".join(lines)


# --- I/O: discovery and probing ------------------------------------------------------------


def discover(
    environ: Mapping[str, str] | None = None,
    *,
    extra: Sequence[str] = (),
    current: str | None = sys.executable,
) -> list[Candidate]:
    """Every candidate interpreter, in preference order, without duplicates."""
    env = os.environ if environ is None else environ
    found: list[Candidate] = []
    configured = [*extra, *(p for p in env.get(PYTHONS_ENV, "").split(os.pathsep) if p)]
    found += [Candidate(p, PYTHONS_ENV, minor_from_name(p)) for p in configured]
    found += [Candidate(p, CONFIG_SOURCE, minor_from_name(p)) for p in configured_in_file(env)]
    if current:
        found.append(Candidate(current, "current", sys.version_info[:2]))
    for directory in env.get("PATH", "").split(os.pathsep):
        if not directory or f"{os.sep}shims" in directory:
            continue
        found += [Candidate(p, "PATH", minor_from_name(p)) for p in _pythons_in(directory)]
    root = Path(env.get("PYENV_ROOT") or Path.home() / ".pyenv")
    try:
        versions = sorted((root / "versions").iterdir())
    except OSError:
        versions = []
    for version_dir in versions:
        found += [
            Candidate(p, "pyenv", minor_from_name(p)) for p in _pythons_in(str(version_dir / "bin"))
        ]
    return dedupe((c for c in found if os.access(c.path, os.X_OK)), _identity)


def configured_in_file(environ: Mapping[str, str]) -> list[str]:
    """``python.interpreters`` of the daemon's default configuration file, if there is one."""
    from cas_daemon.config import default_config_path, is_system_mode, load_config

    path = default_config_path(environ, system=is_system_mode(environ))
    if not path.is_file():
        return []
    return [str(p) for p in load_config(path, environ=environ).interpreters]


def _pythons_in(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)  # noqa: PTH208 - names, not paths
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names) if _NAME.match(n)]  # noqa: PTH118


def _identity(path: str) -> str:
    return os.path.realpath(path)


_probed: dict[tuple[str, int, int], Interpreter | None] = {}


def probe(path: str) -> Interpreter | None:
    """``path``'s version and cache tag; None if it does not run. Cached by mtime and size."""
    try:
        stat = os.stat(path)  # noqa: PTH116
    except OSError:
        return None
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _probed:
        _probed[key] = _run_probe(path)
    return _probed[key]


def _run_probe(path: str) -> Interpreter | None:
    if path == sys.executable:
        return Interpreter(path, sys.version_info[:3], sys.implementation.cache_tag or "")
    try:
        done = subprocess.run(
            [path, "-I", "-S", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) != 2:
        return None
    major, minor, micro = (int(p) for p in parts[0].split("."))
    return Interpreter(path, (major, minor, micro), parts[1])


def choose(requirement: VersionReq, *, extra: Sequence[str] = ()) -> Interpreter:
    """The interpreter that runs a model requiring ``requirement`` (see the module doc)."""
    return select(requirement, discover(extra=extra), probe)
