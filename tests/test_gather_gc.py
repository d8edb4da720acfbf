"""Garbage collection of the gather cache: the pure plan on values, then real gathers in
``tmp_path`` (the per-test ``WHEELCAS_HOME``, conftest) collected by ``wheelcas gc``."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from loader import gather_pool
from loader.cli import _gather_gc_beside_daemon, main
from loader.gather_gc import (
    CachedTree,
    GatherListing,
    GatherRemoval,
    Leftover,
    PoolObject,
    StatCacheFile,
    apply_gather_gc,
    list_gather_cache,
    plan_gather_gc,
    stat_cache_source,
)
from loader.gather_plan import MARKER_NAME
from loader.gather_pool import STALE_TMP_S, path_key, tree_lock_path
from loader.gathering import gather, gather_home

DAY = 86400.0
NOW = 1_800_000_000.0


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _kinds(removals: tuple[GatherRemoval, ...]) -> dict[str, str]:
    return {r.name: r.kind for r in removals}


# --- the pure plan ------------------------------------------------------------------------


def test_trees_unused_for_longer_than_the_age_limit_go_with_the_objects_only_they_link() -> None:
    old, recent = "a" * 64, "b" * 64
    listing = GatherListing(
        trees=(
            CachedTree(old, NOW - 40 * DAY, files=3, links={(1, 10): 1, (1, 11): 1, (1, 12): 1}),
            CachedTree(recent, NOW - DAY),  # not read: it stays
        ),
        objects=(
            PoolObject("objects/10/x", (1, 10), nlink=2, nbytes=100),  # the old tree's only
            PoolObject("objects/11/x", (1, 11), nlink=3, nbytes=200),  # and an -o output's
            PoolObject("objects/12/x", (1, 12), nlink=3, nbytes=300),  # and the recent tree's
            PoolObject("objects/13/x", (1, 13), nlink=1, nbytes=400),  # nobody's
            PoolObject("objects/14/x", (1, 14), nlink=2, nbytes=500),  # an output's
        ),
    )
    plan = plan_gather_gc(listing, now=NOW, max_age=30 * DAY)
    assert _kinds(plan.removals) == {
        f"trees/{old}": "tree",
        "objects/10/x": "object",
        "objects/13/x": "object",
    }
    reasons = {r.name: r.reason for r in plan.removals}
    assert reasons[f"trees/{old}"].startswith("unused for more than 30 days: last used ")
    assert reasons[f"trees/{old}"].endswith("40 days ago")
    assert reasons["objects/10/x"] == "only cached trees removed in this pass link to it"
    assert reasons["objects/13/x"] == "no gather output links to it"
    assert plan.bytes_freed == 500
    tree = next(r for r in plan.removals if r.kind == "tree")
    assert tree.as_of == NOW - 40 * DAY  # checked again before removal


def test_without_an_age_limit_no_tree_goes_by_age_but_garbage_still_goes() -> None:
    listing = GatherListing(
        trees=(
            CachedTree("a" * 64, NOW - 400 * DAY, links={}),
            CachedTree("c" * 64, None, files=1, links={(1, 10): 1}),  # no marker: damaged
        ),
        objects=(PoolObject("objects/10/x", (1, 10), nlink=2, nbytes=1),),
        leftovers=(
            Leftover("tmp/object.old", NOW - STALE_TMP_S - 1, 7),
            Leftover("tmp/tree-new.x", NOW - 60, 7),  # a gather may be writing it
            Leftover("stat/.key.json.tmp", NOW - 2 * STALE_TMP_S, 7),
        ),
        stat_caches=(
            StatCacheFile("stat/gone.json", NOW, 1, "/src/gone", source_exists=False),
            StatCacheFile("stat/here.json", NOW - 400 * DAY, 1, "/src/here", source_exists=True),
            StatCacheFile("stat/unknown.json", NOW - 400 * DAY, 1, None, source_exists=False),
        ),
    )
    plan = plan_gather_gc(listing, now=NOW, max_age=None)
    assert _kinds(plan.removals) == {
        f"trees/{'c' * 64}": "tree",
        "objects/10/x": "object",
        "tmp/object.old": "leftover",
        "stat/.key.json.tmp": "leftover",
        "stat/gone.json": "stat",
    }
    assert "no longer exists" in next(r.reason for r in plan.removals if r.kind == "stat")
    # With an age limit, a stat cache whose dir cannot be told goes once it is old.
    aged = plan_gather_gc(listing, now=NOW, max_age=30 * DAY)
    assert "stat/unknown.json" in _kinds(aged.removals)
    assert f"trees/{'a' * 64}" in _kinds(aged.removals)


def test_a_tree_whose_files_were_not_read_frees_no_object() -> None:
    listing = GatherListing(
        trees=(CachedTree("a" * 64, NOW - 40 * DAY, links=None),),
        objects=(PoolObject("objects/10/x", (1, 10), nlink=2, nbytes=1),),
    )
    plan = plan_gather_gc(listing, now=NOW, max_age=30 * DAY)
    assert _kinds(plan.removals) == {f"trees/{'a' * 64}": "tree"}  # the object: next pass


def test_the_plan_for_a_person_groups_pool_objects() -> None:
    listing = GatherListing(
        trees=(CachedTree("d" * 64, NOW - 40 * DAY, files=2, links={(1, 1): 1, (1, 2): 1}),),
        objects=tuple(PoolObject(f"objects/0{i}/x", (1, i), 2, 1024) for i in (1, 2)),
    )
    lines = plan_gather_gc(listing, now=NOW, max_age=30 * DAY).lines("/h/gather/v1")
    assert lines[0] == (
        "gather cache /h/gather/v1: 3 to remove, freeing 2.0 KiB (1 cached tree, 2 pool "
        "objects; age limit 30 days)"
    )
    assert lines[1].startswith("  remove gather tree dddddddddddd (2 files, 0 B of its own): ")
    assert lines[2] == (
        "  remove 2 gather pool objects (2.0 KiB): only cached trees removed in this pass "
        "link to it"
    )


# --- real gathers ---------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """``one`` (with an external dir) and ``two``: they share the content of ``a.py``."""
    return {
        "one": _write(tmp_path / "one", {"a.py": "A = 1\n", "b.py": "B = 1\n"}),
        "common": _write(tmp_path / "common", {"c.py": "C = 1\n"}),
        "two": _write(tmp_path / "two", {"a.py": "A = 1\n", "x.py": "X = 1\n"}),
        "three": _write(tmp_path / "three", {"t.py": "T = 1\n"}),
    }


def _age(tree: Path, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(tree / MARKER_NAME, (when, when))


def _object(digest: str) -> Path:
    return gather_pool.Pool(gather_home()).path(digest, executable=False)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_a_gather_marks_the_tree_it_reuses_as_used(models: dict[str, Path]) -> None:
    first = gather(models["one"])
    _age(first.path, 40)
    again = gather(models["one"])
    assert again.reused
    assert again.path == first.path
    assert time.time() - (again.path / MARKER_NAME).stat().st_mtime < 60


def test_the_listing_tells_each_stat_caches_dir(models: dict[str, Path]) -> None:
    gather(models["one"], runner_opts={"external_package_dirs": "../common"})
    caches = list((gather_home() / "stat").glob("*.json"))
    sources = {stat_cache_source(c) for c in caches}
    assert sources == {os.path.realpath(models["one"]), os.path.realpath(models["common"])}
    assert {c.name for c in caches} == {f"{path_key(s)}.json" for s in sources if s}


def test_wheelcas_gc_removes_an_old_tree_and_its_objects_but_keeps_an_outputs(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WHEELCAS_SOCKET", "off")  # no daemon: the local GC
    old = gather(models["one"], runner_opts={"external_package_dirs": "../common"})
    out = gather(models["two"], tmp_path / "out")
    recent = gather(models["three"])
    gone_out = gather(models["three"], tmp_path / "out3")  # its objects: recent's too
    shutil.rmtree(models["three"])  # its stat cache goes
    shutil.rmtree(gone_out.path)
    _age(old.path, 40)
    home = gather_home()
    lock = tree_lock_path(home, old.digest)
    assert lock.exists()

    assert main(["gc", "--max-age", "30d", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"remove gather tree {old.digest[:12]} (3 files, 0 B of its own): unused " in printed
    # b.py and c.py were only the old tree's; a.py is also the -o output's, so it stays.
    assert "remove 2 gather pool objects (12 B): only cached trees removed in this pass" in printed
    assert f"its dir {os.path.realpath(models['three'])} no longer exists" in printed
    assert old.path.is_dir()  # a dry run removes nothing

    assert main(["gc", "--max-age", "30d"]) == 0
    printed = capsys.readouterr().out
    assert "gather cache: removed 4 items, freed " in printed  # 12 B and the stat cache
    assert "; 0 skipped" in printed
    assert not old.path.exists()
    assert not lock.exists()
    assert recent.path.is_dir()  # used within the limit
    assert not _object(_digest("B = 1\n")).exists()
    assert not _object(_digest("C = 1\n")).exists()
    assert _object(_digest("A = 1\n")).stat().st_nlink == 2  # the pool's and the output's
    assert (out.path / "a.py").read_text() == "A = 1\n"
    assert _object(_digest("T = 1\n")).stat().st_nlink == 2  # the recent tree's
    assert not list((home / "tmp").iterdir())

    # A gather afterwards puts the removed content back into the pool.
    again = gather(models["one"], runner_opts={"external_package_dirs": "../common"})
    assert again.digest == old.digest
    assert not again.reused
    assert _object(_digest("B = 1\n")).stat().st_nlink == 2


def test_a_tree_in_use_or_used_since_the_plan_stays(models: dict[str, Path]) -> None:
    home = gather_home()
    tree = gather(models["one"])
    _age(tree.path, 40)
    plan = plan_gather_gc(
        list_gather_cache(home, unused_before=time.time() - 30 * DAY),
        now=time.time(),
        max_age=30 * DAY,
    )
    assert f"trees/{tree.digest}" in _kinds(plan.removals)
    with gather_pool._flock(tree_lock_path(home, tree.digest)):  # a gather looking it up
        result = apply_gather_gc(home, plan)
    assert [why for item, why in result.skipped if item.kind == "tree"] == [
        "a gather is looking it up or building it (its lock is held)"
    ]
    # Its objects stayed too: the tree still links them.
    assert {item.kind for item, _ in result.skipped} == {"tree", "object"}
    gather(models["one"])  # reused: marked used
    result = apply_gather_gc(home, plan)
    assert [why for item, why in result.skipped if item.kind == "tree"] == [
        "used since the plan was made"
    ]
    assert (tree.path / "a.py").is_file()


def test_a_gather_links_an_object_gc_removed_after_its_check(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = gather(models["two"], tmp_path / "out")
    shutil.rmtree(first.path)
    for digest in (_digest("A = 1\n"), _digest("X = 1\n")):
        _object(digest).unlink()  # as `wheelcas gc` does with objects nothing links
    real_has = gather_pool.Pool.has
    checked: set[str] = set()

    def has_before_the_gc(pool: gather_pool.Pool, digest: str, executable: bool, size: int) -> bool:
        if digest not in checked:  # the first check (the stat cache knows every digest)
            checked.add(digest)
            return True
        return real_has(pool, digest, executable, size)

    monkeypatch.setattr(gather_pool.Pool, "has", has_before_the_gc)
    again = gather(models["two"], tmp_path / "out")
    assert (again.path / "x.py").read_text() == "X = 1\n"
    assert _object(_digest("X = 1\n")).stat().st_nlink == 2


def test_gc_beside_a_daemon_collects_the_gather_cache_of_its_store(
    models: dict[str, Path],
) -> None:
    from cas_daemon.layout import default_store_root

    tree = gather(models["one"])
    _age(tree.path, 40)
    ns = argparse.Namespace(dry_run=True)
    day_limit = {"max_bytes": None, "max_age_seconds": DAY}
    elsewhere = _gather_gc_beside_daemon({"store_root": "/nowhere", "limits": day_limit}, ns)
    assert elsewhere[0].startswith("gather cache not collected: the daemon's store /nowhere")
    older = _gather_gc_beside_daemon({"lines": []}, ns)
    assert "an older wheelcas" in older[0]
    report = {"store_root": str(default_store_root()), "limits": day_limit}
    lines = _gather_gc_beside_daemon(report, ns)
    assert any(line.startswith(f"  remove gather tree {tree.digest[:12]}") for line in lines)
    assert tree.path.is_dir()
    lines = _gather_gc_beside_daemon(report, argparse.Namespace(dry_run=False))
    assert lines[-1].startswith("gather cache: removed ")
    assert not tree.path.exists()
