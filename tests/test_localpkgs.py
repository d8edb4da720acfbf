"""Bundled and external package dirs: resolution, the link dir, clash detection, loads.

The pure parts (which module each dir provides, which pairs clash, the message) are tested on
plain values; the rest on real dirs, fake wheel trees and, marked slow, real loads: isolated in
this process (a worker), in-process in a fresh interpreter (loading changes ``sys.path``), the
CLI, and through a daemon's view.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loader import conflicts, embedded, load_unpacked
from loader.conflicts import (
    Provider,
    ProviderClash,
    distribution_owning,
    find_provider_clashes,
    module_entries,
    provider_clash_message,
)
from loader.errors import ModelConfigError
from loader.localpkgs import (
    LINKS_DIR,
    LocalPackageDirs,
    check_local_clashes,
    ensure_link_dir,
    importable_dirs,
    link_dir_path,
    local_package_dirs,
)
from loader.options import OptionInput, OptionValue, parse_runner_opts
from loader.syspath import PackageDir, PthFile
from loader.worker import IsolatedModel
from tests.daemon_support import Daemon, running_daemon
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel
from tests.test_load import OPTS, load_and_infer, make_model, run_cli, run_python

# --- helpers -------------------------------------------------------------------------------


def options(**opts: Any) -> Any:
    return parse_runner_opts({"entrypoint_package": "m", "entrypoint_fn": "f", **opts})


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_tree(site: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A wheel's unpacked tree (or, called twice on one dir, a view): files and a dist-info."""
    for name, text in files.items():
        write(site / name, text)
    dist_info = site / f"{dist}-{version}.dist-info"
    write(dist_info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    record = [f"{name},sha256=x,1" for name in files]
    write(dist_info / "RECORD", "\n".join([*record, f"{dist_info.name}/RECORD,,"]) + "\n")
    return site


# --- pure ----------------------------------------------------------------------------------


def test_module_entries_name_the_entry_that_provides_each_module() -> None:
    listing = [
        ("common", True),
        ("common.py", False),  # x/ sorts before x.py: the dir is named
        ("tool.py", False),
        ("fast.cpython-311-x86_64-linux-gnu.so", False),
        ("x-1.0.dist-info", True),
        ("__pycache__", True),
        ("README.md", False),
        ("not-a-module", True),
    ]
    assert module_entries(listing) == {
        "common": "common/",
        "tool": "tool.py",
        "fast": "fast.cpython-311-x86_64-linux-gnu.so",
    }


def _provider(kind: Any, path: str, *modules: str, shown: str | None = None) -> Provider:
    return Provider(kind, path, shown or path, kind, {m: m + "/" for m in modules})


def test_clashes_pair_every_provider_except_two_locked_ones() -> None:
    bundled = _provider("bundled", "/m/packages", "common", "only_here", shown="packages")
    external = _provider("external", "/repo/shared", "shared", "common")
    locked_a = _provider("locked", "/s/a", "common", "alpha")
    locked_b = _provider("locked", "/s/b", "alpha")
    clashes = find_provider_clashes([bundled, external, bundled, locked_a, locked_b])
    assert clashes == [
        ProviderClash("common", bundled, external),
        ProviderClash("common", bundled, locked_a),
        ProviderClash("common", external, locked_a),
    ]  # alpha twice among the locked ones is the store's business; the repeated dir counts once
    assert find_provider_clashes([bundled, locked_b]) == []


def test_the_message_names_both_providers() -> None:
    bundled = _provider("bundled", "/m/packages", "common", shown="packages")
    locked = _provider("locked", "/s/site", "common")
    extra = Provider("locked", "/s/site/extra", "/s/site/extra", "", {"common": "common.py"},
                     pth_file="/s/site/x.pth")  # fmt: skip
    clashes = find_provider_clashes([bundled, locked, extra])
    message = provider_clash_message(clashes, {("/s/site", "common"): "commonlib 1.0"})
    assert "`common`: packages/common/ (bundled) and the locked wheel commonlib 1.0 " in message
    assert "(/s/site/common/)" in message
    assert "a locked package (/s/site/extra/common.py, added by x.pth)" in message
    assert "re-lock" in message


# --- which wheel provides an entry ---------------------------------------------------------


def test_the_owner_is_found_in_a_view_by_record(tmp_path: Path) -> None:
    view = tmp_path / "view"
    fake_tree(view, "alpha", "1.0", {"alpha/__init__.py": ""})
    fake_tree(view, "commonlib", "2.5", {"common/__init__.py": "", "commonlib.pth": "x\n"})
    assert distribution_owning(str(view), "common/") == "commonlib 2.5"
    assert distribution_owning(str(view), "commonlib.pth") == "commonlib 2.5"
    assert distribution_owning(str(view), "alpha/") == "alpha 1.0"
    assert distribution_owning(str(view), "nothing/") is None


def test_a_single_wheels_tree_needs_no_record(tmp_path: Path) -> None:
    site = fake_tree(tmp_path / "site", "beta", "3.0", {"beta/__init__.py": ""})
    (site / "beta-3.0.dist-info" / "RECORD").unlink()
    (site / "beta-3.0.dist-info" / "METADATA").unlink()
    assert distribution_owning(str(site), "beta/") == "beta 3.0"  # from the dir's name


# --- resolving the options -----------------------------------------------------------------


def test_external_dirs_resolve_against_the_model_dir_in_order(tmp_path: Path) -> None:
    model = (tmp_path / "repo" / "model").resolve()
    model.mkdir(parents=True)
    shared = tmp_path / "repo" / "shared"
    shared.mkdir()
    absolute = tmp_path / "abs"
    absolute.mkdir()
    local = local_package_dirs(
        model, options(external_package_dirs=["../shared", str(absolute), "../shared"])
    )
    assert local == LocalPackageDirs(model / "packages", (shared.resolve(), absolute.resolve()))
    assert parse_runner_opts(
        {"entrypoint_package": "m", "entrypoint_fn": "f", "external_package_dirs": "../shared"}
    ).scattered


@pytest.mark.parametrize(
    ("opts", "complaint"),
    [
        ({"external_package_dirs": "../missing"}, "is not a directory"),
        ({"external_package_dirs": "inside"}, "is inside the model dir"),
        ({"external_package_dirs": ".."}, "holds the model dir"),
        ({"bundled_packages_dir": "../packages"}, "must name a dir inside the model dir"),
        ({"bundled_packages_dir": "/abs"}, "must name a dir inside the model dir"),
        (
            {"external_package_dirs": ["../a/common", "../b/common"],
             "keep_external_dir_names": True},
            "have one name, 'common'",
        ),
        (
            {"external_package_dirs": "../a/my-lib", "keep_external_dir_names": True},
            "'my-lib' is not a Python identifier",
        ),
    ],
)  # fmt: skip
def test_bad_local_dirs_say_what_to_do(
    tmp_path: Path, opts: dict[str, Any], complaint: str
) -> None:
    model = tmp_path / "model"
    (model / "inside").mkdir(parents=True)
    for name in ("a/common", "b/common", "a/my-lib"):
        (tmp_path / name).mkdir(parents=True)
    with pytest.raises(ModelConfigError) as raised:
        local_package_dirs(model, options(**opts))
    assert complaint in str(raised.value)


# --- the link dir --------------------------------------------------------------------------


def test_a_link_dir_shows_each_external_dir_under_its_own_name(tmp_path: Path) -> None:
    common, tools = tmp_path / "libs" / "common", tmp_path / "other" / "tools"
    common.mkdir(parents=True)
    tools.mkdir(parents=True)
    (tmp_path / "libs" / "sibling").mkdir()
    root = tmp_path / "store"
    made = ensure_link_dir([common, tools], root)
    assert made == link_dir_path(root, [tools, common])  # the order does not change the key
    assert made.parent == root / LINKS_DIR
    assert sorted(p.name for p in made.iterdir()) == ["common", "tools"]  # no sibling
    assert (made / "common").readlink() == common
    before = made.stat().st_ino
    assert ensure_link_dir([common, tools], root) == made
    assert made.stat().st_ino == before  # reused, not rebuilt
    assert [p.name for p in made.parent.iterdir()] == [made.name]  # no staging left behind


def test_a_damaged_link_dir_is_replaced(tmp_path: Path) -> None:
    common = tmp_path / "libs" / "common"
    common.mkdir(parents=True)
    root = tmp_path / "store"
    final = link_dir_path(root, [common])
    final.mkdir(parents=True)
    (final / "common").symlink_to(tmp_path)  # points elsewhere
    (final / "stray").mkdir()
    assert ensure_link_dir([common], root) == final
    assert [p.name for p in final.iterdir()] == ["common"]
    assert (final / "common").readlink() == common
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_importable_dirs_in_sys_path_order(tmp_path: Path) -> None:
    model = tmp_path / "model"
    ext = [tmp_path / "e1", tmp_path / "e2"]
    for d in ext:
        d.mkdir()
    local = LocalPackageDirs(model / "packages", tuple(ext))
    assert importable_dirs(local) == ext  # no bundled dir: skipped
    (model / "packages").mkdir(parents=True)
    assert importable_dirs(local) == [model / "packages", *ext]
    kept = importable_dirs(LocalPackageDirs(model / "packages", tuple(ext), True))
    assert kept == [model / "packages", link_dir_path(Path(os.environ["WHEELCAS_HOME"]), ext)]


# --- the check over real dirs --------------------------------------------------------------


def test_plan_for_puts_local_dirs_first_and_refuses_a_clash_with_a_wheel(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write(model / "packages" / "common" / "__init__.py")
    shared = tmp_path / "shared"
    write(shared / "helper.py")
    site = fake_tree(tmp_path / "site", "alpha", "1.0", {"alpha/__init__.py": ""})
    local = local_package_dirs(model, options(external_package_dirs="../shared"))
    plan = embedded.plan_for(model, [site], local)
    assert plan.entries == (str(model), str(model / "packages"), str(shared), str(site))
    assert embedded.plan_for(model, [site]).entries == (str(model), str(site))

    fake_tree(site, "commonlib", "1.0", {"common/__init__.py": ""})  # now a view of two
    with pytest.raises(ModelConfigError) as raised:
        embedded.plan_for(model, [site], local)
    message = str(raised.value)
    assert "`common`: packages/common/ (bundled packages dir of" in message
    assert f"the locked wheel commonlib 1.0 ({site}/common/)" in message


def test_clashes_with_pth_dirs_and_between_local_dirs(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write(model / "packages" / "shared.py")
    external = tmp_path / "ext"
    write(external / "shared" / "__init__.py")
    write(external / "hidden_mod.py")
    site = fake_tree(tmp_path / "site", "pthdep", "1.0", {"pthdep.pth": "extra\n"})
    write(site / "extra" / "hidden_mod.py")
    pth = PthFile(str(site / "pthdep.pth"), (str(site / "extra"),), ())
    local = LocalPackageDirs(model / "packages", (external,))
    with pytest.raises(ModelConfigError) as raised:
        check_local_clashes(model, local, [PackageDir(str(site), (pth,))])
    message = str(raised.value)
    assert (
        f"`shared`: packages/shared.py (bundled packages dir of {model}) and "
        f"{external}/shared/ (external package dir)"
    ) in message
    assert (
        f"`hidden_mod`: {external}/hidden_mod.py (external package dir) and the locked wheel "
        f"pthdep 1.0 ({site}/extra/hidden_mod.py, added by pthdep.pth)"
    ) in message


def test_keep_names_mode_clashes_by_the_dirs_name(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    common = tmp_path / "libs" / "common"
    write(common / "x.py")
    site = fake_tree(tmp_path / "site", "commonlib", "1.0", {"common/__init__.py": ""})
    local = LocalPackageDirs(model / "packages", (common,), True)
    with pytest.raises(ModelConfigError, match=r"imported under its own name\) and the locked"):
        check_local_clashes(model, local, [PackageDir(str(site))])
    check_local_clashes(model, LocalPackageDirs(model / "packages", (common,)), [])


def test_no_local_dirs_lists_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = fake_tree(tmp_path / "site", "commonlib", "1.0", {"common/__init__.py": ""})
    model = tmp_path / "model"
    write(model / "common" / "__init__.py")  # the code dir is not a provider

    def no_listing(directory: str) -> dict[str, str]:
        raise AssertionError(f"listed {directory}")

    monkeypatch.setattr("loader.localpkgs.provided_modules", no_listing)
    plan = embedded.plan_for(model, [site], local_package_dirs(model, options()))
    assert plan.entries == (str(model), str(site))


# --- real loads ----------------------------------------------------------------------------

ENTRY = """
import json, subprocess, sys
import bundled_mod, shared_mod

CHILD = "import bundled_mod, shared_mod, alpha; print(bundled_mod.__file__, shared_mod.__file__)"

class Model:
    def __init__(self, report):
        self.report = report

    def infer_with_tensors(self, tensors):
        child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                               check=True).stdout.split()
        facts = {"bundled": bundled_mod.__file__, "shared": shared_mod.__file__,
                 "child": child, "path": sys.path[:4]}
        if not self.report:
            return facts
        with open(self.report, "w") as f:  # a worker returns tensors only, and has no numpy
            json.dump(facts, f)
        return {}

def get_model(report=""):
    return Model(report)
"""

LOCAL_OPTS: dict[str, OptionInput] = {
    "entrypoint_package": "pkg.entry",
    "entrypoint_fn": "get_model",
    "external_package_dirs": "../shared",
}


@pytest.fixture
def scattered(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    """A model (locking alpha and pthdep) that imports a bundled and an external module."""
    model = make_model(tmp_path, wheel_dir, package_index)
    (model / "pkg" / "entry.py").write_text(ENTRY)
    write(model / "packages" / "bundled_mod.py", "B = 1\n")
    write(tmp_path / "shared" / "shared_mod.py", "S = 1\n")
    return model


def _check_scattered(model: Path, out: dict[str, Any]) -> None:
    shared = model.parent / "shared"
    assert out["bundled"] == str(model / "packages" / "bundled_mod.py")
    assert out["shared"] == str(shared / "shared_mod.py")
    assert out["child"] == [out["bundled"], out["shared"]]  # a child process sees them too
    assert out["path"][:3] == [str(model), str(model / "packages"), str(shared)]
    assert out["path"][3].startswith(os.environ["WHEELCAS_HOME"])  # then the locked packages


@pytest.fixture
def this_python(monkeypatch: pytest.MonkeyPatch) -> str:
    """The range that makes an isolated load run this interpreter (no other is probed)."""
    monkeypatch.setenv("WHEELCAS_PYTHONS", sys.executable)
    return "={}.{}.{}".format(*sys.version_info[:3])


def infer_isolated(model: Path, python: str, opts: dict[str, OptionInput]) -> Any:
    """Load ``model`` in a worker, infer once; what its entrypoint wrote to ``model.report``."""
    report = model.parent / "report.json"
    opts = {**opts, "model.report": str(report)}
    m = load_unpacked(model, required_framework_version=python, runner_opts=opts)
    assert isinstance(m, IsolatedModel)
    try:
        assert m.infer({}) == {}
    finally:
        m.close()
    return json.loads(report.read_text())


@pytest.mark.slow
def test_a_scattered_model_loads_isolated_without_gathering(
    scattered: Path, this_python: str
) -> None:
    _check_scattered(scattered, infer_isolated(scattered, this_python, LOCAL_OPTS))


@pytest.mark.slow
def test_a_scattered_model_loads_in_process(scattered: Path) -> None:
    result = load_and_infer(scattered, {**LOCAL_OPTS, "external_package_dirs": ["../shared"]})
    _check_scattered(scattered, result["out"])
    assert result["heavy"] == []


@pytest.mark.slow
def test_cli_infer_with_external_dirs(scattered: Path) -> None:
    done = run_cli(
        "infer", str(scattered), "--entrypoint", "pkg.entry:get_model", "--python", ">=3.8",
        "--opt", "external_package_dirs=../shared", "--input", "x=[1]", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _check_scattered(scattered, json.loads(done.stdout))
    missing = run_cli(
        "infer", str(scattered), "--entrypoint", "pkg.entry:get_model", "--python", ">=3.8",
        "--opt", "external_package_dirs=../nowhere", "--input", "x=[1]",
    )  # fmt: skip
    assert missing.returncode == 2
    assert "external package dir '../nowhere'" in missing.stderr
    assert "is not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_cli_path_lists_the_bundled_dir_and_the_external_dirs_of_opt(scattered: Path) -> None:
    shared = scattered.parent / "shared"
    plain = run_cli("path", str(scattered), "--lines")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[:2] == [str(scattered), str(scattered / "packages")]
    done = run_cli(
        "path", str(scattered), "--lines", "--opt", "external_package_dirs=../shared",
        "--opt", "model.scale=2",  # other options are accepted; no entrypoint is needed
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = done.stdout.splitlines()
    assert entries[:3] == [str(scattered), str(scattered / "packages"), str(shared)]
    assert entries[3].startswith(os.environ["WHEELCAS_HOME"])  # then the locked packages
    child = subprocess.run(
        [sys.executable, "-c", "import bundled_mod, shared_mod, alpha; print(shared_mod.S)"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(entries)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "1"
    missing = run_cli("path", str(scattered), "--opt", "external_package_dirs=../nowhere")
    assert missing.returncode == 2
    assert "external package dir '../nowhere'" in missing.stderr
    assert "Traceback" not in missing.stderr


KEEP_NAMES_ENTRY = """
import importlib.util, json, subprocess, sys
import common

class Model:
    def __init__(self, report):
        self.report = report

    def infer_with_tensors(self, tensors):
        child = subprocess.run([sys.executable, "-c", "import common; print(common.NAME)"],
                               capture_output=True, text=True, check=True).stdout.strip()
        sibling = importlib.util.find_spec("sibling") is not None
        with open(self.report, "w") as f:
            json.dump({"common": common.__file__, "child": child, "sibling": sibling}, f)
        return {}

def get_model(report):
    return Model(report)
"""


@pytest.mark.slow
def test_keep_names_imports_each_dir_by_its_name_and_hides_siblings(
    scattered: Path, this_python: str
) -> None:
    libs = scattered.parent / "libs"
    write(libs / "common" / "__init__.py", "NAME = 'common'\n")
    write(libs / "sibling" / "__init__.py")
    (scattered / "pkg" / "entry.py").write_text(KEEP_NAMES_ENTRY)
    opts = {
        **LOCAL_OPTS,
        "external_package_dirs": "../libs/common",
        "keep_external_dir_names": True,
    }
    out = infer_isolated(scattered, this_python, opts)
    links = Path(os.environ["WHEELCAS_HOME"]) / LINKS_DIR
    assert out["common"].startswith(str(links))
    assert Path(out["common"]).resolve() == (libs / "common" / "__init__.py").resolve()
    assert out["child"] == "common"
    assert out["sibling"] is False


CLASH_OPTS: dict[str, OptionValue] = {
    "entrypoint_package": "pkg.entry",
    "entrypoint_fn": "get_model",
    "model.scale": 1,
}


def _clashing_model(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    """A model whose bundled ``packages/common/`` clashes with the locked commonlib's."""
    build_wheel(wheel_dir, "commonlib", "1.0", files={"common/__init__.py": "X = 1\n"})
    model = make_model(tmp_path, wheel_dir, package_index)
    (model / "requirements.txt").write_text("alpha\npthdep\ncommonlib\n")
    from lockgen import lock

    lock(model, pip_args=package_index.pip_args())
    write(model / "packages" / "common" / "__init__.py")
    return model


@pytest.mark.slow
def test_a_bundled_module_that_a_locked_wheel_provides_is_refused(
    tmp_path: Path, wheel_dir: Path, package_index: PackageIndex, this_python: str
) -> None:
    model = _clashing_model(tmp_path, wheel_dir, package_index)
    with pytest.raises(ModelConfigError) as raised:
        load_unpacked(model, required_framework_version=this_python, runner_opts=CLASH_OPTS)
    message = str(raised.value)
    assert "`common`: packages/common/ (bundled packages dir of" in message
    assert "the locked wheel commonlib 1.0 (" in message
    done = run_cli(
        "infer", str(model), "--entrypoint", "pkg.entry:get_model", "--python", ">=3.8",
        "--opt", "model.scale=1", "--input", "x=[1]",
    )  # fmt: skip
    assert done.returncode == 2
    assert "the locked wheel commonlib 1.0" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_bundled_module_that_an_external_dir_provides_is_refused(
    scattered: Path, this_python: str
) -> None:
    write(scattered.parent / "shared" / "bundled_mod" / "__init__.py")
    with pytest.raises(ModelConfigError) as raised:
        load_unpacked(scattered, required_framework_version=this_python, runner_opts=LOCAL_OPTS)
    shared = scattered.parent / "shared"
    assert (
        f"`bundled_mod`: packages/bundled_mod.py (bundled packages dir of {scattered}) and "
        f"{shared}/bundled_mod/ (external package dir)"
    ) in str(raised.value)


@pytest.fixture
def daemon(short_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    with running_daemon(short_tmp, tmp_path / "daemon-store") as running:
        monkeypatch.setenv("WHEELCAS_SOCKET", str(running.socket_path))
        yield running


@pytest.mark.slow
def test_through_a_daemons_view_the_clash_names_the_wheel(
    tmp_path: Path, wheel_dir: Path, package_index: PackageIndex, daemon: Daemon
) -> None:
    model = _clashing_model(tmp_path, wheel_dir, package_index)
    done = run_cli(
        "infer", str(model), "--entrypoint", "pkg.entry:get_model", "--python", ">=3.8",
        "--opt", "model.scale=1", "--input", "x=[1]",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "/views/" in done.stderr  # one merged dir for every wheel
    assert "the locked wheel commonlib 1.0 (" in done.stderr
    # and a model without the clash loads through the same view, local dirs first
    (model / "packages" / "common" / "__init__.py").unlink()
    (model / "packages" / "common").rmdir()
    write(model / "packages" / "bundled_only.py")
    result = load_and_infer(model, OPTS)
    assert result["entries"][1] == str(model / "packages")
    assert "/views/" in result["entries"][2]


# --- namespace packages (PEP 420) ------------------------------------------------------------


def test_namespace_portions_merge_and_are_no_clash(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write(model / "packages" / "jaraco" / "mine.py", "MINE = 1\n")  # no __init__.py
    write(model / "packages" / "docs" / "index.md")  # not code: a portion too
    external = tmp_path / "ext"
    write(external / "docs" / "other.md")
    site = fake_tree(tmp_path / "site", "jaraco.text", "1.0", {"jaraco/text.py": "TEXT = 2\n"})
    local = local_package_dirs(model, options(external_package_dirs="../ext"))
    plan = embedded.plan_for(model, [site], local)  # the load's check: no clash
    done = run_python(
        f"import sys; sys.path[:0] = {list(plan.entries)!r}\n"
        "import jaraco.mine, jaraco.text; print(jaraco.mine.MINE, jaraco.text.TEXT)"
    )
    assert done.stdout.split() == ["1", "2"], done.stderr


@pytest.mark.parametrize("init", ["__init__.py", "__init__.cpython-312-x86_64-linux-gnu.so"])
def test_a_regular_package_against_a_namespace_portion_is_a_clash(
    tmp_path: Path, init: str
) -> None:
    model = tmp_path / "model"
    write(model / "packages" / "jaraco" / init)
    site = fake_tree(tmp_path / "site", "jaraco.text", "1.0", {"jaraco/text.py": ""})
    local = local_package_dirs(model, options())
    with pytest.raises(ModelConfigError, match=r"`jaraco`: packages/jaraco/ \(bundled"):
        embedded.plan_for(model, [site], local)
    # and a module against a portion: the module would win over the earlier portion
    (model / "packages" / "jaraco" / init).unlink()
    (model / "packages" / "jaraco").rmdir()
    write(model / "packages" / "jaraco.py")
    with pytest.raises(ModelConfigError, match=r"`jaraco`: packages/jaraco.py"):
        embedded.plan_for(model, [site], local)


def test_locked_entries_are_not_statted_unless_a_local_dir_gives_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    write(model / "packages" / "jaraco" / "mine.py")
    files = {f"dep{i}/__init__.py": "" for i in range(20)} | {"jaraco/text.py": ""}
    site = fake_tree(tmp_path / "site", "many", "1.0", files)
    looked_at: list[str] = []
    real = conflicts.is_namespace_portion

    def counted(directory: str) -> bool:
        looked_at.append(directory)
        return real(directory)

    monkeypatch.setattr(conflicts, "is_namespace_portion", counted)
    check_local_clashes(model, local_package_dirs(model, options()), [PackageDir(str(site))])
    assert sorted(looked_at) == [str(model / "packages" / "jaraco"), str(site / "jaraco")]


def test_keep_names_dirs_that_are_both_namespace_portions_merge(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    common = tmp_path / "libs" / "jaraco"
    write(common / "mine.py")
    site = fake_tree(tmp_path / "site", "jaraco.text", "1.0", {"jaraco/text.py": ""})
    local = LocalPackageDirs(model / "packages", (common,), True)
    check_local_clashes(model, local, [PackageDir(str(site))])
    write(common / "__init__.py")
    with pytest.raises(ModelConfigError, match=r"imported under its own name\) and the locked"):
        check_local_clashes(model, local, [PackageDir(str(site))])
