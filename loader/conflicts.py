"""Refusing an in-process load whose locked packages clash with modules already imported.

A module is imported once per process: if the host already imported ``numpy`` from its own
site-packages, a model that locks another numpy would silently run with the host's. So an
in-process load (``isolated=False``) first lists the top-level modules each package dir
provides and refuses the load when one of them is in ``sys.modules`` from somewhere else.
The pure parts (:func:`module_names`, :func:`find_conflicts`) take their inputs as values.

The same listing serves a second check (see :mod:`loader.localpkgs`): two dirs of one model's
``sys.path`` that provide the same top-level module. Only the first one's would ever be
imported, so :func:`find_provider_clashes` reports such pairs instead of letting the later one
be shadowed silently; :func:`distribution_owning` names the locked wheel behind an entry of a
package dir (a tree of one wheel, or the daemon's view of many), for the message.

Two *namespace portions* (PEP 420: dirs of one name without an ``__init__``) are not a clash:
Python merges them into one package, each importable. So a provider's listing stays one
``scandir``, and only a name that two providers give, and both as a dir, is looked at further
(:func:`is_namespace_portion`); the locked dirs, large views of many wheels, are never
``stat``-ed entry by entry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loader.errors import ModelConfigError

_IGNORED_SUFFIXES = (".dist-info", ".data", ".egg-info")
_EXTENSION_SUFFIXES = (".so", ".pyd")
#: What makes a dir a regular package: ``__init__`` with one of these, or ``__init__.*.so``.
_INIT_SUFFIXES = (".py", ".pyc", *_EXTENSION_SUFFIXES)


def is_namespace_portion(directory: str) -> bool:
    """Whether ``directory`` (a module's dir) is a PEP 420 namespace portion: it holds no
    ``__init__.py``, ``__init__.pyc`` nor ``__init__[.TAG].so``/``.pyd``. One ``stat`` for the
    usual ``__init__.py``; the dir is listed only when that is missing. An unreadable dir
    counts as a regular package, so that a clash is reported rather than hidden."""
    try:
        os.stat(os.path.join(directory, "__init__.py"))  # noqa: PTH116, PTH118
    except FileNotFoundError:
        pass
    except OSError:
        return False
    else:
        return False
    try:
        with os.scandir(directory) as entries:
            return not any(
                e.name.startswith("__init__.") and e.name.endswith(_INIT_SUFFIXES) for e in entries
            )
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Conflict:
    module: str
    host_location: str
    package_dir: str


def module_entries(listing: Iterable[tuple[str, bool]]) -> dict[str, str]:
    """Each top-level module name a package dir provides, with the entry that provides it
    (a dir with a trailing ``/``: ``common/``, ``common.py``), from ``(name, is_dir)`` entries.

    A dir (a regular or a namespace package: which one is decided only where two providers
    meet, see :func:`find_provider_clashes`), ``NAME.py``, ``NAME.so`` or ``NAME.*.so``
    provide ``NAME``; ``*.dist-info``, ``*.data`` and ``__pycache__`` provide nothing. When
    two entries provide one name (``x/`` and ``x.py``), the first in sorted order is named.
    """
    entries: dict[str, str] = {}
    for entry, is_dir in sorted(listing):
        if is_dir:
            if entry.endswith(_IGNORED_SUFFIXES) or entry == "__pycache__":
                continue
            name, shown = entry, entry + "/"
        elif entry.endswith(".py"):
            name, shown = entry[:-3], entry
        elif entry.endswith(_EXTENSION_SUFFIXES):
            name, shown = entry.split(".", 1)[0], entry
        else:
            continue
        if name.isidentifier():
            entries.setdefault(name, shown)
    return entries


def module_names(listing: Iterable[tuple[str, bool]]) -> set[str]:
    """The top-level module names a package dir provides (see :func:`module_entries`)."""
    return set(module_entries(listing))


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
    """Whether ``location`` is in ``directory``, as given or with symlinks resolved: a module
    imported through a dir of symlinks (a link dir of external package dirs, a view in
    ``symlink`` mode) resolves to outside it but was still imported from it."""
    if Path(os.path.abspath(location)).is_relative_to(os.path.abspath(directory)):  # noqa: PTH100
        return True
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


# --- two dirs of one sys.path that provide the same top-level module ----------------------

ProviderKind = Literal["bundled", "external", "locked"]


@dataclass(frozen=True, slots=True)
class Provider:
    """One dir of a model's ``sys.path`` and the top-level modules it provides.

    ``modules`` maps each module name to its entry (see :func:`module_entries`). ``shown`` is
    how messages name the dir (the bundled dir relative to the model dir, so that the user
    recognizes ``packages/common/``) and ``label`` what the dir is. A locked dir that a
    ``.pth`` file added has ``pth_file``: the wheel that shipped that file is its provider.
    ``entries_in``: the dir that holds the entries, when it is not ``path`` (an external dir
    imported under its own name is an entry of its parent).
    """

    kind: ProviderKind
    path: str
    shown: str
    label: str
    modules: Mapping[str, str] = field(default_factory=dict)
    pth_file: str | None = None
    entries_in: str | None = None

    def entry(self, module: str) -> str:
        """``packages/common/``: the provider's dir as shown, and the module's entry in it."""
        return f"{self.shown.rstrip('/')}/{self.modules[module]}"

    def is_namespace_portion(self, module: str) -> bool:
        """Whether the provider gives ``module`` as a namespace portion (a dir without an
        ``__init__``); touches the disk, so it is asked only for a name given twice."""
        entry = self.modules[module]
        if not entry.endswith("/"):
            return False
        base = self.path if self.entries_in is None else self.entries_in
        return is_namespace_portion(os.path.join(base, entry.rstrip("/")))  # noqa: PTH118


@dataclass(frozen=True, slots=True)
class ProviderClash:
    """``module`` is provided by ``first`` (earlier on ``sys.path``: imported) and ``other``."""

    module: str
    first: Provider
    other: Provider


def find_provider_clashes(providers: Sequence[Provider]) -> list[ProviderClash]:
    """Every pair of ``providers`` (in ``sys.path`` order) that give one top-level module.

    Two locked dirs are not a clash here: a lock entry's wheels are checked against each other
    by the store when it merges them (``cas_daemon.views``), and a ``.pth`` dir may well
    repeat what its own wheel provides. A dir listed twice counts once. Two namespace
    portions are not a clash either (Python merges them; ``docs/`` or ``data/`` in two repos
    are such portions too); a regular package or a module against anything is. Whether a dir
    is a portion is asked of the disk only here, for a name that two providers give.
    """
    clashes: list[ProviderClash] = []
    seen: dict[str, list[Provider]] = {}
    paths: set[str] = set()
    portions: dict[tuple[str, str], bool] = {}

    def portion(provider: Provider, module: str) -> bool:
        key = (provider.path, module)
        if key not in portions:
            portions[key] = provider.is_namespace_portion(module)
        return portions[key]

    for provider in providers:
        if provider.path in paths:
            continue
        paths.add(provider.path)
        for module in sorted(provider.modules):
            earlier = seen.setdefault(module, [])
            clashes.extend(
                ProviderClash(module, first, provider)
                for first in earlier
                if not (first.kind == "locked" and provider.kind == "locked")
                and not (portion(first, module) and portion(provider, module))
            )
            earlier.append(provider)
    return clashes


def _describe(provider: Provider, module: str, owners: Mapping[tuple[str, str], str]) -> str:
    where = provider.entry(module)
    if provider.kind != "locked":
        return f"{where} ({provider.label})"
    owner = owners.get((provider.path, module))
    via = f", added by {Path(provider.pth_file).name}" if provider.pth_file else ""
    if owner is None:
        return f"a locked package ({where}{via})"
    return f"the locked wheel {owner} ({where}{via})"


def provider_clash_message(
    clashes: Sequence[ProviderClash], owners: Mapping[tuple[str, str], str]
) -> str:
    """The error for ``clashes``; ``owners`` maps ``(locked dir, module)`` to ``NAME VERSION``
    of the wheel that provides it (see :func:`locked_owners`)."""
    lines = [
        "two providers of one top-level module on the model's sys.path: only the first would "
        "ever be imported, and the other silently shadowed:"
    ]
    lines += [
        f"  `{c.module}`: {_describe(c.first, c.module, owners)} and "
        f"{_describe(c.other, c.module, owners)}"
        for c in clashes
    ]
    local_only = all(c.first.kind != "locked" and c.other.kind != "locked" for c in clashes)
    lines.append(
        "Rename or remove one of the two (a local module can move into a package of its own name)."
        if local_only
        else "Rename or remove one of the two: rename the local module (or move it into a "
        "package of its own name), or drop the requirement that provides the other from "
        "requirements.txt and re-lock (`wheelcas lock DIR`)."
    )
    return "\n".join(lines)


def _metadata_name_version(dist_info: str) -> str:
    """``NAME VERSION`` from a dist-info's ``METADATA``; from its dir name if unreadable."""
    name = version = ""
    try:
        with open(os.path.join(dist_info, "METADATA"), encoding="utf-8") as f:  # noqa: PTH118
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key == "Name" and not name:
                    name = value.strip()
                elif key == "Version" and not version:
                    version = value.strip()
    except (OSError, UnicodeDecodeError):
        pass
    if not (name and version):
        stem = Path(dist_info).name.removesuffix(".dist-info")
        name, _, version = stem.partition("-")
    return f"{name} {version}".strip()


def _record_lists(dist_info: str, top: str) -> bool:
    import csv

    try:
        with open(os.path.join(dist_info, "RECORD"), encoding="utf-8", newline="") as f:  # noqa: PTH118
            return any(row and row[0].split("/", 1)[0] == top for row in csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def distribution_owning(site_dir: str, entry: str) -> str | None:
    """``NAME VERSION`` of the wheel in ``site_dir`` whose ``RECORD`` lists the top-level
    ``entry`` (``common/``, ``common.py``, ``x.pth``), or None.

    ``site_dir`` is one wheel's tree or the daemon's view of many; a tree with a single
    dist-info and no usable ``RECORD`` is that wheel's. Reads files: call it once a clash is
    found, never on a normal load.
    """
    top = entry.rstrip("/")
    dist_infos = sorted(
        os.path.join(site_dir, name)  # noqa: PTH118
        for name, is_dir in _listing(site_dir)
        if is_dir and name.endswith(".dist-info")
    )
    for dist_info in dist_infos:
        if _record_lists(dist_info, top):
            return _metadata_name_version(dist_info)
    if len(dist_infos) == 1:
        return _metadata_name_version(dist_infos[0])
    return None


def locked_owners(clashes: Sequence[ProviderClash]) -> dict[tuple[str, str], str]:
    """``(locked dir, module)`` -> ``NAME VERSION`` for the locked sides of ``clashes``."""
    owners: dict[tuple[str, str], str] = {}
    for clash in clashes:
        for provider in (clash.first, clash.other):
            key = (provider.path, clash.module)
            if provider.kind != "locked" or key in owners:
                continue
            if provider.pth_file is not None:
                pth = Path(provider.pth_file)
                owner = distribution_owning(str(pth.parent), pth.name)
            else:
                owner = distribution_owning(provider.path, provider.modules[clash.module])
            if owner is not None:
                owners[key] = owner
    return owners


def check_provider_clashes(providers: Sequence[Provider]) -> None:
    """Raise :class:`ModelConfigError` naming both sides of every clash of ``providers``."""
    clashes = find_provider_clashes(providers)
    if clashes:
        raise ModelConfigError(provider_clash_message(clashes, locked_owners(clashes)))


def provided_modules(directory: str) -> dict[str, str]:
    """:func:`module_entries` of a dir on disk (one ``scandir``; nothing if unreadable)."""
    return module_entries(_listing(directory))
