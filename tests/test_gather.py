"""Gathering a scattered model: content-keyed, incremental, hard-linked, and safe to kill.

Everything here runs on small trees in ``tmp_path`` with the per-test ``WHEELCAS_HOME``
(conftest); no index, no lock. Packing a scattered model is tested in tests/test_pack.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import loader
from loader import gather_pool, gather_walk, gathering
from loader.cli import main
from loader.errors import ModelConfigError
from loader.gather_plan import (
    MARKER_NAME,
    FileEntry,
    LinkEntry,
    PlanEntry,
    glob_regex,
    is_ignored,
    make_plan,
    merge,
    parse_ignore_file,
    tree_digest,
)
from loader.gathering import GatherResult, gather, gather_home
from loader.packing import model_files
from tests.test_load import run_python

EXTERNAL = "external_package_dirs"


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def scattered(tmp_path: Path) -> Path:
    """``model/`` (with its own ``packages/``) and two external dirs beside it."""
    _write(
        tmp_path / "model",
        {
            "pkg/__init__.py": "",
            "pkg/entry.py": "import common_util\n",
            "requirements.txt": "alpha\n",
            ".carton/carton.lock": "# lock\n",
            "packages/local_mod.py": "L = 1\n",
        },
    )
    _write(tmp_path / "common", {"common_util.py": "C = 1\n", "helpers/__init__.py": ""})
    _write(tmp_path / "shared", {"shared_mod.py": "S = 1\n"})
    return tmp_path / "model"


def _opts(*dirs: str, **more: object) -> dict[str, object]:
    return {EXTERNAL: list(dirs), **more}


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as ``-> target``), by relative path."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = f"-> {path.readlink()}"
        elif path.is_file():
            found[rel] = path.read_text()
    return found


def _inode(path: Path) -> int:
    return path.stat().st_ino


# --- what a gather holds ------------------------------------------------------------------


def test_external_dirs_join_the_bundled_dir_and_the_option_is_dropped(
    scattered: Path, tmp_path: Path
) -> None:
    result = gather(
        scattered,
        tmp_path / "out",
        runner_opts=_opts("../common", "../shared", entrypoint_package="pkg.entry"),
    )
    assert result.path == tmp_path / "out"
    assert dict(result.runner_opts) == {"entrypoint_package": "pkg.entry"}
    files = _files(result.path)
    marker = json.loads(files.pop(MARKER_NAME))
    assert marker["digest"] == result.digest
    assert files == {
        ".carton/carton.lock": "# lock\n",  # the lockfile is part of the model
        "packages/common_util.py": "C = 1\n",
        "packages/helpers/__init__.py": "",
        "packages/local_mod.py": "L = 1\n",
        "packages/shared_mod.py": "S = 1\n",
        "pkg/__init__.py": "",
        "pkg/entry.py": "import common_util\n",
        "requirements.txt": "alpha\n",
    }
    assert (result.files, result.copied, result.linked, result.reused) == (8, 8, 0, False)
    # Read-only: the files are the pool's objects, shared with every other gather.
    assert (result.path / "pkg" / "entry.py").stat().st_mode & 0o222 == 0


def test_keep_dir_names_puts_each_external_dir_under_its_name(
    scattered: Path, tmp_path: Path
) -> None:
    result = gather(
        scattered, tmp_path / "out", runner_opts=_opts("../common"), keep_dir_names=True
    )
    assert "packages/common/common_util.py" in _files(result.path)
    assert "packages/common_util.py" not in _files(result.path)
    as_option = gather(
        scattered,
        tmp_path / "out2",
        runner_opts=_opts("../common", keep_external_dir_names=True, bundled_packages_dir="lib"),
    )
    assert "lib/common/helpers/__init__.py" in _files(as_option.path)
    assert "packages/local_mod.py" in _files(as_option.path)  # no longer the bundled dir
    assert dict(as_option.runner_opts) == {"bundled_packages_dir": "lib"}


def test_a_model_without_external_dirs_is_copied_as_is(scattered: Path, tmp_path: Path) -> None:
    result = gather(scattered, tmp_path / "out")
    assert "packages/local_mod.py" in _files(result.path)
    assert result.runner_opts == {}


# --- the content cache --------------------------------------------------------------------


def test_two_gathers_share_every_unchanged_file(scattered: Path, tmp_path: Path) -> None:
    first = gather(scattered, tmp_path / "one", runner_opts=_opts("../common"))
    second = gather(scattered, tmp_path / "two", runner_opts=_opts("../common"))
    assert (second.copied, second.linked, second.digest) == (0, first.files, first.digest)
    for rel in _files(first.path):
        if rel != MARKER_NAME:
            assert _inode(first.path / rel) == _inode(second.path / rel), rel
    pool_object = gather_home() / "objects"
    assert any(_inode(p) == _inode(first.path / "pkg/entry.py") for p in pool_object.rglob("*"))


def test_a_regather_after_one_change_gives_only_that_file_a_new_inode(
    scattered: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = gather(scattered, out, runner_opts=_opts("../common"))
    before = {rel: _inode(out / rel) for rel in _files(out) if rel != MARKER_NAME}
    (tmp_path / "common" / "common_util.py").write_text("C = 2\n")
    second = gather(scattered, out, runner_opts=_opts("../common"))
    assert second.digest != first.digest
    assert (second.copied, second.linked, second.reused) == (1, first.files - 1, False)
    assert (out / "packages/common_util.py").read_text() == "C = 2\n"
    changed = {rel for rel, ino in before.items() if _inode(out / rel) != ino}
    assert changed == {"packages/common_util.py"}


def test_an_unchanged_output_is_left_alone(scattered: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    gather(scattered, out, runner_opts=_opts("../common"))
    marker = (out / MARKER_NAME).stat()
    again = gather(scattered, out, runner_opts=_opts("../common"))
    assert again.reused
    assert (out / MARKER_NAME).stat().st_ino == marker.st_ino
    assert (out / MARKER_NAME).stat().st_mtime_ns == marker.st_mtime_ns


def test_a_damaged_output_is_rebuilt(scattered: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    gather(scattered, out, runner_opts=_opts("../common"))
    (out / "packages" / "common_util.py").unlink()
    again = gather(scattered, out, runner_opts=_opts("../common"))
    assert not again.reused
    assert (out / "packages" / "common_util.py").read_text() == "C = 1\n"


def test_without_an_output_the_tree_is_keyed_by_content_not_location(
    scattered: Path, tmp_path: Path
) -> None:
    first = gather(scattered, runner_opts=_opts("../common"))
    assert first.path == gather_home() / "trees" / first.digest
    assert not first.reused
    # The same content elsewhere, with other mtimes: the same tree, not touched.
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, symlinks=True)
    os.utime(moved / "model" / "pkg" / "entry.py", (1, 1))
    again = gather(moved / "model", runner_opts=_opts("../common"))
    assert (again.path, again.digest, again.reused) == (first.path, first.digest, True)


class _Reads:
    """Counts every read of a file's content by gathering (hash or copy into the pool)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        hash_file, ingest = gather_walk.hash_file, gather_pool.Pool.ingest

        def counted_hash(path: str, size: int) -> str:
            self.paths.append(path)
            return hash_file(path, size)

        def counted_ingest(
            pool: gather_pool.Pool, source: str, before: os.stat_result, expected: str | None = None
        ) -> str:
            self.paths.append(source)
            return ingest(pool, source, before, expected)

        monkeypatch.setattr(gathering, "hash_file", counted_hash)
        monkeypatch.setattr(gather_pool.Pool, "ingest", counted_ingest)


def test_an_unchanged_dir_is_regathered_without_reading_a_file(
    scattered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The files were written just now, so they are "racily clean": trust them anyway here.
    monkeypatch.setattr(gather_walk, "RACY_WINDOW_NS", 0)
    gather(scattered, tmp_path / "one", runner_opts=_opts("../common"))
    reads = _Reads(monkeypatch)
    again = gather(scattered, tmp_path / "two", runner_opts=_opts("../common"))
    assert reads.paths == []
    assert again.copied == 0


def test_racily_clean_files_are_read_again(
    scattered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gather(scattered, tmp_path / "one")
    reads = _Reads(monkeypatch)
    again = gather(scattered, tmp_path / "two")
    assert len(reads.paths) == again.files  # changed within 2 s of being hashed: not trusted
    assert again.copied == 0  # only hashed: the pool had them all


def test_a_content_change_with_preserved_mtimes_is_seen(
    scattered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gather_walk, "RACY_WINDOW_NS", 0)  # so only the stat can tell
    util = tmp_path / "common" / "common_util.py"
    os.utime(util, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    out = tmp_path / "out"
    first = gather(scattered, out, runner_opts=_opts("../common"))
    old = util.stat()
    util.write_text("C = 9\n")  # same size
    os.utime(util, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (util.stat().st_size, util.stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    reads = _Reads(monkeypatch)
    second = gather(scattered, out, runner_opts=_opts("../common"))
    assert set(reads.paths) == {str(util)}  # ctime moved: only that file is read
    assert second.digest != first.digest
    assert (out / "packages" / "common_util.py").read_text() == "C = 9\n"


# --- the walk -----------------------------------------------------------------------------


@pytest.fixture
def scandirs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every dir the walk lists."""
    listed: list[str] = []
    real = os.scandir

    def counting(path: str) -> Iterator[os.DirEntry[str]]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return listed


def test_ignored_dirs_are_never_entered(
    scattered: Path, tmp_path: Path, scandirs: list[str]
) -> None:
    git = scattered / ".git" / "objects"
    for i in range(20):
        _write(git / f"{i:02x}", {f"{j:038x}": "blob" for j in range(100)})  # 2,000 files
    _write(scattered, {"__pycache__/x.pyc": "", ".venv/lib/site.py": "", "pkg/.mypy_cache/a": ""})
    _write(scattered, {"env/pyvenv.cfg": "home = /usr\n", "env/lib/python3/site.py": ""})
    _write(tmp_path / "common", {".git/HEAD": "ref\n"})
    result = gather(scattered, tmp_path / "out", runner_opts=_opts("../common"))
    files = _files(result.path)
    assert not [f for f in files if f.startswith((".git", "__pycache__", ".venv", "env/"))]
    assert not [f for f in files if ".mypy_cache" in f or f.startswith("packages/.git")]
    names = {Path(p).name for p in scandirs}
    assert not names & {".git", "objects", "__pycache__", ".venv", ".mypy_cache", "lib"}
    assert any(p.endswith("/env") for p in scandirs)  # listed once, found to be a venv, left


def test_wheelcasignore_patterns(scattered: Path, tmp_path: Path, scandirs: list[str]) -> None:
    _write(
        scattered,
        {
            ".wheelcasignore": "# weights live elsewhere\n*.log\n!keep.log\ndata/\n/build\n"
            "docs/**/*.tmp\n",
            "run.log": "",
            "pkg/keep.log": "",
            "pkg/data/big.bin": "",
            "pkg/data.py": "",  # `data/` matches dirs only
            "build/x.py": "",
            "pkg/build/y.py": "",  # `/build` is anchored at the root
            "docs/a/b/c.tmp": "",
            "docs/a/b/c.md": "",
        },
    )
    _write(tmp_path / "common", {".wheelcasignore": "tests/\n", "tests/test_x.py": "", "m.py": ""})
    result = gather(scattered, tmp_path / "out", runner_opts=_opts("../common"))
    files = set(_files(result.path))
    assert {"pkg/keep.log", "pkg/data.py", "pkg/build/y.py", "docs/a/b/c.md"} <= files
    assert not files & {"run.log", "pkg/data/big.bin", "build/x.py", "docs/a/b/c.tmp"}
    assert "packages/m.py" in files
    assert not [f for f in files if "tests" in f or f.endswith(".wheelcasignore")]
    assert not [p for p in scandirs if p.endswith(("model/pkg/data", "model/build", "tests"))]
    assert str(scattered / "pkg" / "build") in scandirs


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "ignored"),
    [
        ("*.pyc", "a/b/x.pyc", False, True),
        ("x/*.py", "x/a.py", False, True),
        ("x/*.py", "x/y/a.py", False, False),  # `*` stays within one name
        ("x/**/a.py", "x/a.py", False, True),
        ("x/**/a.py", "x/y/z/a.py", False, True),
        ("**/cache", "a/b/cache", True, True),
        ("out/", "a/out", False, False),  # dirs only
        ("out/", "a/out", True, True),
        ("/top", "a/top", True, False),  # anchored
        ("data[0-9].bin", "data7.bin", False, True),
        ("data[!0-9].bin", "data7.bin", False, False),
        ("\\#name", "#name", False, True),
    ],
)
def test_ignore_globs(pattern: str, path: str, is_dir: bool, ignored: bool) -> None:
    rules = parse_ignore_file(pattern + "\n")
    assert is_ignored(rules, path, path.rsplit("/", 1)[-1], is_dir=is_dir) is ignored, glob_regex(
        pattern
    )


def test_the_last_matching_line_wins() -> None:
    rules = parse_ignore_file("*.txt\n!a.txt\n")
    assert not is_ignored(rules, "a.txt", "a.txt", is_dir=False)
    assert is_ignored(rules, "b.txt", "b.txt", is_dir=False)
    assert is_ignored(parse_ignore_file("!.git\n"), ".git", ".git", is_dir=True)  # built in


# --- clashes ------------------------------------------------------------------------------


def test_two_sources_for_one_path_are_refused_naming_both(scattered: Path, tmp_path: Path) -> None:
    _write(tmp_path / "shared", {"common_util.py": "C = 'other'\n"})
    with pytest.raises(ModelConfigError, match=r"two sources for packages/common_util\.py") as err:
        gather(scattered, tmp_path / "out", runner_opts=_opts("../common", "../shared"))
    assert str(tmp_path / "common" / "common_util.py") in str(err.value)
    assert str(tmp_path / "shared" / "common_util.py") in str(err.value)
    assert "--keep-dir-names" in str(err.value)
    assert not (tmp_path / "out").exists()
    # The same content twice is fine; so is each dir under its own name.
    (tmp_path / "shared" / "common_util.py").write_text("C = 1\n")
    gather(scattered, tmp_path / "out", runner_opts=_opts("../common", "../shared"))
    _write(tmp_path / "shared", {"common_util.py": "C = 'other'\n"})
    gather(
        scattered, tmp_path / "o2", runner_opts=_opts("../common", "../shared"), keep_dir_names=True
    )


def test_a_file_against_a_dir_is_a_clash() -> None:
    with pytest.raises(ModelConfigError, match="as both a file and a directory"):
        merge(
            [
                ("packages/", {"util": FileEntry("/a/util", "0" * 64, False, 1)}),
                ("packages/", {"util/x.py": FileEntry("/b/util/x.py", "1" * 64, False, 1)}),
            ]
        )


def test_the_digest_ignores_where_files_come_from() -> None:
    a: dict[str, PlanEntry] = {
        "x.py": FileEntry("/one/x.py", "0" * 64, False, 3),
        "l": LinkEntry("/one/l", "x.py"),
    }
    b: dict[str, PlanEntry] = {
        "x.py": FileEntry("/two/x.py", "0" * 64, False, 3),
        "l": LinkEntry("/two/l", "x.py"),
    }
    assert tree_digest(a, "packages") == tree_digest(b, "packages")
    flipped: dict[str, PlanEntry] = {**a, "x.py": FileEntry("/one/x.py", "0" * 64, True, 3)}
    assert tree_digest(flipped, "packages") != tree_digest(a, "packages")
    assert tree_digest(a, "lib") != tree_digest(a, "packages")
    assert make_plan(a, [], "packages").digest == tree_digest(a, "packages")


# --- symlinks -----------------------------------------------------------------------------


def test_symlinks_inside_are_kept_and_outside_ones_followed_with_a_warning(
    scattered: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (scattered / "alias").symlink_to("pkg")
    (scattered / "pkg" / "entry_link.py").symlink_to(scattered / "pkg" / "entry.py")  # absolute
    _write(tmp_path / "weights", {"w.bin": "W"})
    (scattered / "weights").symlink_to(tmp_path / "weights")
    with caplog.at_level(logging.WARNING, logger="wheelcas.gather"):
        result = gather(scattered, tmp_path / "out")
    files = _files(result.path)
    assert files["alias"] == "-> pkg"
    assert files["pkg/entry_link.py"] == "-> entry.py"  # relative in the output
    assert files["weights/w.bin"] == "W"
    assert not (result.path / "weights").is_symlink()
    assert result.symlinks == 2
    assert len(result.warnings) == 1
    assert str(scattered / "weights") in result.warnings[0]
    assert str(scattered / "weights") in caplog.text


def test_a_dangling_symlink_is_an_error_naming_it(scattered: Path, tmp_path: Path) -> None:
    (scattered / "pkg" / "gone.py").symlink_to("nothere.py")
    with pytest.raises(ModelConfigError, match=r"gone\.py -> nothere\.py is dangling"):
        gather(scattered, tmp_path / "out")


def test_a_symlink_to_an_ignored_target_is_an_error(scattered: Path, tmp_path: Path) -> None:
    _write(scattered, {".venv/bin/python": ""})
    (scattered / "python").symlink_to(".venv/bin/python")
    with pytest.raises(ModelConfigError, match=r"symlink .*python points to \.venv/bin/python"):
        gather(scattered, tmp_path / "out")


def test_a_symlink_loop_through_an_outside_dir_is_an_error(scattered: Path, tmp_path: Path) -> None:
    _write(tmp_path / "outside", {"a.py": ""})
    (tmp_path / "outside" / "back").symlink_to(tmp_path / "outside")
    (scattered / "outside").symlink_to(tmp_path / "outside")
    with pytest.raises(ModelConfigError, match="never end"):
        gather(scattered, tmp_path / "out")


def test_packing_follows_every_symlink_and_warns_about_outside_ones(
    scattered: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (scattered / "alias").symlink_to("pkg")
    _write(tmp_path / "weights", {"w.bin": "W"})
    (scattered / "weights").symlink_to(tmp_path / "weights")
    with caplog.at_level(logging.WARNING, logger="wheelcas.pack"):
        files = dict(model_files(scattered))
    assert files["alias/entry.py"] == scattered / "pkg" / "entry.py"
    assert files["weights/w.bin"] == tmp_path / "weights" / "w.bin"
    assert "weights" in caplog.text
    assert "alias" not in caplog.text


# --- the output ---------------------------------------------------------------------------


def test_outputs_wheelcas_did_not_make_are_refused(scattered: Path, tmp_path: Path) -> None:
    _write(tmp_path / "mine", {"notes.txt": "keep me"})
    with pytest.raises(ModelConfigError, match="not an earlier `wheelcas gather` output"):
        gather(scattered, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ModelConfigError, match="overlaps"):
        gather(scattered, scattered / "gathered")
    with pytest.raises(ModelConfigError, match="overlaps"):
        gather(scattered, tmp_path / "common" / "x", runner_opts=_opts("../common"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelConfigError, match="not a directory"):
        gather(scattered, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert gather(scattered, tmp_path / "empty").files > 0


def test_a_failure_mid_build_leaves_the_old_output_whole(
    scattered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = gather(scattered, out, runner_opts=_opts("../common"))
    before = _files(out)
    (tmp_path / "common" / "common_util.py").write_text("C = 3\n")
    place = gather_pool.Pool.place
    calls = 0

    def failing(pool: gather_pool.Pool, entry: FileEntry, target: Path) -> tuple[bool, bool]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        return place(pool, entry, target)

    monkeypatch.setattr(gather_pool.Pool, "place", failing)
    with pytest.raises(OSError, match="No space"):
        gather(scattered, out, runner_opts=_opts("../common"))
    assert _files(out) == before
    assert json.loads((out / MARKER_NAME).read_text())["digest"] == first.digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_without_an_atomic_exchange_two_renames_replace_the_output(
    scattered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    gather(scattered, out, runner_opts=_opts("../common"))
    monkeypatch.setattr(gather_pool, "_exchange", lambda a, b: False)
    (tmp_path / "common" / "common_util.py").write_text("C = 5\n")
    again = gather(scattered, out, runner_opts=_opts("../common"))
    assert (out / "packages" / "common_util.py").read_text() == "C = 5\n"
    assert json.loads((out / MARKER_NAME).read_text())["digest"] == again.digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_a_killed_gather_leaves_the_old_output_whole(scattered: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = gather(scattered, out, runner_opts=_opts("../common"))
    before = _files(out)
    (tmp_path / "common" / "common_util.py").write_text("C = 4\n")
    done = run_python(
        f"""
        import os, signal
        from loader import gather_pool, gathering
        place = gather_pool.Pool.place
        calls = []
        def dying(pool, entry, target):
            calls.append(target)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return place(pool, entry, target)
        gather_pool.Pool.place = dying
        gathering.gather({str(scattered)!r}, {str(out)!r},
                         runner_opts={{"external_package_dirs": "../common"}})
        """
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _files(out) == before
    assert json.loads((out / MARKER_NAME).read_text())["digest"] == first.digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.gather-")]
    again = gather(scattered, out, runner_opts=_opts("../common"))
    assert (out / "packages" / "common_util.py").read_text() == "C = 4\n"
    assert again.digest != first.digest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# --- the command and the package ----------------------------------------------------------


def test_cli_gather(scattered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["gather", str(scattered), "-o", str(out), "--external-package-dir"]
    argv += [str(tmp_path / "common"), "--keep-dir-names", "--opt", "model.scale=2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"gathered {out}: 7 files (0 linked from the gather pool, 7 copied into it)"
    )
    assert lines[1].startswith("digest: ")
    assert lines[2] == 'load it with runner options: {"model.scale": 2}'
    assert (out / "packages" / "common" / "common_util.py").is_file()
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"up to date: {out} (7 files)")
    missing = ["gather", str(scattered), "-o", str(tmp_path / "o2"), "--opt", f"{EXTERNAL}=../no"]
    assert main(missing) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_gather_is_exported_lazily() -> None:
    assert loader.gather is gather
    assert GatherResult.__module__ == "loader.gathering"
    done = run_python(
        """
        import sys, loader
        print("loader.gathering" in sys.modules, "loader.gather_walk" in sys.modules)
        """
    )
    assert done.stdout.split() == ["False", "False"]


# --- review fixes: pool integrity, spelling of the bundled dir, modes ----------------------


def _edit_in_place(path: Path, text: str) -> None:
    """What root, or an editor that writes in place, does to a read-only output file."""
    path.chmod(0o644)
    with path.open("r+") as handle:  # the same inode: the pool object it links to
        handle.truncate(0)
        handle.write(text)


def test_an_output_edited_in_place_never_reaches_another_gather(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write(tmp_path / "m1", {"pkg/__init__.py": ""})
    _write(tmp_path / "ext" / "big", {"m7.py": "X=7\n"})
    _write(tmp_path / "m2", {"pkg/__init__.py": "", "packages/big/m7.py": "X=7\n"})
    out = gather(tmp_path / "m1", tmp_path / "out", runner_opts=_opts("../ext")).path
    edited = out / "packages" / "big" / "m7.py"
    pool_object = next(
        p for p in (gather_home() / "objects").rglob("*") if _inode(p) == _inode(edited)
    )
    assert pool_object.stat().st_mtime_ns == gather_pool.POOL_MTIME_NS
    assert edited.stat().st_mtime_ns == gather_pool.POOL_MTIME_NS  # outputs show it too
    _edit_in_place(edited, "X=8\n")
    assert pool_object.read_text() == "X=8\n"  # a hard link: the pool object is edited too

    with caplog.at_level(logging.WARNING, logger="wheelcas.gather"):
        # A new model of that content (read, not in the stat cache) ...
        other = gather(tmp_path / "m2", tmp_path / "out2")
        assert (other.path / "packages/big/m7.py").read_text() == "X=7\n"
        # ... and the same model again (its digests from the stat cache, nothing read).
        cached = gather(tmp_path / "m1", runner_opts=_opts("../ext"))
        assert (cached.path / "packages/big/m7.py").read_text() == "X=7\n"
    assert "was changed in place" in caplog.text
    assert edited.read_text() == "X=8\n"  # the edited output keeps its edit ...
    again = gather(tmp_path / "m1", tmp_path / "out", runner_opts=_opts("../ext"))
    assert not again.reused  # ... until it is gathered again: the edit moved its mtime
    assert (out / "packages/big/m7.py").read_text() == "X=7\n"


def test_a_gathered_dir_with_the_pool_mtime_packs(tmp_path: Path) -> None:
    """Zip cannot store times before 1980; the pool's mtime is after, and packing writes a
    fixed timestamp anyway."""
    _write(tmp_path / "m1", {"pkg/__init__.py": "", "pkg/a.py": "A = 1\n"})
    out = gather(tmp_path / "m1", tmp_path / "out").path
    rels = [rel for rel, _ in model_files(out)]
    assert "pkg/a.py" in rels
    from loader.packed import MemberSource, ZipReader, write_zip

    with (tmp_path / "x.zip").open("w+b") as handle:
        write_zip(handle, [MemberSource("a.py", path=out / "pkg" / "a.py")])
    with ZipReader(tmp_path / "x.zip") as reader:
        assert b"".join(reader.iter_member("a.py")) == b"A = 1\n"


def test_the_bundled_dir_spelling_does_not_change_the_gather(
    scattered: Path, tmp_path: Path
) -> None:
    plain = gather(scattered, tmp_path / "a", runner_opts=_opts("../common"))
    for spelling in ("./packages", "packages/.", "packages/"):
        other = gather(
            scattered,
            tmp_path / "b",
            runner_opts=_opts("../common", bundled_packages_dir=spelling),
        )
        assert other.digest == plain.digest, spelling
        assert dict(other.runner_opts) == {"bundled_packages_dir": "packages"}
    with pytest.raises(ModelConfigError, match="other than the model dir itself"):
        gather(scattered, tmp_path / "c", runner_opts=_opts("../common", bundled_packages_dir="."))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_and_cached_trees_get_the_umasks_mode(
    scattered: Path, tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        out = gather(scattered, tmp_path / "out", runner_opts=_opts("../common")).path
        tree = gather(scattered, runner_opts=_opts("../common")).path
    finally:
        os.umask(old)
    for made in (out, tree, out / "packages"):
        assert made.stat().st_mode & 0o777 == 0o777 & ~umask, made
    assert not (out / ".umask-probe").exists()
