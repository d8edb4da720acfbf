"""Fixtures every wheelcas test gets, and a hermetic pip for the whole test process.

This machine configures pip globally (config files, ``PIP_*`` variables with extra indexes,
find-links and constraints). Tests must see only the loopback index they start, so the
environment is cleaned here at import time, before any test or subprocess runs; children
inherit the clean ``os.environ``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.version import InvalidVersion, Version

from tests.support.index import PackageIndex


def _make_environment_hermetic() -> None:
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        del os.environ[key]
    # PIP_CONFIG_FILE=os.devnull makes pip skip every config file (global, user, site).
    os.environ["PIP_CONFIG_FILE"] = os.devnull
    os.environ["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    os.environ["PIP_NO_INPUT"] = "1"
    for key in ("PYTHONPATH", "WHEELCAS_SOCKET"):
        os.environ.pop(key, None)
    # A proxy configured for the machine must never see loopback traffic.
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join([*hosts, "127.0.0.1", "localhost"])


_make_environment_hermetic()


def _short_dir() -> Path:
    """A fresh 0700 directory like ``/tmp/wc-k3j9x2``: unix socket paths must stay short."""
    return Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Per test: a fresh store, a short runtime dir, a private pip cache and cache home.

    ``XDG_CACHE_HOME`` too: the user's bundle digests (cas_daemon/bundle_keys.py) live there.
    """
    home = tmp_path / "wheelcas-home"
    home.mkdir()
    monkeypatch.setenv("WHEELCAS_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    runtime = _short_dir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    try:
        yield
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    """An empty directory for built dists; :func:`package_index` serves it."""
    path = tmp_path / "dists"
    path.mkdir()
    return path


@pytest.fixture
def package_index(wheel_dir: Path) -> Iterator[PackageIndex]:
    """A started loopback index over ``wheel_dir``; files may be added while it runs."""
    with PackageIndex(wheel_dir) as index:
        yield index


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path under /tmp (for unix sockets), removed after."""
    path = _short_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _pyenv_root() -> Path | None:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv is not None:
        try:
            out = subprocess.run(
                [pyenv, "root"], capture_output=True, text=True, check=True, timeout=10
            )
            return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    default = Path.home() / ".pyenv"
    return default if default.is_dir() else None


def _version_key(path: Path) -> Version:
    # versions/3.12.1/bin/python3.12 -> 3.12.1; odd names (3.12-dev) sort lowest.
    try:
        return Version(path.parent.parent.name)
    except InvalidVersion:
        return Version("0")


def find_python(minor: str) -> str | None:
    """Path of a ``python{minor}`` interpreter (``minor`` like ``"3.12"``), newest pyenv
    patch release first, else from PATH; None if there is none."""
    root = _pyenv_root()
    if root is not None:
        candidates = [
            *root.glob(f"versions/{minor}/bin/python{minor}"),
            *root.glob(f"versions/{minor}.*/bin/python{minor}"),
        ]
        candidates = [c for c in candidates if os.access(c, os.X_OK)]
        if candidates:
            return str(max(candidates, key=_version_key))
    return shutil.which(f"python{minor}")


@pytest.fixture(scope="session")
def pyenv_python() -> Callable[[str], str]:
    """``pyenv_python("3.12")`` -> interpreter path; skips the test when there is none."""

    def find(minor: str) -> str:
        found = find_python(minor)
        if found is None:
            pytest.skip(f"no Python {minor} interpreter (neither pyenv nor python{minor} on PATH)")
        return found

    return find
