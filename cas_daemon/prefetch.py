"""Warm the store ahead of the first load: every wheel that model dirs or lockfiles need.

A target is a model dir (its ``.carton/carton.lock`` is read) or a lockfile path; bundled
wheels resolve against the lockfile's model dir, which is ``lockfile.parent.parent`` since a
lockfile always lives at ``{model_dir}/.carton/carton.lock``. Each lockfile contributes the
entry matching the interpreter the wheels are readied for, not the one running this code.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cas_daemon.progress import ProgressCallback
from cas_daemon.store import Store, WheelRef
from lockgen.errors import LockfileError, WheelcasError
from lockgen.lockfile import LOCKFILE_RELPATH, WRITTEN_MARKERS, LockFile, parse_lockfile


class MissingLockfileError(WheelcasError):
    """A prefetch target that is neither a locked model dir nor a lockfile."""

    def __init__(self, target: Path, problem: str) -> None:
        self.target = target
        super().__init__(f"{target}: {problem}")


class NoMatchingEntryError(WheelcasError):
    """A lockfile with no entry for the interpreter the wheels are wanted for."""

    def __init__(
        self,
        lockfile: Path,
        environment: Mapping[str, str],
        available: Sequence[Mapping[str, str]],
        python: str,
    ) -> None:
        self.lockfile = lockfile
        self.environment = dict(environment)
        self.available = [dict(markers) for markers in available]
        model_dir = lockfile.parent.parent
        listed = "; ".join(_describe(m) for m in available) or "none"
        super().__init__(
            f"{lockfile} has no entry for {python} ({_describe(environment)}). Its entries are "
            f"for: {listed}. Run `wheelcas lock {model_dir} --python {python}` to add one."
        )


@dataclass(frozen=True, slots=True)
class PrefetchReport:
    """What a prefetch did: ``wheels`` distinct wheels, ``already_ready`` of them warm."""

    lockfiles: tuple[Path, ...]
    wheels: int
    already_ready: int
    site_dirs: tuple[Path, ...]

    @property
    def readied(self) -> int:
        """Wheels this prefetch fetched, unpacked or compiled."""
        return self.wheels - self.already_ready


def _describe(markers: Mapping[str, str]) -> str:
    shown = [k for k in WRITTEN_MARKERS if k in markers] or sorted(markers)
    return ", ".join(f"{k}={markers[k]}" for k in shown) or "any environment"


def locate_lockfile(target: Path) -> tuple[Path, Path]:
    """``(lockfile, model_dir)`` for a model dir or a lockfile path."""
    if target.is_dir():
        lockfile = target / LOCKFILE_RELPATH
        if not lockfile.is_file():
            raise MissingLockfileError(
                target, f"has no {LOCKFILE_RELPATH}; run `wheelcas lock {target}` first"
            )
        return lockfile, target
    if target.is_file():
        return target, target.absolute().parent.parent
    raise MissingLockfileError(target, "no such model dir or lockfile")


def read_lockfile_at(path: Path) -> LockFile:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LockfileError(str(path), "is not UTF-8 text") from None
    return parse_lockfile(text, str(path))


def target_environment(python: str) -> dict[str, str]:
    """The PEP 508 markers lock entries are matched against for ``python``."""
    if python == sys.executable:
        from lockgen.lockfile import current_environment

        return current_environment()
    from lockgen.interpreters import interpreter_environment

    return interpreter_environment(python)


def collect_refs(targets: Sequence[Path], python: str = sys.executable) -> list[WheelRef]:
    """The wheels ``targets`` lock for ``python``, each store key once, in first-seen order.

    Every target is checked before anything is fetched, so a bad one fails fast.
    """
    environment = target_environment(python)
    refs: dict[str, WheelRef] = {}
    for target in targets:
        path, model_dir = locate_lockfile(target)
        lockfile = read_lockfile_at(path)
        entry = lockfile.find_entry(environment)
        if entry is None:
            raise NoMatchingEntryError(
                path, environment, [e.markers for e in lockfile.entries], python
            )
        for dep in entry.locked_deps:
            ref = WheelRef.from_locked_dep(dep, model_dir)
            refs.setdefault(ref.sha256, ref)  # by store key: two models' bundles may differ
    return list(refs.values())


def prefetch(
    targets: Sequence[Path],
    *,
    store: Store | None = None,
    python: str = sys.executable,
    progress: ProgressCallback | None = None,
) -> PrefetchReport:
    """Make every wheel of ``targets`` ready for ``python`` in the store.

    ``progress`` gets the store's events; to size a bar first, call :func:`collect_refs`.
    """
    from cas_daemon.precompile import interpreter_cache_tag

    store = Store.open_default() if store is None else store
    lockfiles = tuple(locate_lockfile(t)[0] for t in targets)
    refs = collect_refs(targets, python)
    cache_tag = interpreter_cache_tag(python)
    already = sum(1 for ref in refs if store.warm_site_dirs([ref], cache_tag) is not None)
    site_dirs = store.ready(refs, python=python, progress=progress)
    return PrefetchReport(
        lockfiles=lockfiles,
        wheels=len(refs),
        already_ready=already,
        site_dirs=tuple(site_dirs),
    )
