"""Walking a model dir (or an external package dir) for gathering and packing, and the stat
cache that lets a re-gather of an unchanged dir read no file contents.

The walk uses ``os.scandir`` and prunes ignored dirs *while walking* (a ``.git`` with 50k files
costs one name comparison, not 50k ``stat`` calls): :data:`~loader.gather_plan.IGNORED_NAMES`,
any dir holding a ``pyvenv.cfg``, and the patterns of the root's ``.wheelcasignore``.

Symlinks: one whose target resolves inside the walked dir is kept as a relative link (when the
caller keeps links: gathering does, packing cannot, a ``.carton`` holds no links); one pointing
outside is followed, its file or dir contents taken as if they were there, and named in a
warning; a dangling one, a loop, or a dir reached again through a link is an error naming it.
"""

# The walk is the hot path of a re-gather (one stat per file, no content read): plain str
# paths and os calls are cheaper there than Path objects.
# ruff: noqa: PTH115, PTH116, PTH118

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from loader.errors import ModelConfigError
from loader.gather_plan import (
    IGNORE_FILE,
    MARKER_NAME,
    VENV_MARKER,
    IgnoreRule,
    is_ignored,
    parse_ignore_file,
)

CHUNK = 1 << 20
#: A cached digest is trusted only for files last changed this long before it was recorded:
#: a file written again within the same timestamp tick keeps its stat (git's "racily clean").
RACY_WINDOW_NS = 2_000_000_000
STAT_CACHE_VERSION = 1


@dataclass(frozen=True, slots=True)
class WalkedFile:
    relpath: str
    #: The content's path, with every symlink resolved (so the stat cache sees one file once).
    path: str
    stat: os.stat_result


@dataclass(frozen=True, slots=True)
class WalkedLink:
    relpath: str
    path: str
    #: The link text for the output: relative, from the link's dir to its target.
    target: str


@dataclass(slots=True)
class Walk:
    root: str
    files: list[WalkedFile] = field(default_factory=list)
    links: list[WalkedLink] = field(default_factory=list)
    #: One line per symlink followed out of the walked dir.
    warnings: list[str] = field(default_factory=list)


def read_ignore_rules(root: str) -> tuple[IgnoreRule, ...]:
    try:
        with open(os.path.join(root, IGNORE_FILE), encoding="utf-8") as handle:
            return parse_ignore_file(handle.read())
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(
            f"cannot read {os.path.join(root, IGNORE_FILE)}: {exc}. Fix it (UTF-8 text, one "
            "pattern a line) or remove it."
        ) from None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _scan(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise ModelConfigError(
            f"cannot list {path}: {exc.strerror}. Make it readable, or add it to a {IGNORE_FILE}."
        ) from None


def walk(root: Path, *, keep_links: bool, skip: frozenset[str] = frozenset()) -> Walk:
    """Every file (and, with ``keep_links``, every inside symlink) under ``root``, in sorted
    order, as ``/``-separated paths relative to it. ``skip``: real paths left out (the
    ``.carton`` being written)."""
    real_root = os.path.realpath(root)
    rules = read_ignore_rules(real_root)
    result = Walk(real_root)
    # (real dir, its relative path + "/", the real dirs above it, the link that led there)
    stack: list[tuple[str, str, frozenset[str], str | None]] = [
        (real_root, "", frozenset({real_root}), None)
    ]
    while stack:
        directory, prefix, above, via = stack.pop()
        entries = _scan(directory)
        if prefix and any(e.name == VENV_MARKER for e in entries):
            continue  # a virtual environment
        subdirs: list[tuple[str, str, frozenset[str], str | None]] = []
        for entry in entries:
            relpath = prefix + entry.name
            if (not prefix and entry.name in (MARKER_NAME, IGNORE_FILE)) or entry.path in skip:
                continue
            if entry.is_symlink():
                target = _link_target(entry.path)
                is_dir = stat.S_ISDIR(os.stat(target).st_mode)
                if is_ignored(rules, relpath, entry.name, is_dir=is_dir):
                    continue
                inside = _inside(target, real_root)
                if inside and keep_links:
                    inner = os.path.relpath(target, real_root).replace(os.sep, "/")
                    text = posixpath.relpath(inner, posixpath.dirname(relpath) or ".")
                    result.links.append(WalkedLink(relpath, entry.path, text))
                    continue
                if not inside:
                    result.warnings.append(
                        f"followed symlink {entry.path} -> {target}: it points outside "
                        f"{real_root}, so its contents were copied"
                    )
                if is_dir:
                    subdirs.append((target, relpath + "/", above, entry.path))
                elif target not in skip:
                    result.files.append(WalkedFile(relpath, target, _regular(target)))
            elif entry.is_dir(follow_symlinks=False):
                if not is_ignored(rules, relpath, entry.name, is_dir=True):
                    subdirs.append((entry.path, relpath + "/", above, via))
            elif entry.is_file(follow_symlinks=False):
                if not is_ignored(rules, relpath, entry.name, is_dir=False):
                    result.files.append(WalkedFile(relpath, entry.path, entry.stat()))
            elif not is_ignored(rules, relpath, entry.name, is_dir=False):
                raise ModelConfigError(
                    f"{entry.path} is not a regular file, dir or symlink (a socket, FIFO or "
                    f"device); add it to a {IGNORE_FILE}."
                )
        for path, rel, ancestors, link in reversed(subdirs):
            if path in ancestors:
                raise ModelConfigError(
                    f"symlink {link} leads back to {path}, a dir above it: following it would "
                    f"never end. Remove the link or add it to a {IGNORE_FILE}."
                )
            stack.append((path, rel, ancestors | {path}, link))
    return result


def _link_target(link: str) -> str:
    target = os.path.realpath(link)
    try:
        os.stat(target)
    except OSError as exc:
        raise ModelConfigError(
            f"symlink {link} -> {os.readlink(link)} is dangling ({exc.strerror}): its target "
            f"does not exist. Remove the link, fix it, or add it to a {IGNORE_FILE}."
        ) from None
    return target


def _regular(path: str) -> os.stat_result:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelConfigError(f"{path} is not a regular file; add it to a {IGNORE_FILE}.")
    return st


# --- content digests ----------------------------------------------------------------------


def read_chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """A file's bytes in reads of at most ``CHUNK``; a file of ``size`` below that in one
    read of its size (a 1 MiB buffer per file costs more than reading most source files)."""
    want = min(CHUNK, max(size, 0) + 1)
    while data := handle.read(want):
        yield data


def hash_file(path: str, size: int = CHUNK) -> str:
    """sha256 of a file's bytes (``hashlib.file_digest`` is 3.11+); ``size``: its expected
    size, to read a small file at once."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        for data in read_chunks(handle, size):
            digest.update(data)
    return digest.hexdigest()


def same_file_state(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats of a path describe the same, unchanged file. ``ctime`` is the one a
    user cannot set: ``os.utime`` back to old times, or a copy that preserves mtimes, still
    changes it."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def _key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class StatCache:
    """Digests of files by path, valid while the file's (dev, inode, size, mtime, ctime) is
    unchanged and it was not racily clean when recorded.

    One JSON file per walked dir; it keeps only the files seen by the last walk, so it never
    grows past the dir. Concurrent gathers may overwrite each other's file: both are valid.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._old: dict[str, list[object]] = {}
        self._new: dict[str, list[object]] = {}
        self._changed = False
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == STAT_CACHE_VERSION:
                files = data.get("files")
                if isinstance(files, dict):
                    self._old = files

    def get(self, path: str, st: os.stat_result) -> str | None:
        """The cached digest, if it can be trusted; the entry is kept for the next save."""
        row = self._old.get(path)
        if not isinstance(row, list) or len(row) != 7 or row[:5] != _key(st):
            return None
        recorded, digest = row[5], row[6]
        if not isinstance(recorded, int) or not isinstance(digest, str):
            return None
        if max(st.st_mtime_ns, st.st_ctime_ns) >= recorded - RACY_WINDOW_NS:
            return None
        self._new[path] = row
        return digest

    def previous_size(self, path: str) -> int | None:
        """The size recorded last time: equal now means the file was probably only touched."""
        row = self._old.get(path)
        return row[2] if isinstance(row, list) and len(row) == 7 and type(row[2]) is int else None

    def put(self, path: str, st: os.stat_result, digest: str, recorded_ns: int) -> None:
        """``recorded_ns``: a time taken *before* the file was read."""
        self._new[path] = [*_key(st), recorded_ns, digest]
        self._changed = True

    def save(self) -> None:
        if not self._changed and self._new.keys() == self._old.keys():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": STAT_CACHE_VERSION, "files": self._new})
        with _temp_beside(self.path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.path)


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
