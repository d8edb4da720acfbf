"""Disk usage as ``du`` counts it: every inode once, whatever the number of its hard links.

Each directory, file and symlink under the roots is ``lstat``-ed (symlinks are not followed);
an inode seen before, by ``(st_dev, st_ino)``, is not counted again, so a file hard-linked
into a view, or deduplicated between trees, costs its bytes once. ``disk`` is allocated
blocks (``st_blocks * 512``, what ``du`` reports), ``apparent`` the sum of ``st_size``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

Inode = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Usage:
    disk: int = 0
    apparent: int = 0
    inodes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.disk + other.disk, self.apparent + other.apparent, self.inodes + other.inodes
        )


def _entries(root: Path) -> Iterable[str]:
    if not os.path.lexists(root):
        return
    yield str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            yield os.path.join(dirpath, name)  # noqa: PTH118


def usage(root: Path, seen: set[Inode] | None = None) -> Usage:
    """What ``root`` takes on disk, skipping (and adding to) the inodes in ``seen``."""
    seen = set() if seen is None else seen
    disk = apparent = inodes = 0
    for path in _entries(root):
        info = os.lstat(path)
        key = (info.st_dev, info.st_ino)
        if key in seen:
            continue
        seen.add(key)
        disk += info.st_blocks * 512
        apparent += info.st_size
        inodes += 1
    return Usage(disk, apparent, inodes)


def usage_by_part(root: Path, parts: Iterable[tuple[str, Path]]) -> dict[str, Usage]:
    """``root``'s usage split into ``parts`` (label, dir under root): each inode is counted in
    the first part it is found in, in the order given; ``"rest"`` is what no part holds."""
    seen: set[Inode] = set()
    split = {label: usage(path, seen) for label, path in parts}
    split["rest"] = usage(root, seen)
    return split


def total(split: dict[str, Usage]) -> Usage:
    return sum(split.values(), Usage())


def duplicate_bytes(root: Path, *, min_size: int) -> int:
    """Bytes (``st_size``) of the extra copies of identical regular files under ``root``:
    files of at least ``min_size`` bytes, grouped by content and executable bit, each inode
    once; every group beyond its first file. What content dedupe could save at most."""
    seen: set[Inode] = set()
    copies: dict[tuple[str, bool], int] = {}
    extra = 0
    for path in _entries(root):
        info = os.lstat(path)
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISREG(info.st_mode) or info.st_size < min_size or key in seen:
            continue
        seen.add(key)
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        group = (digest, bool(info.st_mode & stat.S_IXUSR))
        if group in copies:
            extra += info.st_size
        copies[group] = copies.get(group, 0) + 1
    return extra
