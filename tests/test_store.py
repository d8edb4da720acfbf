"""The store against a real loopback index: publish, warm path, interpreters, processes."""

from __future__ import annotations

import asyncio
import json
import marshal
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cas_daemon import publish as publish_module
from cas_daemon.errors import HashMismatch, StoreError
from cas_daemon.layout import StoreLayout, default_store_root
from cas_daemon.precompile import remove_sealed
from cas_daemon.progress import ProgressEvent
from cas_daemon.store import Store, WheelRef
from lockgen.bundle import bundle_filename, write_bundle
from lockgen.lockfile import LockedDep, sha256_hex
from tests.support.bundles import write_forged_bundle
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag


def _ref(index: PackageIndex, wheel: Path) -> WheelRef:
    return WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, url=index.file_url(wheel.name))


def _wheels(wheel_dir: Path, *names: str) -> list[Path]:
    return [build_wheel(wheel_dir, n, files={f"{n}/__init__.py": f"NAME = {n!r}\n"}) for n in names]


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if not p.is_dir()] if directory.exists() else []


@pytest.fixture
def store() -> Store:
    return Store(StoreLayout(default_store_root()))


def test_ready_publishes_compiled_read_only_trees(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta")
    refs = [_ref(package_index, w) for w in wheels]

    sites = store.ready(refs)

    assert sites == [store.layout.site_dir(r.sha256) for r in refs]
    for site, name in zip(sites, ["alpha", "beta"], strict=True):
        assert (site / name / "__init__.py").read_text() == f"NAME = {name!r}\n"
        assert list((site / name / "__pycache__").glob(f"*.{TAG}.pyc"))
        assert (site.parent / f"pyc-{TAG}").is_file()
        for path in [site, *site.rglob("*")]:
            assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path
        if os.geteuid() != 0:  # root writes through permission bits
            with pytest.raises(PermissionError):
                (site / name / "__init__.py").write_text("changed")
    assert _files(store.layout.tmp_dir) == []
    assert all(store.layout.blob_path(r.sha256).is_file() for r in refs)


def test_pyc_name_the_final_path_not_the_staging_dir(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    (site,) = store.ready([_ref(package_index, _wheels(wheel_dir, "gamma")[0])])
    (pyc,) = (site / "gamma" / "__pycache__").glob(f"*.{TAG}.pyc")
    code = marshal.loads(pyc.read_bytes()[16:])  # noqa: S302 - a file this test just made
    assert code.co_filename == str(site / "gamma" / "__init__.py")


def test_the_warm_path_checks_every_tree_each_time(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    """It keeps the site dirs' paths it made, never the answer: a tree removed (by a GC, by
    hand) makes the next warm check fail, and a tree published again is found again."""
    refs = [_ref(package_index, w) for w in _wheels(wheel_dir, "alpha", "beta")]
    first = store.ready(refs)
    assert store.warm_site_dirs(refs, TAG) == first
    assert [str(p) for p in first] == [f"{store.layout.tree_path(r.sha256)}/site" for r in refs]
    assert [str(p) for p in first] == [str(store.layout.site_dir(r.sha256)) for r in refs]

    remove_sealed(store.layout.tree_dir(refs[1].sha256))

    assert store.warm_site_dirs(refs, TAG) is None
    assert store.warm_site_dirs(refs[:1], TAG) == first[:1]
    assert store.ready(refs) == first
    assert store.warm_site_dirs(refs, TAG) == first
    assert store.warm_site_dirs(refs, "cpython-399") is None


def test_tree_path_is_tree_dir_as_a_string() -> None:
    for root in (Path("/"), Path("/srv/store"), Path("rel/store")):
        layout = StoreLayout(root)
        sha = "ab" + "0" * 62
        assert layout.tree_path(sha) == str(layout.tree_dir(sha))
        assert layout == StoreLayout(root)  # the cached prefix is not part of equality


def test_second_ready_is_warm_and_downloads_nothing(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta")
    refs = [_ref(package_index, w) for w in wheels]
    assert store.warm_site_dirs(refs, TAG) is None
    first = store.ready(refs)
    events: list[ProgressEvent] = []

    assert store.warm_site_dirs(refs, TAG) == first
    assert store.ready(refs, progress=events.append) == first
    assert [w for w in wheels if package_index.downloads(w.name) != 1] == []
    assert [e.kind for e in events] == ["cached", "cached"]


def test_cold_ready_reports_progress(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    events: list[ProgressEvent] = []
    store.ready([_ref(package_index, wheel)], progress=events.append)

    kinds = [e.kind for e in events]
    assert kinds[0] == "start"
    assert kinds[-1] == "ready"
    assert "bytes" in kinds
    assert sum(e.nbytes for e in events if e.kind == "bytes") == wheel.stat().st_size
    assert {e.name for e in events} == {wheel.name}


def test_slow_download_does_not_hold_up_the_others(
    package_index: PackageIndex, wheel_dir: Path
) -> None:
    store = Store(StoreLayout(default_store_root()), max_parallel_downloads=2)
    slow, *fast = _wheels(wheel_dir, "slow", "f1", "f2", "f3")
    package_index.delay(slow.name, 1.5)
    events: list[ProgressEvent] = []

    store.ready([_ref(package_index, w) for w in (slow, *fast)], progress=events.append)

    assert [e.name for e in events if e.kind == "ready"][-1] == slow.name


def test_downloads_go_on_while_publishes_hold_the_loops_default_threads(
    package_index: PackageIndex, wheel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing runs in the store's own threads: two publishes that take long (held here)
    must not take the two threads of the loop's default executor, which the downloads'
    writes need. Sharing them, the third wheel's download would wait for both."""
    store = Store(StoreLayout(default_store_root()))
    first, second, third = _wheels(wheel_dir, "held1", "held2", "free")
    held = {first.name, second.name}
    entered = threading.Semaphore(0)
    release = threading.Event()
    publish = publish_module.publish_tree

    def holding(layout: StoreLayout, ref: WheelRef, *args: Any, **kwargs: Any) -> int:
        if ref.filename in held:
            entered.release()
            assert release.wait(30)
        return publish(layout, ref, *args, **kwargs)

    monkeypatch.setattr(publish_module, "publish_tree", holding)

    async def scenario() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        slow = asyncio.ensure_future(
            store.aready([_ref(package_index, first), _ref(package_index, second)])
        )
        with ThreadPoolExecutor(max_workers=1) as waiter:  # not the loop's: it may be full
            for _ in range(2):
                assert await asyncio.get_running_loop().run_in_executor(
                    waiter, entered.acquire, True, 30
                )
        try:
            (site,) = await asyncio.wait_for(store.aready([_ref(package_index, third)]), 20)
            assert (site / "free" / "__init__.py").is_file()
            assert not slow.done()
        finally:
            release.set()
        await slow

    with store:
        asyncio.run(scenario())


def test_concurrent_calls_in_one_process_share_one_download(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta")
    refs = [_ref(package_index, w) for w in wheels]
    for wheel in wheels:
        package_index.delay(wheel.name, 0.3)

    async def both() -> list[list[Path]]:
        return list(await asyncio.gather(store.aready(refs), store.aready(refs[::-1])))

    first, second = asyncio.run(both())
    assert first == second[::-1]
    assert [package_index.downloads(w.name) for w in wheels] == [1, 1]


def test_ready_inside_a_running_loop_says_to_use_aready(store: Store) -> None:
    async def call() -> None:
        store.ready([])

    with pytest.raises(RuntimeError, match="aready"):
        asyncio.run(call())


def test_corrupt_download_stores_nothing(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    package_index.corrupt(wheel.name)
    ref = _ref(package_index, wheel)

    with pytest.raises(HashMismatch) as caught:
        store.ready([ref])

    assert caught.value.expected == ref.sha256
    layout = store.layout
    assert _files(layout.blobs_dir) == []
    assert _files(layout.tmp_dir) == []
    assert not layout.tree_dir(ref.sha256).exists()


def test_leftovers_of_a_crashed_process_are_removed(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    ref = _ref(package_index, wheel)
    tmp = store.layout.tmp_dir
    (tmp / f"{ref.sha256}.half" / "site" / "pkg").mkdir(parents=True)
    (tmp / f"{ref.sha256}.half" / "site" / "pkg" / "m.py").write_text("")
    (tmp / f"{ref.sha256}.half" / "site").chmod(0o555)  # a crash after sealing
    (tmp / f"{ref.sha256}.junk").write_text("partial download")
    other = tmp / f"{'e' * 64}.part"
    other.write_text("someone else's")

    store.ready([ref])

    assert sorted(tmp.iterdir()) == [other]


def test_python2_only_module_does_not_fail_the_publish(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    files = {"old/__init__.py": "", "old/legacy.py": "print 'python 2'\n"}
    wheel = build_wheel(wheel_dir, "old", files=files)

    (site,) = store.ready([_ref(package_index, wheel)])

    names = sorted(p.name for p in (site / "old" / "__pycache__").iterdir())
    assert names == [f"__init__.{TAG}.pyc"]


def _bundle_ref(model_dir: Path, wheel: Path, sha: str | None = None) -> WheelRef:
    digest = sha or sha256_file(wheel)
    relpath = f".carton/bundled_wheels/{digest}/{wheel.name}"
    target = model_dir / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel, target)
    dep = LockedDep(sha256=sha256_hex(digest), bundled_whl_path=relpath)
    return WheelRef.from_locked_dep(dep, model_dir)


def test_bundled_plain_wheel_is_unpacked_without_a_blob(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    ref = _bundle_ref(tmp_path / "model", wheel)
    assert ref.bundle_path is not None
    assert ref.bundle_path.is_absolute()

    (site,) = store.ready([ref])

    assert (site / "alpha" / "__init__.py").is_file()
    assert _files(store.layout.blobs_dir) == []


def test_tampered_bundled_wheel_raises_hash_mismatch(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    original = sha256_file(wheel)
    tampered = build_wheel(tmp_path / "evil", "alpha", files={"alpha/__init__.py": "EVIL = 1\n"})
    ref = _bundle_ref(tmp_path / "model", tampered, sha=original)

    with pytest.raises(HashMismatch) as caught:
        store.ready([ref])

    assert caught.value.url == str(ref.bundle_path)
    assert caught.value.expected == original
    assert caught.value.actual == sha256_file(tampered)
    assert not store.layout.tree_dir(ref.sha256).exists()
    assert _files(store.layout.tmp_dir) == []


def test_missing_bundle_names_the_file_and_says_to_relock(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    ref = _bundle_ref(tmp_path / "model", wheel)
    assert ref.bundle_path is not None
    ref.bundle_path.unlink()

    with pytest.raises(StoreError, match="missing from the model dir") as caught:
        store.ready([ref])
    assert str(ref.bundle_path) in str(caught.value)
    assert "wheelcas lock" in str(caught.value)


def test_stats_count_blobs_and_trees(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta")
    store.ready([_ref(package_index, w) for w in wheels])

    stats = store.stats()
    assert (stats.blobs, stats.trees) == (2, 2)
    assert stats.blob_bytes == sum(w.stat().st_size for w in wheels)
    assert stats.tree_bytes > 0


@pytest.mark.slow
def test_another_interpreter_adds_its_pyc_to_the_same_tree(
    store: Store,
    package_index: PackageIndex,
    wheel_dir: Path,
    pyenv_python: Callable[[str], str],
) -> None:
    python312 = pyenv_python("3.12")
    refs = [_ref(package_index, w) for w in _wheels(wheel_dir, "alpha")]
    (site,) = store.ready(refs)
    inode = site.parent.stat().st_ino

    assert store.ready(refs, python=python312) == [site]

    assert site.parent.stat().st_ino == inode
    pycache = site / "alpha" / "__pycache__"
    assert sorted(p.name for p in pycache.iterdir()) == [
        f"__init__.{TAG}.pyc",
        "__init__.cpython-312.pyc",
    ]
    assert store.warm_site_dirs(refs, "cpython-312") == [site]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o222 == 0 for p in [pycache, *pycache.iterdir()])
    assert package_index.downloads(refs[0].filename) == 1


_CHILD = """
import json, sys
from pathlib import Path
from cas_daemon.store import Store, WheelRef
refs = [WheelRef(r["sha256"], r["filename"], url=r["url"]) for r in json.loads(sys.argv[1])]
print(json.dumps([str(p) for p in Store.open_default().ready(refs)]))
"""


@pytest.mark.slow
def test_two_processes_ready_the_same_cold_lock_once(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta", "gamma", "delta")
    for wheel in wheels:
        package_index.delay(wheel.name, 0.2)  # keep both processes inside the cold path
    refs = [_ref(package_index, w) for w in wheels]
    arg = json.dumps([{"sha256": r.sha256, "filename": r.filename, "url": r.url} for r in refs])

    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, arg],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=120) for child in children]

    assert [c.returncode for c in children] == [0, 0], [err for _, err in outputs]
    expected = [str(store.layout.site_dir(r.sha256)) for r in refs]
    assert [json.loads(out) for out, _ in outputs] == [expected, expected]
    assert [package_index.downloads(w.name) for w in wheels] == [1, 1, 1, 1]
    assert store.stats().trees == 4
    assert _files(store.layout.tmp_dir) == []


def _compressed_bundle_ref(model_dir: Path, wheel: Path, sha: str) -> WheelRef:
    relpath = f".carton/bundled_wheels/{sha}/{bundle_filename(wheel.name)}"
    (model_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
    write_bundle(wheel, model_dir / relpath)
    dep = LockedDep(sha256=sha256_hex(sha), bundled_whl_path=relpath)
    return WheelRef.from_locked_dep(dep, model_dir)


def test_compressed_bundle_is_unpacked_and_checked(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    ref = _compressed_bundle_ref(tmp_path / "model", wheel, sha256_file(wheel))
    assert ref.bundle_path is not None
    assert (ref.sha256, ref.wheel_sha256) == (sha256_file(ref.bundle_path), sha256_file(wheel))

    (site,) = store.ready([ref])

    assert site == store.layout.site_dir(sha256_file(ref.bundle_path))  # keyed by its bytes
    assert not store.layout.tree_dir(sha256_file(wheel)).exists()
    assert (site / "alpha" / "__init__.py").read_text() == "NAME = 'alpha'\n"
    assert list((site / "alpha" / "__pycache__").glob(f"*.{TAG}.pyc"))
    assert _files(store.layout.blobs_dir) == []


def test_compressed_bundle_of_another_wheel_is_refused(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    stale = build_wheel(tmp_path / "old", "alpha", files={"alpha/__init__.py": "OLD = 1\n"})
    ref = _compressed_bundle_ref(tmp_path / "model", stale, sha256_file(wheel))

    with pytest.raises(HashMismatch) as caught:
        store.ready([ref])

    assert caught.value.url == str(ref.bundle_path)
    assert caught.value.actual == sha256_file(stale)
    assert not store.layout.tree_dir(ref.sha256).exists()


def test_a_forged_bundle_does_not_become_the_wheel_it_claims(
    store: Store, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    sha = sha256_file(wheel)
    evil = build_wheel(tmp_path / "evil", "alpha", files={"alpha/__init__.py": "NAME = 'evil'\n"})
    model = tmp_path / "model"
    relpath = f".carton/bundled_wheels/{sha}/{bundle_filename(wheel.name)}"
    (model / relpath).parent.mkdir(parents=True)
    write_forged_bundle(evil, model / relpath, sha)
    forged = WheelRef.from_locked_dep(
        LockedDep(sha256=sha256_hex(sha), bundled_whl_path=relpath), model
    )

    (evil_site,) = store.ready([forged])
    (site,) = store.ready([_ref(package_index, wheel)])

    assert evil_site == store.layout.site_dir(sha256_file(model / relpath))
    assert site == store.layout.site_dir(sha) != evil_site
    assert (site / "alpha" / "__init__.py").read_text() == "NAME = 'alpha'\n"
    assert package_index.downloads(wheel.name) == 1


def test_a_bundle_changed_after_its_key_was_taken_is_refused(
    store: Store, wheel_dir: Path, tmp_path: Path
) -> None:
    first, second = _wheels(wheel_dir, "alpha", "beta")
    ref = _compressed_bundle_ref(tmp_path / "model", first, sha256_file(first))
    assert ref.bundle_path is not None
    write_bundle(second, ref.bundle_path)  # swapped between the key and the unpacking

    with pytest.raises(HashMismatch) as caught:
        store.ready([ref])

    assert (caught.value.expected, caught.value.actual) == (
        ref.sha256,
        sha256_file(ref.bundle_path),
    )
    assert _files(store.layout.trees_dir) == []


def test_a_cancelled_ready_leaves_nothing_and_releases_the_lock(
    store: Store, package_index: PackageIndex, wheel_dir: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "alpha")
    ref = _ref(package_index, wheel)
    package_index.delay(wheel.name, 30)

    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(store.aready([ref]), 0.5))

    assert _files(store.layout.tmp_dir) == []
    assert _files(store.layout.blobs_dir) == []
    package_index.clear_faults()
    assert store.ready([ref]) == [store.layout.site_dir(ref.sha256)]
