"""The embedded loader end to end, each load in a fresh interpreter (loading changes sys.path).

Models are real dirs locked against the loopback index; the store is the per-test
``WHEELCAS_HOME``; every subprocess inherits the hermetic pip environment of conftest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loader.cli import main
from lockgen import lock
from lockgen.lockfile import read_lockfile
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel

pytestmark = pytest.mark.slow

ENTRY = """
import os, subprocess, sys
import alpha

class Model:
    def __init__(self, scale):
        self.scale = scale

    def infer_with_tensors(self, tensors):
        child = subprocess.run(
            [sys.executable, "-c", "import alpha, hidden_mod; print(alpha.__file__)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        import hidden_mod
        return {
            "out": [v * self.scale for v in tensors["x"]],
            "alpha": alpha.__file__,
            "child_alpha": child,
            "hidden": hidden_mod.__file__,
            "pth_ran": os.environ.get("WHEELCAS_TEST_PTH_RAN"),
        }

def get_model(scale: int, flag: bool = False):
    assert isinstance(flag, bool)
    return Model(scale)
"""


def build_dependencies(wheel_dir: Path) -> None:
    """alpha, and pthdep: a wheel whose .pth adds a dir and runs an import line."""
    build_wheel(wheel_dir, "alpha", "1.0")
    build_wheel(
        wheel_dir,
        "pthdep",
        "1.0",
        files={
            "pthdep/__init__.py": "",
            "pthdep_extra/hidden_mod.py": "X = 1\n",
            "pthdep.pth": "pthdep_extra\nimport os; os.environ['WHEELCAS_TEST_PTH_RAN'] = '1'\n",
        },
    )


def make_model(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    """A model (pkg/entry.py: ENTRY) locked against the loopback index."""
    build_dependencies(wheel_dir)
    model_dir = tmp_path / "model"
    (model_dir / "pkg").mkdir(parents=True)
    (model_dir / "pkg" / "__init__.py").write_text("")
    (model_dir / "pkg" / "entry.py").write_text(ENTRY)
    (model_dir / "requirements.txt").write_text("alpha\npthdep\n")
    lock(model_dir, pip_args=package_index.pip_args())
    return model_dir


@pytest.fixture
def model(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    return make_model(tmp_path, wheel_dir, package_index)


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loader.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
        check=False,
    )


def load_and_infer(model: Path, opts: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    done = run_python(
        f"""
        import json, sys
        from loader import load_unpacked
        m = load_unpacked({str(model)!r}, required_framework_version=">=3.8",
                          runner_opts={opts!r}, isolated=False)
        out = m.infer({{"x": [1, 2, 3]}})
        heavy = sorted(n for n in ("aiohttp", "zstandard", "numpy", "asyncio", "ssl",
                                  "urllib.request") if n in sys.modules)
        print(json.dumps({{"out": out, "path": sys.path[:3], "heavy": heavy,
                          "entries": list(m.info.sys_path_entries)}}))
        """,
        env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]) | {"stderr": done.stderr}


OPTS = {"entrypoint_package": "pkg.entry", "entrypoint_fn": "get_model", "model.scale": 2}


def test_load_unpacked_runs_the_model_with_locked_packages(model: Path) -> None:
    result = load_and_infer(model, {**OPTS, "model.flag": False})
    out = result["out"]
    assert out["out"] == [2, 4, 6]
    store = os.environ["WHEELCAS_HOME"]
    assert out["alpha"].startswith(store)  # from the store, read-only, precompiled
    assert out["child_alpha"] == out["alpha"]  # a child process sees the same packages
    assert out["hidden"].startswith(store)  # the .pth path line was processed
    assert out["pth_ran"] == "1"  # and its import line ran
    assert result["path"][0] == str(model)  # code dir first
    assert len(result["entries"]) == 4  # code dir, alpha, pthdep, pthdep_extra


def test_a_warm_load_imports_nothing_heavy(model: Path) -> None:
    load_and_infer(model, OPTS)  # fills the store
    again = load_and_infer(model, OPTS)
    assert again["heavy"] == []
    assert "filling the store" not in again["stderr"]


def test_cli_infer_prints_outputs(model: Path) -> None:
    done = run_cli(
        "infer", str(model), "--entrypoint", "pkg.entry:get_model", "--python", ">=3.8",
        "--opt", "model.scale=3", "--input", "x=[1, 2, 3]", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["out"] == [3, 6, 9]


def test_cli_path_prints_a_pythonpath(model: Path) -> None:
    done = run_cli("path", str(model))
    assert done.returncode == 0, done.stderr
    entries = done.stdout.strip().split(os.pathsep)
    assert entries[0] == str(model)
    assert all(Path(e).is_dir() for e in entries)
    child = subprocess.run(
        [sys.executable, "-c", "import alpha; print(alpha.VERSION)"],
        env={**os.environ, "PYTHONPATH": done.stdout.strip()},
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "1.0"


def test_no_entry_for_this_environment_warns_relocks_and_loads(
    tmp_path: Path,
    wheel_dir: Path,
    package_index: PackageIndex,
    pyenv_python: Callable[[str], str],
) -> None:
    build_dependencies(wheel_dir)
    model = tmp_path / "m"
    (model / "pkg").mkdir(parents=True)
    (model / "pkg" / "entry.py").write_text(ENTRY)
    (model / "requirements.txt").write_text("alpha\npthdep\n")
    lock(model, python=pyenv_python("3.12"), pip_args=package_index.pip_args())
    # The user's pip configuration is honoured by the re-lock: here, an index in PIP_INDEX_URL.
    result = load_and_infer(model, OPTS, env={"PIP_INDEX_URL": package_index.simple_url})
    assert result["out"]["out"] == [2, 4, 6]
    assert "no lockfile entry for this environment" in result["stderr"]
    lockfile = read_lockfile(model)
    assert lockfile is not None
    assert [e.markers["python_version"] for e in lockfile.entries] == ["3.12", "3.11"]


# --- errors: one line, what to fix, exit code 2 -------------------------------------------


def _infer_cli(model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("infer", str(model), "--python", ">=3.8", "--input", "x=[1]", *extra)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--entrypoint", "pkg.entry"], "expected PACKAGE:FUNCTION"),
        (["--entrypoint", "pkg.nothere:get_model"], "`pkg.nothere` not found in"),
        (["--entrypoint", "pkg.entry:nothere"], "has no function `nothere`"),
        (["--entrypoint", "pkg.entry:get_model"], "model.NAME"),  # scale is required
        (["--entrypoint", "pkg.entry:get_model", "--opt", "model.scale=[1]"], "JSON list"),
        (["--entrypoint", "pkg.entry:get_model", "--opt", "model.scale"], "NAME=VALUE"),
    ],
)
def test_bad_options_and_entrypoints(model: Path, args: list[str], message: str) -> None:
    done = _infer_cli(model, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("wheelcas: error:") or "\nwheelcas: error:" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_interpreter_outside_the_range_is_refused(model: Path) -> None:
    done = run_cli(
        "infer", str(model), "--entrypoint", "pkg.entry:get_model", "--python", "=3.7",
    )  # fmt: skip
    assert done.returncode == 2
    assert "requires '=3.7'" in done.stderr


def test_a_lockfile_that_does_not_parse(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model / ".carton" / "carton.lock").write_text("orig_deps_hash = \n")
    assert main(["path", str(model)]) == 2
    assert "carton.lock: not valid TOML" in capsys.readouterr().err


def test_a_missing_bundled_wheel(
    tmp_path: Path, package_index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    local = build_wheel(tmp_path / "local", "gamma", "0.1")
    model = tmp_path / "m"
    model.mkdir()
    (model / "requirements.txt").write_text(f"{local}\n")
    lock(model, pip_args=package_index.pip_args())
    for bundled in (model / ".carton" / "bundled_wheels").rglob("*.*"):
        bundled.unlink()
    assert main(["path", str(model)]) == 2
    err = capsys.readouterr().err
    assert "bundled wheel(s) named by the lockfile are missing" in err
    assert "wheelcas lock" in err
