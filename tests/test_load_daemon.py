"""Loading through a real daemon: one view on sys.path, leases that live with the loader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_support import Daemon, running_daemon
from tests.support.index import PackageIndex
from tests.test_load import OPTS, load_and_infer, make_model, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def model(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    return make_model(tmp_path, wheel_dir, package_index)


@pytest.fixture
def daemon(short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    settings = {"gc": {"max_age": "1s", "interval": "1h"}}
    with running_daemon(short_tmp, tmp_path / "daemon-store", settings=settings) as running:
        monkeypatch.setenv("WHEELCAS_SOCKET", str(running.socket_path))
        yield running


def _embedded_trees() -> list[Path]:
    return list(Path(os.environ["WHEELCAS_HOME"]).glob("v1/trees/*/*"))


def test_a_model_loads_through_the_daemons_view(model: Path, daemon: Daemon) -> None:
    result = load_and_infer(model, OPTS)
    out = result["out"]
    assert out["out"] == [2, 4, 6]
    store = str(daemon.store)
    assert out["alpha"].startswith(store)
    assert out["child_alpha"] == out["alpha"]
    assert out["pth_ran"] == "1"
    entries = result["entries"]
    assert entries[0] == str(model)
    assert "/views/" in entries[1]  # one entry for all the packages
    assert len(entries) == 3  # code dir, the view, the dir the view's .pth adds
    assert _embedded_trees() == []  # nothing was filled in this user's own store


def test_no_daemon_forces_the_embedded_store(model: Path, daemon: Daemon) -> None:
    done = run_cli("--no-daemon", "path", str(model), "--lines")
    assert done.returncode == 0, done.stderr
    entries = done.stdout.split()
    assert entries[1].startswith(os.environ["WHEELCAS_HOME"])
    assert _embedded_trees() != []


def test_status_names_the_daemon(daemon: Daemon) -> None:
    done = run_cli("status")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["daemon"] == str(daemon.socket_path)


def test_a_lease_keeps_a_live_loaders_packages_until_it_is_killed(
    model: Path, daemon: Daemon
) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from loader import load_unpacked
                m = load_unpacked({str(model)!r}, required_framework_version="*",
                                  runner_opts={OPTS!r}, isolated=False)
                print(m.infer({{"x": [1]}})["alpha"], flush=True)
                time.sleep(120)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as loader:
        try:
            assert loader.stdout is not None
            alpha = Path(loader.stdout.readline().strip())
            assert alpha.is_file()
            time.sleep(1.5)  # now older than gc.max_age
            report = daemon.client().gc(dry_run=False)
            assert alpha.is_file(), report  # leased: kept although old
        finally:
            loader.send_signal(signal.SIGKILL)
            loader.wait()
    report = daemon.client().gc(dry_run=False)
    assert not alpha.exists(), report  # the lease died with its process
