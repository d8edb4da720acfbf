"""In-process loads refuse locked packages that clash with modules already imported."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from loader.conflicts import (
    Conflict,
    check_no_conflicts,
    conflict_message,
    find_conflicts,
    module_names,
)
from loader.errors import ModelConfigError
from tests.test_load import OPTS, run_python
from tests.test_pack import model  # noqa: F401 - the fixture


def test_module_names_from_a_listing() -> None:
    listing = [
        ("numpy", True),
        ("nspkg", True),
        ("numpy-2.0.dist-info", True),
        ("numpy.libs", True),
        ("thing-1.0.data", True),
        ("__pycache__", True),
        ("six.py", False),
        ("_speedups.cpython-311-x86_64-linux-gnu.so", False),
        ("plain.so", False),
        ("pthdep.pth", False),
        ("README.txt", False),
        ("not-a-name.py", False),
    ]
    assert module_names(listing) == {"numpy", "nspkg", "six", "_speedups", "plain"}


def _module(name: str, file: str | None = None, path: list[str] | None = None) -> object:
    module = types.ModuleType(name)
    if file is not None:
        module.__file__ = file
    if path is not None:
        module.__path__ = path
    return module


def test_find_conflicts_over_a_modules_mapping(tmp_path: Path) -> None:
    pkg = tmp_path / "store" / "numpy-dir"
    other = tmp_path / "store" / "six-dir"
    modules = {
        "numpy": _module("numpy", file="/usr/lib/python3/site-packages/numpy/__init__.py"),
        "six": _module("six", file=str(other / "six.py")),  # the model's own: fine
        "nspkg": _module("nspkg", path=["/host/nspkg"]),  # a namespace package elsewhere
        "sys": _module("sys"),  # built in: no location
    }
    provided = {str(pkg): {"numpy", "nspkg", "sys", "absent"}, str(other): {"six"}}
    assert find_conflicts(provided, modules) == [
        Conflict("nspkg", "/host/nspkg", str(pkg)),
        Conflict("numpy", "/usr/lib/python3/site-packages/numpy/__init__.py", str(pkg)),
    ]
    message = conflict_message(find_conflicts(provided, modules))
    assert "numpy: this process has it from /usr/lib/python3/site-packages" in message
    assert "isolated" in message


def test_check_no_conflicts_lists_the_dirs(tmp_path: Path) -> None:
    package_dir = tmp_path / "pkgs"
    (package_dir / "json").mkdir(parents=True)
    (package_dir / "json" / "__init__.py").write_text("")
    import json

    with pytest.raises(ModelConfigError, match=r"json: this process has it from"):
        check_no_conflicts([str(package_dir)], {"json": json})
    check_no_conflicts([str(package_dir)], {})


@pytest.mark.slow
def test_an_in_process_load_refuses_an_imported_module(model: Path) -> None:  # noqa: F811
    done = run_python(
        f"""
        import sys, types
        sys.modules["alpha"] = types.ModuleType("alpha")
        sys.modules["alpha"].__file__ = "/elsewhere/alpha/__init__.py"
        from loader import load_unpacked
        from loader.errors import ModelConfigError
        try:
            load_unpacked({str(model)!r}, required_framework_version=">=3.8",
                          runner_opts={OPTS!r}, isolated=False)
        except ModelConfigError as exc:
            print("REFUSED", exc)
        else:
            print("LOADED")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout
    assert "alpha: this process has it from /elsewhere/alpha/__init__.py" in done.stdout
