"""Deferred bytecode: a tree is ready once its modules outside test dirs have ``.pyc``; the
test dirs are compiled afterwards, in the background, by the store's owner. Pure split, the
store, the compile pool's priorities, views, and a real daemon (also one killed half-way)."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cas_daemon.compile_pool import CompilerPools
from cas_daemon.config import load_config
from cas_daemon.deferred import DeferredBytecode, DeferredStats
from cas_daemon.layout import StoreLayout, is_deferred_dir
from cas_daemon.precompile import compile_tree, complete_deferred, deferred_roots, seal_read_only
from cas_daemon.store import Store, WheelRef
from cas_daemon.view_plan import view_key
from cas_daemon.views import ensure_view
from lockgen.lockfile import sha256_hex
from tests.daemon_support import lock_model, running_daemon, start_daemon, url_dep
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag

#: A package as wheels ship them: code, a test suite inside it, and a nested test dir.
FILES = {
    "tpkg/__init__.py": "NAME = 'tpkg'\n",
    "tpkg/core.py": "X = 1\n",
    "tpkg/tests/__init__.py": "",
    "tpkg/tests/test_core.py": "def test_x():\n    assert True\n",
    "tpkg/sub/test/test_deep.py": "Y = 2\n",
    "tpkg/sub/helpers.py": "Z = 3\n",
    "tpkg/testing.py": "W = 4\n",  # a module named like a test dir is code: compiled at once
}
READY = ["tpkg/__init__.py", "tpkg/core.py", "tpkg/sub/helpers.py", "tpkg/testing.py"]
DEFERRED = ["tpkg/tests/__init__.py", "tpkg/tests/test_core.py", "tpkg/sub/test/test_deep.py"]


def _pyc(site: Path, relpath: str) -> Path:
    source = site / relpath
    return source.parent / "__pycache__" / f"{source.stem}.{TAG}.pyc"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _ref(index: PackageIndex, wheel: Path) -> WheelRef:
    return WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, url=index.file_url(wheel.name))


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWUSR)


# --- which modules wait --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "deferred"),
    [("tests", True), ("test", True), ("testing", False), ("_tests", False), ("Tests", False)],
)
def test_only_dirs_named_tests_or_test_are_deferred(name: str, deferred: bool) -> None:
    assert is_deferred_dir(name) is deferred


def test_compile_tree_with_defer_leaves_the_test_dirs_and_counts_them(tmp_path: Path) -> None:
    site = _write(tmp_path / "site", FILES)
    with CompilerPools(workers=1) as pools:
        left = compile_tree(site, sys.executable, pools=pools, defer=True)
    assert left == len(DEFERRED)
    assert all(_pyc(site, r).is_file() for r in READY)
    assert not any(_pyc(site, r).exists() for r in DEFERRED)
    assert deferred_roots(site) == [site / "tpkg/sub/test", site / "tpkg/tests"]


def test_without_defer_everything_is_compiled(tmp_path: Path) -> None:
    site = _write(tmp_path / "site", FILES)
    with CompilerPools(workers=1) as pools:
        assert compile_tree(site, sys.executable, pools=pools) == 0
    assert all(_pyc(site, r).is_file() for r in READY + DEFERRED)


def test_completing_opens_only_the_test_dirs_and_seals_them_again(tmp_path: Path) -> None:
    site = _write(tmp_path / "site", FILES)
    with CompilerPools(workers=1) as pools:
        compile_tree(site, sys.executable, pools=pools, defer=True)
        seal_read_only(site)
        seen: dict[str, bool] = {}
        original = pools.compile_deferred

        def watching(site_dir: Path, python: str, *, display_dir: Path | None = None) -> int:
            seen["code dir writable"] = _writable(site / "tpkg")
            seen["test dir writable"] = _writable(site / "tpkg/tests")
            return original(site_dir, python, display_dir=display_dir)

        pools.compile_deferred = watching  # type: ignore[method-assign]
        assert complete_deferred(site, sys.executable, pools=pools) == len(DEFERRED)
    assert seen == {"code dir writable": False, "test dir writable": True}
    assert all(_pyc(site, r).is_file() for r in DEFERRED)
    for path in [site / "tpkg/tests", site / "tpkg/tests/__pycache__", _pyc(site, DEFERRED[1])]:
        assert not _writable(path), path


def test_background_batches_wait_for_the_others(tmp_path: Path) -> None:
    """With one worker, a tree queued after a big background job is done long before it."""
    body = "".join(f"def f{i}(x):\n    return [x * {i} for _ in range({i})]\n" for i in range(300))
    slow = _write(tmp_path / "slow", {f"p/tests/m{n:03}.py": body for n in range(120)})
    quick = _write(tmp_path / "quick", {"q/__init__.py": "Q = 1\n"})
    finished: dict[str, float] = {}
    with CompilerPools(workers=1) as pools:
        pools.compile_tree(quick, sys.executable)  # the worker is started and warm

        def background() -> None:
            pools.compile_deferred(slow, sys.executable)
            finished["background"] = time.monotonic()

        thread = threading.Thread(target=background)
        thread.start()
        time.sleep(0.2)  # the background job's batches are queued and one is being compiled
        (quick / "q/more.py").write_text("M = 2\n", encoding="utf-8")
        pools.compile_tree(quick, sys.executable)
        finished["foreground"] = time.monotonic()
        thread.join()
    assert finished["foreground"] < finished["background"]
    assert _pyc(quick, "q/more.py").is_file()
    assert all(_pyc(slow, f"p/tests/m{n:03}.py").is_file() for n in range(120))


# --- the store ------------------------------------------------------------------------------


Published = tuple[Store, WheelRef, Path]


@pytest.fixture
def published(package_index: PackageIndex, wheel_dir: Path, tmp_path: Path) -> Iterator[Published]:
    """A store that defers test bytecode, with the ``FILES`` wheel published: the store, the
    wheel's ref and its site dir."""
    ref = _ref(package_index, build_wheel(wheel_dir, "tpkg", files=FILES))
    with Store(StoreLayout(tmp_path / "store"), defer_test_bytecode=True) as store:
        (site,) = store.ready([ref])
        yield store, ref, site


def test_a_store_that_defers_publishes_first_and_completes_later(published: Published) -> None:
    store, ref, site = published
    layout = store.layout
    assert store.warm_site_dirs([ref], TAG) == [site]  # ready: loaders may use it now
    assert all(_pyc(site, r).is_file() for r in READY)
    assert not any(_pyc(site, r).exists() for r in DEFERRED)
    assert store.deferred_trees() == [(ref.sha256, TAG)]
    assert layout.deferred_marker(ref.sha256, TAG).read_text().strip() == sys.executable

    assert asyncio.run(store.acomplete_deferred(ref.sha256, TAG)) == len(DEFERRED)
    assert asyncio.run(store.acomplete_deferred(ref.sha256, TAG)) is None  # done already
    assert store.deferred_trees() == []
    assert all(_pyc(site, r).is_file() for r in DEFERRED)
    assert not layout.deferred_marker(ref.sha256, TAG).exists()
    assert not _writable(site / "tpkg/tests/__pycache__")


def test_a_tree_without_test_dirs_leaves_no_marker(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(wheel_dir, "plain", files={"plain/__init__.py": "P = 1\n"})
    with Store(StoreLayout(tmp_path / "store"), defer_test_bytecode=True) as store:
        store.ready([_ref(package_index, wheel)])
        assert store.deferred_trees() == []


def test_the_default_store_compiles_everything_before_ready(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(wheel_dir, "tpkg", files=FILES)
    with Store(StoreLayout(tmp_path / "store")) as store:
        (site,) = store.ready([_ref(package_index, wheel)])
        assert store.deferred_trees() == []
    assert all(_pyc(site, r).is_file() for r in READY + DEFERRED)


def test_a_tree_that_fails_is_reported_and_the_next_one_is_still_done(
    package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    broken = build_wheel(wheel_dir, "tpkg", files=FILES)
    fine = build_wheel(wheel_dir, "other", files={"other/tests/test_o.py": "O = 1\n"})
    refs = [_ref(package_index, broken), _ref(package_index, fine)]
    layout = StoreLayout(tmp_path / "store")
    with Store(layout, defer_test_bytecode=True) as store:
        store.ready(refs)
        gone = layout.deferred_marker(refs[0].sha256, TAG)
        gone.write_text("/nonexistent/python3\n", encoding="utf-8")  # that Python went away

        async def work() -> DeferredStats:
            deferred = DeferredBytecode(store, idle_poll=0.01)
            await deferred.start()
            try:
                for _ in range(1000):  # 20 s at most
                    if not deferred.stats().pending:
                        return deferred.stats()
                    await asyncio.sleep(0.02)
                raise AssertionError("the deferred work did not end")
            finally:
                await deferred.aclose()

        stats = asyncio.run(work())
    assert (stats.trees_done, stats.modules_done, stats.failures) == (1, 1, 1)
    assert stats.last_error is not None
    assert "/nonexistent/python3" in stats.last_error
    assert gone.exists()  # tried again at the next start-up
    assert not layout.deferred_marker(refs[1].sha256, TAG).exists()


def test_the_daemon_defers_unless_configured_not_to(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("", encoding="utf-8")
    assert load_config(empty, environ={}).defer_test_bytecode is True
    config = tmp_path / "d.toml"
    config.write_text("[store]\ndefer_test_bytecode = false\n", encoding="utf-8")
    assert load_config(config, environ={}).defer_test_bytecode is False


# --- views ---------------------------------------------------------------------------------


def test_a_view_shows_test_dirs_through_symlinks_so_later_bytecode_appears(
    published: Published,
) -> None:
    store, ref, site = published
    view = ensure_view(store.layout, [(ref.filename, site)], view_key([ref.sha256], TAG))
    tests_link = view / "tpkg/tests"
    assert tests_link.is_symlink()
    assert tests_link.resolve() == (site / "tpkg/tests").resolve()
    assert not tests_link.readlink().is_absolute()  # relative: the store may move
    assert (view / "tpkg/sub/test").is_symlink()
    assert not (view / "tpkg").is_symlink()  # code stays hard-linked
    assert (view / "tpkg/core.py").stat().st_ino == (site / "tpkg/core.py").stat().st_ino
    assert not _pyc(view, DEFERRED[1]).exists()

    asyncio.run(store.acomplete_deferred(ref.sha256, TAG))
    assert _pyc(view, DEFERRED[1]).is_file()
    assert _pyc(view, DEFERRED[2]).is_file()


# --- the daemon ----------------------------------------------------------------------------


def test_a_daemon_answers_before_the_test_dirs_and_compiles_them_after(
    short_tmp: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheel = build_wheel(wheel_dir, "tpkg", files=FILES)
    model = tmp_path / "model"
    entry = lock_model(model, [url_dep(package_index, wheel)])
    store = tmp_path / "store"
    with running_daemon(short_tmp, store) as daemon:
        client = daemon.client()
        result = client.resolve(model, entry)
        assert result.view is not None
        assert all(_pyc(result.view, r).is_file() for r in READY)
        # Importable at once, before their bytecode is there (Python compiles in memory).
        code = "import tpkg.tests.test_core, tpkg.sub.test.test_deep as d; print(d.Y)"
        path = f"import sys; sys.path[:0] = [{str(result.view)!r}]; "
        imported = subprocess.run(
            [sys.executable, "-I", "-c", path + code], capture_output=True, text=True, check=False
        )
        assert (imported.returncode, imported.stdout.strip()) == (0, "2"), imported.stderr

        def done() -> bool:
            deferred = client.status()["deferred_bytecode"]
            return bool(deferred["pending_trees"] == 0 and deferred["trees_done"] == 1)

        _wait_for(done)
        deferred = client.status()["deferred_bytecode"]
        assert deferred["modules_done"] == len(DEFERRED)
        assert deferred["failures"] == 0
        assert "wheelcas_deferred_bytecode_trees 0" in client.metrics()
    assert all(_pyc(result.view, r).is_file() for r in DEFERRED)
    assert not StoreLayout(store).deferred_marker(sha256_file(wheel), TAG).exists()


def test_a_daemon_finishes_what_a_killed_one_left(
    short_tmp: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    """A daemon killed before its deferred pass: the next one finds the marker on start-up.

    The first daemon is kept from compiling in the background by a resolve that does not end
    (a download the index delays for a minute), so its store stays busy until SIGKILL."""
    wheel = build_wheel(wheel_dir, "tpkg", files=FILES)
    stuck = build_wheel(wheel_dir, "stuck", files={"stuck/__init__.py": "S = 1\n"})
    model, hung = tmp_path / "model", tmp_path / "hung"
    entry = lock_model(model, [url_dep(package_index, wheel)])
    hung_entry = lock_model(hung, [url_dep(package_index, stuck)])
    store = tmp_path / "store"
    layout = StoreLayout(store)
    marker = layout.deferred_marker(sha256_file(wheel), TAG)
    package_index.delay(stuck.name, 60)
    first = start_daemon(short_tmp, store, name="first")
    try:
        client = first.client()
        hanging = threading.Thread(
            target=lambda: _swallow(lambda: first.client().resolve(hung, hung_entry)), daemon=True
        )
        hanging.start()
        _wait_for(lambda: package_index.downloads(stuck.name) == 1)
        client.resolve(model, entry)
        time.sleep(0.5)
        assert marker.exists()  # busy: nothing was compiled in the background
        assert client.status()["deferred_bytecode"]["pending_trees"] == 1
    finally:
        first.kill()
        package_index.clear_faults()
    site = layout.site_dir(sha256_file(wheel))
    assert not _pyc(site, DEFERRED[1]).exists()
    with running_daemon(short_tmp, store, name="second") as second:
        _wait_for(lambda: not marker.exists())
        assert second.client().status()["deferred_bytecode"]["trees_done"] == 1
    assert all(_pyc(site, r).is_file() for r in DEFERRED)


def _swallow(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # the daemon is killed under it: its error is expected
        return
