"""Bytecode for a published tree, and the read-only seal around it.

Trees are read-only once published, so a model's interpreter can never write ``__pycache__``
itself: the store compiles with the interpreter that asked (``py_compile`` run by *that*
Python, so the ``.pyc`` magic and cache tag are its own) and records it with a ``pyc-{tag}``
marker. The compiling itself is done by the persistent workers of
:mod:`cas_daemon.compile_pool`; this module says what a tree gets (everything, or everything
but its test dirs, whose turn comes later) and seals the tree around it.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from cas_daemon.compile_pool import CompilerPools, default_pools
from cas_daemon.errors import StoreError
from cas_daemon.layout import is_deferred_dir
from lockgen.interpreters import interpreter_facts

_FILE_MODE = 0o444
_EXEC_MODE = 0o555
_DIR_MODE = 0o555
_WRITABLE_DIR_MODE = 0o755


def interpreter_cache_tag(python: str) -> str:
    """The ``sys.implementation.cache_tag`` of ``python`` (e.g. ``cpython-311``).

    The running interpreter answers from memory; any other is asked once per path and the
    answer is cached for the life of the process (by :func:`interpreter_facts`).
    """
    tag: str | None
    if python == sys.executable:
        tag = sys.implementation.cache_tag
    else:
        tag = interpreter_facts(python).get("cache_tag")
    if not tag or tag == "None":
        raise StoreError(
            f"the interpreter {python} has no bytecode cache tag (sys.implementation.cache_tag "
            "is None), so the store cannot precompile for it. Use a CPython or PyPy build."
        )
    return tag


def compile_tree(
    site_dir: Path,
    python: str,
    *,
    display_dir: Path | None = None,
    pools: CompilerPools | None = None,
    defer: bool = False,
) -> int:
    """Write ``.pyc`` files for every module under ``site_dir`` using ``python``.

    ``defer``: leave out the modules under test dirs
    (:data:`cas_daemon.layout.DEFERRED_DIR_NAMES`), for :func:`complete_deferred` to compile
    later; returns how many were left out (0 without).

    Every ``*.py`` file (``__pycache__`` and symlinked directories left out, as compileall
    does) gets ``__pycache__/NAME.{cache_tag}.pyc``, written by ``py_compile`` in a worker of
    ``pools`` (the process-wide default pools if None): atomically, timestamp-checked.

    ``display_dir`` is the path tracebacks should show (the tree's final place, not the
    staging dir it is compiled in). Files that ``python`` cannot compile — Python 2 only
    modules, code for a newer Python — are skipped, as pip skips them at install time: they
    are only a problem if imported, and then the import reports them. An interpreter that does
    not run at all, or a disk that cannot take the bytecode, is a :class:`StoreError`.
    """
    return (pools if pools is not None else default_pools()).compile_tree(
        site_dir, python, display_dir=display_dir, defer=defer
    )


def deferred_roots(site_dir: Path) -> list[Path]:
    """The outermost test dirs under ``site_dir`` (symlinked dirs left out)."""
    roots: list[Path] = []
    stack = [os.fspath(site_dir)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False) or entry.name == "__pycache__":
                    continue
                if is_deferred_dir(entry.name):
                    roots.append(Path(entry.path))
                else:
                    stack.append(entry.path)
    return sorted(roots)


# --- sealing ------------------------------------------------------------------------------


def seal_read_only(tree: Path) -> None:
    """Make every file and directory under ``tree`` (and ``tree``) read-only.

    Executable files keep their execute bits (``0o555``): wheels ship scripts and shared
    libraries that must stay runnable. Symlinks are left alone; their targets are sealed
    where they live, if inside the tree.
    """
    for root, dirs, files in os.walk(tree, topdown=False):
        for name in files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                path.chmod(_EXEC_MODE if mode & 0o111 else _FILE_MODE)
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(_DIR_MODE)
    tree.chmod(_DIR_MODE)


def unseal_dirs(tree: Path) -> None:
    """Make the directories under ``tree`` writable again; files stay read-only.

    Enough for another interpreter's compile workers to add their own ``__pycache__``
    entries without any existing file becoming writable.
    """
    tree.chmod(_WRITABLE_DIR_MODE)
    for root, dirs, _files in os.walk(tree):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(_WRITABLE_DIR_MODE)


def compile_published(
    site_dir: Path,
    python: str,
    marker: Path,
    *,
    pools: CompilerPools | None = None,
    deferred_marker: Path | None = None,
) -> None:
    """Add ``python``'s ``.pyc`` to an already published, sealed tree, then its marker.

    The tree is never replaced (it may be on a running process's ``sys.path``): only its
    directories open up for the new ``__pycache__`` entries, and are sealed again even if
    compiling fails. The marker comes last, so it is only ever seen with complete bytecode.
    With ``deferred_marker``, test dirs are left for :func:`complete_deferred`, and that
    marker is written (before ``marker``) if there were any.
    """
    unseal_dirs(site_dir)
    try:
        deferred = compile_tree(site_dir, python, pools=pools, defer=deferred_marker is not None)
    finally:
        seal_read_only(site_dir)
    if deferred and deferred_marker is not None:
        write_marker(deferred_marker, python)
    write_marker(marker, python)


def complete_deferred(
    site_dir: Path,
    python: str,
    *,
    pools: CompilerPools | None = None,
    display_dir: Path | None = None,
) -> int:
    """Compile the test dirs that publishing left out, in a published tree; how many modules.

    Only the test dirs open up (their files stay read-only) and they are sealed again even
    if compiling fails; the rest of the tree, which loaders import, is never touched. The
    caller holds the tree's lock and removes the tree's deferred marker after.
    """
    roots = deferred_roots(site_dir)
    for root in roots:
        unseal_dirs(root)
    try:
        return (pools if pools is not None else default_pools()).compile_deferred(
            site_dir, python, display_dir=display_dir
        )
    finally:
        for root in roots:
            seal_read_only(root)


def write_marker(path: Path, python: str) -> None:
    # Its existence is what counts; the content only helps a human looking at the store.
    path.write_text(f"{python}\n", encoding="utf-8")


def remove_sealed(path: Path) -> None:
    """Delete a file, or a directory that may hold sealed (read-only) trees."""
    if path.is_dir() and not path.is_symlink():
        unseal_dirs(path)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
