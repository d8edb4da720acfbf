"""sys.path planning (pure) and its one application."""

from __future__ import annotations

import os
from pathlib import Path

from loader.syspath import (
    PackageDir,
    PthFile,
    SysPathPlan,
    apply,
    plan_sys_path,
    pythonpath_value,
    scan_package_dir,
)


def test_code_dir_first_then_packages_in_order_with_pth_dirs_beside_them() -> None:
    plan = plan_sys_path(
        "/m",
        [
            PackageDir("/s/a", (PthFile("/s/a/x.pth", ("/s/a/extra",), ("import x",)),)),
            PackageDir("/s/b"),
            PackageDir("/s/a"),  # a duplicate is not added twice
        ],
    )
    assert plan.entries == ("/m", "/s/a", "/s/a/extra", "/s/b")
    assert plan.pth_imports == (("/s/a/x.pth", "import x"),)


def test_pythonpath_puts_entries_first_and_keeps_the_rest() -> None:
    assert pythonpath_value(["/a", "/b"], None) == f"/a{os.pathsep}/b"
    assert pythonpath_value(["/a"], f"/z{os.pathsep}/a") == f"/a{os.pathsep}/z"


def test_scan_reads_pth_files_like_site(tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    (tmp_path / "b.pth").write_text("# comment\n\nextra\nmissing\nimport os\n")
    (tmp_path / "a.pth").write_text("import\tsys\n")
    scanned = scan_package_dir(tmp_path)
    assert [Path(p.path).name for p in scanned.pth_files] == ["a.pth", "b.pth"]
    assert scanned.pth_files[1].dirs == (str(tmp_path / "extra"),)
    assert scanned.pth_files[1].imports == ("import os",)


def test_apply_prepends_once_and_runs_imports(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    plan = SysPathPlan(
        ("/m", "/p"), (("x.pth", f"import pathlib; pathlib.Path({str(marker)!r}).touch()"),)
    )
    path = ["", "/p", "/stdlib"]
    env = {"PYTHONPATH": "/other"}
    apply(plan, path=path, environ=env)
    assert path == ["/m", "/p", "", "/stdlib"]
    assert env["PYTHONPATH"] == os.pathsep.join(["/m", "/p", "/other"])
    assert marker.exists()


def test_local_dirs_go_between_the_code_dir_and_the_locked_packages() -> None:
    plan = plan_sys_path(
        "/m",
        [PackageDir("/s/a", (PthFile("/s/a/x.pth", ("/s/a/extra",), ()),))],
        ["/m/packages", "/repo/shared", "/repo/libs", "/m/packages"],
    )
    assert plan.entries == ("/m", "/m/packages", "/repo/shared", "/repo/libs", "/s/a", "/s/a/extra")
    assert plan_sys_path("/m", [PackageDir("/s/a")], []).entries == ("/m", "/s/a")
