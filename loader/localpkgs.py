"""A model's local package dirs: its bundled packages dir and its external package dirs.

Their contents are importable as top-level modules, after the model's code dir and before the
locked packages (Truss's ``bundled_packages_dir`` and ``external_package_dirs``), in the
model's process and in its child processes (they are in ``PYTHONPATH`` too). With
``keep_external_dir_names`` each external dir is importable under its own name instead
(``/repo/libs/common`` -> ``import common``): a *link dir* of one symlink per external dir
goes on ``sys.path`` in their place, so that their siblings stay hidden.

A top-level module that two of these dirs provide, or one of them and a locked wheel, is an
error at load that names both, never a silent shadowing (Truss users met that with
``common`` and ``shared``). The check costs nothing for a model without local packages: one
``stat`` of the bundled dir.

A model with external dirs is *scattered*; :mod:`loader.gather` makes it self-contained.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loader.conflicts import Provider, check_provider_clashes, provided_modules
from loader.errors import ModelConfigError
from loader.options import (
    BUNDLED_PACKAGES_DIR,
    EXTERNAL_PACKAGE_DIRS,
    KEEP_EXTERNAL_DIR_NAMES,
    LocalPackageOptions,
    RunnerOptions,
    canonical_bundled_dir,
)
from loader.syspath import PackageDir

#: Link dirs live beside the store's versioned layout (``<root>/v1/``), not inside it: they
#: are this user's, small, and no store process (GC, fsck) needs to know about them.
LINKS_DIR = "links"
_KEY_CHARS = 16


@dataclass(frozen=True, slots=True)
class LocalPackageDirs:
    """Where a model's local packages are, resolved and checked.

    ``bundled`` is absolute and inside the model dir; it need not exist (the default one is
    optional). ``external`` are absolute, in the order given, and exist.
    """

    bundled: Path
    external: tuple[Path, ...]
    keep_external_names: bool = False


def local_package_dirs(
    model_dir: Path, options: RunnerOptions | LocalPackageOptions
) -> LocalPackageDirs:
    """Resolve the options against ``model_dir``; a missing external dir is an error.

    So is an external dir inside the model dir (it belongs in the bundled dir), one that
    contains the model dir (the model would be importable as a package of itself, and
    gathering would copy the model into itself), and, with ``keep_external_dir_names``, two
    external dirs of one name or a name that is not importable.
    """
    model_dir = model_dir.absolute()
    real_model_dir = model_dir.resolve()
    bundled = _bundled_dir(model_dir, options)
    external: list[Path] = []
    for given in options.external_package_dirs:
        path = (model_dir / given).resolve()
        if not path.is_dir():
            raise ModelConfigError(
                f"external package dir {given!r} (runner option `{EXTERNAL_PACKAGE_DIRS}`) is "
                f"not a directory: {path}. Create it, or correct the option (relative paths are "
                "relative to the model dir)."
            )
        if path.is_relative_to(real_model_dir):
            raise ModelConfigError(
                f"external package dir {given!r} is inside the model dir; put it in "
                f"`{options.bundled_packages_dir}/` (runner option `{BUNDLED_PACKAGES_DIR}`) "
                "instead."
            )
        if real_model_dir.is_relative_to(path):
            raise ModelConfigError(
                f"external package dir {given!r} ({path}) holds the model dir {model_dir}: the "
                "model would be importable as a package of itself, and gathering would copy "
                "the model into itself. Point the option at the dirs with the packages instead."
            )
        if path not in external:
            external.append(path)
    if options.keep_external_dir_names:
        _check_own_names(external)
    return LocalPackageDirs(bundled, tuple(external), options.keep_external_dir_names)


def _check_own_names(external: Sequence[Path]) -> None:
    by_name: dict[str, Path] = {}
    for path in external:
        if not path.name.isidentifier():
            raise ModelConfigError(
                f"external package dir {path} cannot be imported under its own name "
                f"(runner option `{KEEP_EXTERNAL_DIR_NAMES}`): {path.name!r} is not a Python "
                "identifier. Rename the dir, or turn the option off and import its contents."
            )
        other = by_name.setdefault(path.name, path)
        if other != path:
            raise ModelConfigError(
                f"external package dirs {other} and {path} have one name, {path.name!r}: with "
                f"`{KEEP_EXTERNAL_DIR_NAMES}` each is imported under its own name, so only one "
                "could be. Rename one of them, or turn the option off."
            )


def _bundled_dir(model_dir: Path, options: RunnerOptions | LocalPackageOptions) -> Path:
    # Parsed options are canonical already; options built directly are checked here too.
    return model_dir / canonical_bundled_dir(options.bundled_packages_dir)


# --- the link dir of keep_external_dir_names -----------------------------------------------


def link_dir_path(root: Path, targets: Sequence[Path]) -> Path:
    """Where the link dir of ``targets`` lives: ``<root>/links/<key>``, the key a digest of
    the sorted target paths, so that every model naming the same dirs shares one."""
    text = "\0".join(sorted(str(t) for t in targets))
    key = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:_KEY_CHARS]
    return root / LINKS_DIR / key


def _is_link_dir_of(path: Path, targets: Sequence[Path]) -> bool:
    """Whether ``path`` holds exactly one symlink per target, named after it."""
    try:
        names = {entry.name for entry in path.iterdir()}
        return names == {t.name for t in targets} and all(
            (path / t.name).readlink() == t for t in targets
        )
    except OSError:
        return False


def ensure_link_dir(targets: Sequence[Path], root: Path | None = None) -> Path:
    """The link dir of ``targets`` (absolute dirs of distinct names), made if missing or wrong.

    Built in a temp dir beside it and renamed into place, so that a reader never sees a
    partial one; a twin process that wins the race leaves the same content. ``root``: the
    store root (default: :func:`cas_daemon.layout.default_store_root`).
    """
    if root is None:
        from cas_daemon.layout import default_store_root

        root = default_store_root()
    final = link_dir_path(root, targets)
    if _is_link_dir_of(final, targets):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for target in targets:
            (staging / target.name).symlink_to(target, target_is_directory=True)
        staging.chmod(0o755)
        try:
            staging.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not _is_link_dir_of(final, targets):  # damaged: move it aside, then replace it
                trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
                final.rename(trash / "old")
                staging.rename(final)
                shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# --- sys.path entries and the clash check ---------------------------------------------------


def importable_dirs(local: LocalPackageDirs, *, store_root: Path | None = None) -> list[Path]:
    """The dirs to put on ``sys.path`` between the code dir and the locked packages: the
    bundled dir if it exists, then each external dir in order (or their link dir)."""
    dirs = [local.bundled] if local.bundled.is_dir() else []
    if local.external and local.keep_external_names:
        dirs.append(ensure_link_dir(local.external, store_root))
    else:
        dirs.extend(local.external)
    return dirs


def local_providers(model_dir: Path, local: LocalPackageDirs) -> list[Provider]:
    """What the bundled and external dirs provide, in ``sys.path`` order (lists each dir)."""
    providers: list[Provider] = []
    if local.bundled.is_dir():
        shown = os.path.relpath(local.bundled, model_dir.absolute())
        providers.append(
            Provider(
                "bundled",
                str(local.bundled),
                shown,
                f"bundled packages dir of {model_dir}",
                provided_modules(str(local.bundled)),
            )
        )
    for path in local.external:
        if local.keep_external_names:
            providers.append(
                Provider(
                    "external",
                    str(path),
                    str(path.parent),
                    "external package dir, imported under its own name",
                    {path.name: path.name + "/"},
                    entries_in=str(path.parent),
                )
            )
        else:
            modules = provided_modules(str(path))
            providers.append(
                Provider("external", str(path), str(path), "external package dir", modules)
            )
    return providers


def locked_providers(packages: Sequence[PackageDir]) -> list[Provider]:
    """What the locked package dirs provide, each followed by the dirs its ``.pth`` files add."""
    providers: list[Provider] = []
    for package in packages:
        providers.append(
            Provider("locked", package.path, package.path, "", provided_modules(package.path))
        )
        for pth in package.pth_files:
            providers.extend(
                Provider("locked", extra, extra, "", provided_modules(extra), pth_file=pth.path)
                for extra in pth.dirs
            )
    return providers


def check_local_clashes(
    model_dir: Path, local: LocalPackageDirs, packages: Sequence[PackageDir]
) -> None:
    """Raise :class:`ModelConfigError` if a top-level module is provided twice by the local
    dirs and the locked ``packages`` (see the module doc). Nothing to list, and no cost beyond
    one ``stat``, when the model has neither a bundled dir nor external dirs."""
    providers = local_providers(model_dir, local)
    if not providers:
        return
    check_provider_clashes([*providers, *locked_providers(packages)])
