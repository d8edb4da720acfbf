"""Views: merging trees into one sys.path entry, the lazy scan, building, reuse, conflicts."""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from cas_daemon import views
from cas_daemon.layout import StoreLayout
from cas_daemon.precompile import compile_tree, seal_read_only
from cas_daemon.unpack import unpack_wheel
from cas_daemon.view_plan import (
    Entry,
    SameContent,
    TreeListing,
    ViewConflict,
    ViewLink,
    ViewPlan,
    dirs_to_expand,
    plan_view,
    view_key,
    with_children,
)
from cas_daemon.views import LinkMode, build_view, ensure_view, scan_trees, verify_plan
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag
MODES: tuple[LinkMode, ...] = ("symlink", "hardlink")

# --- in-memory listings for the planner ---------------------------------------------------


def file(size: int = 10, inode: int | None = None) -> Entry:
    return Entry("file", size, None if inode is None else (1, inode))


def folder(children: Mapping[str, Entry] | None = None) -> Entry:
    return Entry("dir", children=children)


def listing(wheel: str, entries: Mapping[str, Entry]) -> TreeListing:
    return TreeListing(wheel, Path("/store/trees") / wheel / "site", entries)


def source(wheel: str, path: str) -> Path:
    return Path("/store/trees") / wheel / "site" / path


def test_a_namespace_dir_is_unfolded_and_its_subpackages_linked_whole() -> None:
    a = listing("a.whl", {"nspkg": folder({"a": folder()}), "a-1.0.dist-info": folder()})
    b = listing("b.whl", {"nspkg": folder({"b": folder()}), "b-1.0.dist-info": folder()})

    plan = plan_view([a, b])

    assert plan.dirs == ("nspkg",)
    assert set(plan.links) == {
        ViewLink("a-1.0.dist-info", source("a.whl", "a-1.0.dist-info"), "dir"),
        ViewLink("b-1.0.dist-info", source("b.whl", "b-1.0.dist-info"), "dir"),
        ViewLink("nspkg/a", source("a.whl", "nspkg/a"), "dir"),
        ViewLink("nspkg/b", source("b.whl", "nspkg/b"), "dir"),
    }
    assert plan.checks == ()


def test_a_subtree_of_one_wheel_is_linked_whole_without_being_listed() -> None:
    # numpy's children are unknown (None): the planner must not need them.
    a = listing("numpy.whl", {"numpy": folder(), "numpy.libs": folder()})
    b = listing("six.whl", {"six.py": file(), "__pycache__": folder({"six.pyc": file()})})

    plan = plan_view([a, b])

    assert plan.dirs == ()
    assert [link.path for link in plan.links] == ["__pycache__", "numpy", "numpy.libs", "six.py"]
    assert dirs_to_expand([a, b]) == []


def test_root_pycache_and_pth_files_of_several_wheels_are_merged() -> None:
    a = listing("a.whl", {"a.py": file(), "a.pth": file(), "__pycache__": folder({"a.p": file()})})
    b = listing("b.whl", {"b.py": file(), "b.pth": file(), "__pycache__": folder({"b.p": file()})})

    plan = plan_view([a, b])

    assert plan.dirs == ("__pycache__",)
    links = {link.path: link.source for link in plan.links}
    assert links == {
        "__pycache__/a.p": source("a.whl", "__pycache__/a.p"),
        "__pycache__/b.p": source("b.whl", "__pycache__/b.p"),
        "a.pth": source("a.whl", "a.pth"),
        "a.py": source("a.whl", "a.py"),
        "b.pth": source("b.whl", "b.pth"),
        "b.py": source("b.whl", "b.py"),
    }


def test_same_inode_is_identical_same_size_must_be_compared() -> None:
    a = listing("a.whl", {"ns": folder({"same": file(5, inode=7), "maybe": file(5, inode=8)})})
    b = listing("b.whl", {"ns": folder({"same": file(5, inode=7), "maybe": file(5, inode=9)})})

    plan = plan_view([a, b])

    assert [link.path for link in plan.links] == ["ns/maybe", "ns/same"]
    assert plan.links[0].source == source("a.whl", "ns/maybe")  # the first wheel's copy
    assert plan.checks == (
        SameContent(
            "ns/maybe", source("a.whl", "ns/maybe"), "a.whl", source("b.whl", "ns/maybe"), "b.whl"
        ),
    )


def test_bytecode_at_one_path_follows_the_first_tree_unchecked() -> None:
    cache = {"m.cpython-311.pyc": file(100)}
    a = listing("a.whl", {"ns": folder({"m.py": file(5, 1), "__pycache__": folder(cache)})})
    cache = {"m.cpython-311.pyc": file(120)}
    b = listing("b.whl", {"ns": folder({"m.py": file(5, 1), "__pycache__": folder(cache)})})

    plan = plan_view([a, b])

    assert plan.dirs == ("ns", "ns/__pycache__")
    assert [(link.path, link.source) for link in plan.links] == [
        ("ns/__pycache__/m.cpython-311.pyc", source("a.whl", "ns/__pycache__/m.cpython-311.pyc")),
        ("ns/m.py", source("a.whl", "ns/m.py")),
    ]
    assert plan.checks == ()


def test_different_files_at_one_path_are_a_conflict_naming_both_wheels() -> None:
    a = listing("a-1.0-py3-none-any.whl", {"ns": folder({"x.py": file(5), "d": folder()})})
    b = listing("b-1.0-py3-none-any.whl", {"ns": folder({"x.py": file(6), "d": file()})})

    with pytest.raises(ViewConflict) as caught:
        plan_view([a, b])

    error = caught.value
    assert (error.path, error.first_wheel, error.other_wheel) == (
        "ns/d",
        "a-1.0-py3-none-any.whl",
        "b-1.0-py3-none-any.whl",
    )
    assert [c.path for c in error.clashes] == ["ns/d", "ns/x.py"]
    message = str(error)
    assert "ns/x.py" in message
    assert "5 vs 6 bytes" in message
    assert "a dir vs a file" in message
    assert "a-1.0-py3-none-any.whl" in message
    assert "b-1.0-py3-none-any.whl" in message
    assert "re-lock" in message


def test_symlinks_merge_when_their_targets_agree() -> None:
    a = listing("a.whl", {"ns": folder({"l": Entry("symlink", target="x")})})
    b = listing("b.whl", {"ns": folder({"l": Entry("symlink", target="x")})})
    c = listing("c.whl", {"ns": folder({"l": Entry("symlink", target="y")})})

    assert [link.path for link in plan_view([a, b]).links] == ["ns/l"]
    with pytest.raises(ViewConflict, match="symlinks to 'x' vs 'y'"):
        plan_view([a, c])


def test_the_planner_asks_for_shared_dirs_one_level_at_a_time() -> None:
    a = listing("a.whl", {"ns": folder(), "only_a": folder()})
    b = listing("b.whl", {"ns": folder()})

    assert dirs_to_expand([a, b]) == [(0, "ns"), (1, "ns")]
    with pytest.raises(ValueError, match="scan_trees"):
        plan_view([a, b])

    a = with_children(a, "ns", {"deep": folder(), "x": file()})
    b = with_children(b, "ns", {"deep": folder()})
    assert dirs_to_expand([a, b]) == [(0, "ns/deep"), (1, "ns/deep")]
    a = with_children(a, "ns/deep", {"one": file()})
    b = with_children(b, "ns/deep", {"two": file()})
    assert dirs_to_expand([a, b]) == []
    assert plan_view([a, b]).dirs == ("ns", "ns/deep")


def test_view_key_is_order_free_and_depends_on_the_interpreter() -> None:
    x, y = "a" * 64, "b" * 64

    assert view_key([x, y], "cpython-311") == view_key([y, x, y], "cpython-311")
    assert view_key([x, y], "cpython-311") != view_key([x, y], "cpython-312")
    assert view_key([x], "cpython-311") != view_key([x, y], "cpython-311")
    with pytest.raises(ValueError, match="sha256"):
        view_key(["A" * 64], "cpython-311")


# --- real trees ---------------------------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    return StoreLayout(tmp_path / "store")


Publish = Callable[..., tuple[str, Path, str]]


@pytest.fixture
def publish(layout: StoreLayout, tmp_path: Path) -> Publish:
    """Build a wheel, unpack it as the store does: ``(filename, site dir, sha256)``."""

    def make(
        name: str, version: str = "1.0", *, files: Mapping[str, str | bytes], compile: bool = False
    ) -> tuple[str, Path, str]:
        wheel = build_wheel(tmp_path / "dists", name, version, files=files)
        sha = sha256_file(wheel)
        site = layout.site_dir(sha)
        unpack_wheel(wheel, site)
        if compile:
            compile_tree(site, sys.executable, display_dir=site)
        seal_read_only(site)
        return wheel.name, site, sha

    return make


def run_python(path: Path, code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with ``path`` first on sys.path; ``-B``: tests run as
    root, who could write ``.pyc`` into sealed trees, and ``-I`` ignores the environment."""
    prelude = f"import sys; sys.path.insert(0, {str(path)!r})\n"
    argv = [sys.executable, "-I", "-B", *flags, "-c", prelude + code]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done


def bytecode_used(path: Path, module: str, pyc: str) -> bool:
    """Whether importing ``module`` from ``path`` loads ``path / pyc`` (``-v`` says so)."""
    trace = run_python(path, f"import {module}", "-v").stderr
    return f"# code object from '{path / pyc}'" in trace.splitlines()


def key_of(*published: tuple[str, Path, str]) -> str:
    return view_key([sha for _, _, sha in published], TAG)


def entries_of(*published: tuple[str, Path, str]) -> list[tuple[str, Path]]:
    return [(wheel, site) for wheel, site, _ in published]


def test_namespace_package_imports_through_the_view(
    publish: Publish, layout: StoreLayout, mode: LinkMode
) -> None:
    a = publish("nspkg-a", files={"nspkg/a/__init__.py": "NAME = 'a'\n"}, compile=True)
    b = publish("nspkg-b", files={"nspkg/b/__init__.py": "NAME = 'b'\n"}, compile=True)

    site = ensure_view(layout, entries_of(a, b), key_of(a, b), link_mode=mode)

    assert site == layout.view_site_dir(key_of(a, b))
    assert (site / "nspkg").is_dir()
    assert not (site / "nspkg").is_symlink()
    assert sorted(p.name for p in (site / "nspkg").iterdir()) == ["a", "b"]
    out = run_python(site, "import nspkg.a, nspkg.b; print(nspkg.a.NAME + nspkg.b.NAME)")
    assert out.stdout == "ab\n"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> LinkMode:
    value: LinkMode = request.param
    return value


def test_a_subtree_of_one_wheel_is_linked_whole(
    publish: Publish, layout: StoreLayout, mode: LinkMode
) -> None:
    a = publish("alpha", files={"alpha/__init__.py": "", "alpha/sub/m.py": "X = 1\n"})
    b = publish("beta", files={"beta/__init__.py": ""})

    site = ensure_view(layout, entries_of(a, b), key_of(a, b), link_mode=mode)

    view_alpha, tree_alpha = site / "alpha", a[1] / "alpha"
    if mode == "symlink":
        assert view_alpha.is_symlink()
        assert view_alpha.resolve() == tree_alpha.resolve()
        assert not view_alpha.readlink().is_absolute()  # the store may move
    else:
        assert not view_alpha.is_symlink()
        assert view_alpha.is_dir()
        assert (view_alpha / "sub/m.py").stat().st_ino == (tree_alpha / "sub/m.py").stat().st_ino
    assert (site / "alpha/sub/m.py").read_text() == "X = 1\n"


def test_a_view_of_many_files_in_a_merged_dir_links_every_one(
    publish: Publish, layout: StoreLayout
) -> None:
    count = 800
    files = {f"many/d{n % 9}/m{n}.py": f"N = {n}\n" for n in range(count)}
    a = publish("many", files=files)
    b = publish("other", files={"other/__init__.py": "", "many/extra.py": "E = 1\n"})

    site = ensure_view(layout, entries_of(a, b), key_of(a, b), link_mode="hardlink")

    for name in files:
        assert (site / name).stat().st_ino == (a[1] / name).stat().st_ino, name
    assert (site / "many/extra.py").stat().st_ino == (b[1] / "many/extra.py").stat().st_ino
    assert not (site / "many/d0").stat().st_mode & stat.S_IWUSR  # made dirs sealed too


def test_the_view_is_sealed_and_reused_by_key(
    publish: Publish, layout: StoreLayout, mode: LinkMode
) -> None:
    a = publish("alpha", files={"alpha/__init__.py": "", "shared/x.py": "X = 1\n"})
    b = publish("beta", files={"beta/__init__.py": "", "shared/y.py": "Y = 2\n"})
    key = key_of(a, b)

    first = ensure_view(layout, entries_of(a, b), key, link_mode=mode)
    inode = first.stat().st_ino
    again = ensure_view(layout, entries_of(b, a), key, link_mode=mode)

    assert again == first
    assert again.stat().st_ino == inode
    for path in [layout.view_dir(key), *layout.view_dir(key).rglob("*")]:
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            assert stat.S_IMODE(info.st_mode) == 0o555, path
        elif stat.S_ISREG(info.st_mode):
            assert stat.S_IMODE(info.st_mode) == 0o444, path
    assert list(layout.tmp_dir.iterdir()) == []


def test_identical_files_at_one_path_are_fine_and_keep_their_bytecode(
    publish: Publish, layout: StoreLayout, mode: LinkMode
) -> None:
    # An old-style namespace __init__.py, byte for byte the same in both wheels; their .pyc
    # differ (each records its own tree), which must not count as a conflict.
    shared = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    files_a = {"common/__init__.py": shared, "common/a.py": "A = 1\n"}
    files_b = {"common/__init__.py": shared, "common/b.py": "B = 2\n"}
    a = publish("alpha", files=files_a, compile=True)
    b = publish("beta", files=files_b, compile=True)
    pyc = f"common/__pycache__/__init__.{TAG}.pyc"
    assert (a[1] / pyc).read_bytes() != (b[1] / pyc).read_bytes()

    site = ensure_view(layout, entries_of(a, b), key_of(a, b), link_mode=mode)

    assert (site / "common/__init__.py").read_text() == shared
    assert (site / "common/__init__.py").resolve().stat().st_ino == (
        (a[1] / "common/__init__.py").stat().st_ino
    )
    assert (site / pyc).read_bytes() == (a[1] / pyc).read_bytes()  # the source's own
    assert bytecode_used(site, "common", pyc)
    assert run_python(site, "import common.a, common.b").returncode == 0


@pytest.mark.parametrize("other", ["X = 2\n", "X = 22222\n"], ids=["same-size", "other-size"])
def test_a_conflict_names_both_wheels_and_leaves_nothing_behind(
    publish: Publish, layout: StoreLayout, mode: LinkMode, other: str
) -> None:
    a = publish("alpha", files={"alpha/__init__.py": "", "common/util.py": "X = 1\n"})
    b = publish("beta", files={"beta/__init__.py": "", "common/util.py": other})
    key = key_of(a, b)

    with pytest.raises(ViewConflict) as caught:
        ensure_view(layout, entries_of(a, b), key, link_mode=mode)

    assert caught.value.path == "common/util.py"
    assert (caught.value.first_wheel, caught.value.other_wheel) == (a[0], b[0])
    assert a[0] in str(caught.value)
    assert b[0] in str(caught.value)
    assert not layout.view_dir(key).exists()
    assert list(layout.tmp_dir.glob("*")) == []


def test_verify_plan_reads_bytes_only_for_same_size_files(tmp_path: Path) -> None:
    one, two, three = tmp_path / "1", tmp_path / "2", tmp_path / "3"
    one.write_bytes(b"abc")
    two.write_bytes(b"abc")
    three.write_bytes(b"abd")
    plan = ViewPlan(trees=(), dirs=(), links=())

    verify_plan(replace(plan, checks=(SameContent("p", one, "a", two, "b"),)))
    with pytest.raises(ViewConflict, match="same size, different bytes"):
        verify_plan(replace(plan, checks=(SameContent("p", one, "a", three, "c"),)))


def test_only_dirs_that_trees_share_are_listed(
    publish: Publish, layout: StoreLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = publish("alpha", files={"alpha/deep/m.py": "", "ns/a/m.py": "", "ns/x/one.py": ""})
    b = publish("beta", files={"beta/deep/m.py": "", "ns/b/m.py": "", "ns/x/two.py": ""})
    listed: list[str] = []
    real_scan_dir = views.scan_dir

    def spy(path: Path, relpath: str = "") -> dict[str, Entry]:
        listed.append(relpath)
        return real_scan_dir(path, relpath)

    monkeypatch.setattr(views, "scan_dir", spy)

    plan = plan_view(scan_trees(entries_of(a, b)))

    assert sorted(listed) == ["", "", "ns", "ns", "ns/x", "ns/x"]
    assert plan.dirs == ("ns", "ns/x")


def test_losing_the_race_to_a_twin_keeps_the_twin(
    publish: Publish, layout: StoreLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = publish("alpha", files={"alpha/__init__.py": ""})
    b = publish("beta", files={"beta/__init__.py": ""})
    key = key_of(a, b)
    plan = plan_view(scan_trees(entries_of(a, b)))
    real_place_links = views._place_links

    def twin_first(*args: object, **kwargs: object) -> list[str]:
        monkeypatch.setattr(views, "_place_links", real_place_links)
        build_view(layout, key, plan, link_mode="symlink")  # the twin wins the rename
        return real_place_links(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(views, "_place_links", twin_first)

    site = build_view(layout, key, plan, link_mode="hardlink")

    assert (site / "alpha").is_symlink()  # the twin's
    assert list(layout.tmp_dir.iterdir()) == []


def test_leftovers_of_a_crashed_build_are_removed(publish: Publish, layout: StoreLayout) -> None:
    a = publish("alpha", files={"alpha/__init__.py": ""})
    key = key_of(a)
    crashed = layout.tmp_dir / f"{layout.view_staging_prefix(key)}dead"
    (crashed / "site/partial").mkdir(parents=True)
    seal_read_only(crashed)
    unrelated = layout.tmp_dir / "someone-elses"
    unrelated.mkdir()

    ensure_view(layout, entries_of(a), key)

    assert sorted(p.name for p in layout.tmp_dir.iterdir()) == ["someone-elses"]


def test_a_symlink_view_survives_moving_the_store(
    publish: Publish, layout: StoreLayout, tmp_path: Path
) -> None:
    a = publish("alpha", files={"alpha/__init__.py": "NAME = 'alpha'\n"})
    b = publish("beta", files={"beta.py": "NAME = 'beta'\n"})
    key = key_of(a, b)
    ensure_view(layout, entries_of(a, b), key, link_mode="symlink")

    moved = StoreLayout(tmp_path / "moved")
    layout.root.rename(moved.root)

    out = run_python(moved.view_site_dir(key), "import alpha, beta; print(alpha.NAME, beta.NAME)")
    assert out.stdout == "alpha beta\n"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_hardlink_view_keeps_rpaths_across_wheels_working(
    layout: StoreLayout, tmp_path: Path
) -> None:
    """Why hard links are the default: ``$ORIGIN/../..`` of one wheel reaching into another
    (torch and the nvidia-* wheels) resolves in the view, not in the tree a symlink points to."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.c").write_text("int b(void) { return 42; }\n")
    (src / "a.c").write_text("int b(void);\nint a(void) { return b() + 1; }\n")
    trees = {name: layout.site_dir(hashlib.sha256(name.encode()).hexdigest()) for name in "ab"}
    lib_b, lib_a = trees["b"] / "depb/lib", trees["a"] / "pkga/lib"
    lib_b.mkdir(parents=True)
    lib_a.mkdir(parents=True)
    cc = ["cc", "-shared", "-fPIC", "-o"]
    subprocess.run([*cc, str(lib_b / "libb.so"), str(src / "b.c")], check=True)
    rpath = "-Wl,-rpath,$ORIGIN/../../depb/lib"
    link_b = [f"-L{lib_b}", "-lb", rpath]
    subprocess.run([*cc, str(lib_a / "liba.so"), str(src / "a.c"), *link_b], check=True)
    for site in trees.values():
        seal_read_only(site)

    entries = [("a.whl", trees["a"]), ("b.whl", trees["b"])]
    site = ensure_view(layout, entries, "k" * 64, link_mode="hardlink")

    code = textwrap.dedent(f"""
        import ctypes
        print(ctypes.CDLL({str(site / "pkga/lib/liba.so")!r}).a())
    """)
    assert run_python(site, code).stdout == "43\n"
