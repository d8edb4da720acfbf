"""Rebuilding the store's index from its files, and ``wheelcas fsck``.

The files under ``v1/`` are the truth (see :mod:`cas_daemon.metadata`). If the index is lost
or corrupt, :func:`rebuild_from_disk` makes a new one from the files; :func:`fsck` reconciles
the two, and checks the files against their names (blobs are hashed), without writing
anything unless asked to repair.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from cas_daemon import leases
from cas_daemon.diskscan import (
    SHA256_NAME,
    DiskScan,
    index_tree,
    index_view,
    scan_disk,
    sorted_entries,
)
from cas_daemon.errors import StoreError
from cas_daemon.flock import try_flock
from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import Clock, IsAlive, Lease, Metadata, Root


def rebuild_from_disk(layout: StoreLayout, *, clock: Clock = time.time) -> Metadata:
    """Replace the index by one made from the store's files; the new index, open.

    Everything recorded is "used now": the old usage times are gone, and guessing them old
    could let GC remove trees a running model imports. Leases and roots cannot be read from
    the files; they are carried over from the old index as far as it can still be read.
    Run it with the daemon stopped: its open connection would keep writing the old file.
    """
    old_leases, old_roots = _salvage(layout.metadata_db)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{layout.metadata_db}{suffix}").unlink(missing_ok=True)
    metadata = Metadata.open(layout, clock=clock)
    try:
        disk = scan_disk(layout)
        with metadata.transaction():
            for sha, tags in disk.trees.items():
                index_tree(metadata, layout, sha, tags, disk.blobs.get(sha, 0))
            for sha, size in disk.blobs.items():
                if sha not in disk.trees:
                    metadata.record_wheel(sha, "", size, 0, 0, ())
            for key in disk.views:
                index_view(metadata, layout, key)
            for lease in old_leases:
                metadata.restore_lease(lease)
            for root in old_roots:
                metadata.set_root(root.kind, root.path, root.shas)
    except BaseException:
        metadata.close()
        raise
    return metadata


def _salvage(path: Path) -> tuple[list[Lease], list[Root]]:
    """The leases and roots of a damaged index, if it still answers; else none."""
    if not path.exists():
        return [], []
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return [], []
    try:
        old = Metadata(conn, path, time.time)
        return old.leases(), old.roots()
    except sqlite3.Error:
        return [], []
    finally:
        conn.close()


# --- fsck: the index against the files, and the files against their names --------------------

FindingKind = Literal[
    "index-missing",  # no index, but a store with content
    "index-corrupt",  # SQLite cannot read it, or its own check fails
    "tmp-leftover",  # staging of a crashed process (or of an interrupted GC)
    "incomplete-tree",  # a tree without any pyc marker: never published that way
    "corrupt-blob",  # a blob whose bytes do not hash to its name
    "stray",  # a name the layout never produces
    "row-without-entry",  # the index names a tree, blob, marker or view that is not there
    "entry-without-row",  # a tree, blob, marker or view the index does not know
    "dead-lease",  # a lease whose process is gone
]
#: The daemon's own upload area (it empties it at start): fsck leaves it alone.
_DAEMON_TMP = frozenset({"uploads"})
TMP_GRACE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    path: Path | None
    detail: str
    repaired: bool = False


@dataclass(frozen=True, slots=True)
class FsckReport:
    findings: tuple[Finding, ...]
    repair: bool

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def unrepaired(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.repaired)

    def lines(self) -> list[str]:
        if not self.findings:
            return ["the store and its index agree: nothing to repair"]
        out = []
        for f in self.findings:
            state = "repaired" if f.repaired else ("left as is" if self.repair else "found")
            where = f" {f.path}" if f.path is not None else ""
            out.append(f"{f.kind} ({state}):{where}: {f.detail}")
        return out


def _lock_of_tmp_entry(layout: StoreLayout, name: str) -> Path | None:
    """The lock that guards a staged name (``{sha}.*``, ``view-{key}.*``); None if unknown."""
    head, dot, _ = name.partition(".")
    if dot and SHA256_NAME.fullmatch(head):
        return layout.lock_path(head)
    if dot and head.startswith("view-") and len(head) > len("view-"):
        return layout.view_lock_path(head.removeprefix("view-"))
    return None


def fsck(
    layout: StoreLayout,
    *,
    repair: bool,
    clock: Clock = time.time,
    is_alive: IsAlive = leases.is_alive,
    tmp_grace_seconds: float = TMP_GRACE_SECONDS,
) -> FsckReport:
    """Check the store against its names and the index against the store; fix if ``repair``.

    Without ``repair`` nothing is written (safe beside a running daemon). With it: the index is
    rebuilt if missing or corrupt, leftovers and corrupt blobs are deleted (each under its
    lock; one in use is left alone), rows are made to match the files. Incomplete trees and
    stray names are only reported: they should never exist, and someone should look.
    """
    findings: list[Finding] = []
    metadata = _check_index(layout, repair, clock, findings)
    try:
        findings += _check_tmp(layout, repair, clock() - tmp_grace_seconds)
        disk = scan_disk(layout)
        findings += [Finding("stray", p, "not a name the store layout makes") for p in disk.strays]
        for sha, tags in disk.trees.items():
            if not tags:
                detail = "tree without a pyc marker: it was not published by wheelcas"
                findings.append(Finding("incomplete-tree", layout.tree_dir(sha), detail))
        findings += _check_blobs(layout, disk, repair, metadata)
        if metadata is not None:
            disk = scan_disk(layout) if repair else disk  # corrupt blobs may be gone now
            findings += _check_rows(layout, disk, metadata, repair, is_alive)
    finally:
        if metadata is not None:
            metadata.close()
    return FsckReport(tuple(findings), repair)


def _check_index(
    layout: StoreLayout, repair: bool, clock: Clock, findings: list[Finding]
) -> Metadata | None:
    """The open index if it is sound (or was rebuilt); a finding if it is not."""
    path = layout.metadata_db
    if not path.exists():
        disk = scan_disk(layout)
        if not (disk.trees or disk.blobs or disk.views):
            return Metadata.open(layout, clock=clock) if repair else None
        kind: FindingKind = "index-missing"
        detail = "the store has content but no index"
    else:
        try:
            metadata = Metadata.open(layout, clock=clock)
        except StoreError as exc:
            kind, detail = "index-corrupt", str(exc)
        else:
            try:
                problems = metadata.integrity_problems()
            except sqlite3.DatabaseError as exc:
                problems = [str(exc)]
            if not problems:
                return metadata
            metadata.close()
            kind, detail = "index-corrupt", "; ".join(problems[:5])
    if not repair:
        findings.append(Finding(kind, path, detail))
        return None
    # A running daemon keeps its connection to the old file: replacing it under the daemon
    # would split the index in two. Holding the lock also keeps a daemon from starting.
    with try_flock(layout.daemon_lock) as no_daemon:
        if not no_daemon:
            detail += "; a daemon serves this store: stop it, then run fsck --repair again"
            findings.append(Finding(kind, path, detail))
            return None
        rebuilt = rebuild_from_disk(layout, clock=clock)
    findings.append(Finding(kind, path, f"{detail}; rebuilt from the store", repaired=True))
    return rebuilt


def _check_tmp(layout: StoreLayout, repair: bool, older_than: float) -> list[Finding]:
    from cas_daemon.precompile import remove_sealed

    findings = []
    for entry in sorted_entries(layout.tmp_dir):
        if entry.name in _DAEMON_TMP:
            continue
        path = Path(entry.path)
        lock = _lock_of_tmp_entry(layout, entry.name)
        if lock is None:
            # Nobody's lock says whether it is in use: only old enough is safe to call dead.
            if entry.stat(follow_symlinks=False).st_mtime > older_than:
                continue
            if repair:
                remove_sealed(path)
            findings.append(Finding("tmp-leftover", path, "unknown staging, old", repair))
            continue
        with try_flock(lock) as free:
            if not free:
                continue  # being staged right now by the holder of its lock
            if repair:
                remove_sealed(path)
            findings.append(Finding("tmp-leftover", path, "left by a crashed process", repair))
    return findings


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_blobs(
    layout: StoreLayout, disk: DiskScan, repair: bool, metadata: Metadata | None
) -> list[Finding]:
    findings = []
    for sha in disk.blobs:
        path = layout.blob_path(sha)
        actual = _sha256_of(path)
        if actual == sha:
            continue
        detail = f"its bytes hash to {actual}"
        repaired = False
        if repair:
            with try_flock(layout.lock_path(sha)) as free:
                if free:
                    path.unlink(missing_ok=True)
                    if metadata is not None:
                        metadata.forget_blob(sha)
                    repaired = True
                else:
                    detail += " (in use now: run fsck again)"
        findings.append(Finding("corrupt-blob", path, detail, repaired))
    return findings


def _check_rows(
    layout: StoreLayout, disk: DiskScan, metadata: Metadata, repair: bool, is_alive: IsAlive
) -> list[Finding]:
    """Rows that point at nothing, and files no row describes."""
    found: list[Finding] = []

    def note(kind: FindingKind, path: Path | None, detail: str, fix: Callable[[], None]) -> None:
        if repair:
            fix()
        found.append(Finding(kind, path, detail, repair))

    rows = {row.sha256: row for row in metadata.wheels()}
    for sha, row in rows.items():
        tree, blob = layout.tree_dir(sha), layout.blob_path(sha)
        if sha not in disk.trees and sha not in disk.blobs:
            note(
                "row-without-entry",
                tree,
                "no tree and no blob",
                partial(metadata.forget_wheel, sha),
            )
            continue
        if sha not in disk.trees and (row.tree_bytes or row.cache_tags):
            note("row-without-entry", tree, "the tree is gone", partial(metadata.forget_tree, sha))
        if sha not in disk.blobs and row.blob_bytes:
            note("row-without-entry", blob, "the blob is gone", partial(metadata.forget_blob, sha))
        for tag in sorted(row.cache_tags - disk.trees.get(sha, row.cache_tags)):
            marker = layout.pyc_marker(sha, tag)
            note(
                "row-without-entry",
                marker,
                "no such marker",
                partial(metadata.forget_pyc, sha, tag),
            )
    for sha, tags in disk.trees.items():
        known = rows.get(sha)
        if known is None or not tags <= known.cache_tags or not known.tree_bytes:
            blob_bytes = disk.blobs.get(sha, 0)
            fix = partial(index_tree, metadata, layout, sha, tags, blob_bytes)
            note("entry-without-row", layout.tree_dir(sha), "tree not in the index", fix)
    for sha, size in disk.blobs.items():
        if sha not in rows and sha not in disk.trees:
            fix = partial(metadata.record_wheel, sha, "", size, 0, 0, ())
            note("entry-without-row", layout.blob_path(sha), "blob not in the index", fix)
    indexed_views = {view.key for view in metadata.views()}
    for key in sorted(indexed_views - set(disk.views)):
        fix = partial(metadata.forget_view, key)
        note("row-without-entry", layout.view_dir(key), "the view is gone", fix)
    for key in sorted(set(disk.views) - indexed_views):
        fix = partial(index_view, metadata, layout, key)
        note("entry-without-row", layout.view_dir(key), "view not in the index", fix)
    for lease in metadata.leases():
        if not is_alive(lease.pid, lease.pid_start_time):
            fix = partial(metadata.drop_lease, lease.id)
            note("dead-lease", None, f"{lease.label}: its process is gone", fix)
    return found
