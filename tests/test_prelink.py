"""Views staged tree by tree while a cold resolve runs: the same view, built from parts."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from cas_daemon import view_plan, views
from cas_daemon.layout import StoreLayout
from cas_daemon.prelink import Prelinker
from cas_daemon.store import Store, WheelRef
from lockgen.lockfile import sha256_hex
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag

PACKAGES = {
    "nspkg-a": {"nspkg/a/__init__.py": "NAME = 'a'\n"},
    "nspkg-b": {"nspkg/b/__init__.py": "NAME = 'b'\n"},
    "alpha": {
        "alpha/__init__.py": "",
        "alpha/sub/m.py": "X = 1\n",
        "alpha/tests/test_m.py": "def test(): pass\n",
        "single.py": "S = 2\n",
    },
}

Trees = Sequence[tuple[str, Path, str]]  # (wheel filename, site dir, sha256)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(StoreLayout(tmp_path / "store"))


@pytest.fixture
def trees(store: Store, tmp_path: Path) -> Trees:
    """The packages above published by the store: compiled, test dirs deferred, sealed."""
    wheels = [build_wheel(tmp_path / "dists", n, files=f) for n, f in PACKAGES.items()]
    refs = [WheelRef(sha256_hex(sha256_file(w)), w.name, bundle_path=w.absolute()) for w in wheels]
    sites = store.ready(refs)
    return [(ref.filename, site, ref.sha256) for ref, site in zip(refs, sites, strict=True)]


def key_of(trees: Trees, tag: str = TAG) -> str:
    return view_plan.view_key([sha for _, _, sha in trees], tag)


def entries_of(trees: Trees) -> list[tuple[str, Path]]:
    return [(wheel, site) for wheel, site, _ in trees]


def claim(layout: StoreLayout, key: str) -> Prelinker:
    prelinker = Prelinker.claim(layout, key)
    assert prelinker is not None
    return prelinker


def shape(site: Path) -> dict[str, tuple[str, object, int]]:
    """Every path of a view: its kind, what it is (inode, link target) and its mode."""
    found: dict[str, tuple[str, object, int]] = {}
    for path in sorted(site.rglob("*")):
        info = path.lstat()
        rel = path.relative_to(site).as_posix()
        if stat.S_ISLNK(info.st_mode):
            found[rel] = ("symlink", str(path.readlink()), 0)
        elif stat.S_ISDIR(info.st_mode):
            found[rel] = ("dir", None, stat.S_IMODE(info.st_mode))
        else:
            found[rel] = ("file", info.st_ino, stat.S_IMODE(info.st_mode))
    return found


def lock_is_free(layout: StoreLayout, key: str) -> bool:
    fd = os.open(layout.view_lock_path(key), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_view_built_from_parts_is_the_view_built_without_them(store: Store, trees: Trees) -> None:
    layout, key = store.layout, key_of(trees)
    prelinker = claim(layout, key)
    for _, site, sha in trees:
        prelinker.add(sha, site)

    site = prelinker.finish(entries_of(trees))
    plain = views.ensure_view(layout, entries_of(trees), key_of(trees, "another-tag"))

    assert site == layout.view_site_dir(key)
    assert shape(site) == shape(plain)
    assert shape(site)["alpha/tests"][0] == "symlink"  # deferred bytecode shows through it
    assert (site / "nspkg/a/__pycache__").is_dir()
    assert stat.S_IMODE(layout.view_dir(key).stat().st_mode) == 0o555
    code = "import nspkg.a, nspkg.b, alpha.sub.m, single; print(nspkg.a.NAME, nspkg.b.NAME)"
    argv = [
        sys.executable,
        "-I",
        "-B",
        "-c",
        f"import sys; sys.path.insert(0, {str(site)!r})\n{code}",
    ]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == "a b\n"
    assert list(layout.tmp_dir.iterdir()) == []
    assert lock_is_free(layout, key)


def test_the_build_moves_the_parts_instead_of_linking_again(
    store: Store, trees: Trees, monkeypatch: pytest.MonkeyPatch
) -> None:
    prelinker = claim(store.layout, key_of(trees))
    for _, site, sha in trees:
        prelinker.add(sha, site)

    def link_again(source: str, *_: object) -> None:
        raise AssertionError(f"{source} was linked again")

    monkeypatch.setattr(views, "hardlink_tree", link_again)
    site = prelinker.finish(entries_of(trees))

    assert (site / "alpha/sub/m.py").stat().st_ino == (trees[2][1] / "alpha/sub/m.py").stat().st_ino


def test_trees_without_a_part_are_linked_by_the_build(store: Store, trees: Trees) -> None:
    layout, key = store.layout, key_of(trees)
    prelinker = claim(layout, key)
    prelinker.add(trees[0][2], trees[0][1])
    prelinker.add("0" * 64, layout.site_dir("0" * 64))  # no such tree: dropped, no error

    site = prelinker.finish(entries_of(trees))

    assert prelinker.trees_linked == 1
    plain = views.ensure_view(layout, entries_of(trees), key_of(trees, "another-tag"))
    assert shape(site) == shape(plain)
    assert list(layout.tmp_dir.iterdir()) == []


def test_nothing_is_staged_for_a_view_that_exists_or_is_being_built(
    store: Store, trees: Trees
) -> None:
    layout, key = store.layout, key_of(trees)
    lock_path = layout.view_lock_path(key)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process's build
        assert Prelinker.claim(layout, key) is None
    finally:
        os.close(holder)
    views.ensure_view(layout, entries_of(trees), key)
    assert Prelinker.claim(layout, key) is None
    assert list(layout.tmp_dir.iterdir()) == []


def test_closing_drops_the_parts_and_the_lock(store: Store, trees: Trees) -> None:
    layout, key = store.layout, key_of(trees)
    prelinker = claim(layout, key)
    prelinker.add(trees[0][2], trees[0][1])
    prefix = layout.view_staging_prefix(key)
    assert any(p.name.startswith(prefix) for p in layout.tmp_dir.iterdir())

    prelinker.close()
    prelinker.add(trees[1][2], trees[1][1])  # too late: nothing happens
    prelinker.close()

    assert list(layout.tmp_dir.iterdir()) == []
    assert lock_is_free(layout, key)
    assert not layout.view_dir(key).exists()


def test_a_conflict_still_leaves_nothing_behind(store: Store, tmp_path: Path) -> None:
    wheels = [
        build_wheel(tmp_path / "dists", name, files={"clash.py": f"WHO = {name!r}\n"})
        for name in ("one", "two")
    ]
    refs = [WheelRef(sha256_hex(sha256_file(w)), w.name, bundle_path=w.absolute()) for w in wheels]
    sites = store.ready(refs)
    trees = [(r.filename, s, r.sha256) for r, s in zip(refs, sites, strict=True)]
    prelinker = claim(store.layout, key_of(trees))
    for _, site, sha in trees:
        prelinker.add(sha, site)

    with pytest.raises(view_plan.ViewConflict, match=r"clash\.py"):
        prelinker.finish(entries_of(trees))

    assert list(store.layout.tmp_dir.iterdir()) == []
    assert lock_is_free(store.layout, key_of(trees))
