"""Bytecode for a published tree, and the read-only seal around it.

Trees are read-only once published, so a model's interpreter can never write ``__pycache__``
itself: the store compiles with the interpreter that asked (``compileall`` of *that* Python,
so the ``.pyc`` magic and cache tag are its own) and records it with a ``pyc-{tag}`` marker.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from cas_daemon.errors import StoreError
from lockgen.interpreters import interpreter_facts

log = logging.getLogger(__name__)

# compileall prints this (since 3.x, still in 3.13) for each file the interpreter rejects.
_FILE_ERROR_MARK = "*** Error compiling"
_FILE_MODE = 0o444
_EXEC_MODE = 0o555
_DIR_MODE = 0o555
_WRITABLE_DIR_MODE = 0o755
# compileall's process pool costs ~0.4 s to start: worth it for numpy-sized trees only.
# Small wheels are compiled concurrently with each other by the store anyway.
PARALLEL_COMPILE_MIN_FILES = 256


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


def compile_tree(site_dir: Path, python: str, *, display_dir: Path | None = None) -> None:
    """Write ``.pyc`` files for every module under ``site_dir`` using ``python``.

    Runs ``python -I -m compileall -q -j N [-d display_dir] site_dir``, with ``-j 0`` (a
    process per CPU) for trees of at least :data:`PARALLEL_COMPILE_MIN_FILES` modules.

    ``display_dir`` is the path tracebacks should show (the tree's final place, not the
    staging dir it is compiled in). Files that ``python`` cannot compile — Python 2 only
    modules, code for a newer Python — are skipped, as pip skips them at install time: they
    are only a problem if imported, and then the import reports them. An interpreter that does
    not run at all is an error.
    """
    workers = "0" if _count_sources(site_dir) >= PARALLEL_COMPILE_MIN_FILES else "1"
    argv = [python, "-I", "-m", "compileall", "-q", "-j", workers]
    if display_dir is not None:
        argv += ["-d", str(display_dir)]
    argv.append(str(site_dir))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        raise StoreError(f"cannot run {python} to precompile {site_dir}: {exc}") from None
    if done.returncode == 0:
        return
    if done.returncode == 1 and _FILE_ERROR_MARK in done.stdout:
        skipped = done.stdout.count(_FILE_ERROR_MARK)
        log.info("%s: %d file(s) do not compile with %s; left as source", site_dir, skipped, python)
        return
    detail = (done.stderr.strip() or done.stdout.strip() or "(no output)")[-2000:]
    raise StoreError(
        f"precompiling {site_dir} with {python} failed (exit status {done.returncode}). "
        f"Check that the interpreter works. It said:\n{detail}"
    )


def _count_sources(tree: Path) -> int:
    return sum(1 for _root, _dirs, files in os.walk(tree) for name in files if name.endswith(".py"))


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

    Enough for another interpreter's compileall to add its own ``__pycache__`` entries
    without any existing file becoming writable.
    """
    tree.chmod(_WRITABLE_DIR_MODE)
    for root, dirs, _files in os.walk(tree):
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                path.chmod(_WRITABLE_DIR_MODE)


def compile_published(site_dir: Path, python: str, marker: Path) -> None:
    """Add ``python``'s ``.pyc`` to an already published, sealed tree, then its marker.

    The tree is never replaced (it may be on a running process's ``sys.path``): only its
    directories open up for the new ``__pycache__`` entries, and are sealed again even if
    compiling fails. The marker comes last, so it is only ever seen with complete bytecode.
    """
    unseal_dirs(site_dir)
    try:
        compile_tree(site_dir, python)
    finally:
        seal_read_only(site_dir)
    write_marker(marker, python)


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
