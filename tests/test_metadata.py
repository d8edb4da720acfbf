"""The store's index (SQLite), process liveness for leases, rebuild from disk, and fsck."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cas_daemon import leases, view_plan, views
from cas_daemon.diskscan import read_view_members, scan_disk
from cas_daemon.errors import StoreError
from cas_daemon.fsck import fsck, rebuild_from_disk
from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import SCHEMA_VERSION, Metadata
from cas_daemon.store import Store, WheelRef
from lockgen.lockfile import sha256_hex
from tests.support.clock import FakeClock
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    return StoreLayout(tmp_path / "store")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def meta(layout: StoreLayout, clock: FakeClock) -> Iterator[Metadata]:
    with Metadata.open(layout, clock=clock) as opened:
        yield opened


def _publish(layout: StoreLayout, dists: Path, *names: str) -> dict[str, str]:
    """Publish real wheels (bundled, so no blob is made); name -> sha256."""
    refs = []
    for name in names:
        wheel = build_wheel(dists, name, files={f"{name}/__init__.py": f"NAME = {name!r}\n"})
        refs.append(WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, bundle_path=wheel))
    Store(layout).ready(refs)
    return {name: ref.sha256 for name, ref in zip(names, refs, strict=True)}


# --- the database ---------------------------------------------------------------------------


def test_index_lives_in_the_store_in_wal_mode_with_a_schema_version(
    layout: StoreLayout, meta: Metadata
) -> None:
    assert meta.path == layout.root / "v1" / "metadata.sqlite3"
    conn = sqlite3.connect(meta.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_reopening_keeps_rows_and_does_not_migrate_again(
    layout: StoreLayout, meta: Metadata
) -> None:
    meta.record_published(SHA_A, "a-1.0-py3-none-any.whl", 10, 20, 3, TAG)
    meta.close()
    with Metadata.open(layout) as again:
        assert [row.sha256 for row in again.wheels()] == [SHA_A]


def test_an_index_from_a_newer_wheelcas_is_refused(layout: StoreLayout, meta: Metadata) -> None:
    meta.close()
    conn = sqlite3.connect(layout.metadata_db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this wheelcas"):
        Metadata.open(layout)


def test_a_file_that_is_not_a_database_says_to_run_fsck(layout: StoreLayout) -> None:
    layout.metadata_db.parent.mkdir(parents=True)
    layout.metadata_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="wheelcas fsck --repair"):
        Metadata.open(layout)


def test_record_published_keeps_first_publish_time_and_adds_cache_tags(
    meta: Metadata, clock: FakeClock
) -> None:
    meta.record_published(SHA_A, "a.whl", 10, 20, 3, "cpython-311")
    clock.now += 50
    meta.record_published(SHA_A, "a.whl", 10, 25, 4, "cpython-312")

    (row,) = meta.wheels()
    assert row.published_at == 1_000_000.0
    assert row.last_used_at == 1_000_050.0
    assert (row.tree_bytes, row.files) == (25, 4)
    assert row.cache_tags == {"cpython-311", "cpython-312"}


def test_touch_updates_wheels_and_view_in_one_call(meta: Metadata, clock: FakeClock) -> None:
    meta.record_published(SHA_A, "a.whl", 1, 1, 1, TAG)
    meta.record_published(SHA_B, "b.whl", 1, 1, 1, TAG)
    meta.record_view("k1", [SHA_B, SHA_A])
    clock.now += 100

    meta.touch([SHA_A, SHA_C], view_key="k1")  # an unknown sha is ignored

    used = {row.sha256: row.last_used_at for row in meta.wheels()}
    assert used == {SHA_A: 1_000_100.0, SHA_B: 1_000_000.0}
    (view,) = meta.views()
    assert view.last_used_at == 1_000_100.0
    assert view.members == (SHA_B, SHA_A)  # sys.path order, as recorded


def test_record_view_replaces_members(meta: Metadata) -> None:
    meta.record_view("k1", [SHA_A, SHA_B], nbytes=7)
    meta.record_view("k1", [SHA_C], nbytes=9)
    (view,) = meta.views()
    assert (view.members, view.nbytes) == ((SHA_C,), 9)


def test_leases_are_listed_dropped_and_pruned_when_dead(meta: Metadata) -> None:
    first = meta.add_lease(111, 5, [SHA_A, SHA_B], "k1")
    second = meta.add_lease(222, 6, [SHA_C], None)

    held = {lease.id: lease for lease in meta.leases()}
    assert held[first].shas == (SHA_A, SHA_B)
    assert held[first].view_key == "k1"
    assert held[second].pid == 222

    dead = meta.drop_dead_leases(lambda pid, _start: pid == 222)
    assert [d.id for d in dead] == [first]
    meta.drop_lease(second)
    assert meta.leases() == []


def test_roots_are_replaced_per_kind_and_path(meta: Metadata) -> None:
    meta.set_root("watched", "/models/a", [SHA_A, SHA_B])
    meta.set_root("pinned", "/models/a", [SHA_C])
    meta.set_root("watched", "/models/a", [SHA_B])

    roots = {(r.kind, r.path): r.shas for r in meta.roots()}
    assert roots == {("watched", "/models/a"): (SHA_B,), ("pinned", "/models/a"): (SHA_C,)}
    meta.drop_root("watched", "/models/a")
    assert [r.kind for r in meta.roots()] == ["pinned"]
    with pytest.raises(ValueError, match="root kind"):
        meta.set_root("borrowed", "/x", [])  # type: ignore[arg-type]


def test_stats_sum_the_index(meta: Metadata) -> None:
    meta.record_published(SHA_A, "a.whl", 10, 100, 3, TAG)
    meta.record_published(SHA_B, "b.whl", 0, 50, 2, TAG)
    meta.record_view("k", [SHA_A])
    meta.add_lease(1, 1, [SHA_A], None)
    meta.set_root("pinned", "/m", [SHA_B])
    stats = meta.stats()
    assert (stats.wheels, stats.blob_bytes, stats.tree_bytes, stats.files) == (2, 10, 150, 5)
    assert (stats.views, stats.leases, stats.roots) == (1, 1, 1)


def test_tree_holders_name_leases_roots_and_views(meta: Metadata) -> None:
    meta.record_view("k1", [SHA_A])
    meta.add_lease(10, 1, [SHA_A], None)
    meta.add_lease(20, 1, [], "k1")  # holds SHA_A through its view
    meta.add_lease(30, 1, [SHA_A], None)  # dead
    meta.set_root("pinned", "/m", [SHA_A])

    holders = meta.tree_holders(SHA_A, lambda pid, _start: pid != 30)

    assert sorted(holders) == sorted(
        ["lease 1 (pid 10)", "lease 2 (pid 20)", "pinned model /m", "member of view k1"]
    )
    assert meta.tree_holders(SHA_B, lambda _pid, _start: True) == []


# --- process liveness ---------------------------------------------------------------------


def _stat_line(comm: str, state: str = "S", start: int = 4242) -> str:
    # pid (comm) state, then fields 4..21, then starttime (22) and a few more.
    middle = " ".join(str(n) for n in range(4, 22))
    return f"77 ({comm}) {state} {middle} {start} 1000 2000\n"


@pytest.mark.parametrize("comm", ["python", "my prog", "a) b (c", ") ) (", ""])
def test_stat_is_parsed_after_the_last_parenthesis(comm: str) -> None:
    assert leases.parse_stat(_stat_line(comm)) == ("S", 4242)


@pytest.mark.parametrize("text", ["", "77 python S 1 2", "77 (x) S 1 2 3", "77 (x) S " + "z " * 30])
def test_malformed_stat_gives_none(text: str) -> None:
    assert leases.parse_stat(text) is None


def test_own_start_time_matches_proc() -> None:
    start = leases.process_start_time(os.getpid())
    assert start is not None
    assert start > 0
    assert leases.is_alive(os.getpid(), start)


def test_a_reused_pid_is_not_the_leased_process() -> None:
    start = leases.process_start_time(os.getpid())
    assert start is not None
    assert not leases.is_alive(os.getpid(), start + 1)


def test_an_exited_process_is_dead_even_before_it_is_reaped() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = leases.process_start_time(child.pid)
        assert start is not None
        assert leases.is_alive(child.pid, start)
        child.kill()
        # Until wait() the child is a zombie: still in /proc, but its sys.path is gone.
        _wait_for_state(child.pid, "Z")
        assert not leases.is_alive(child.pid, start)
        assert leases.process_start_time(child.pid) is None
    finally:
        child.kill()
        child.wait()
    assert not leases.is_alive(child.pid, start)


def _wait_for_state(pid: int, state: str) -> None:
    import time

    for _ in range(200):
        parsed = leases.parse_stat(Path(f"/proc/{pid}/stat").read_text())
        if parsed is not None and parsed[0] == state:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached state {state}")


def test_unknown_start_time_falls_back_to_pid_existence() -> None:
    assert leases.is_alive(os.getpid(), 0)
    assert not leases.is_alive(0, 0)


def test_a_proc_that_hides_other_processes_counts_them_alive(tmp_path: Path) -> None:
    fake_proc = tmp_path / "proc"  # hidepid: not even pid 1 is listed
    fake_proc.mkdir()
    assert leases.process_start_time(os.getpid(), proc=fake_proc) is None
    assert leases.is_alive(os.getpid(), 12345, proc=fake_proc)  # the kernel says it exists
    (fake_proc / "1").mkdir()  # a /proc that shows everything: absent means gone
    assert not leases.is_alive(os.getpid(), 12345, proc=fake_proc)


# --- rebuilding the index from the store --------------------------------------------------


def test_rebuild_after_the_index_is_deleted(
    layout: StoreLayout, tmp_path: Path, clock: FakeClock
) -> None:
    shas = _publish(layout, tmp_path / "dists", "alpha", "beta")
    orphan = "d" * 64
    layout.blob_path(orphan).parent.mkdir(parents=True)
    layout.blob_path(orphan).write_bytes(b"x" * 5)
    entries = [(f"{n}-1.0-py3-none-any.whl", layout.site_dir(s)) for n, s in shas.items()]
    key = view_plan.view_key(list(shas.values()), TAG)
    views.ensure_view(layout, entries, key)
    with Metadata.open(layout, clock=clock) as first:
        lease = first.add_lease(os.getpid(), 1, [shas["alpha"]], key)
        first.set_root("pinned", "/models/m", [shas["beta"]])
    layout.metadata_db.unlink()
    for leftover in layout.base.glob("metadata.sqlite3-*"):
        leftover.unlink()

    with rebuild_from_disk(layout, clock=clock) as rebuilt:
        rows = {row.sha256: row for row in rebuilt.wheels()}
        assert set(rows) == {*shas.values(), orphan}
        alpha = rows[shas["alpha"]]
        assert alpha.filename == "alpha-1.0-py3-none-any.whl"
        assert alpha.cache_tags == {TAG}
        assert alpha.tree_bytes > 0
        assert alpha.files >= 3
        assert alpha.last_used_at == clock.now  # unknown: counted as used now
        assert (rows[orphan].blob_bytes, rows[orphan].tree_bytes) == (5, 0)
        (view,) = rebuilt.views()
        assert view.key == key
        assert view.members == tuple(shas.values())  # from the view's manifest, in order
        assert rebuilt.leases() == []
        assert rebuilt.roots() == []
    assert lease > 0


def test_rebuild_carries_leases_and_roots_over_from_a_readable_index(
    layout: StoreLayout, meta: Metadata
) -> None:
    lease = meta.add_lease(4321, 99, [SHA_A], None)
    meta.set_root("watched", "/models/w", [SHA_B])
    meta.close()

    with rebuild_from_disk(layout) as rebuilt:
        (kept,) = rebuilt.leases()
        assert (kept.id, kept.pid, kept.pid_start_time, kept.shas) == (lease, 4321, 99, (SHA_A,))
        assert [(r.kind, r.path, r.shas) for r in rebuilt.roots()] == [
            ("watched", "/models/w", (SHA_B,))
        ]


def test_view_members_from_symlinks_when_there_is_no_manifest(
    layout: StoreLayout, tmp_path: Path
) -> None:
    shas = _publish(layout, tmp_path / "dists", "gamma", "delta")
    site = layout.view_site_dir("handmade")
    site.mkdir(parents=True)
    for name, sha in shas.items():
        (site / name).symlink_to(layout.site_dir(sha) / name)
    (site / "outside").symlink_to(tmp_path)

    assert set(read_view_members(layout, "handmade")) == set(shas.values())


# --- fsck ---------------------------------------------------------------------------------


def test_fsck_of_a_sound_store_finds_nothing(layout: StoreLayout, tmp_path: Path) -> None:
    shas = _publish(layout, tmp_path / "dists", "alpha")
    with Metadata.open(layout) as meta:
        meta.record_published(shas["alpha"], "alpha.whl", 0, 1, 1, TAG)
    report = fsck(layout, repair=False)
    assert report.ok, report.lines()
    assert report.lines() == ["the store and its index agree: nothing to repair"]
    assert fsck(layout, repair=True).ok


def test_fsck_removes_tmp_leftovers_unless_their_lock_is_held(
    layout: StoreLayout, meta: Metadata
) -> None:
    layout.tmp_dir.mkdir(parents=True)
    crashed = layout.tmp_dir / f"{SHA_A}.1234abcd"
    (crashed / "site" / "pkg").mkdir(parents=True)
    (crashed / "site" / "pkg" / "m.py").write_text("x = 1\n")
    (crashed / "site" / "pkg").chmod(0o555)  # sealed, as a crashed publish may leave it
    busy = layout.tmp_dir / f"{SHA_B}.5678.part"
    busy.write_bytes(b"downloading")
    (layout.tmp_dir / "uploads").mkdir()  # the daemon's own
    layout.lock_path(SHA_B).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock_path(SHA_B), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        found = fsck(layout, repair=False)
        assert [(f.kind, f.path) for f in found.findings] == [("tmp-leftover", crashed)]
        assert crashed.exists()

        repaired = fsck(layout, repair=True)
        assert [(f.kind, f.repaired) for f in repaired.findings] == [("tmp-leftover", True)]
    finally:
        os.close(fd)
    assert not crashed.exists()
    assert busy.exists()
    assert (layout.tmp_dir / "uploads").is_dir()


def test_fsck_deletes_a_corrupt_blob_and_its_size(
    layout: StoreLayout, tmp_path: Path, meta: Metadata
) -> None:
    good = build_wheel(tmp_path / "dists", "good")
    good_sha = sha256_file(good)
    layout.blob_path(good_sha).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(good, layout.blob_path(good_sha))
    layout.blob_path(SHA_C).parent.mkdir(parents=True, exist_ok=True)
    layout.blob_path(SHA_C).write_bytes(b"flipped bits")
    meta.record_wheel(good_sha, good.name, good.stat().st_size, 0, 0, ())
    meta.record_wheel(SHA_C, "c.whl", 12, 0, 0, ())

    report = fsck(layout, repair=True)

    corrupt = [f for f in report.findings if f.kind == "corrupt-blob"]
    assert [(f.path, f.repaired) for f in corrupt] == [(layout.blob_path(SHA_C), True)]
    assert not layout.blob_path(SHA_C).exists()
    assert layout.blob_path(good_sha).exists()
    assert [row.sha256 for row in meta.wheels()] == [good_sha]  # the emptied row went too
    assert fsck(layout, repair=False).ok


def test_fsck_reports_incomplete_trees_and_stray_names(layout: StoreLayout, meta: Metadata) -> None:
    tree = layout.tree_dir(SHA_A)
    (tree / "site").mkdir(parents=True)
    stray = layout.trees_dir / "zz"
    stray.mkdir()

    report = fsck(layout, repair=True)

    kinds = {(f.kind, f.path) for f in report.findings}
    assert ("incomplete-tree", tree) in kinds
    assert ("stray", stray) in kinds
    assert tree.exists()
    assert stray.exists()


def test_fsck_reconciles_rows_and_files(layout: StoreLayout, tmp_path: Path) -> None:
    shas = _publish(layout, tmp_path / "dists", "alpha")
    with Metadata.open(layout) as meta:
        meta.record_published(SHA_B, "gone.whl", 10, 10, 1, TAG)  # nothing on disk
        meta.record_view("ghost", [SHA_B])
        meta.add_lease(os.getpid(), 1, [SHA_B], None)  # pid reused: dead

    report = fsck(layout, repair=True)

    kinds = sorted(f.kind for f in report.findings)
    assert kinds == ["dead-lease", "entry-without-row", "row-without-entry", "row-without-entry"]
    assert all(f.repaired for f in report.findings)
    with Metadata.open(layout) as meta:
        assert [row.sha256 for row in meta.wheels()] == [shas["alpha"]]
        assert meta.views() == []
        assert meta.leases() == []
    assert fsck(layout, repair=False).ok


def test_fsck_rebuilds_a_corrupt_index(layout: StoreLayout, tmp_path: Path) -> None:
    shas = _publish(layout, tmp_path / "dists", "alpha")
    layout.metadata_db.write_bytes(b"\0garbage" * 512)

    found = fsck(layout, repair=False)
    assert [f.kind for f in found.findings] == ["index-corrupt"]

    repaired = fsck(layout, repair=True)
    assert [(f.kind, f.repaired) for f in repaired.findings] == [("index-corrupt", True)]
    with Metadata.open(layout) as meta:
        assert [row.sha256 for row in meta.wheels()] == [shas["alpha"]]


def test_fsck_notices_a_missing_index_only_when_the_store_has_content(
    layout: StoreLayout, tmp_path: Path
) -> None:
    assert fsck(layout, repair=False).ok
    _publish(layout, tmp_path / "dists", "alpha")
    assert [f.kind for f in fsck(layout, repair=False).findings] == ["index-missing"]
    assert not layout.metadata_db.exists()  # without --repair nothing is written
    assert [f.repaired for f in fsck(layout, repair=True).findings] == [True]
    assert scan_disk(layout).trees  # the store itself is untouched


def test_fsck_does_not_replace_the_index_under_a_running_daemon(
    layout: StoreLayout, tmp_path: Path
) -> None:
    _publish(layout, tmp_path / "dists", "alpha")
    layout.metadata_db.write_bytes(b"\0garbage" * 512)
    fd = os.open(layout.daemon_lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a running daemon holds
    try:
        report = fsck(layout, repair=True)
    finally:
        os.close(fd)
    (finding,) = report.findings
    assert finding.kind == "index-corrupt"
    assert not finding.repaired
    assert "stop it, then run fsck --repair again" in finding.detail
    assert layout.metadata_db.read_bytes().startswith(b"\0garbage")
