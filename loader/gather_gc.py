"""Garbage collection of the gather cache (``<store root>/gather/v1/``, :mod:`loader.gathering`).

Nothing else removes what gathers leave: cached trees (gathers without ``-o``), the pool
objects they and ``-o`` outputs are hard links to, staging leftovers of killed gathers, and
the stat cache of every dir ever gathered. As for the store (:mod:`cas_daemon.gc_plan`), a pure
plan (:func:`plan_gather_gc`, from a :class:`GatherListing` of values) decides what goes and
why, so every rule is tested without a disk and ``--dry-run`` shows exactly what a run does;
:func:`apply_gather_gc` removes what a plan lists, checking each item again first.

The rules (docs/gather.md, "Garbage collection"):

1. a cached tree not used for longer than the age limit goes; its last use is its marker's
   mtime, set when a gather makes or reuses it. No age limit, no tree goes by age. A tree
   without a marker (damaged) goes;
2. then a pool object that nothing but the pool links to any more (link count 1, once the
   trees going in this pass are counted out) goes. An ``-o`` output elsewhere holds links
   to its objects, so they stay while it exists;
3. a staging leftover in ``tmp/`` (or a stat cache's temp file) older than a day goes;
4. the stat cache of a dir that no longer exists goes (one whose dir cannot be told, because
   it recorded no file, goes when older than the age limit).

Removing a pool object never breaks an output: its links keep the bytes. A gather that finds
an object gone between its check and its link copies the source into the pool again
(:meth:`loader.gather_pool.Pool.place`).
"""

# The listing stats every file of the trees it may remove: plain os calls there.
# ruff: noqa: PTH118

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import itertools
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Literal

from cas_daemon.gc_plan import human_bytes, human_duration
from loader.gather_plan import MARKER_NAME
from loader.gather_pool import STALE_TMP_S, path_key, tree_lock_path

GatherKind = Literal["tree", "object", "leftover", "stat"]
Inode = tuple[int, int]  # (st_dev, st_ino)

_DIGEST = re.compile(r"[0-9a-f]{64}")
_OBJECT = re.compile(r"[0-9a-f]{64}(\.x)?")
_STAT_CACHE = re.compile(r"[0-9a-f]{40}\.json")
#: Files of a stat cache read to tell which dir it caches (each is tried up the path).
_SOURCE_PROBES = 64


# --- the listing: everything the planner knows ----------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedTree:
    """``trees/<digest>/``. ``links`` and ``own_bytes`` are filled only for trees listed as
    candidates (see :func:`list_gather_cache`): None means the tree's files were not read,
    so none of its objects can be counted as freed by its removal."""

    digest: str
    #: The marker's mtime; None when the tree has no marker.
    last_used: float | None
    files: int = 0
    #: For its files that have other links (pool objects): how many of those links it holds.
    links: Mapping[Inode, int] | None = None
    #: Bytes of its files nothing else links to (copied, not linked, from the pool).
    own_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PoolObject:
    name: str  # "objects/ab/<sha256>[.x]"
    inode: Inode
    nlink: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class StatCacheFile:
    name: str  # "stat/<key>.json"
    mtime: float
    nbytes: int
    #: The walked dir it caches; None when it cannot be told (no file recorded, unreadable).
    source: str | None
    source_exists: bool


@dataclass(frozen=True, slots=True)
class Leftover:
    """An entry of ``tmp/``, or a stat cache's temp file, that a running gather may own."""

    name: str  # "tmp/<name>" or "stat/.<key>.json.<random>"
    mtime: float
    nbytes: int


@dataclass(frozen=True, slots=True)
class GatherListing:
    trees: tuple[CachedTree, ...] = ()
    objects: tuple[PoolObject, ...] = ()
    stat_caches: tuple[StatCacheFile, ...] = ()
    leftovers: tuple[Leftover, ...] = ()


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatherRemoval:
    kind: GatherKind
    name: str  # relative to the gather home
    nbytes: int
    reason: str
    #: What the apply step checks again: a tree's last use or a leftover's mtime as planned.
    as_of: float | None = None
    #: A pool object's file as listed: one replaced since is not removed.
    inode: Inode | None = None
    #: A stat cache's dir: the cache stays if it exists again.
    source: str | None = None
    #: A tree's file count, for people.
    files: int = 0


@dataclass(frozen=True, slots=True)
class GatherGcPlan:
    now: float
    max_age: float | None
    removals: tuple[GatherRemoval, ...]
    trees: int  # in the listing
    objects: int

    @property
    def bytes_freed(self) -> int:
        return sum(r.nbytes for r in self.removals)

    def lines(self, home: Path | str = "") -> list[str]:
        """The plan for a person (``wheelcas gc --dry-run``); pool objects in one line per
        reason (a removed tree frees thousands)."""
        where = f" {home}" if str(home) else ""
        age = (
            "no age limit" if self.max_age is None else f"age limit {human_duration(self.max_age)}"
        )
        out = [
            f"gather cache{where}: {len(self.removals)} to remove, freeing "
            f"{human_bytes(self.bytes_freed)} ({_count(self.trees, 'cached tree')}, "
            f"{_count(self.objects, 'pool object')}; {age})"
        ]
        objects: dict[str, list[GatherRemoval]] = {}
        for r in self.removals:
            if r.kind == "tree":
                out.append(
                    f"  remove gather tree {r.name.rpartition('/')[2][:12]} "
                    f"({_count(r.files, 'file')}, {human_bytes(r.nbytes)} of its own): {r.reason}"
                )
            elif r.kind == "object":
                objects.setdefault(r.reason, []).append(r)
            elif r.kind == "leftover":
                out.append(
                    f"  remove gather leftover {r.name} ({human_bytes(r.nbytes)}): {r.reason}"
                )
            else:
                out.append(f"  remove gather stat cache {r.name}: {r.reason}")
        for reason, items in objects.items():
            size = human_bytes(sum(r.nbytes for r in items))
            count = _count(len(items), "gather pool object")
            out.append(f"  remove {count} ({size}): {reason}")
        return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _when(timestamp: float, now: float) -> str:
    at = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return f"last used {at:%Y-%m-%d %H:%M} UTC, {human_duration(now - timestamp)} ago"


def plan_gather_gc(listing: GatherListing, *, now: float, max_age: float | None) -> GatherGcPlan:
    """What goes and why (the rules are in the module doc). Pure: ``listing`` is values."""
    removals: list[GatherRemoval] = []
    freed: collections.Counter[Inode] = collections.Counter()
    for tree in listing.trees:
        if tree.last_used is None:
            reason = f"it has no {MARKER_NAME}: not a complete gather (damaged, or made by hand)"
        elif max_age is not None and tree.last_used < now - max_age:
            reason = f"unused for more than {human_duration(max_age)}: {_when(tree.last_used, now)}"
        else:
            continue
        removals.append(
            GatherRemoval(
                "tree",
                f"trees/{tree.digest}",
                tree.own_bytes,
                reason,
                as_of=tree.last_used,
                files=tree.files,
            )
        )
        if tree.links is not None:
            freed.update(tree.links)
    for obj in listing.objects:
        if obj.nlink - freed[obj.inode] > 1:
            continue  # an -o output, or a tree that stays, links to it
        reason = (
            "no gather output links to it"
            if obj.nlink <= 1
            else "only cached trees removed in this pass link to it"
        )
        removals.append(GatherRemoval("object", obj.name, obj.nbytes, reason, inode=obj.inode))
    for leftover in listing.leftovers:
        if now - leftover.mtime > STALE_TMP_S:
            reason = (
                f"left by a killed gather: last changed {human_duration(now - leftover.mtime)} ago"
            )
            removals.append(
                GatherRemoval(
                    "leftover", leftover.name, leftover.nbytes, reason, as_of=leftover.mtime
                )
            )
    for cache in listing.stat_caches:
        if cache.source is not None and not cache.source_exists:
            reason = f"its dir {cache.source} no longer exists"
        elif cache.source is None and max_age is not None and cache.mtime < now - max_age:
            reason = (
                "it names no file, so its dir is unknown, and was last written "
                f"{human_duration(now - cache.mtime)} ago"
            )
        else:
            continue
        removals.append(
            GatherRemoval(
                "stat", cache.name, cache.nbytes, reason, as_of=cache.mtime, source=cache.source
            )
        )
    return GatherGcPlan(now, max_age, tuple(removals), len(listing.trees), len(listing.objects))


# --- listing the disk -----------------------------------------------------------------------


def list_gather_cache(home: Path, *, unused_before: float | None) -> GatherListing:
    """What ``home`` (``<store root>/gather/v1``) holds.

    Only trees last used before ``unused_before`` (and those without a marker) have their
    files read, to count the pool links they hold: a GC pass stats the files of the trees it
    may remove, not of every tree. None: no tree is old enough for that.
    """
    trees = []
    for entry in _entries(home / "trees"):
        if not _DIGEST.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            last_used: float | None = (Path(entry.path) / MARKER_NAME).lstat().st_mtime
        except FileNotFoundError:
            last_used = None
        if last_used is None or (unused_before is not None and last_used < unused_before):
            trees.append(_read_tree(entry.name, entry.path, last_used))
        else:
            trees.append(CachedTree(entry.name, last_used))
    objects = []
    for shard in _entries(home / "objects"):
        for entry in _entries(Path(shard.path)):
            if not _OBJECT.fullmatch(entry.name) or entry.name[:2] != shard.name:
                continue
            st = _lstat(entry)
            if st is not None and stat.S_ISREG(st.st_mode):
                objects.append(
                    PoolObject(
                        f"objects/{shard.name}/{entry.name}",
                        (st.st_dev, st.st_ino),
                        st.st_nlink,
                        st.st_size,
                    )
                )
    caches, leftovers = [], []
    for entry in _entries(home / "stat"):
        st = _lstat(entry)
        if st is None:
            continue
        if entry.name.startswith("."):  # StatCache.save's temp file
            leftovers.append(Leftover(f"stat/{entry.name}", st.st_mtime, st.st_size))
        elif _STAT_CACHE.fullmatch(entry.name):
            source = stat_cache_source(Path(entry.path))
            exists = source is not None and Path(source).is_dir()
            caches.append(
                StatCacheFile(f"stat/{entry.name}", st.st_mtime, st.st_size, source, exists)
            )
    for entry in _entries(home / "tmp"):
        st = _lstat(entry)
        if st is None:
            continue
        size = _dir_bytes(entry.path) if stat.S_ISDIR(st.st_mode) else st.st_size
        leftovers.append(Leftover(f"tmp/{entry.name}", st.st_mtime, size))
    return GatherListing(tuple(trees), tuple(objects), tuple(caches), tuple(leftovers))


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _lstat(entry: os.DirEntry[str]) -> os.stat_result | None:
    """None for an entry gone since it was listed (a gather or another GC removed it)."""
    try:
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None


def _read_tree(digest: str, path: str, last_used: float | None) -> CachedTree:
    links: collections.Counter[Inode] = collections.Counter()
    files = own = 0
    for directory, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or (name == MARKER_NAME and directory == path):
                continue
            files += 1
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] += 1
            else:
                own += st.st_size
    return CachedTree(digest, last_used, files, dict(links), own)


def _dir_bytes(path: str) -> int:
    total = 0
    for directory, _dirs, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def stat_cache_source(path: Path) -> str | None:
    """The dir a stat cache belongs to. Its name is :func:`~loader.gather_pool.path_key` of
    the walked dir's real path and its files are recorded by real path, so the dir is the
    ancestor of a recorded file whose key is that name. None when no file tells (an empty
    dir was walked, or the file cannot be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return None
    key = path.name.removesuffix(".json")
    for recorded in itertools.islice(files, _SOURCE_PROBES):
        if not isinstance(recorded, str):
            continue
        for parent in PurePath(recorded).parents:
            if path_key(str(parent)) == key:
                return str(parent)
    return None


# --- applying a plan ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatherGcResult:
    removed: tuple[GatherRemoval, ...]
    skipped: tuple[tuple[GatherRemoval, str], ...]

    @property
    def bytes_freed(self) -> int:
        return sum(r.nbytes for r in self.removed)

    def lines(self) -> list[str]:
        """Why each item that stayed stayed, and the totals."""
        out = [f"  skipped gather {item.kind} {item.name}: {why}" for item, why in self.skipped]
        out.append(
            f"gather cache: removed {len(self.removed)} items, freed "
            f"{human_bytes(self.bytes_freed)}; {len(self.skipped)} skipped"
        )
        return out


def apply_gather_gc(home: Path, plan: GatherGcPlan) -> GatherGcResult:
    """Remove what ``plan`` lists, and nothing else; what was removed and what was not.

    Trees go first, each under its lock taken without waiting (one held is being looked up
    or built by a gather: skipped), after checking that no gather used it since the plan; it
    leaves its place by one ``rename`` into ``tmp/`` and is deleted there. Then each pool
    object, if it is still the file listed and nothing links to it any more: a tree that
    stayed, or an output linked since, keeps it.
    """
    removed: list[GatherRemoval] = []
    skipped: list[tuple[GatherRemoval, str]] = []
    order = {"tree": 0, "object": 1, "leftover": 2, "stat": 3}
    for item in sorted(plan.removals, key=lambda r: order[r.kind]):
        try:
            why = _REMOVERS[item.kind](home, item)
        except OSError as exc:
            why = f"could not remove it: {exc}"
        if why is None:
            removed.append(item)
        else:
            skipped.append((item, why))
    return GatherGcResult(tuple(removed), tuple(skipped))


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Hold ``path``'s exclusive flock for the block if it is free and still the file at
    ``path`` (see :func:`loader.gather_pool._flock`); whether it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            current = path.stat()
        except FileNotFoundError:
            yield False
            return
        held = os.fstat(fd)
        yield (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)
    finally:
        os.close(fd)


def _remove_tree(home: Path, item: GatherRemoval) -> str | None:
    from cas_daemon.precompile import remove_sealed

    digest = item.name.rpartition("/")[2]
    lock = tree_lock_path(home, digest)
    with _try_lock(lock) as free:
        if not free:
            return "a gather is looking it up or building it (its lock is held)"
        tree = home / item.name
        try:
            used: float | None = (tree / MARKER_NAME).lstat().st_mtime
        except FileNotFoundError:
            used = None
        if used is not None and (item.as_of is None or used > item.as_of):
            return "used since the plan was made"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        grave = home / "tmp" / f"gc-{digest[:16]}.{secrets.token_hex(4)}"
        try:
            tree.rename(grave)
        except FileNotFoundError:
            pass  # removed by hand or by another GC: nothing left to do
        else:
            remove_sealed(grave)
        # Still under the lock: a gather waiting for it takes it again on a new file.
        lock.unlink(missing_ok=True)
    return None


def _remove_object(home: Path, item: GatherRemoval) -> str | None:
    path = home / item.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if (st.st_dev, st.st_ino) != item.inode:
        return "replaced since the plan was made"
    if st.st_nlink > 1:
        return "something links to it: a tree that stayed, or an output made since the plan"
    path.unlink()
    return None


def _remove_leftover(home: Path, item: GatherRemoval) -> str | None:
    from cas_daemon.precompile import remove_sealed

    path = home / item.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if item.as_of is None or st.st_mtime > item.as_of:
        return "changed since the plan was made: a gather is using it"
    remove_sealed(path)
    return None


def _remove_stat_cache(home: Path, item: GatherRemoval) -> str | None:
    if item.source is not None and Path(item.source).is_dir():
        return f"its dir {item.source} exists again"
    path = home / item.name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if item.as_of is not None and st.st_mtime > item.as_of:
        return "written since the plan was made: a gather is using it"
    path.unlink()
    return None


_REMOVERS = {
    "tree": _remove_tree,
    "object": _remove_object,
    "leftover": _remove_leftover,
    "stat": _remove_stat_cache,
}


def collect_gather_cache(
    home: Path, *, max_age: float | None, now: float, dry_run: bool
) -> tuple[GatherGcPlan, GatherGcResult | None] | None:
    """List, plan and (unless ``dry_run``) apply: one pass over the gather cache at ``home``
    (``<store root>/gather/v1``). None when there is no gather cache."""
    if not home.is_dir():
        return None
    listing = list_gather_cache(home, unused_before=None if max_age is None else now - max_age)
    plan = plan_gather_gc(listing, now=now, max_age=max_age)
    if dry_run:
        return plan, None
    return plan, apply_gather_gc(home, plan)
