"""Identical files of different trees stored once, as hard links to one inode.

Two versions of a package share most of their files (sources, licenses, bundled shared
libraries). Their ``.pyc`` never do, so bytecode is not even hashed: each records the path
it was compiled at (``co_filename``, the tree's own place in the store) and its source's
mtime, the time its tree was unpacked. In a cold R40 store that was 4,166 index entries and
118 MB hashed, and not one file shared (benchmarks/README.md). The content index
``dedupe/<aa>/<sha256>`` holds a hard link to the first copy of each content ever seen; a
tree published later replaces its own copy by a link to that one.

Executables are indexed under ``<sha256>.x``: every link to an inode shares its mode, so a
file only ever links to an entry with its own mode, and sealed trees stay exactly as sealed.

Every link to an inode shares its mtime too, and a ``.py`` file's mtime is what its ``.pyc``
is checked against (timestamp-based bytecode, as ``compileall`` writes by default): a source
linked to a copy with another mtime would make its bytecode stale for good, in a tree nobody
can write, and every import would compile it again. So a ``.py`` file is only linked to an
entry with the same mtime in whole seconds (what a ``.pyc`` records). Other files are linked
whatever their mtime.

Replacing a file is a ``link`` of the index entry to a temp name in ``tmp/`` and a ``rename``
over the file: a reader opens either copy, both with the same bytes. The temp names start with
the tree's staging prefix (``{sha256}.``), so the store's clean-up of a crashed process, done
under the same wheel lock, removes them too.

The decisions are pure (:func:`plan_dedupe`, :func:`shared_bytes`); hashing, looking up and
linking are the I/O around them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cas_daemon.layout import StoreLayout, is_bytecode

#: Files smaller than this are left alone. Measured (docs/views.md): below 1 KiB are half of a
#: tree's files but a few percent of the bytes they could save, and each costs a hash, a
#: lookup and a link, with its directory unsealed around it.
MIN_DEDUPE_SIZE = 1024
EXEC_SUFFIX = ".x"
_CHUNK = 1 << 20

Inode = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True, slots=True)
class FileFact:
    """One regular file of a tree, hashed."""

    path: str  # relative to the site dir, "/"-separated
    size: int
    mode: int  # permission bits
    inode: Inode
    digest: str  # sha256 of the content
    mtime: int = 0  # whole seconds


@dataclass(frozen=True, slots=True)
class IndexFact:
    """An existing entry of the content index."""

    size: int
    inode: Inode
    mtime: int = 0


@dataclass(frozen=True, slots=True)
class DedupeStep:
    """``index``: the file becomes the index entry. ``link``: it is replaced by the entry."""

    action: Literal["index", "link"]
    path: str
    name: str  # the index entry
    size: int


@dataclass(frozen=True, slots=True)
class DedupeResult:
    files_linked: int
    bytes_saved: int


@dataclass(frozen=True, slots=True)
class PruneResult:
    entries_removed: int
    bytes_freed: int


def index_name(digest: str, mode: int) -> str:
    """The index entry for content ``digest`` with permission bits ``mode``."""
    return digest + EXEC_SUFFIX if mode & 0o111 else digest


def plan_dedupe(files: Sequence[FileFact], index: Mapping[str, IndexFact]) -> list[DedupeStep]:
    """What to do with each file, given the index entries that exist for their contents.

    A file whose content is not indexed becomes the entry (so duplicates within one tree are
    linked as well); one whose entry is already its own inode is done; one whose entry has
    another size is left alone: the entry is damaged, and linking would change the file. A
    ``.py`` file whose entry has another mtime is left alone too (see the module docstring).
    """
    known = dict(index)
    steps: list[DedupeStep] = []
    for fact in files:
        name = index_name(fact.digest, fact.mode)
        entry = known.get(name)
        if entry is None:
            steps.append(DedupeStep("index", fact.path, name, fact.size))
            known[name] = IndexFact(fact.size, fact.inode, fact.mtime)
        elif entry.inode != fact.inode and entry.size == fact.size and _same_age(fact, entry):
            steps.append(DedupeStep("link", fact.path, name, fact.size))
    return steps


def _mtime_matters(path: str) -> bool:
    """Whether ``path`` is a source that bytecode may be checked against by its mtime."""
    return path.endswith(".py")


def _same_age(fact: FileFact, entry: IndexFact) -> bool:
    return not _mtime_matters(fact.path) or entry.mtime == fact.mtime


def shared_bytes(files: Iterable[tuple[Inode, int]]) -> int:
    """Bytes saved by hard links among ``files`` (inode, size): each extra path to an inode."""
    seen: dict[Inode, int] = {}
    saved = 0
    for inode, size in files:
        if inode in seen:
            saved += size
        else:
            seen[inode] = size
    return saved


# --- I/O ----------------------------------------------------------------------------------


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_files(
    site_dir: Path, min_size: int, known_digests: Mapping[str, str] | None = None
) -> list[FileFact]:
    """Every regular file of ``site_dir`` of at least ``min_size`` bytes, hashed; bytecode
    (:func:`is_bytecode`) left out. A file in ``known_digests`` (by path relative to the
    site dir) is taken to have that sha256 and is not read again: the unpacker computed it
    from the bytes it wrote, in a tree nobody else writes to."""
    known = known_digests or {}
    facts: list[FileFact] = []
    skip = len(str(site_dir)) + 1  # of every path os.walk gives: the site dir and a "/"
    for root, _dirs, files in os.walk(site_dir):
        for name in files:
            path = os.path.join(root, name)  # noqa: PTH118 - once per file of a whole tree
            relpath = path[skip:]
            if is_bytecode(relpath):
                continue
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size < max(min_size, 1):
                continue
            inode = (info.st_dev, info.st_ino)
            mode = stat.S_IMODE(info.st_mode)
            digest = known.get(relpath) or _digest(path)
            facts.append(FileFact(relpath, info.st_size, mode, inode, digest, int(info.st_mtime)))
    return facts


def _entry_path(index_dir: str, name: str) -> str:
    # Plain strings: called once or twice per file of a tree, Path objects cost a third of it.
    return f"{index_dir}/{name[:2]}/{name}"


def _lookup(layout: StoreLayout, names: Iterable[str]) -> dict[str, IndexFact]:
    index_dir = str(layout.dedupe_dir)
    found: dict[str, IndexFact] = {}
    for name in set(names):
        try:
            info = os.lstat(_entry_path(index_dir, name))
        except FileNotFoundError:
            continue
        found[name] = IndexFact(info.st_size, (info.st_dev, info.st_ino), int(info.st_mtime))
    return found


def _add_to_index(index_dir: str, path: str, name: str) -> bool:
    """Make ``path`` the index entry ``name``; False if an entry appeared meanwhile."""
    entry = _entry_path(index_dir, name)
    try:
        try:
            os.link(path, entry)
        except FileNotFoundError:  # the first entry of its shard
            os.makedirs(os.path.dirname(entry), exist_ok=True)  # noqa: PTH103, PTH120
            os.link(path, entry)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EMLINK:
            return True  # the file cannot take another link: it stays unindexed
        raise
    return True


@contextlib.contextmanager
def _writable(directory: Path) -> Iterator[None]:
    """Open a sealed dir for renames into it, and seal it again whatever happens."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    directory.chmod(mode | stat.S_IWUSR)
    try:
        yield
    finally:
        directory.chmod(mode)


def _replace_by_entry(layout: StoreLayout, path: Path, step: DedupeStep, staged: Path) -> bool:
    """Replace ``path`` by a link to its index entry; False if the entry no longer fits."""
    index_dir = str(layout.dedupe_dir)
    try:
        staged.hardlink_to(_entry_path(index_dir, step.name))
    except FileNotFoundError:  # pruned since it was looked up: this copy becomes the entry
        _add_to_index(index_dir, str(path), step.name)
        return False
    except OSError as exc:
        if exc.errno == errno.EMLINK:
            return False
        raise
    try:
        theirs, ours = staged.lstat(), path.lstat()
        fits = (
            theirs.st_size == step.size == ours.st_size
            and (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)
            and stat.S_IMODE(theirs.st_mode) == stat.S_IMODE(ours.st_mode)
            and (not _mtime_matters(step.path) or int(theirs.st_mtime) == int(ours.st_mtime))
        )
        if fits:
            staged.rename(path)
            return True
    finally:
        staged.unlink(missing_ok=True)
    return False


def _staging_prefix(layout: StoreLayout, site_dir: Path) -> str:
    # trees/ab/<sha256>/site: the tree's own prefix, cleaned up under its lock after a crash.
    return f"{layout.staging_prefix(site_dir.parent.name)}dedupe-"


def apply_dedupe(layout: StoreLayout, site_dir: Path, steps: Sequence[DedupeStep]) -> DedupeResult:
    """Carry out ``steps`` on the tree at ``site_dir``; what was linked."""
    index_dir, site = str(layout.dedupe_dir), str(site_dir)
    to_link: dict[str, list[DedupeStep]] = {}
    for step in steps:
        if step.action == "index" and _add_to_index(index_dir, f"{site}/{step.path}", step.name):
            continue
        # A link, or an entry that another process added since the lookup: link to theirs.
        parent = step.path.rpartition("/")[0]
        to_link.setdefault(parent, []).append(DedupeStep("link", step.path, step.name, step.size))
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    staged = layout.tmp_dir / f"{_staging_prefix(layout, site_dir)}{secrets.token_hex(8)}"
    linked = saved = 0
    for parent, group in to_link.items():
        directory = site_dir / parent if parent else site_dir
        with _writable(directory):
            for step in group:
                if _replace_by_entry(layout, site_dir / step.path, step, staged):
                    linked += 1
                    saved += step.size
    return DedupeResult(linked, saved)


def dedupe_tree(
    layout: StoreLayout,
    site_dir: Path,
    *,
    min_size: int = MIN_DEDUPE_SIZE,
    known_digests: Mapping[str, str] | None = None,
) -> DedupeResult:
    """Link the files of the published tree ``site_dir`` to identical files already stored.

    Run it under the tree's wheel lock, right after publishing: it opens the tree's sealed
    dirs for a moment, as compiling does. Adding bytecode later changes nothing it would do.
    Files already linked are skipped, so running it twice only costs the hashing.
    ``known_digests``: see :func:`scan_files` (``UnpackResult.digests`` of the tree).
    """
    files = scan_files(site_dir, min_size, known_digests)
    index = _lookup(layout, (index_name(f.digest, f.mode) for f in files))
    return apply_dedupe(layout, site_dir, plan_dedupe(files, index))


def _regular_files(top: Path) -> Iterator[tuple[Inode, int, int]]:
    """(inode, size, link count) of every regular file under ``top``."""
    for root, _dirs, files in os.walk(top):
        for name in files:
            info = os.lstat(os.path.join(root, name))  # noqa: PTH118 - whole store
            if stat.S_ISREG(info.st_mode):
                yield (info.st_dev, info.st_ino), info.st_size, info.st_nlink


def dedupe_savings(layout: StoreLayout) -> int:
    """Bytes the trees would take more without dedupe: a walk of ``trees/``.

    Counting index entries' ``st_nlink`` would be quicker but wrong: links from hard-link
    views (and from nowhere the store knows of) raise it too. Only paths under ``trees/`` are
    counted here, each inode once plus its extra paths.
    """
    return shared_bytes(
        (inode, size) for inode, size, nlink in _regular_files(layout.trees_dir) if nlink > 1
    )


def prune_index(layout: StoreLayout) -> PruneResult:
    """Drop index entries that no tree uses any more (link count 1: only the index's own).

    Call it after removing trees: until then an entry keeps its inode, and its bytes, alive.
    Safe while trees are deduped: one that finds its entry gone indexes its own copy.
    """
    removed = freed = 0
    if not layout.dedupe_dir.is_dir():
        return PruneResult(0, 0)
    for shard in layout.dedupe_dir.iterdir():
        for entry in shard.iterdir():
            info = entry.lstat()
            if info.st_nlink == 1:
                entry.unlink(missing_ok=True)
                removed += 1
                freed += info.st_size
    return PruneResult(removed, freed)
