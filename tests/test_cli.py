"""The `wheelcas` command, in-process through main(argv) where nothing changes sys.path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loader.cli import main, split_daemon_args
from tests.daemon_support import Daemon, daemon_settings, wait_healthy, write_config
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel

pytestmark = pytest.mark.slow


@pytest.fixture
def model(tmp_path: Path, wheel_dir: Path) -> Path:
    build_wheel(wheel_dir, "alpha", "1.0", requires=["beta"])
    build_wheel(wheel_dir, "beta", "2.0")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "requirements.txt").write_text("alpha\n")
    return model_dir


def test_lock_then_prefetch_prints_one_line_per_wheel_off_a_terminal(
    model: Path, package_index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lock", str(model), "--index-url", package_index.simple_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("new: ")
    assert "(2 wheels, 0 bundled; Python 3.11)" in out

    assert main(["lock", str(model)]) == 0  # unchanged: no index needed, pip not started
    assert capsys.readouterr().out.startswith("unchanged: ")

    assert main(["prefetch", str(model)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "whl" in line]
    assert len(lines) == 2, captured.err  # a line per wheel, no progress-bar redraws
    assert "\r" not in captured.err
    assert "2 wheels ready (2 made ready now, 0 already ready)" in captured.out

    assert main(["prefetch", str(model / ".carton" / "carton.lock")]) == 0
    assert "(0 made ready now, 2 already ready)" in capsys.readouterr().out


def test_prefetch_without_a_lockfile_says_to_lock(
    model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prefetch", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wheelcas: error:")
    assert "wheelcas lock" in err


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("/no/such/python", "no executable interpreter at that path"),
        ("3.99", "no such interpreter on PATH or among pyenv's versions"),
    ],
)
def test_lock_with_an_unknown_interpreter(
    model: Path, python: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lock", str(model), "--python", python]) == 2
    assert message in capsys.readouterr().err


def test_lock_failure_prints_pips_error(
    model: Path, package_index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / "requirements.txt").write_text("does-not-exist\n")
    assert main(["lock", str(model), "-i", package_index.simple_url]) == 2
    err = capsys.readouterr().err
    assert "pip said:" in err
    assert "does-not-exist" in err
    assert not (model / ".carton").exists()


def test_split_daemon_args_hands_the_daemons_options_over_untouched() -> None:
    assert split_daemon_args(["-v", "daemon", "--socket", "/s", "--store", "/d"]) == (
        ["-v", "daemon"],
        ["--socket", "/s", "--store", "/d"],
    )
    assert split_daemon_args(["status"]) == (["status"], None)
    assert split_daemon_args(["path", "daemon"]) == (["path", "daemon"], None)  # a dir named so


def test_wheelcas_daemon_with_its_options_serves(short_tmp: Path) -> None:
    """``wheelcas daemon --socket PATH --store DIR --config FILE``, as the README shows it."""
    config = write_config(short_tmp / "d.toml", daemon_settings())
    socket_path, store = short_tmp / "d.sock", short_tmp / "store"
    argv = [sys.executable, "-m", "loader.cli", "daemon", "--socket", str(socket_path)]
    argv += ["--store", str(store), "--config", str(config)]
    log_path = short_tmp / "d.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    daemon = Daemon(process, socket_path, store, log_path)
    try:
        wait_healthy(daemon)
        assert daemon.client().status()["store"]["root"] == str(store)
    finally:
        assert daemon.stop() == 0
