"""Views on disk: one directory that presents the union of a lock entry's trees, for one
sys.path entry.

What a view holds is decided by :func:`cas_daemon.view_plan.plan_view` (Nix ``buildEnv``
rules, pure); here the trees are read for it and the view is built. :func:`scan_trees` reads
the disk lazily (a directory is only listed when another tree provides it too, so ``numpy/``
is never walked in ``symlink`` mode); :func:`build_view` stages the view in ``tmp/`` and
renames it to ``views/<key>/``.

Links are hard links by default: measured in docs/views.md, they import as fast as a venv,
and a real directory tree keeps ``$ORIGIN/../..`` rpaths that cross wheels working (the kernel
resolves ``..`` from where a symlink points, not from the view). ``symlink`` mode stays as an
option: faster to build, and needed where hard links are not allowed (trees owned by another
user with ``fs.protected_hardlinks``).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout, is_deferred_dir
from cas_daemon.precompile import remove_sealed
from cas_daemon.view_plan import (
    VIEW_FORMAT,
    Clash,
    Entry,
    TreeListing,
    ViewConflict,
    ViewLink,
    ViewPlan,
    dirs_to_expand,
    join_path,
    plan_view,
    with_children,
)

LinkMode = Literal["symlink", "hardlink"]
#: Chosen by measurement, see docs/views.md.
DEFAULT_LINK_MODE: LinkMode = "hardlink"

_DIR_MODE = 0o555
_CHUNK = 1 << 20
_MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class TreePart:
    """One tree hard-linked whole, ahead of its view's build (:mod:`cas_daemon.prelink`).

    ``root`` mirrors the tree's site dir as :func:`hardlink_tree` makes it, for the view's
    final place; ``dirs`` are the dirs made there, relative to ``root``, sorted. A view built
    from the same trees moves the subtrees its plan links whole out of here (a rename each)
    instead of linking their files again.
    """

    root: str
    dirs: tuple[str, ...]

    def move(self, relpath: str, dest: str) -> list[str] | None:
        """Rename the part's ``relpath`` to ``dest``; the dirs now under ``dest``, or None
        if the part lacks it."""
        try:
            os.rename(f"{self.root}/{relpath}", dest)  # noqa: PTH104 - strings throughout
        except FileNotFoundError:
            return None
        below = f"{relpath}/"
        start = bisect.bisect_left(self.dirs, below)
        moved = [dest]
        for made in self.dirs[start:]:
            if not made.startswith(below):
                break
            moved.append(f"{dest}/{made[len(below) :]}")
        return moved


# --- reading trees ------------------------------------------------------------------------


def _visible(parent: str, name: str) -> bool:
    """Whether a tree entry belongs in views.

    In ``__pycache__`` only ``.pyc`` files do: anything else there is a temp file of a
    compileall that is adding another interpreter's bytecode to the tree right now.
    """
    return parent.rpartition("/")[2] != "__pycache__" or name.endswith(".pyc")


def scan_dir(path: Path, relpath: str = "") -> dict[str, Entry]:
    """One level of a tree: files with their size and inode, dirs unlisted, symlinks' targets."""
    entries: dict[str, Entry] = {}
    with os.scandir(path) as found:
        for item in found:
            if not _visible(relpath, item.name):
                continue
            if item.is_symlink():
                entries[item.name] = Entry("symlink", target=str(Path(item.path).readlink()))
            elif item.is_dir(follow_symlinks=False):
                entries[item.name] = Entry("dir")
            elif item.is_file(follow_symlinks=False):
                info = item.stat(follow_symlinks=False)
                entries[item.name] = Entry("file", info.st_size, (info.st_dev, info.st_ino))
            else:
                raise StoreError(
                    f"{item.path} is neither a file, a directory nor a symlink; the tree is "
                    "damaged. Delete it from the store so that it is unpacked again."
                )
    return entries


def scan_tree(name: str, site_dir: Path) -> TreeListing:
    """The top level of one tree; :func:`scan_trees` lists deeper where trees overlap."""
    return TreeListing(name, site_dir, scan_dir(site_dir))


def scan_trees(entries: Sequence[tuple[str, Path]]) -> list[TreeListing]:
    """Listings of the trees ``(wheel filename, site dir)`` deep enough for :func:`plan_view`.

    Only dirs that two trees share are listed below the top level, one level per round.
    """
    listings = [scan_tree(wheel, site) for wheel, site in entries]
    while wanted := dirs_to_expand(listings):
        for index, path in wanted:
            tree = listings[index]
            listings[index] = with_children(tree, path, scan_dir(tree.root / path, path))
    return listings


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk_a, chunk_b = fa.read(_CHUNK), fb.read(_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def verify_plan(plan: ViewPlan) -> None:
    """Compare the bytes of the plan's same-size files; :class:`ViewConflict` if any differ."""
    clashes = [
        Clash(c.path, c.first_wheel, c.other_wheel, "same size, different bytes")
        for c in plan.checks
        if not _same_bytes(c.first, c.other)
    ]
    if clashes:
        raise ViewConflict(clashes)


# --- building -----------------------------------------------------------------------------


def _symlink(link: ViewLink, dest: Path, final_dest: Path, base: Path) -> None:
    """A symlink at ``dest`` to the link's source, relative when both are in the store.

    Relative links keep working when the store is moved or mounted elsewhere. They are computed
    from ``final_dest``, where the link will be after the rename, not from the staging dir.
    """
    source = link.source
    target = str(source)
    if source.is_relative_to(base):
        target = os.path.relpath(source, final_dest.parent)
    dest.symlink_to(target)


def _hardlink_file(source: str, dest: str) -> None:
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EMLINK:  # the inode has the most links the filesystem allows
            shutil.copy2(source, dest, follow_symlinks=False)
        elif exc.errno == errno.EXDEV:
            raise StoreError(
                f"cannot hard-link {source} into a view: it is on another filesystem than the "
                "store. Keep the trees inside the store root, or set link_mode to 'symlink'."
            ) from None
        else:
            raise


def hardlink_tree(source: str, dest: str, relpath: str, made: list[str], final_dest: str) -> None:
    """Recreate the dir ``source`` at ``dest``: real dirs, hard-linked files.

    Test dirs (:func:`~cas_daemon.layout.is_deferred_dir`) are symlinks to the tree's
    instead, relative from ``final_dest`` (where ``dest`` will be): a store that defers their
    bytecode adds it to the tree after the view is built, and through a symlink it shows.
    Their import speed does not matter; no model imports them when it loads.

    Plain strings and ``os`` calls: this runs once per file of every tree, tens of thousands.
    """
    os.mkdir(dest)  # noqa: PTH102
    made.append(dest)
    with os.scandir(source) as found:
        for item in found:
            if not _visible(relpath, item.name):
                continue
            target = os.path.join(dest, item.name)  # noqa: PTH118
            final_target = os.path.join(final_dest, item.name)  # noqa: PTH118
            if not item.is_dir(follow_symlinks=False):
                _hardlink_file(item.path, target)
            elif is_deferred_dir(item.name):
                os.symlink(os.path.relpath(item.path, final_dest), target)  # noqa: PTH211
            else:
                hardlink_tree(item.path, target, join_path(relpath, item.name), made, final_target)


def _place_links(
    plan: ViewPlan,
    site: Path,
    final_site: Path,
    base: Path,
    link_mode: LinkMode,
    parts: Mapping[str, TreePart],
) -> list[str]:
    """Make the plan's dirs and links under ``site``; every real dir made, to seal.

    A dir linked whole is moved out of its tree's part when ``parts`` has one (by the
    tree's site dir), and linked file by file otherwise.
    """
    site.mkdir()
    made = [str(site)]
    for relpath in plan.dirs:
        (site / relpath).mkdir()
        made.append(str(site / relpath))
    for link in plan.links:
        dest = site / link.path
        if link_mode == "symlink" or (
            link.kind == "dir" and is_deferred_dir(link.path.rpartition("/")[2])
        ):
            _symlink(link, dest, final_site / link.path, base)
        elif link.kind == "dir":
            source = str(link.source)
            part = parts.get(source[: -len(link.path) - 1])
            moved = part.move(link.path, str(dest)) if part is not None else None
            if moved is not None:
                made.extend(moved)
            else:
                hardlink_tree(source, str(dest), link.path, made, str(final_site / link.path))
        else:
            _hardlink_file(str(link.source), str(dest))
    return made


def _manifest(plan: ViewPlan, key: str, link_mode: LinkMode) -> str:
    """What the view is made of, for a human or a collector rebuilding its records from disk."""
    trees = [{"wheel": wheel, "site": str(site)} for wheel, site in plan.trees]
    doc = {"format": VIEW_FORMAT, "key": key, "link_mode": link_mode, "trees": trees}
    return json.dumps(doc, indent=2) + "\n"


def build_view(
    layout: StoreLayout,
    key: str,
    plan: ViewPlan,
    *,
    link_mode: LinkMode,
    parts: Mapping[str, TreePart] | None = None,
) -> Path:
    """Build the view ``key`` from ``plan``; its site dir (what goes on ``sys.path``).

    Staged in ``tmp/view-{key}.*`` and renamed to ``views/<key>`` whole, then sealed: no
    reader ever sees a partial view. If a twin got there first, ours is discarded and the
    twin's is returned. Nothing is left in ``tmp/`` on failure. Callers hold the view's lock
    (:func:`ensure_view` does) so that leftovers of a crashed build can be removed safely.
    ``parts``: trees already hard-linked for this view (``hardlink`` mode, see
    :class:`TreePart`), by site dir; what is moved out of them is no longer theirs.
    """
    if link_mode not in ("symlink", "hardlink"):
        raise ValueError(f"link_mode must be 'symlink' or 'hardlink', not {link_mode!r}")
    final = layout.view_dir(key)
    final_site = layout.view_site_dir(key)
    if final_site.is_dir():
        return final_site
    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    layout.views_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=layout.view_staging_prefix(key), dir=layout.tmp_dir))
    try:
        made = _place_links(plan, staging / "site", final_site, layout.base, link_mode, parts or {})
        (staging / _MANIFEST).write_text(_manifest(plan, key, link_mode), encoding="utf-8")
        (staging / _MANIFEST).chmod(0o444)
        for directory in made:
            Path(directory).chmod(_DIR_MODE)
        try:
            # The staged dir itself stays writable until here: renaming a directory into
            # another parent rewrites its ".." entry, which needs write permission on it.
            staging.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            remove_sealed(staging)  # a twin won the race: same key, same content
        else:
            final.chmod(_DIR_MODE)
    except BaseException:
        remove_sealed(staging)
        raise
    return final_site


@contextlib.contextmanager
def _view_lock(path: Path) -> Iterator[None]:
    """Hold the exclusive flock of one view, waiting for it.

    Waiting in ``flock`` is safe here, unlike for tree locks: a view build waits for no other
    lock, so whoever holds this one always finishes on its own.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def remove_leftovers(layout: StoreLayout, key: str) -> None:
    """Remove what a crashed build of view ``key`` staged; only under the view's lock."""
    if layout.tmp_dir.is_dir():
        for path in layout.tmp_dir.glob(f"{layout.view_staging_prefix(key)}*"):
            remove_sealed(path)


def ensure_view(
    layout: StoreLayout,
    entries: Sequence[tuple[str, Path]],
    key: str,
    *,
    link_mode: LinkMode = DEFAULT_LINK_MODE,
) -> Path:
    """The site dir of view ``key`` of ``entries`` (wheel filename, site dir), built if needed.

    ``key`` comes from :func:`view_key` of the same trees. Every tree must be complete for the
    interpreter (its ``pyc-{tag}`` marker present) before its view is built. The warm path is
    one ``stat``. Raises :class:`ViewConflict` when two wheels clash; nothing is written then.
    """
    site = layout.view_site_dir(key)
    if site.is_dir():
        return site
    with _view_lock(layout.view_lock_path(key)):
        if site.is_dir():  # built by another process while this one waited
            return site
        remove_leftovers(layout, key)
        plan = plan_view(scan_trees(entries))
        verify_plan(plan)
        return build_view(layout, key, plan, link_mode=link_mode)
