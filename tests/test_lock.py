"""lockgen end to end: real pip, a real loopback index, real wheels and sdists."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from lockgen import lock
from lockgen.errors import PipError, RequirementsError
from lockgen.lockfile import LOCKFILE_RELPATH, read_lockfile
from tests.support.index import PackageIndex
from tests.support.wheels import build_sdist, build_wheel, make_source_dir, sha256_file

pytestmark = pytest.mark.slow


def _model(tmp_path: Path, requirements: str) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "requirements.txt").write_text(requirements)
    return model


def _snapshot(model: Path) -> dict[str, bytes]:
    carton = model / ".carton"
    return {
        str(p.relative_to(model)): p.read_bytes() for p in sorted(carton.rglob("*")) if p.is_file()
    }


@pytest.fixture
def alpha_beta(wheel_dir: Path) -> tuple[Path, Path]:
    """alpha 1.0 depends on beta; both on the index."""
    alpha = build_wheel(wheel_dir, "alpha", "1.0", requires=["beta>=1"])
    beta = build_wheel(wheel_dir, "beta", "1.2")
    return alpha, beta


def test_locks_index_wheels_by_url_and_sha256(
    tmp_path: Path, package_index: PackageIndex, alpha_beta: tuple[Path, Path]
) -> None:
    model = _model(tmp_path, "alpha\n")
    result = lock(model, pip_args=package_index.pip_args())
    assert result.action == "new"
    deps = {d.filename: d for d in result.entry.locked_deps}
    assert set(deps) == {p.name for p in alpha_beta}
    for wheel in alpha_beta:
        assert deps[wheel.name].url == package_index.file_url(wheel.name)
        assert deps[wheel.name].sha256 == sha256_file(wheel)
    lockfile = read_lockfile(model)
    assert lockfile is not None
    assert lockfile.orig_deps_hash == hashlib.sha256(b"alpha\n").hexdigest()
    assert dict(lockfile.entries[0].markers)["python_version"] == "3.11"
    assert not (model / ".carton" / "bundled_wheels").exists()
    assert sorted(p.name for p in (model / ".carton").iterdir()) == ["carton.lock"]


def test_same_hash_and_entry_does_nothing_without_pip(
    tmp_path: Path, package_index: PackageIndex, alpha_beta: tuple[Path, Path]
) -> None:
    model = _model(tmp_path, "alpha\n")
    lock(model, pip_args=package_index.pip_args())
    before = (model / LOCKFILE_RELPATH).stat()
    package_index.stop()  # pip would fail now: an unchanged lock must not start it
    result = lock(model, pip_args=package_index.pip_args())
    assert result.action == "unchanged"
    assert (model / LOCKFILE_RELPATH).stat().st_mtime_ns == before.st_mtime_ns


def test_second_interpreter_appends_an_entry(
    tmp_path: Path,
    package_index: PackageIndex,
    alpha_beta: tuple[Path, Path],
    pyenv_python: Callable[[str], str],
) -> None:
    model = _model(tmp_path, "alpha\n")
    lock(model, pip_args=package_index.pip_args())
    result = lock(model, python=pyenv_python("3.12"), pip_args=package_index.pip_args())
    assert result.action == "appended"
    lockfile = read_lockfile(model)
    assert lockfile is not None
    assert [e.markers["python_version"] for e in lockfile.entries] == ["3.11", "3.12"]
    assert lock(model, python="3.12", pip_args=package_index.pip_args()).action == "unchanged"


def test_new_requirements_start_a_new_lockfile_and_prune_bundles(
    tmp_path: Path, package_index: PackageIndex, alpha_beta: tuple[Path, Path]
) -> None:
    local = build_wheel(tmp_path / "local", "gamma", "0.1")
    model = _model(tmp_path, f"alpha\n{local}\n")
    first = lock(model, pip_args=package_index.pip_args())
    bundle_dir = model / ".carton" / "bundled_wheels" / sha256_file(local)
    assert bundle_dir.is_dir()
    (model / "requirements.txt").write_text("beta\n")
    second = lock(model, pip_args=package_index.pip_args())
    assert second.action == "new"
    lockfile = read_lockfile(model)
    assert lockfile is not None
    assert len(lockfile.entries) == 1
    assert [d.filename for d in second.entry.locked_deps] == [alpha_beta[1].name]
    assert not bundle_dir.exists()
    assert first.lockfile.orig_deps_hash != second.lockfile.orig_deps_hash


@pytest.mark.parametrize("bundle_format", ["zst", "whl"])
def test_a_wheel_off_the_index_is_bundled(
    tmp_path: Path,
    package_index: PackageIndex,
    alpha_beta: tuple[Path, Path],
    bundle_format: str,
) -> None:
    local = build_wheel(tmp_path / "local", "gamma", "0.1", requires=["beta"])
    model = _model(tmp_path, f"{local}\n")
    result = lock(model, pip_args=package_index.pip_args(), bundle_format=bundle_format)  # type: ignore[arg-type]
    by_name = {d.filename.split("-")[0]: d for d in result.entry.locked_deps}
    gamma = by_name["gamma"]
    assert gamma.url is None
    assert gamma.bundled_whl_path is not None
    assert gamma.sha256 == sha256_file(local)
    assert gamma.bundled_whl_path.startswith(f".carton/bundled_wheels/{gamma.sha256}/{local.name}")
    bundled = model / gamma.bundled_whl_path
    assert bundled.is_file()
    if bundle_format == "whl":
        assert bundled.read_bytes() == local.read_bytes()
    else:
        assert bundled.stat().st_size < local.stat().st_size * 2  # compressed, not the zip
    assert by_name["beta"].url == package_index.file_url(alpha_beta[1].name)


def test_sdists_and_local_dirs_are_built_and_bundled(
    tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    build_sdist(wheel_dir, "delta", "2.0")
    make_source_dir(tmp_path / "model" / "localpkg", "localpkg", "0.3")
    model = _model(tmp_path, "delta\n./localpkg\n")
    result = lock(model, pip_args=package_index.pip_args())
    deps = {d.filename.split("-")[0]: d for d in result.entry.locked_deps}
    assert set(deps) == {"delta", "localpkg"}
    for dep in deps.values():
        assert dep.bundled_whl_path is not None
        assert (model / dep.bundled_whl_path).is_file()
        assert dep.bundled_whl_path.split("/")[2] == dep.sha256


def test_a_failed_lock_keeps_the_previous_lockfile_and_bundles(
    tmp_path: Path, package_index: PackageIndex, alpha_beta: tuple[Path, Path]
) -> None:
    local = build_wheel(tmp_path / "local", "gamma", "0.1")
    model = _model(tmp_path, f"alpha\n{local}\n")
    lock(model, pip_args=package_index.pip_args())
    before = _snapshot(model)
    (model / "requirements.txt").write_text("alpha\nno-such-package==9\n")
    with pytest.raises(PipError) as info:
        lock(model, pip_args=package_index.pip_args())
    assert "no-such-package" in str(info.value)  # pip's own words
    assert "previous lockfile was kept" in str(info.value)
    assert _snapshot(model) == before
    assert sorted(p.name for p in (model / ".carton").iterdir()) == [
        "bundled_wheels",
        "carton.lock",
    ]


def test_a_failed_first_lock_leaves_no_carton_dir(
    tmp_path: Path, package_index: PackageIndex
) -> None:
    model = _model(tmp_path, "no-such-package\n")
    with pytest.raises(PipError):
        lock(model, pip_args=package_index.pip_args())
    assert not (model / ".carton").exists()


def test_missing_requirements_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(RequirementsError, match=r"has no requirements.txt; create one"):
        lock(tmp_path / "m")
