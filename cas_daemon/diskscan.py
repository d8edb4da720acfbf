"""The store on disk, read from its directories: what the index is rebuilt and checked from.

Listings and ``stat`` only, never hashing: :func:`scan_disk` says which trees (with their pyc
markers), blobs and views exist and which names the layout never makes; the ``measure_*``
functions size trees and views; :func:`index_tree` and :func:`index_view` record what was
found into the index. Used by the daemon (sizes of new trees), GC (entries an embedded loader
published without the index) and fsck (the whole store against the index).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import Metadata

#: The names of trees, blobs, locks and staging: a lower-case sha256 hex digest.
SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
#: Written into each view by views.py: its trees' site dirs, in sys.path order.
VIEW_MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class DiskScan:
    """What the store's directories hold, from listings and ``stat`` only (no hashing)."""

    trees: Mapping[str, frozenset[str]]  # sha256 -> cache tags that have a pyc marker
    blobs: Mapping[str, int]  # sha256 -> size
    views: tuple[str, ...]
    strays: tuple[Path, ...]  # names the layout never produces: reported, never removed


def sorted_entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as found:
            return sorted(found, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sharded(top: Path, strays: list[Path]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(sha256, entry)`` of ``top/<aa>/<sha256>``; other names go to ``strays``."""
    for shard in sorted_entries(top):
        if not (_SHARD.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
            strays.append(Path(shard.path))
            continue
        for entry in sorted_entries(Path(shard.path)):
            if SHA256_NAME.fullmatch(entry.name) and entry.name[:2] == shard.name:
                yield entry.name, entry
            else:
                strays.append(Path(entry.path))


def scan_disk(layout: StoreLayout) -> DiskScan:
    strays: list[Path] = []
    trees: dict[str, frozenset[str]] = {}
    for sha, entry in _sharded(layout.trees_dir, strays):
        trees[sha] = frozenset(
            e.name.removeprefix("pyc-")
            for e in sorted_entries(Path(entry.path))
            if e.name.startswith("pyc-") and e.is_file(follow_symlinks=False)
        )
    blobs = {
        sha: entry.stat(follow_symlinks=False).st_size
        for sha, entry in _sharded(layout.blobs_dir, strays)
    }
    views = tuple(
        e.name for e in sorted_entries(layout.views_dir) if e.is_dir(follow_symlinks=False)
    )
    return DiskScan(trees, blobs, views, tuple(strays))


def measure_tree(top: Path) -> tuple[int, int]:
    """``(bytes, files)`` under ``top``: apparent sizes, shared (hard-linked) files included."""
    size = files = 0
    for root, _dirs, names in os.walk(top):
        for name in names:
            files += 1
            size += Path(root, name).lstat().st_size
    return size, files


def measure_view(top: Path) -> int:
    """The bytes a view holds on its own: files it shares with trees (hard links) are free."""
    size = 0
    for root, _dirs, names in os.walk(top):
        for name in names:
            info = Path(root, name).lstat()
            if info.st_nlink == 1:
                size += info.st_size
    return size


def read_view_members(layout: StoreLayout, key: str) -> tuple[str, ...]:
    """The shas of a view's trees, in sys.path order, as far as the disk can tell.

    From the view's ``manifest.json`` (``{"trees": [{"site": ".../trees/aa/<sha>/site"}]}``);
    without one, from where the view's symlinks point (``symlink`` mode: order of first
    appearance, not sys.path order). A hard-linked view without a manifest cannot say: no
    members, so it holds no tree alive.
    """
    view = layout.view_dir(key)
    try:
        doc = json.loads((view / VIEW_MANIFEST).read_text(encoding="utf-8"))
        sites = [str(tree["site"]) for tree in doc["trees"]]
    except (OSError, ValueError, KeyError, TypeError):
        sites = _symlink_targets(view)
    shas = (_tree_sha(layout, site) for site in sites)
    return tuple(dict.fromkeys(sha for sha in shas if sha is not None))


def _symlink_targets(view: Path) -> list[str]:
    targets: list[str] = []
    for root, dirs, names in os.walk(view):
        for name in sorted([*dirs, *names]):
            path = Path(root, name)
            if path.is_symlink():
                targets.append(str(path.parent / path.readlink()))
    return targets


def _tree_sha(layout: StoreLayout, path: str) -> str | None:
    """The sha of the tree ``path`` lies in (``trees/aa/<sha>/...``), if it does."""
    try:
        relative = Path(os.path.normpath(path)).relative_to(layout.trees_dir)
    except ValueError:
        return None
    parts = relative.parts
    return parts[1] if len(parts) >= 2 and SHA256_NAME.fullmatch(parts[1]) else None


def guess_filename(site: Path) -> str:
    """A wheel file name rebuilt from a tree's ``*.dist-info``: for people, not for lookups."""
    for info in sorted(site.glob("*.dist-info")):
        try:
            text = (info / "WHEEL").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        tags = [
            line.partition(":")[2].strip().split("-")
            for line in text.splitlines()
            if line.startswith("Tag:")
        ]
        if tags and all(len(t) == 3 for t in tags):
            compressed = "-".join(".".join(sorted({t[i] for t in tags})) for i in range(3))
            return f"{info.name.removesuffix('.dist-info')}-{compressed}.whl"
    return ""


def index_tree(
    metadata: Metadata,
    layout: StoreLayout,
    sha256: str,
    cache_tags: Iterable[str],
    blob_bytes: int,
    *,
    last_used_at: float | None = None,
) -> None:
    """Record a tree found on disk: measured now, used "now" unless told (see docs/gc.md)."""
    tree_bytes, files = measure_tree(layout.tree_dir(sha256))
    filename = guess_filename(layout.site_dir(sha256))
    metadata.record_wheel(
        sha256, filename, blob_bytes, tree_bytes, files, cache_tags, last_used_at=last_used_at
    )


def index_view(
    metadata: Metadata, layout: StoreLayout, key: str, *, last_used_at: float | None = None
) -> None:
    members = read_view_members(layout, key)
    nbytes = measure_view(layout.view_dir(key))
    metadata.record_view(key, members, nbytes=nbytes, last_used_at=last_used_at)
