"""Refusing an in-process load whose locked packages clash with modules already imported.

A module is imported once per process: if the host already imported ``numpy`` from its own
site-packages, a model that locks another numpy would silently run with the host's. So an
in-process load (``isolated=False``) first lists the top-level modules each package dir
provides and refuses the load when one of them is in ``sys.modules`` from somewhere else.
The pure parts (:func:`module_names`, :func:`find_conflicts`) take their inputs as values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loader.errors import ModelConfigError

_IGNORED_SUFFIXES = (".dist-info", ".data", ".egg-info")
_EXTENSION_SUFFIXES = (".so", ".pyd")


@dataclass(frozen=True, slots=True)
class Conflict:
    module: str
    host_location: str
    package_dir: str


def module_names(listing: Iterable[tuple[str, bool]]) -> set[str]:
    """The top-level module names a package dir provides, from ``(name, is_dir)`` entries:
    a dir (a regular or a namespace package), ``NAME.py``, ``NAME.so`` or ``NAME.*.so``.
    ``*.dist-info``, ``*.data`` and ``__pycache__`` provide nothing."""
    names: set[str] = set()
    for entry, is_dir in listing:
        if is_dir:
            if entry.endswith(_IGNORED_SUFFIXES) or entry == "__pycache__":
                continue
            name = entry
        elif entry.endswith(".py"):
            name = entry[:-3]
        elif entry.endswith(_EXTENSION_SUFFIXES):
            name = entry.split(".", 1)[0]
        else:
            continue
        if name.isidentifier():
            names.add(name)
    return names


def _locations(module: object) -> list[str]:
    file = getattr(module, "__file__", None)
    if isinstance(file, str):
        return [file]
    path = getattr(module, "__path__", None)
    try:
        return [p for p in path if isinstance(p, str)] if path is not None else []
    except TypeError:
        return []


def _under(location: str, directory: str) -> bool:
    return Path(os.path.realpath(location)).is_relative_to(os.path.realpath(directory))


def find_conflicts(
    provided: Mapping[str, Iterable[str]], modules: Mapping[str, object]
) -> list[Conflict]:
    """Each module a package dir (``provided``: dir -> its module names) provides that is in
    ``modules`` (a ``sys.modules``) from outside that dir. A module without a file (built in)
    is not a conflict."""
    conflicts: list[Conflict] = []
    for directory, names in provided.items():
        for name in sorted(names):
            module = modules.get(name)
            if module is None:
                continue
            locations = _locations(module)
            if locations and not any(_under(loc, directory) for loc in locations):
                conflicts.append(Conflict(name, locations[0], directory))
    return conflicts


def conflict_message(conflicts: Sequence[Conflict]) -> str:
    lines = [
        "cannot load this model in this process: it locks modules that this process has "
        "already imported from elsewhere, and a module is imported only once per process:"
    ]
    lines += [
        f"  {c.module}: this process has it from {c.host_location}; the model's is in "
        f"{c.package_dir}"
        for c in conflicts
    ]
    lines.append(
        "Load the model isolated (the default, isolated=True: a worker process of its own), "
        "or load it before importing those modules."
    )
    return "\n".join(lines)


def _listing(directory: str) -> list[tuple[str, bool]]:
    try:
        with os.scandir(directory) as entries:
            return [(e.name, e.is_dir()) for e in entries]
    except OSError:
        return []


def check_no_conflicts(package_dirs: Sequence[str], modules: Mapping[str, object]) -> None:
    """Raise :class:`ModelConfigError` naming every conflict (see the module doc)."""
    provided = {d: module_names(_listing(d)) for d in package_dirs}
    conflicts = find_conflicts(provided, modules)
    if conflicts:
        raise ModelConfigError(conflict_message(conflicts))
