"""prefetch: model dirs and lockfile paths, the matching entry, dedupe, clear errors; and
what prefetch shows and relies on: the progress renderers, compiling with an interpreter."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout, default_store_root
from cas_daemon.precompile import compile_tree
from cas_daemon.prefetch import (
    MissingLockfileError,
    NoMatchingEntryError,
    collect_refs,
    prefetch,
    target_environment,
)
from cas_daemon.progress import ProgressEvent, make_renderer
from cas_daemon.store import Store
from lockgen.lockfile import (
    LockedDep,
    LockEntry,
    LockFile,
    current_environment,
    entry_markers,
    sha256_hex,
    write_lockfile,
)
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file


def _url_dep(index: PackageIndex, wheel: Path) -> LockedDep:
    return LockedDep(sha256=sha256_hex(sha256_file(wheel)), url=index.file_url(wheel.name))


def _bundled_dep(model_dir: Path, wheel: Path) -> LockedDep:
    sha = sha256_file(wheel)
    relpath = f".carton/bundled_wheels/{sha}/{wheel.name}"
    (model_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheel, model_dir / relpath)
    return LockedDep(sha256=sha256_hex(sha), bundled_whl_path=relpath)


def _lock(
    model_dir: Path, deps: Sequence[LockedDep], markers: Mapping[str, str] | None = None
) -> Path:
    entry = LockEntry(
        markers=entry_markers(current_environment()) if markers is None else markers,
        locked_deps=tuple(deps),
    )
    return write_lockfile(model_dir, LockFile(orig_deps_hash="0" * 64, entries=(entry,)))


@pytest.fixture
def store() -> Store:
    return Store(StoreLayout(default_store_root()))


def test_prefetch_of_a_model_dir_readies_its_wheels(
    store: Store, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    remote = build_wheel(wheel_dir, "remote")
    local = build_wheel(tmp_path / "built", "local")
    _lock(model, [_url_dep(package_index, remote), _bundled_dep(model, local)])

    report = prefetch([model], store=store)

    assert (report.wheels, report.already_ready, report.readied) == (2, 0, 2)
    assert report.lockfiles == (model / ".carton" / "carton.lock",)
    assert [(d / "remote").is_dir() for d in report.site_dirs[:1]] == [True]
    assert (report.site_dirs[1] / "local" / "__init__.py").is_file()
    again = prefetch([model], store=store)
    assert (again.wheels, again.already_ready) == (2, 2)
    assert package_index.downloads(remote.name) == 1


def test_prefetch_of_a_lockfile_path_resolves_bundles_against_its_model_dir(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    local = build_wheel(tmp_path / "built", "local")
    lockfile = _lock(model, [_bundled_dep(model, local)])
    monkeypatch.chdir(tmp_path / "built")  # bundle paths must not depend on the cwd

    report = prefetch([lockfile], store=store)

    assert report.wheels == 1
    assert (report.site_dirs[0] / "local" / "__init__.py").is_file()


def test_wheels_shared_by_targets_are_readied_once(
    store: Store, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    shared = _url_dep(package_index, build_wheel(wheel_dir, "shared"))
    only_b = _url_dep(package_index, build_wheel(wheel_dir, "onlyb"))
    _lock(tmp_path / "a", [shared])
    _lock(tmp_path / "b", [only_b, shared])

    refs = collect_refs([tmp_path / "a", tmp_path / "b"])
    report = prefetch([tmp_path / "a", tmp_path / "b"], store=store)

    assert [r.sha256 for r in refs] == [shared.sha256, only_b.sha256]
    assert report.wheels == 2
    assert package_index.downloads("shared-1.0-py3-none-any.whl") == 1


def test_no_entry_for_the_environment_says_which_and_how_to_fix(tmp_path: Path) -> None:
    markers = {**entry_markers(current_environment()), "python_version": "2.7"}
    _lock(tmp_path / "model", [], markers=markers)

    with pytest.raises(NoMatchingEntryError) as caught:
        prefetch([tmp_path / "model"])

    message = str(caught.value)
    assert "python_version=2.7" in message
    assert f"python_version={current_environment()['python_version']}" in message
    assert f"wheelcas lock {tmp_path / 'model'} --python" in message
    assert caught.value.available == [markers]


def test_a_dir_without_lockfile_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingLockfileError, match="wheelcas lock"):
        prefetch([tmp_path])
    with pytest.raises(MissingLockfileError, match="no such model dir or lockfile"):
        prefetch([tmp_path / "absent"])


@pytest.mark.slow
def test_prefetch_for_another_interpreter_uses_its_entry(
    store: Store,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    pyenv_python: Callable[[str], str],
) -> None:
    python312 = pyenv_python("3.12")
    wheel = build_wheel(wheel_dir, "remote")
    _lock(
        tmp_path / "model",
        [_url_dep(package_index, wheel)],
        markers=entry_markers(target_environment(python312)),
    )

    report = prefetch([tmp_path / "model"], store=store, python=python312)

    assert store.warm_site_dirs(collect_refs([tmp_path / "model"], python312), "cpython-312")
    assert list((report.site_dirs[0] / "remote" / "__pycache__").glob("*.cpython-312.pyc"))


def test_an_interpreter_that_cannot_run_fails_the_publish(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'cannot start: no encodings module' >&2\nexit 2\n")
    broken.chmod(0o755)
    (tmp_path / "site").mkdir()

    with pytest.raises(StoreError, match="no encodings module"):
        compile_tree(tmp_path / "site", str(broken))
    with pytest.raises(StoreError, match="cannot run"):
        compile_tree(tmp_path / "site", str(tmp_path / "absent"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


NUMPY = "numpy-2.1.0-cp311-cp311-linux_x86_64.whl"


def _feed(callback: Callable[[ProgressEvent], None]) -> None:
    callback(ProgressEvent("start", "a" * 64, NUMPY))
    callback(ProgressEvent("bytes", "a" * 64, NUMPY, 12_300_000))
    callback(ProgressEvent("ready", "a" * 64, NUMPY, 12_300_000))
    callback(ProgressEvent("start", "b" * 64, "six-1.16.0-py2.py3-none-any.whl"))
    callback(ProgressEvent("ready", "b" * 64, "six-1.16.0-py2.py3-none-any.whl", 11_053))
    callback(ProgressEvent("cached", "c" * 64, "idna-3.7-py3-none-any.whl"))


def test_progress_is_one_line_per_wheel_off_a_terminal() -> None:
    stream = io.StringIO()
    with make_renderer(stream, total_wheels=3) as callback:
        _feed(callback)
    assert stream.getvalue().splitlines() == [
        f"ready  {NUMPY}  (12.3 MB, fetched)",
        "ready  six-1.16.0-py2.py3-none-any.whl  (11.1 kB, unpacked)",
        "cached idna-3.7-py3-none-any.whl  (already in the store)",
    ]


def test_progress_is_a_bar_on_a_terminal() -> None:
    stream = _Terminal()
    with make_renderer(stream, total_wheels=3) as callback:
        _feed(callback)
    assert "3/3" in stream.getvalue()
    assert "12.3 MB fetched" in stream.getvalue()
