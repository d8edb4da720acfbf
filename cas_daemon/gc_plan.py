"""Garbage collection's pure part: what may go, and why, from values alone.

:func:`plan_gc` decides from a :class:`StoreSnapshot` (sizes, last use, roots), so every rule
is tested without a store and ``--dry-run`` shows exactly what a run would do. Reading the
store into a snapshot and removing what a plan lists are :mod:`cas_daemon.gc`'s. The rules and
their order are in docs/gc.md.
"""

from __future__ import annotations

import datetime
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

ItemKind = Literal["view", "tree", "blob"]
RootKindOrLease = Literal["lease", "watched", "pinned"]


@dataclass(frozen=True, slots=True)
class GcLimits:
    """What the store may hold: ``None`` is no limit. From ``[gc]`` in the configuration."""

    max_bytes: int | None = None
    max_age_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"gc max_bytes must be 0 or more, not {self.max_bytes}")
        if self.max_age_seconds is not None and self.max_age_seconds <= 0:
            raise ValueError(f"gc max_age must be positive, not {self.max_age_seconds}")


# --- the snapshot: everything the planner knows ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeInfo:
    sha256: str
    filename: str
    nbytes: int
    last_used: float


@dataclass(frozen=True, slots=True)
class BlobInfo:
    sha256: str
    filename: str
    nbytes: int
    last_used: float


@dataclass(frozen=True, slots=True)
class ViewInfo:
    key: str
    members: frozenset[str]
    nbytes: int
    last_used: float


@dataclass(frozen=True, slots=True)
class RootRef:
    """One thing that holds trees and views: a live lease, a watched or pinned model dir."""

    kind: RootKindOrLease
    label: str
    trees: frozenset[str] = frozenset()
    views: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    trees: tuple[TreeInfo, ...] = ()
    blobs: tuple[BlobInfo, ...] = ()
    views: tuple[ViewInfo, ...] = ()
    roots: tuple[RootRef, ...] = ()

    @property
    def total_bytes(self) -> int:
        parts: Iterable[TreeInfo | BlobInfo | ViewInfo] = (*self.trees, *self.blobs, *self.views)
        return sum(item.nbytes for item in parts)


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Removal:
    kind: ItemKind
    name: str  # sha256, or view key
    label: str  # what a person recognizes: the wheel's file name, or the key
    nbytes: int
    last_used: float  # as planned: apply skips an item used since
    reason: str
    with_tree: bool = False  # a blob that goes because its tree goes (and stays if it stays)


@dataclass(frozen=True, slots=True)
class Kept:
    kind: ItemKind
    name: str
    label: str
    nbytes: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GcPlan:
    now: float
    limits: GcLimits
    total_bytes: int  # of the snapshot, before any removal
    removals: tuple[Removal, ...]
    kept: tuple[Kept, ...]  # held by a root (or by a kept view) though a limit asked

    @property
    def bytes_freed(self) -> int:
        return sum(r.nbytes for r in self.removals)

    @property
    def bytes_after(self) -> int:
        return self.total_bytes - self.bytes_freed

    @property
    def over_budget(self) -> int:
        """Bytes above ``max_bytes`` that only roots hold: the limit cannot be met."""
        limit = self.limits.max_bytes
        return 0 if limit is None else max(0, self.bytes_after - limit)

    def lines(self) -> list[str]:
        """The plan for a person (``wheelcas gc --dry-run``)."""
        limit = self.limits.max_bytes
        budget = "" if limit is None else f", limit {human_bytes(limit)}"
        out = [
            f"{len(self.removals)} to remove, freeing {human_bytes(self.bytes_freed)} "
            f"(store {human_bytes(self.total_bytes)} -> {human_bytes(self.bytes_after)}{budget})"
        ]
        for r in self.removals:
            size = human_bytes(r.nbytes)
            out.append(f"  remove {r.kind} {r.name[:12]} {r.label} ({size}): {r.reason}")
        if self.kept:
            out.append(f"{len(self.kept)} kept because something holds them:")
        for k in self.kept:
            out.append(f"  keep {k.kind} {k.name[:12]} {k.label}: {'; '.join(k.reasons)}")
        if self.over_budget:
            out.append(
                f"still {human_bytes(self.over_budget)} over the size limit: "
                "everything left is held by a lease, a watched or pinned model, or a view"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "bytes_freed": self.bytes_freed,
            "bytes_after": self.bytes_after,
            "over_budget": self.over_budget,
            "removals": [removal_json(r) for r in self.removals],
            "kept": [
                {"kind": k.kind, "name": k.name, "label": k.label, "reasons": list(k.reasons)}
                for k in self.kept
            ],
        }


def removal_json(r: Removal) -> dict[str, Any]:
    """One removal as JSON, for a plan's and a result's ``to_json``."""
    return {"kind": r.kind, "name": r.name, "label": r.label, "bytes": r.nbytes, "reason": r.reason}


# --- reasons, for people ------------------------------------------------------------------


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    size, index = n / 1024, 0
    while size >= 1024 and index < len(units) - 1:
        size, index = size / 1024, index + 1
    return f"{size:.1f} {units[index]}"


def human_duration(seconds: float) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{int(seconds)} seconds"


def _when(timestamp: float, now: float) -> str:
    at = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return f"last used {at:%Y-%m-%d %H:%M} UTC, {human_duration(now - timestamp)} ago"


# --- the planner --------------------------------------------------------------------------


@dataclass
class _Planner:
    """The state of one planning pass; :func:`plan_gc` is its only user."""

    snap: StoreSnapshot
    limits: GcLimits
    now: float
    trees: dict[str, TreeInfo] = field(default_factory=dict)
    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    views: dict[str, ViewInfo] = field(default_factory=dict)
    tree_roots: dict[str, list[str]] = field(default_factory=dict)
    view_roots: dict[str, list[str]] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)  # tree -> kept views holding it
    held_back: dict[str, str] = field(default_factory=dict)  # tree -> why a limit could not
    removed: dict[tuple[ItemKind, str], Removal] = field(default_factory=dict)
    remaining: int = 0

    def __post_init__(self) -> None:
        snap = self.snap
        self.trees = {t.sha256: t for t in snap.trees}
        self.blobs = {b.sha256: b for b in snap.blobs}
        self.views = {v.key: v for v in snap.views}
        self.remaining = snap.total_bytes
        for root in snap.roots:
            for sha in root.trees:
                self.tree_roots.setdefault(sha, []).append(root.label)
            for key in root.views:
                self.view_roots.setdefault(key, []).append(root.label)
        for view in snap.views:
            for sha in view.members:
                self.holders.setdefault(sha, set()).add(view.key)
            if view.key in self.view_roots:
                held = f"member of view {view.key} ({'; '.join(self.view_roots[view.key])})"
                for sha in view.members:
                    self.tree_roots.setdefault(sha, []).append(held)

    def over(self) -> bool:
        limit = self.limits.max_bytes
        return limit is not None and self.remaining > limit

    def gone(self, kind: ItemKind, name: str) -> bool:
        return (kind, name) in self.removed

    def remove(self, kind: ItemKind, name: str, reason: str, *, with_tree: bool = False) -> None:
        item: TreeInfo | BlobInfo | ViewInfo
        if kind == "view":
            item = self.views[name]
            label = name
            for sha in item.members:
                self.holders.get(sha, set()).discard(name)
        else:
            item = self.trees[name] if kind == "tree" else self.blobs[name]
            label = item.filename or name
        self.removed[(kind, name)] = Removal(
            kind, name, label, item.nbytes, item.last_used, reason, with_tree
        )
        self.remaining -= item.nbytes
        if kind == "tree" and name in self.blobs and not self.gone("blob", name):
            self.remove("blob", name, "its tree is removed", with_tree=True)

    def tree_free(self, sha: str) -> bool:
        return sha not in self.tree_roots and not self.holders.get(sha)

    def by_age(self, max_age: float) -> None:
        cutoff = self.now - max_age
        why = f"older than {human_duration(max_age)}"
        for view in sorted(self.views.values(), key=lambda v: v.last_used):
            if view.key not in self.view_roots and view.last_used < cutoff:
                self.remove("view", view.key, f"{why}: {_when(view.last_used, self.now)}")
        for tree in sorted(self.trees.values(), key=lambda t: t.last_used):
            if tree.last_used >= cutoff or tree.sha256 in self.tree_roots:
                continue
            if self.holders.get(tree.sha256):
                self.held_back[tree.sha256] = _held_by_views(self.holders[tree.sha256])
                continue
            self.remove("tree", tree.sha256, f"{why}: {_when(tree.last_used, self.now)}")
        for blob in self._orphan_blobs():
            if blob.last_used < cutoff:
                reason = (
                    f"{why} and its tree is not in the store: {_when(blob.last_used, self.now)}"
                )
                self.remove("blob", blob.sha256, reason)

    def _orphan_blobs(self) -> list[BlobInfo]:
        """Blobs without a tree that no root needs: a rooted one is the only copy left."""
        return sorted(
            (
                b
                for b in self.blobs.values()
                if b.sha256 not in self.trees
                and b.sha256 not in self.tree_roots
                and not self.gone("blob", b.sha256)
            ),
            key=lambda b: b.last_used,
        )

    def by_size(self, max_bytes: int) -> None:
        why = f"least recently used under size pressure (limit {human_bytes(max_bytes)})"
        # Blobs first: the tree is what gets imported; a blob only saves a download if the
        # tree is ever published again.
        kept_tree_blobs = [
            b
            for b in self.blobs.values()
            if b.sha256 in self.trees and not self.gone("blob", b.sha256)
        ]
        for blob in sorted([*self._orphan_blobs(), *kept_tree_blobs], key=lambda b: b.last_used):
            if not self.over():
                return
            if blob.sha256 in self.trees:
                reason = (
                    f"blob of a kept tree, dropped under size pressure (limit "
                    f"{human_bytes(max_bytes)}): the unpacked tree is what gets imported"
                )
            else:
                reason = f"blob without a tree, {why}: {_when(blob.last_used, self.now)}"
            self.remove("blob", blob.sha256, reason)
        self._evict_lru(why)

    def _evict_lru(self, why: str) -> None:
        """Views and trees, least recently used first; a tree only once no kept view holds it."""
        queue: list[tuple[float, int, str]] = []
        for view in self.views.values():
            if view.key not in self.view_roots and not self.gone("view", view.key):
                queue.append((view.last_used, 0, view.key))
        for tree in self.trees.values():
            if tree.sha256 not in self.tree_roots and not self.gone("tree", tree.sha256):
                queue.append((tree.last_used, 1, tree.sha256))
        heapq.heapify(queue)
        waiting: dict[str, tuple[float, int, str]] = {}
        while queue and self.over():
            entry = heapq.heappop(queue)
            used, kind, name = entry
            if kind == 0:
                self.remove("view", name, f"{why}: {_when(used, self.now)}")
                for sha in self.views[name].members:
                    if sha in waiting and self.tree_free(sha):
                        heapq.heappush(queue, waiting.pop(sha))
            elif self.holders.get(name):
                waiting[name] = entry
            else:
                self.held_back.pop(name, None)
                self.remove("tree", name, f"{why}: {_when(used, self.now)}")
        for sha in waiting:
            self.held_back.setdefault(sha, _held_by_views(self.holders[sha]))

    def kept(self) -> list[Kept]:
        out = []
        for key, labels in sorted(self.view_roots.items()):
            if key in self.views:
                view = self.views[key]
                out.append(Kept("view", key, key, view.nbytes, tuple(labels)))
        for sha, tree in sorted(self.trees.items()):
            reasons = list(self.tree_roots.get(sha, ()))
            if sha in self.held_back and not self.gone("tree", sha):
                reasons.append(self.held_back[sha])
            if reasons:
                out.append(Kept("tree", sha, tree.filename or sha, tree.nbytes, tuple(reasons)))
        for sha, blob in sorted(self.blobs.items()):
            if sha not in self.trees and sha in self.tree_roots and not self.gone("blob", sha):
                why = (*self.tree_roots[sha], "the only copy: its tree is not in the store")
                out.append(Kept("blob", sha, blob.filename or sha, blob.nbytes, why))
        return out


def _held_by_views(keys: Iterable[str]) -> str:
    return "member of kept view " + ", ".join(sorted(keys))


def plan_gc(snapshot: StoreSnapshot, limits: GcLimits, now: float) -> GcPlan:
    """What to remove from the store described by ``snapshot``, and why. Pure.

    Roots (live leases, watched and pinned model dirs) are never removed, nor are the member
    trees of a view that stays. First everything not used within ``max_age_seconds``; then,
    while the store exceeds ``max_bytes``: blobs (least recently used first), then views and
    trees, least recently used first.
    """
    planner = _Planner(snapshot, limits, now)
    if limits.max_age_seconds is not None:
        planner.by_age(limits.max_age_seconds)
    if limits.max_bytes is not None and planner.over():
        planner.by_size(limits.max_bytes)
    order = {"view": 0, "tree": 1, "blob": 2}
    removals = sorted(planner.removed.values(), key=lambda r: (order[r.kind], r.last_used))
    return GcPlan(now, limits, snapshot.total_bytes, tuple(removals), tuple(planner.kept()))
