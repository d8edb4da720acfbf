"""Dedupe: the pure plan, then real trees sharing inodes, savings and pruning."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from cas_daemon.dedupe import (
    MIN_DEDUPE_SIZE,
    DedupeResult,
    DedupeStep,
    FileFact,
    IndexFact,
    PruneResult,
    dedupe_savings,
    dedupe_tree,
    index_name,
    plan_dedupe,
    prune_index,
    scan_files,
    shared_bytes,
)
from cas_daemon.layout import StoreLayout, is_bytecode
from cas_daemon.precompile import compile_tree, remove_sealed, seal_read_only

# --- the pure part ------------------------------------------------------------------------


def fact(
    path: str, digest: str, *, size: int = 2000, inode: int = 1, mode: int = 0o444, mtime: int = 0
) -> FileFact:
    return FileFact(path, size, mode, (1, inode), digest, mtime)


def test_new_content_is_indexed_and_a_second_copy_in_the_tree_linked() -> None:
    files = [
        fact("a.py", "d1", inode=1),
        fact("b/a.py", "d1", inode=2),
        fact("c.so", "d2", inode=3),
    ]

    assert plan_dedupe(files, {}) == [
        DedupeStep("index", "a.py", "d1", 2000),
        DedupeStep("link", "b/a.py", "d1", 2000),
        DedupeStep("index", "c.so", "d2", 2000),
    ]


def test_indexed_content_is_linked_unless_already_shared_or_damaged() -> None:
    files = [fact("new.py", "d1", inode=5), fact("done.py", "d2", inode=6), fact("odd", "d3")]
    index = {
        "d1": IndexFact(2000, (1, 1)),
        "d2": IndexFact(2000, (1, 6)),  # already this inode: nothing to do
        "d3": IndexFact(1999, (1, 9)),  # same name, other size: never link over it
    }

    assert plan_dedupe(files, index) == [DedupeStep("link", "new.py", "d1", 2000)]


def test_executables_have_their_own_index_entries() -> None:
    assert index_name("d1", 0o444) == "d1"
    assert index_name("d1", 0o555) == "d1.x"
    files = [fact("lib.so", "d1", mode=0o555, inode=4)]

    assert plan_dedupe(files, {"d1": IndexFact(2000, (1, 1))}) == [
        DedupeStep("index", "lib.so", "d1.x", 2000)
    ]


def test_a_source_is_only_linked_to_a_copy_of_the_same_age() -> None:
    # Its .pyc records its mtime: a link to an older copy would make the bytecode stale.
    files = [fact("m.py", "d1", inode=2, mtime=100), fact("m.so", "d2", inode=3, mtime=100)]
    index = {"d1": IndexFact(2000, (1, 1), mtime=99), "d2": IndexFact(2000, (1, 4), mtime=99)}

    assert plan_dedupe(files, index) == [DedupeStep("link", "m.so", "d2", 2000)]
    index["d1"] = IndexFact(2000, (1, 1), mtime=100)
    assert plan_dedupe(files, index)[0] == DedupeStep("link", "m.py", "d1", 2000)


def test_shared_bytes_counts_every_extra_path_to_an_inode() -> None:
    assert shared_bytes([((1, 1), 100), ((1, 2), 50), ((1, 1), 100), ((1, 1), 100)]) == 200
    assert shared_bytes([]) == 0


# --- real trees ---------------------------------------------------------------------------

BIG = "".join(f"VALUE_{i} = {i}\n" for i in range(300))  # about 4 KiB
OTHER_BIG = BIG.replace("VALUE_", "OTHER_")
SMALL = "X = 1\n"


@pytest.fixture
def layout(tmp_path: Path) -> StoreLayout:
    return StoreLayout(tmp_path / "store")


MTIME = 1_700_000_000


def make_tree(
    layout: StoreLayout,
    sha: str,
    files: Mapping[str, str],
    *,
    executable: frozenset[str] = frozenset(),
    mtime: int = MTIME,
    compile: bool = False,
) -> Path:
    """A sealed tree in the store, as publishing leaves it; every file dated ``mtime``."""
    site = layout.site_dir(sha * 64)
    for relpath, text in files.items():
        path = site / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (mtime, mtime))
        if relpath in executable:
            path.chmod(0o755)
    if compile:
        compile_tree(site, sys.executable, display_dir=site)
    seal_read_only(site)
    return site


def loads_bytecode(site: Path, module: str) -> bool:
    """Whether ``import module`` from ``site`` uses the tree's ``.pyc`` (``-v`` tells)."""
    pyc = site / f"{module.replace('.', '/')}".rpartition("/")[0] / "__pycache__"
    pyc = pyc / f"{module.rpartition('.')[2]}.{sys.implementation.cache_tag}.pyc"
    code = f"import sys; sys.path.insert(0, {str(site)!r}); import {module}"
    argv = [sys.executable, "-I", "-B", "-v", "-c", code]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return f"# code object from '{pyc}'" in done.stderr.splitlines()


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_two_versions_share_their_identical_files(layout: StoreLayout) -> None:
    common = {"pkg/__init__.py": SMALL, "pkg/core.py": BIG, "pkg/data/table.txt": BIG * 2}
    old = make_tree(layout, "a", {**common, "pkg/version.py": OTHER_BIG})
    new = make_tree(layout, "b", {**common, "pkg/version.py": OTHER_BIG + "# 2.0\n"})

    assert dedupe_tree(layout, old) == DedupeResult(0, 0)  # the first copies become the index
    result = dedupe_tree(layout, new)

    shared = len(BIG) + len(BIG * 2)
    assert result == DedupeResult(files_linked=2, bytes_saved=shared)
    assert inode(new / "pkg/core.py") == inode(old / "pkg/core.py")
    assert inode(new / "pkg/data/table.txt") == inode(old / "pkg/data/table.txt")
    assert inode(new / "pkg/version.py") != inode(old / "pkg/version.py")
    assert inode(new / "pkg/__init__.py") != inode(old / "pkg/__init__.py")  # under 1 KiB
    assert (new / "pkg/core.py").read_text() == BIG
    assert (new / "pkg/version.py").read_text() == OTHER_BIG + "# 2.0\n"
    for path in [new, *new.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o555 if path.is_dir() else 0o444), path
    assert dedupe_savings(layout) == shared
    assert list(layout.tmp_dir.iterdir()) == []
    assert dedupe_tree(layout, new) == DedupeResult(0, 0)  # a second run finds nothing to do


def test_a_file_is_only_linked_to_a_copy_with_its_own_mode(layout: StoreLayout) -> None:
    plain = make_tree(layout, "a", {"tool": BIG})
    runnable = make_tree(layout, "b", {"tool": BIG}, executable=frozenset({"tool"}))
    again = make_tree(layout, "c", {"tool": BIG}, executable=frozenset({"tool"}))

    dedupe_tree(layout, plain)
    assert dedupe_tree(layout, runnable) == DedupeResult(0, 0)
    assert dedupe_tree(layout, again) == DedupeResult(1, len(BIG))

    assert inode(again / "tool") == inode(runnable / "tool") != inode(plain / "tool")
    assert stat.S_IMODE((again / "tool").stat().st_mode) == 0o555
    assert stat.S_IMODE((plain / "tool").stat().st_mode) == 0o444


def test_min_size_is_configurable(layout: StoreLayout) -> None:
    old = make_tree(layout, "a", {"m.py": SMALL, "e.py": ""})
    new = make_tree(layout, "b", {"m.py": SMALL, "e.py": ""})

    dedupe_tree(layout, old, min_size=0)
    result = dedupe_tree(layout, new, min_size=0)

    assert result == DedupeResult(1, len(SMALL))  # empty files never: nothing to save
    assert inode(new / "m.py") == inode(old / "m.py")


def test_modules_import_from_a_deduped_tree_with_their_bytecode(layout: StoreLayout) -> None:
    source = BIG + "def answer():\n    return 42\n"
    files = {"pkg/__init__.py": "", "pkg/core.py": source, "pkg/table.txt": BIG}
    old = make_tree(layout, "a", files, compile=True)
    new = make_tree(layout, "b", files, compile=True)
    dedupe_tree(layout, old)
    assert dedupe_tree(layout, new).files_linked == 2  # core.py and table.txt
    assert inode(new / "pkg/core.py") == inode(old / "pkg/core.py")

    assert loads_bytecode(new, "pkg.core")
    code = (
        f"import sys; sys.path.insert(0, {str(new)!r}); import pkg.core; print(pkg.core.answer())"
    )
    done = subprocess.run([sys.executable, "-I", "-B", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"


def test_bytecode_is_never_hashed_nor_indexed(layout: StoreLayout) -> None:
    # Bytes equal on purpose, which real .pyc of two trees never are (their co_filename and
    # source mtime differ): even then they are left alone, unread.
    fake_pyc = "\r\n" + BIG
    files = {
        "pkg/__pycache__/core.cpython-311.pyc": fake_pyc,
        "__pycache__/top.cpython-311.pyc": fake_pyc,
    }
    old = make_tree(layout, "a", {**files, "pkg/core.py": BIG})
    new = make_tree(layout, "b", {**files, "pkg/core.py": BIG})

    assert [f.path for f in scan_files(old, MIN_DEDUPE_SIZE)] == ["pkg/core.py"]
    dedupe_tree(layout, old)
    assert dedupe_tree(layout, new) == DedupeResult(1, len(BIG))  # the source only

    entries = [p.name for p in layout.dedupe_dir.rglob("*") if p.is_file()]
    assert len(entries) == 1
    for relpath in files:
        assert inode(new / relpath) != inode(old / relpath)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pkg/__pycache__/core.cpython-311.pyc", True),
        ("__pycache__/top.cpython-311.pyc", True),
        ("pkg/core.pyc", False),  # a .pyc beside its source is a module, not a cache
        ("not__pycache__/core.pyc", False),
        ("pkg/__pycache__/notes.txt", False),
    ],
)
def test_what_counts_as_bytecode(path: str, expected: bool) -> None:
    assert is_bytecode(path) is expected


def test_a_source_of_another_age_keeps_its_own_copy(layout: StoreLayout) -> None:
    files = {"pkg/__init__.py": "", "pkg/core.py": BIG, "pkg/table.txt": BIG}
    old = make_tree(layout, "a", files, compile=True)
    new = make_tree(layout, "b", files, mtime=MTIME + 60, compile=True)
    dedupe_tree(layout, old)

    assert dedupe_tree(layout, new) == DedupeResult(1, len(BIG))  # only table.txt

    assert inode(new / "pkg/core.py") != inode(old / "pkg/core.py")
    assert loads_bytecode(new, "pkg.core")


def test_a_pruned_entry_is_replaced_by_the_next_copy(layout: StoreLayout) -> None:
    old = make_tree(layout, "a", {"core.py": BIG})
    dedupe_tree(layout, old)
    remove_sealed(old.parent)

    assert prune_index(layout) == PruneResult(entries_removed=1, bytes_freed=len(BIG))
    new = make_tree(layout, "b", {"core.py": BIG})
    assert dedupe_tree(layout, new) == DedupeResult(0, 0)
    newer = make_tree(layout, "c", {"core.py": BIG})
    assert dedupe_tree(layout, newer) == DedupeResult(1, len(BIG))
    assert prune_index(layout) == PruneResult(0, 0)  # still used by two trees


def test_known_digests_are_taken_as_given_and_the_rest_hashed(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "known.py").write_bytes(b"k" * 2000)
    (site / "pkg" / "other.py").write_bytes(b"o" * 2000)
    claimed = "f" * 64

    facts = {f.path: f.digest for f in scan_files(site, 1024, {"pkg/known.py": claimed})}

    other = hashlib.sha256(b"o" * 2000).hexdigest()
    assert facts == {"pkg/known.py": claimed, "pkg/other.py": other}
