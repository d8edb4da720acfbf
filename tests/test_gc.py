"""Garbage collection: the pure planner on in-memory snapshots, then apply on a real store."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cas_daemon import view_plan, views
from cas_daemon.gc import apply_gc, collect, run_for_daemon, snapshot
from cas_daemon.gc_plan import (
    BlobInfo,
    GcLimits,
    GcPlan,
    Removal,
    RootRef,
    StoreSnapshot,
    TreeInfo,
    ViewInfo,
    human_bytes,
    plan_gc,
)
from cas_daemon.layout import StoreLayout
from cas_daemon.leases import is_alive, process_start_time
from cas_daemon.metadata import Metadata
from cas_daemon.store import Store, WheelRef
from lockgen.lockfile import sha256_hex
from tests.support.clock import FakeClock
from tests.support.wheels import build_wheel, sha256_file

DAY = 86400.0
NOW = 100 * DAY
TAG = sys.implementation.cache_tag


def sha(c: str) -> str:
    return c * 64


def tree(c: str, nbytes: int, days_ago: float) -> TreeInfo:
    return TreeInfo(sha(c), f"{c}-1.0-py3-none-any.whl", nbytes, NOW - days_ago * DAY)


def blob(c: str, nbytes: int, days_ago: float) -> BlobInfo:
    return BlobInfo(sha(c), f"{c}-1.0-py3-none-any.whl", nbytes, NOW - days_ago * DAY)


def view(key: str, members: str, nbytes: int, days_ago: float) -> ViewInfo:
    return ViewInfo(key, frozenset(sha(c) for c in members), nbytes, NOW - days_ago * DAY)


def removed(plan: GcPlan) -> list[tuple[str, str]]:
    return [(r.kind, r.name if r.kind == "view" else r.name[0]) for r in plan.removals]


def kept_reasons(plan: GcPlan, kind: str, name: str) -> tuple[str, ...]:
    return next(k.reasons for k in plan.kept if (k.kind, k.name) == (kind, name))


# --- the planner ------------------------------------------------------------------------


def test_no_limits_remove_nothing() -> None:
    snap = StoreSnapshot(trees=(tree("a", 10, 400),), blobs=(blob("a", 5, 400),))
    plan = plan_gc(snap, GcLimits(), NOW)
    assert plan.removals == ()
    assert plan.bytes_freed == 0


def test_age_limit_removes_what_was_not_used_since() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 40), tree("b", 200, 10), tree("c", 300, 31)),
        blobs=(blob("a", 50, 40), blob("b", 60, 10), blob("d", 70, 45), blob("e", 80, 5)),
    )
    plan = plan_gc(snap, GcLimits(max_age_seconds=30 * DAY), NOW)

    assert sorted(removed(plan)) == [("blob", "a"), ("blob", "d"), ("tree", "a"), ("tree", "c")]
    by_name = {(r.kind, r.name[0]): r for r in plan.removals}
    assert by_name["tree", "a"].reason.startswith("older than 30 days: last used ")
    assert "40 days ago" in by_name["tree", "a"].reason
    assert by_name["blob", "a"].reason == "its tree is removed"
    assert by_name["blob", "a"].with_tree
    assert "its tree is not in the store" in by_name["blob", "d"].reason
    assert plan.bytes_freed == 100 + 300 + 50 + 70
    assert plan.total_bytes == 100 + 200 + 300 + 50 + 60 + 70 + 80
    assert plan.bytes_after == plan.total_bytes - plan.bytes_freed


def test_size_limit_drops_blobs_first_then_trees_least_recently_used_first() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 1), tree("b", 100, 3), tree("c", 100, 2), tree("d", 100, 0)),
        blobs=(blob("a", 10, 1), blob("d", 10, 0)),
    )
    plan = plan_gc(snap, GcLimits(max_bytes=220), NOW)

    # 420 bytes: both blobs go first (400), then the two least recently used trees (b, c).
    assert removed(plan) == [("tree", "b"), ("tree", "c"), ("blob", "a"), ("blob", "d")]
    blob_reason = next(r.reason for r in plan.removals if r.kind == "blob")
    assert "blob of a kept tree" in blob_reason
    assert "the unpacked tree is what gets imported" in blob_reason
    tree_reason = next(r.reason for r in plan.removals if r.kind == "tree")
    assert tree_reason.startswith("least recently used under size pressure (limit 220 B)")
    assert plan.bytes_after == 200
    assert plan.over_budget == 0


def test_size_limit_stops_as_soon_as_the_store_fits() -> None:
    snap = StoreSnapshot(trees=(tree("a", 100, 3), tree("b", 100, 2), tree("c", 100, 1)))
    plan = plan_gc(snap, GcLimits(max_bytes=250), NOW)
    assert removed(plan) == [("tree", "a")]


def test_age_goes_first_then_size() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 60), tree("b", 100, 5), tree("c", 100, 1), tree("d", 100, 2))
    )
    plan = plan_gc(snap, GcLimits(max_bytes=150, max_age_seconds=30 * DAY), NOW)
    assert removed(plan) == [("tree", "a"), ("tree", "b"), ("tree", "d")]
    reasons = [r.reason.split(":")[0] for r in plan.removals]
    assert reasons[0] == "older than 30 days"
    assert reasons[1].startswith("least recently used under size pressure")


def test_a_leased_tree_survives_both_limits() -> None:
    lease = RootRef("lease", "lease 7 (pid 4242)", trees=frozenset({sha("a")}))
    snap = StoreSnapshot(
        trees=(tree("a", 1000, 90), tree("b", 10, 1)), blobs=(blob("a", 10, 90),), roots=(lease,)
    )
    plan = plan_gc(snap, GcLimits(max_bytes=0, max_age_seconds=DAY), NOW)

    assert ("tree", "a") not in removed(plan)
    # The blob of a leased tree may go under size pressure: the tree is what is imported.
    assert ("blob", "a") in removed(plan)
    assert kept_reasons(plan, "tree", sha("a")) == ("lease 7 (pid 4242)",)
    assert plan.over_budget == 1000
    assert "everything left is held" in plan.lines()[-1]


def test_a_leased_view_keeps_its_member_trees() -> None:
    lease = RootRef("lease", "lease 3 (pid 99)", views=frozenset({"v1"}))
    snap = StoreSnapshot(
        trees=(tree("a", 100, 90), tree("b", 100, 90), tree("c", 100, 90)),
        views=(view("v1", "ab", 5, 90),),
        roots=(lease,),
    )
    plan = plan_gc(snap, GcLimits(max_bytes=0, max_age_seconds=DAY), NOW)

    assert removed(plan) == [("tree", "c")]
    assert kept_reasons(plan, "view", "v1") == ("lease 3 (pid 99)",)
    assert kept_reasons(plan, "tree", sha("a")) == ("member of view v1 (lease 3 (pid 99))",)


def test_a_kept_view_holds_its_old_member_trees() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 90), tree("b", 100, 90)),
        views=(view("recent", "a", 5, 1),),
    )
    plan = plan_gc(snap, GcLimits(max_age_seconds=30 * DAY), NOW)

    assert removed(plan) == [("tree", "b")]
    assert kept_reasons(plan, "tree", sha("a")) == ("member of kept view recent",)


def test_removing_a_view_under_size_pressure_frees_its_trees() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 9), tree("b", 100, 1)),
        views=(view("old", "a", 10, 5),),
    )
    plan = plan_gc(snap, GcLimits(max_bytes=150), NOW)

    # Tree a is the least recently used but its view holds it until the view itself goes.
    assert removed(plan) == [("view", "old"), ("tree", "a")]
    assert plan.bytes_after == 100


def test_an_old_view_goes_by_age_and_its_trees_with_it() -> None:
    snap = StoreSnapshot(trees=(tree("a", 100, 90),), views=(view("old", "a", 10, 90),))
    plan = plan_gc(snap, GcLimits(max_age_seconds=30 * DAY), NOW)
    assert removed(plan) == [("view", "old"), ("tree", "a")]


def test_watched_and_pinned_models_are_roots() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 100, 90), tree("b", 100, 90), tree("c", 100, 90)),
        blobs=(blob("d", 50, 90),),
        roots=(
            RootRef("watched", "watched model /models/w", trees=frozenset({sha("a")})),
            RootRef("pinned", "pinned model /models/p", trees=frozenset({sha("b"), sha("d")})),
        ),
    )
    plan = plan_gc(snap, GcLimits(max_bytes=0, max_age_seconds=DAY), NOW)

    assert removed(plan) == [("tree", "c")]
    assert kept_reasons(plan, "tree", sha("a")) == ("watched model /models/w",)
    assert kept_reasons(plan, "tree", sha("b")) == ("pinned model /models/p",)
    # A rooted blob without its tree is the only copy left: kept even under size pressure.
    assert kept_reasons(plan, "blob", sha("d"))[-1].startswith("the only copy")


def test_dry_run_lines_name_each_item_its_size_and_reason() -> None:
    snap = StoreSnapshot(
        trees=(tree("a", 3 * 2**20, 40), tree("b", 10, 1)),
        roots=(RootRef("pinned", "pinned model /m", trees=frozenset({sha("b")})),),
    )
    plan = plan_gc(snap, GcLimits(max_age_seconds=30 * DAY), NOW)
    lines = plan.lines()
    assert lines[0] == "1 to remove, freeing 3.0 MiB (store 3.0 MiB -> 10 B)"
    assert lines[1].startswith("  remove tree aaaaaaaaaaaa a-1.0-py3-none-any.whl (3.0 MiB): ")
    assert lines[2] == "1 kept because something holds them:"
    assert lines[3] == "  keep tree bbbbbbbbbbbb b-1.0-py3-none-any.whl: pinned model /m"
    assert plan.to_json()["removals"][0]["bytes"] == 3 * 2**20


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        GcLimits(max_bytes=-1)
    with pytest.raises(ValueError, match="max_age"):
        GcLimits(max_age_seconds=0)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 2**30, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 GiB",
        "3.0 TiB",
    ]


# --- apply on a real store ----------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    return StoreLayout(tmp_path / "store")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def meta(layout: StoreLayout, clock: FakeClock) -> Iterator[Metadata]:
    with Metadata.open(layout, clock=clock) as opened:
        yield opened


def _publish(layout: StoreLayout, meta: Metadata, dists: Path, *names: str) -> dict[str, str]:
    """Publish real wheels, each with a blob, recorded as the daemon does; name -> sha256."""
    refs: list[WheelRef] = []
    found: dict[str, str] = {}
    for name in names:
        wheel = build_wheel(dists, name, files={f"{name}/__init__.py": f"NAME = {name!r}\n"})
        ref = WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, bundle_path=wheel)
        refs.append(ref)
        found[name] = ref.sha256
        # A bundled wheel leaves no blob; give it one, as a downloaded wheel would have.
        layout.blob_path(ref.sha256).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel, layout.blob_path(ref.sha256))
    Store(layout).ready(refs)
    for ref in refs:
        size = layout.blob_path(ref.sha256).stat().st_size
        meta.record_published(ref.sha256, ref.filename, size, 1000, 3, TAG)
    return found


def _everything_older_than_a_day(layout: StoreLayout, meta: Metadata, clock: FakeClock) -> GcPlan:
    clock.now += 2 * DAY
    return plan_gc(snapshot(layout, meta), GcLimits(max_age_seconds=DAY), clock.now)


def test_apply_removes_trees_blobs_and_rows_and_leaves_no_trace(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha", "beta")
    clock.now += 2 * DAY
    meta.touch([shas["beta"]])

    plan = plan_gc(snapshot(layout, meta), GcLimits(max_age_seconds=DAY), clock.now)
    result = apply_gc(layout, meta, plan)

    assert [(r.kind, r.name) for r in result.removed] == [
        ("tree", shas["alpha"]),
        ("blob", shas["alpha"]),
    ]
    assert result.skipped == ()
    assert result.bytes_freed == plan.bytes_freed
    assert not layout.tree_dir(shas["alpha"]).exists()
    assert not layout.blob_path(shas["alpha"]).exists()
    assert layout.site_dir(shas["beta"]).is_dir()
    assert layout.blob_path(shas["beta"]).is_file()
    assert [row.sha256 for row in meta.wheels()] == [shas["beta"]]
    assert list(layout.tmp_dir.iterdir()) == []


def test_apply_skips_a_wheel_whose_lock_is_held(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")
    plan = _everything_older_than_a_day(layout, meta, clock)
    fd = os.open(layout.lock_path(shas["alpha"]), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process publishing it, say
    try:
        result = apply_gc(layout, meta, plan)
    finally:
        os.close(fd)

    assert result.removed == ()
    assert {s.why for s in result.skipped} == {
        "its lock is held: the wheel is being published or removed by another process"
    }
    assert layout.site_dir(shas["alpha"]).is_dir()


def test_apply_rechecks_leases_taken_after_the_plan(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")
    plan = _everything_older_than_a_day(layout, meta, clock)
    start = process_start_time(os.getpid())
    assert start is not None
    meta.add_lease(os.getpid(), start, [shas["alpha"]], None)

    result = apply_gc(layout, meta, plan)

    assert result.removed == ()
    tree_skip = next(s for s in result.skipped if s.item.kind == "tree")
    assert tree_skip.why.startswith("held since the plan was made: lease 1 (pid ")
    blob_skip = next(s for s in result.skipped if s.item.kind == "blob")
    assert blob_skip.why == "its tree stays"
    assert layout.site_dir(shas["alpha"]).is_dir()
    assert layout.blob_path(shas["alpha"]).is_file()


def test_apply_skips_what_was_used_after_the_plan(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")
    plan = _everything_older_than_a_day(layout, meta, clock)
    clock.now += 1
    meta.touch([shas["alpha"]])
    result = apply_gc(layout, meta, plan)
    assert result.removed == ()
    assert layout.site_dir(shas["alpha"]).is_dir()


def test_apply_removes_nothing_that_is_not_in_the_plan(
    layout: StoreLayout, meta: Metadata, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")
    stale = Removal("tree", "f" * 64, "ghost", 1, 0.0, "test")
    result = apply_gc(layout, meta, GcPlan(0.0, GcLimits(), 0, (stale,), ()))
    assert [r.name for r in result.removed] == ["f" * 64]  # nothing there: nothing to do
    assert layout.site_dir(shas["alpha"]).is_dir()
    assert layout.blob_path(shas["alpha"]).is_file()


def test_a_live_process_lease_protects_its_trees_until_it_is_killed(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha", "beta")
    loader = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start_time(loader.pid)
        assert start is not None
        meta.add_lease(loader.pid, start, [shas["alpha"]], None)
        clock.now += 2 * DAY

        plan, result = collect(layout, meta, GcLimits(max_bytes=0), dry_run=False, now=clock.now)
        assert result is not None
        # The leased tree stays; its blob may go under size pressure (the tree is imported).
        assert {(r.kind, r.name) for r in result.removed} == {
            ("tree", shas["beta"]),
            ("blob", shas["beta"]),
            ("blob", shas["alpha"]),
        }
        assert plan.kept[0].reasons == (f"lease 1 (pid {loader.pid})",)
        assert layout.site_dir(shas["alpha"]).is_dir()
    finally:
        loader.send_signal(signal.SIGTERM)
        loader.wait()
    assert not is_alive(loader.pid, start)

    _plan, result = collect(layout, meta, GcLimits(max_bytes=0), dry_run=False, now=clock.now)
    assert result is not None
    assert {(r.kind, r.name) for r in result.removed} == {("tree", shas["alpha"])}
    assert not layout.tree_dir(shas["alpha"]).exists()
    assert meta.leases() == []  # the dead lease went with it


def test_views_go_first_and_a_skipped_view_keeps_its_trees(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha", "beta")
    members = list(shas.values())
    key = view_plan.view_key(members, TAG)
    entries = [(f"{name}-1.0-py3-none-any.whl", layout.site_dir(s)) for name, s in shas.items()]
    views.ensure_view(layout, entries, key)
    meta.record_view(key, members)
    plan = _everything_older_than_a_day(layout, meta, clock)
    assert [r.kind for r in plan.removals][:1] == ["view"]

    fd = os.open(layout.view_lock_path(key), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # someone is building or removing the view
    try:
        blocked = apply_gc(layout, meta, plan)
    finally:
        os.close(fd)
    assert blocked.removed == ()
    assert layout.view_site_dir(key).is_dir()
    assert all(layout.site_dir(s).is_dir() for s in members)

    result = apply_gc(layout, meta, plan)
    assert {r.kind for r in result.removed} == {"view", "tree", "blob"}
    assert not layout.view_dir(key).exists()
    assert meta.views() == []
    assert meta.wheels() == []
    assert list(layout.tmp_dir.iterdir()) == []


def test_snapshot_indexes_what_the_index_does_not_know(
    layout: StoreLayout, clock: FakeClock, tmp_path: Path
) -> None:
    wheel = build_wheel(tmp_path / "dists", "embedded")
    ref = WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, bundle_path=wheel)
    Store(layout).ready([ref])  # published without the daemon: no row
    with Metadata.open(layout, clock=clock) as meta:
        snap = snapshot(layout, meta)
        (found,) = snap.trees
        assert found.sha256 == ref.sha256
        assert found.filename == wheel.name
        assert found.nbytes > 0
        assert found.last_used == clock.now
        assert [row.sha256 for row in meta.wheels()] == [ref.sha256]


def test_dry_run_through_the_daemon_entry_point_removes_nothing(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")

    class Settings:
        gc_max_bytes: int | None = 0
        gc_max_age: float | None = None

    report = asyncio.run(run_for_daemon(layout, meta, Settings(), dry_run=True))

    assert report["dry_run"] is True
    assert report["summary"].startswith("2 to remove")
    assert {r["kind"] for r in report["plan"]["removals"]} == {"tree", "blob"}
    assert layout.site_dir(shas["alpha"]).is_dir()

    report = asyncio.run(run_for_daemon(layout, meta, Settings(), dry_run=False))
    assert report["summary"].startswith("removed 2 items")
    assert not layout.tree_dir(shas["alpha"]).exists()


def test_a_lease_whose_pid_was_reused_is_no_root(
    layout: StoreLayout, meta: Metadata, clock: FakeClock, tmp_path: Path
) -> None:
    shas = _publish(layout, meta, tmp_path / "dists", "alpha")
    start = process_start_time(os.getpid())
    assert start is not None
    # This pid is alive, but it is not the process that took the lease: another start time.
    meta.add_lease(os.getpid(), start - 1, [shas["alpha"]], None)

    _plan, result = collect(layout, meta, GcLimits(max_bytes=0), dry_run=False, now=clock.now)

    assert result is not None
    assert ("tree", shas["alpha"]) in {(r.kind, r.name) for r in result.removed}
    assert meta.leases() == []
