"""Precompiling with persistent worker pools: every module, skipped files, interpreters,
workers that die, and no worker left behind."""

from __future__ import annotations

import importlib.util
import logging
import marshal
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cas_daemon.compile_pool import CompilerPools
from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout, default_store_root
from cas_daemon.precompile import compile_tree
from cas_daemon.store import Store, WheelRef
from lockgen.lockfile import sha256_hex
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag
REPO = Path(__file__).resolve().parent.parent


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _sources(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.py") if "__pycache__" not in p.parts)


def _pyc(source: Path, tag: str = TAG) -> Path:
    return source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"


def _heavy_tree(root: Path, modules: int) -> Path:
    """``modules`` modules of ~10 kB each: long enough to compile that work is in flight."""
    body = "".join(
        f"def f{i}(x, y=1):\n    return [x * {i} + y for _ in range({i})] or {{'k': {i}}}\n"
        for i in range(150)
    )
    return _tree(root, {f"pkg/m{n:03}.py": body for n in range(modules)})


def _gone(pid: int) -> bool:
    """True once ``pid`` is neither running nor a zombie waiting to be reaped."""
    return not Path(f"/proc/{pid}").exists()


def _ref(index: PackageIndex, wheel: Path) -> WheelRef:
    return WheelRef(sha256_hex(sha256_file(wheel)), wheel.name, url=index.file_url(wheel.name))


@pytest.fixture
def pools() -> Iterator[CompilerPools]:
    with CompilerPools(workers=2) as pools:
        yield pools


def test_ready_writes_a_pyc_for_every_module(package_index: PackageIndex, wheel_dir: Path) -> None:
    files = {
        "deep/__init__.py": "",
        "deep/a.py": "A = 1\n",
        "deep/sub/__init__.py": "from deep.a import A\n",
        "deep/sub/b.py": "B = 2\n",
        "deep/sub/caf\u00e9.py": "C = 3\n",  # a name the protocol must carry intact
        "deep/data.txt": "not python\n",
        "top.py": "TOP = True\n",
    }
    wheel = build_wheel(wheel_dir, "deep", files=files)
    with Store(StoreLayout(default_store_root())) as store:
        (site,) = store.ready([_ref(package_index, wheel)])

    sources = _sources(site)
    assert len(sources) == 6
    for source in sources:
        pyc = _pyc(source)
        assert pyc.is_file(), pyc
        data = pyc.read_bytes()
        assert data[:4] == importlib.util.MAGIC_NUMBER
        assert int.from_bytes(data[4:8], "little") == 0  # timestamp-checked, as compileall
        code = marshal.loads(data[16:])  # noqa: S302 - a file this test just made
        assert code.co_filename == str(source)  # the final tree, not the staging dir
    assert not list(site.rglob(f"data.{TAG}.pyc"))


def test_a_file_that_does_not_compile_is_skipped_and_logged(
    package_index: PackageIndex, wheel_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {
        "mixed/__init__.py": "",
        "mixed/py2.py": "print 'only Python 2'\n",
        "mixed/nul.py": "x = 1\0\n",
        "mixed/good.py": "GOOD = 1\n",
    }
    wheel = build_wheel(wheel_dir, "mixed", files=files)
    caplog.set_level(logging.DEBUG, logger="cas_daemon.compile_pool")
    with Store(StoreLayout(default_store_root())) as store:
        (site,) = store.ready([_ref(package_index, wheel)])

    assert _pyc(site / "mixed" / "good.py").is_file()
    assert _pyc(site / "mixed" / "__init__.py").is_file()
    assert not _pyc(site / "mixed" / "py2.py").exists()
    assert not _pyc(site / "mixed" / "nul.py").exists()
    assert "2 file(s) do not compile" in caplog.text
    assert "py2.py" in caplog.text


def test_a_second_interpreter_gets_its_own_pool_and_pyc(
    package_index: PackageIndex, wheel_dir: Path, pyenv_python: Callable[[str], str]
) -> None:
    python312 = pyenv_python("3.12")
    files = {"twice/__init__.py": "X = 1\n", "twice/more.py": "Y = 2\n"}
    wheel = build_wheel(wheel_dir, "twice", files=files)
    ref = _ref(package_index, wheel)
    with Store(StoreLayout(default_store_root())) as store:
        (site,) = store.ready([ref])
        store.ready([ref], python=python312)  # adds 3.12's bytecode to the published tree
        pids = store._compile_pools().worker_pids()

    assert set(pids) == {sys.executable, python312}
    assert not set(pids[sys.executable]) & set(pids[python312])
    magic = subprocess.run(
        [python312, "-I", "-c", "import importlib.util as u; print(u.MAGIC_NUMBER.hex())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for source in _sources(site):
        assert _pyc(source).is_file()
        assert _pyc(source, "cpython-312").read_bytes()[:4].hex() == magic
    assert (site.parent / "pyc-cpython-312").is_file()
    assert all(_gone(pid) for pid in [*pids[sys.executable], *pids[python312]])


def test_the_worker_runs_on_the_oldest_python_it_promises(
    tmp_path: Path, pools: CompilerPools, pyenv_python: Callable[[str], str]
) -> None:
    python38 = pyenv_python("3.8")
    site = _tree(tmp_path / "site", {"old/__init__.py": "A = 1\n", "old/new.py": "match = 1\n"})

    pools.compile_tree(site, python38)

    assert _pyc(site / "old" / "__init__.py", "cpython-38").is_file()
    assert _pyc(site / "old" / "new.py", "cpython-38").is_file()


def test_workers_are_reused_across_trees_and_grow_to_the_pool_size(
    tmp_path: Path, pools: CompilerPools
) -> None:
    small = _tree(tmp_path / "small", {"s/__init__.py": "S = 1\n"})
    pools.compile_tree(small, sys.executable)
    first = pools.worker_pids()[sys.executable]
    assert len(first) == 1  # one batch: one worker, no pool spin-up

    big = _heavy_tree(tmp_path / "big", 40)
    pools.compile_tree(big, sys.executable, display_dir=Path("/shown/big"))
    second = pools.worker_pids()[sys.executable]

    assert set(first) < set(second)
    assert len(second) == 2
    assert all(_pyc(source).is_file() for source in _sources(big))
    code = marshal.loads(_pyc(big / "pkg" / "m000.py").read_bytes()[16:])  # noqa: S302
    assert code.co_filename == "/shown/big/pkg/m000.py"


def test_trees_from_many_threads_share_the_workers(tmp_path: Path, pools: CompilerPools) -> None:
    sites = [_heavy_tree(tmp_path / f"t{n}", 8) for n in range(6)]
    errors: list[BaseException] = []

    def publish(site: Path) -> None:
        try:
            pools.compile_tree(site, sys.executable)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(site,)) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert all(_pyc(s).is_file() for site in sites for s in _sources(site))
    assert len(pools.worker_pids()[sys.executable]) <= 2


@pytest.mark.timeout(60)
def test_a_worker_killed_mid_tree_is_replaced(tmp_path: Path, pools: CompilerPools) -> None:
    pools.compile_tree(_tree(tmp_path / "warm", {"w.py": "W = 1\n"}), sys.executable)
    site = _heavy_tree(tmp_path / "site", 300)
    outcome: list[BaseException | None] = []

    def publish() -> None:
        try:
            pools.compile_tree(site, sys.executable)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish)
    thread.start()
    deadline = time.monotonic() + 30
    while not list((site / "pkg" / "__pycache__").glob("*.pyc")):
        assert time.monotonic() < deadline, "nothing was compiled"
        time.sleep(0.005)
    victims = pools.worker_pids()[sys.executable]
    os.kill(victims[0], signal.SIGKILL)
    thread.join(45)

    assert not thread.is_alive(), "the store hung on a dead worker"
    assert outcome == [None]  # its batches went to a new worker
    assert all(_pyc(source).is_file() for source in _sources(site))
    assert [p.name for p in site.rglob("__pycache__/*") if p.suffix != ".pyc"] == []
    assert victims[0] not in pools.worker_pids()[sys.executable]
    assert _gone(victims[0])


@pytest.mark.timeout(60)
def test_a_worker_that_dies_on_every_try_fails_the_tree_cleanly(
    tmp_path: Path, pools: CompilerPools
) -> None:
    # An "interpreter" whose worker starts fine, then is killed by the first batch it reads.
    fake = tmp_path / "crashing.py"
    fake.write_text(
        textwrap.dedent(
            """\
            import json, os, signal, sys
            sys.stdout.write(json.dumps(["cpython-311", os.getpid()]) + "\\n")
            sys.stdout.flush()
            sys.stdin.readline()
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -I {fake}\n")
    python.chmod(0o755)
    site = _tree(tmp_path / "site", {"doomed.py": "D = 1\n"})

    with pytest.raises(StoreError, match=r"died \(killed by SIGKILL\) twice"):
        pools.compile_tree(site, str(python))
    assert pools.worker_pids()[str(python)] == []


def test_an_interpreter_that_answers_nonsense_is_an_error(
    tmp_path: Path, pools: CompilerPools
) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'some detail' >&2\necho 'this is not python'\n")
    python.chmod(0o755)
    site = _tree(tmp_path / "site", {"m.py": "M = 1\n"})

    with pytest.raises(StoreError, match="some detail"):
        pools.compile_tree(site, str(python))
    with pytest.raises(StoreError, match="cannot run"):
        pools.compile_tree(site, str(tmp_path / "absent"))


def test_closing_the_store_leaves_no_worker_process(
    package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheels = [build_wheel(wheel_dir, n) for n in ("one", "two", "three")]

    async def main() -> dict[str, list[int]]:
        async with Store(StoreLayout(default_store_root())) as store:
            await store.aready([_ref(package_index, w) for w in wheels])
            pids = store._compile_pools().worker_pids()
            assert pids[sys.executable]
            assert not any(_gone(pid) for pid in pids[sys.executable])
        return pids

    import asyncio

    pids = asyncio.run(main())
    assert all(_gone(pid) for pid in pids[sys.executable])


def test_idle_workers_exit_and_come_back(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site", {"a.py": "A = 1\n"})
    with CompilerPools(workers=2, idle_timeout=0.1) as pools:
        pools.compile_tree(site, sys.executable)
        (pid,) = pools.worker_pids()[sys.executable]
        deadline = time.monotonic() + 10
        while not _gone(pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert pools.worker_pids()[sys.executable] == []
        _pyc(site / "a.py").unlink()
        pools.compile_tree(site, sys.executable)
    assert _pyc(site / "a.py").is_file()


@pytest.mark.parametrize("close", ["never", "close"])
def test_a_process_exits_cleanly_with_workers_running(tmp_path: Path, close: str) -> None:
    """At exit (atexit, or a store's finalizer) workers are stopped and reaped: no warning."""
    site = _tree(tmp_path / "site", {"a.py": "A = 1\n", "b/c.py": "C = 1\n"})
    code = textwrap.dedent(
        f"""\
        import atexit, os, sys
        from pathlib import Path

        pids = []

        @atexit.register  # registered first, so it runs last
        def report():
            alive = [pid for pid in pids if os.path.exists(f"/proc/{{pid}}")]
            print("workers", len(pids), "left", len(alive))

        from cas_daemon.layout import StoreLayout
        from cas_daemon.compile_pool import default_pools
        from cas_daemon.precompile import compile_tree
        from cas_daemon.store import Store

        compile_tree(Path({str(site)!r}), sys.executable)
        store = Store(StoreLayout(Path({str(tmp_path / "store")!r})))
        store._compile_pools().compile_tree(Path({str(site)!r}), sys.executable)
        pids += default_pools().worker_pids()[sys.executable]
        pids += store._compile_pools().worker_pids()[sys.executable]
        if {close == "close"!r}:
            store.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout == "workers 2 left 0\n"


def test_module_level_compile_tree_uses_the_default_pools(tmp_path: Path) -> None:
    site = _tree(tmp_path / "site", {"z.py": "Z = 1\n"})
    compile_tree(site, sys.executable)
    assert _pyc(site / "z.py").is_file()


def test_a_forked_child_starts_its_own_workers(tmp_path: Path) -> None:
    """The child must not use, nor hold open, the parent's pipes to its workers."""
    sites = [_tree(tmp_path / name, {"m.py": "M = 1\n"}) for name in ("a", "b", "c")]
    code = textwrap.dedent(
        f"""\
        import os, sys, time
        from pathlib import Path
        from cas_daemon.compile_pool import CompilerPools

        pools = CompilerPools(workers=1)
        pools.compile_tree(Path({str(sites[0])!r}), sys.executable)
        (parent_worker,) = pools.worker_pids()[sys.executable]
        child = os.fork()
        if child == 0:
            pools.compile_tree(Path({str(sites[1])!r}), sys.executable)
            assert pools.worker_pids()[sys.executable] != [parent_worker]
            pools.close()
            time.sleep(3)  # still alive while the parent closes its own pools
            os._exit(0)
        time.sleep(0.5)
        pools.compile_tree(Path({str(sites[2])!r}), sys.executable)
        started = time.monotonic()
        pools.close()  # its worker sees EOF at once: the child holds no copy of the pipe
        print(round(time.monotonic() - started, 1), os.path.exists(f"/proc/{{parent_worker}}"))
        _, status = os.waitpid(child, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )

    assert done.returncode == 0, done.stderr
    seconds, alive = done.stdout.split()
    assert float(seconds) < 2
    assert alive == "False"
    assert all(_pyc(site / "m.py").is_file() for site in sites)
