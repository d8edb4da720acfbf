"""What goes on ``sys.path`` and ``PYTHONPATH``: planned by a pure function, applied in one place.

Order: the model's code dir, then its local package dirs (the bundled packages dir, then each
external package dir or their link dir: see :mod:`loader.localpkgs`), then each locked package
dir in lockfile order, each followed by the dirs its ``.pth`` files name (as ``site`` would
add them, but next to their package rather than after the interpreter's own site-packages).
``import`` lines of ``.pth`` files run after ``sys.path`` is in place, as ``site`` runs them.
Local dirs are the model's own code: their ``.pth`` files are not read, as ``site`` does not
read those of ``PYTHONPATH`` dirs.

The same entries are prepended to ``PYTHONPATH`` so that child processes of the model
(``subprocess``, ``multiprocessing`` with spawn) import the same packages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PthFile:
    """One ``.pth`` file: the dirs it adds (already checked to exist) and its import lines."""

    path: str
    dirs: tuple[str, ...]
    imports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PackageDir:
    path: str
    pth_files: tuple[PthFile, ...] = ()


@dataclass(frozen=True, slots=True)
class SysPathPlan:
    entries: tuple[str, ...]
    pth_imports: tuple[tuple[str, str], ...]  # (.pth file, its import line)


def read_pth_file(pth: Path) -> PthFile:
    """Parse a ``.pth`` file with ``site``'s rules (blank and ``#`` lines skipped)."""
    dirs: list[str] = []
    imports: list[str] = []
    try:
        text = pth.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return PthFile(str(pth), (), ())
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(("import ", "import\t")):
            imports.append(line)
            continue
        candidate = os.path.normpath(os.path.join(pth.parent, line.rstrip()))
        if os.path.exists(candidate):
            dirs.append(candidate)
    return PthFile(str(pth), tuple(dirs), tuple(imports))


def scan_package_dir(path: Path) -> PackageDir:
    """A package dir with its ``.pth`` files, in ``site``'s (sorted) order."""
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".pth") and not n.startswith("."))
    except OSError:
        names = []
    return PackageDir(str(path), tuple(read_pth_file(path / n) for n in names))


def plan_sys_path(
    code_dir: str, packages: Sequence[PackageDir], local_dirs: Sequence[str] = ()
) -> SysPathPlan:
    """The entries to put first on ``sys.path``, without duplicates, and the imports to run.

    ``local_dirs`` (the model's bundled and external package dirs, in order) come between the
    code dir and the locked ``packages``: the model's own code wins over what it locks, and a
    module both provide is refused before this is applied (:mod:`loader.localpkgs`).
    """
    entries: list[str] = []
    imports: list[tuple[str, str]] = []

    def add(entry: str) -> None:
        if entry not in entries:
            entries.append(entry)

    add(code_dir)
    for local in local_dirs:
        add(local)
    for package in packages:
        add(package.path)
        for pth in package.pth_files:
            for extra in pth.dirs:
                add(extra)
            imports.extend((pth.path, line) for line in pth.imports)
    return SysPathPlan(tuple(entries), tuple(imports))


def pythonpath_value(entries: Sequence[str], inherited: str | None) -> str:
    """``PYTHONPATH`` with ``entries`` first and the inherited value's other entries after."""
    rest = [p for p in (inherited or "").split(os.pathsep) if p and p not in entries]
    return os.pathsep.join([*entries, *rest])


def apply(
    plan: SysPathPlan,
    *,
    path: MutableSequence[str] | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> None:
    """The one place that changes ``sys.path`` and ``PYTHONPATH`` for a model."""
    target = sys.path if path is None else path
    env = os.environ if environ is None else environ
    for entry in plan.entries:
        while entry in target:
            target.remove(entry)
    target[0:0] = plan.entries
    env["PYTHONPATH"] = pythonpath_value(plan.entries, env.get("PYTHONPATH"))
    for pth, line in plan.pth_imports:
        try:
            exec(line, {"__name__": "__wheelcas_pth__", "__file__": pth})  # noqa: S102 - .pth semantics
        except Exception as exc:  # site.py reports and goes on; so do we
            print(f"wheelcas: error in {pth}: {line!r}: {exc!r}", file=sys.stderr)
