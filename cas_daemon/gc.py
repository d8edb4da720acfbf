"""Garbage collection on disk: the store read into a snapshot, and a plan applied to it.

The plan itself is pure (:func:`cas_daemon.gc_plan.plan_gc`). :func:`snapshot` reads the store
and its index to make one; :func:`apply_gc` removes what a plan lists, one item at a time under
that item's lock, after checking again that nothing took hold of it since the plan was made;
:func:`collect` is the three in a row. The rules and their order are in docs/gc.md.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cas_daemon import leases
from cas_daemon.diskscan import index_tree, index_view, scan_disk
from cas_daemon.flock import try_flock
from cas_daemon.gc_plan import (
    BlobInfo,
    GcLimits,
    GcPlan,
    ItemKind,
    Removal,
    RootRef,
    StoreSnapshot,
    TreeInfo,
    ViewInfo,
    human_bytes,
    plan_gc,
    removal_json,
)
from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import IsAlive, Metadata
from cas_daemon.precompile import remove_sealed

# --- reading the store into a snapshot ----------------------------------------------------


def snapshot(
    layout: StoreLayout, metadata: Metadata, *, is_alive: IsAlive = leases.is_alive
) -> StoreSnapshot:
    """The store as the planner sees it: what is on disk, with the index's sizes and times.

    Trees, blobs and views on disk that the index does not know (published by an embedded
    loader without the daemon, or before a rebuild) are measured and indexed here, as used
    now; rows for things not on disk are left out (``wheelcas fsck`` deals with them). Leases
    of processes that are gone are no roots.
    """
    disk = scan_disk(layout)
    rows = {row.sha256: row for row in metadata.wheels()}
    for sha, tags in disk.trees.items():
        row = rows.get(sha)
        if row is None or not row.tree_bytes:
            index_tree(metadata, layout, sha, tags, disk.blobs.get(sha, 0))
    for sha, size in disk.blobs.items():
        if sha not in rows and sha not in disk.trees:
            metadata.record_wheel(sha, "", size, 0, 0, ())
    view_rows = {view.key: view for view in metadata.views()}
    for key in disk.views:
        if key not in view_rows:
            index_view(metadata, layout, key)
    rows = {row.sha256: row for row in metadata.wheels()}
    view_rows = {view.key: view for view in metadata.views()}

    trees = tuple(
        TreeInfo(sha, rows[sha].filename, rows[sha].tree_bytes, rows[sha].last_used_at)
        for sha in disk.trees
    )
    blobs = tuple(
        BlobInfo(sha, rows[sha].filename, size, rows[sha].last_used_at)
        for sha, size in disk.blobs.items()
    )
    views = tuple(
        ViewInfo(key, frozenset(row.members), row.nbytes, row.last_used_at)
        for key, row in ((key, view_rows[key]) for key in disk.views)
    )
    roots = [
        RootRef(
            "lease",
            lease.label,
            frozenset(lease.shas),
            frozenset(() if lease.view_key is None else (lease.view_key,)),
        )
        for lease in metadata.leases()
        if is_alive(lease.pid, lease.pid_start_time)
    ]
    roots += [RootRef(root.kind, root.label, frozenset(root.shas)) for root in metadata.roots()]
    return StoreSnapshot(trees, blobs, views, tuple(roots))


# --- applying a plan ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Skipped:
    item: Removal
    why: str


@dataclass(frozen=True, slots=True)
class GcResult:
    removed: tuple[Removal, ...]
    skipped: tuple[Skipped, ...]

    @property
    def bytes_freed(self) -> int:
        return sum(r.nbytes for r in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_freed": self.bytes_freed,
            "removed": [removal_json(r) for r in self.removed],
            "skipped": [{**removal_json(s.item), "why": s.why} for s in self.skipped],
        }


def apply_gc(
    layout: StoreLayout,
    metadata: Metadata,
    plan: GcPlan,
    *,
    is_alive: IsAlive = leases.is_alive,
) -> GcResult:
    """Remove what ``plan`` lists, and nothing else; what was removed and what was not.

    Views go first, so that the trees they held are free when their turn comes. Each item is
    removed under its lock, taken without waiting (one held is being published, built or
    removed by another process: skipped), after checking in one index transaction that no
    lease, root or remaining view holds it and nobody used it since the plan; it then leaves
    its place by one ``rename`` into ``tmp/`` before being deleted, so no reader sees half of
    it. Leases of ended processes are dropped at the end.
    """
    removed: list[Removal] = []
    skipped: list[Skipped] = []
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)

    def outcome(item: Removal, why: str | None) -> None:
        if why is None:
            removed.append(item)
        else:
            skipped.append(Skipped(item, why))

    for item in plan.removals:
        if item.kind == "view":
            outcome(item, _remove_view(layout, metadata, item, is_alive))
    wheels: dict[str, dict[ItemKind, Removal]] = {}
    for item in plan.removals:
        if item.kind != "view":
            wheels.setdefault(item.name, {})[item.kind] = item
    for sha, items in wheels.items():
        stayed = _remove_wheel(layout, metadata, sha, items, is_alive)
        for kind, item in items.items():
            outcome(item, stayed.get(kind))
    metadata.drop_dead_leases(is_alive)
    return GcResult(tuple(removed), tuple(skipped))


def _graveyard(layout: StoreLayout, prefix: str) -> Path:
    # The item's own staging prefix: whoever takes its lock next may delete what a crash left.
    return layout.tmp_dir / f"{prefix}gc-{secrets.token_hex(8)}"


def _remove_view(
    layout: StoreLayout, metadata: Metadata, item: Removal, is_alive: IsAlive
) -> str | None:
    """Remove one view; None if done, else why not."""
    key = item.name
    with try_flock(layout.view_lock_path(key)) as free:
        if not free:
            return "its lock is held: the view is being built or removed by another process"
        grave = None
        try:
            with metadata.transaction():
                why = _still_held(metadata.view_holders(key, is_alive))
                why = why or _used_since(metadata.view_last_used(key), item)
                if why is not None:
                    return why
                if layout.view_dir(key).exists():
                    grave = _graveyard(layout, layout.view_staging_prefix(key))
                    layout.view_dir(key).rename(grave)
                metadata.forget_view(key)
        except OSError as exc:
            return f"could not remove it: {exc}"
        if grave is not None:
            remove_sealed(grave)
    return None


def _remove_wheel(
    layout: StoreLayout,
    metadata: Metadata,
    sha: str,
    items: Mapping[ItemKind, Removal],
    is_alive: IsAlive,
) -> dict[ItemKind, str]:
    """Remove a wheel's tree and/or blob as planned; why each one that stays stayed."""
    tree_item, blob_item = items.get("tree"), items.get("blob")
    with try_flock(layout.lock_path(sha)) as free:
        if not free:
            busy = "its lock is held: the wheel is being published or removed by another process"
            return dict.fromkeys(items, busy)
        outcome: dict[ItemKind, str] = {}
        grave = None
        try:
            with metadata.transaction():
                if tree_item is not None:
                    why = _still_held(metadata.tree_holders(sha, is_alive))
                    why = why or _used_since(metadata.last_used(sha), tree_item)
                    if why is not None:
                        outcome["tree"] = why
                    else:
                        grave = _graveyard(layout, layout.staging_prefix(sha))
                        _rename_if_there(layout.tree_dir(sha), grave)
                        metadata.forget_tree(sha)
                if blob_item is not None:
                    if blob_item.with_tree and "tree" in outcome:
                        outcome["blob"] = "its tree stays"
                    elif (
                        blob_item.with_tree
                        or _used_since(metadata.last_used(sha), blob_item) is None
                    ):
                        layout.blob_path(sha).unlink(missing_ok=True)
                        metadata.forget_blob(sha)
                    else:
                        outcome["blob"] = "used since the plan was made"
                if not layout.tree_dir(sha).exists() and not layout.blob_path(sha).exists():
                    metadata.forget_wheel(sha)
        except OSError as exc:
            outcome = dict.fromkeys(items, f"could not remove it: {exc}")
        finally:
            # Still under the lock: a publisher taking it next would delete this too.
            if grave is not None and grave.exists():
                remove_sealed(grave)
    return outcome


def _rename_if_there(source: Path, dest: Path) -> None:
    # Already gone (by hand, or an interrupted GC): the index only needs to agree.
    with contextlib.suppress(FileNotFoundError):
        source.rename(dest)


def _still_held(holders: list[str]) -> str | None:
    return None if not holders else "held since the plan was made: " + "; ".join(holders)


def _used_since(last_used: float | None, item: Removal) -> str | None:
    if last_used is not None and last_used > item.last_used:
        return "used since the plan was made"
    return None


# --- the daemon's entry point -------------------------------------------------------------


class GcSettings(Protocol):
    """The part of the daemon's configuration that GC reads."""

    @property
    def gc_max_bytes(self) -> int | None: ...

    @property
    def gc_max_age(self) -> float | None: ...


def collect(
    layout: StoreLayout,
    metadata: Metadata,
    limits: GcLimits,
    *,
    dry_run: bool,
    now: float,
    is_alive: IsAlive = leases.is_alive,
) -> tuple[GcPlan, GcResult | None]:
    """Snapshot, plan and (unless ``dry_run``) apply: one blocking GC pass."""
    plan = plan_gc(snapshot(layout, metadata, is_alive=is_alive), limits, now)
    if dry_run:
        return plan, None
    result = apply_gc(layout, metadata, plan, is_alive=is_alive)
    if any(r.kind == "tree" for r in result.removed):
        from cas_daemon.dedupe import prune_index

        # Deduplicated files keep their bytes through the content index until it lets go.
        prune_index(layout)
    return plan, result


async def run_for_daemon(
    layout: StoreLayout, metadata: Metadata, config: GcSettings, *, dry_run: bool
) -> dict[str, Any]:
    """One GC pass in a worker thread, as JSON for ``POST /v1/gc`` and the periodic task."""
    import asyncio
    import time

    limits = GcLimits(config.gc_max_bytes, config.gc_max_age)
    plan, result = await asyncio.to_thread(
        collect, layout, metadata, limits, dry_run=dry_run, now=time.time()
    )
    report: dict[str, Any] = {"dry_run": dry_run, "plan": plan.to_json(), "lines": plan.lines()}
    # For `wheelcas gc`, which collects the loader's gather cache under the same root with
    # these limits (this layer cannot: it never imports the loader).
    report["store_root"] = str(layout.root)
    report["limits"] = {"max_bytes": limits.max_bytes, "max_age_seconds": limits.max_age_seconds}
    if result is None:
        report["summary"] = plan.lines()[0]
    else:
        report["result"] = result.to_json()
        report["summary"] = (
            f"removed {len(result.removed)} items, freed {human_bytes(result.bytes_freed)}; "
            f"{len(result.skipped)} skipped"
        )
    return report
