"""The pure part of views: what a view of some trees is, planned from listings of them.

A view merges trees the way Nix's ``buildEnv`` merges packages: an entry that one tree alone
provides is linked whole; a directory that several trees provide (namespace packages such as
``nvidia/`` or ``google/``, the root ``__pycache__/`` of top-level modules) is made a real
directory of the view and merged entry by entry. Identical files at one path are fine; two
different ones are a :class:`ViewConflict`, since an installer would let one silently overwrite
the other. Bytecode is the exception: ``__pycache__/*.pyc`` of identical sources differ (each
records its own tree's source mtime and path), so the first tree's is taken, as its source is,
and the pair stays consistent. The sources are compared like any file.

Nothing here touches the disk: :func:`plan_view` works on :class:`TreeListing` values, which
:mod:`cas_daemon.views` reads (lazily) and builds views from; :func:`view_key` names them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from cas_daemon.errors import StoreError
from cas_daemon.layout import is_bytecode

#: Bumped whenever the same trees would give a different view: it is part of every key.
VIEW_FORMAT = 2
EntryKind = Literal["dir", "file", "symlink"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_CLASHES_SHOWN = 10


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a tree. ``children`` is None for a directory nobody needed to list yet."""

    kind: EntryKind
    size: int = 0
    #: ``(st_dev, st_ino)`` of a file: two paths with one inode are identical, unread.
    inode: tuple[int, int] | None = None
    target: str | None = None  # of a symlink
    children: Mapping[str, Entry] | None = None


@dataclass(frozen=True, slots=True)
class TreeListing:
    """What one tree's ``site/`` holds, as far as it was scanned."""

    wheel: str  # the wheel's file name, for messages
    root: Path  # the tree's site dir
    entries: Mapping[str, Entry]


@dataclass(frozen=True, slots=True)
class ViewLink:
    """One link of a view: ``path`` (view-relative, ``/``-separated) to ``source``."""

    path: str
    source: Path
    kind: EntryKind  # what ``source`` is: a ``dir`` is linked whole


@dataclass(frozen=True, slots=True)
class SameContent:
    """Two same-size files at one path: the view is only valid if their bytes are equal."""

    path: str
    first: Path
    first_wheel: str
    other: Path
    other_wheel: str


@dataclass(frozen=True, slots=True)
class ViewPlan:
    trees: tuple[tuple[str, Path], ...]  # (wheel, site dir), in the lock's order
    dirs: tuple[str, ...]  # to create, parents first
    links: tuple[ViewLink, ...]
    checks: tuple[SameContent, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Clash:
    path: str
    first_wheel: str
    other_wheel: str
    detail: str


class ViewConflict(StoreError):
    """Two wheels of one lock entry put different things at one path."""

    def __init__(self, clashes: Sequence[Clash]) -> None:
        if not clashes:
            raise ValueError("a ViewConflict needs at least one clash")
        self.clashes = tuple(clashes)
        first = self.clashes[0]
        self.path = first.path
        self.first_wheel = first.first_wheel
        self.other_wheel = first.other_wheel
        lines = [f"  {c.path}: {c.first_wheel} vs {c.other_wheel} ({c.detail})" for c in clashes]
        if len(lines) > _MAX_CLASHES_SHOWN:
            hidden = len(lines) - _MAX_CLASHES_SHOWN
            lines = [*lines[:_MAX_CLASHES_SHOWN], f"  ... and {hidden} more"]
        listing = "\n".join(lines)
        super().__init__(
            f"{first.first_wheel} and {first.other_wheel} both provide {first.path} with "
            f"different content, so they cannot share one directory: installed into one "
            f"environment, one would silently overwrite the other. Clashes:\n{listing}\n"
            "Keep only one of the two in the requirements (such pairs are usually alternatives, "
            "like opencv-python and opencv-python-headless) or pin versions that agree, then "
            "re-lock the model (`wheelcas lock DIR`)."
        )


# --- keys ---------------------------------------------------------------------------------


def view_key(shas: Sequence[str], cache_tag: str) -> str:
    """The name of the view of the trees ``shas`` for interpreter ``cache_tag``.

    The wheels are sorted: a view's content does not depend on their order, since any two
    entries that differ at one path are a conflict. ``cache_tag`` is part of the key because
    the ``.pyc`` files are part of the layout: a merged ``__pycache__`` dir (and every dir in
    ``hardlink`` mode) holds links to the files that existed when the view was built, so a view
    made for ``cpython-311`` lacks the ``cpython-312`` bytecode compiled into its trees later.
    The link mode is not: both modes present the same files.
    """
    unique = sorted(set(shas))
    for sha in unique:
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"not a sha256 (64 lowercase hex digits): {sha!r}")
    if not cache_tag or "\n" in cache_tag:
        raise ValueError(f"not a cache tag: {cache_tag!r}")
    text = "\n".join([f"wheelcas-view-{VIEW_FORMAT}", cache_tag, *unique])
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --- the pure planner ---------------------------------------------------------------------

_Providers = list[tuple[int, Entry]]  # (index of the tree, its entry at one path)


def join_path(parent: str, name: str) -> str:
    """``parent/name`` of view-relative, ``/``-separated paths; ``name`` at the root."""
    return f"{parent}/{name}" if parent else name


def _by_name(trees: Sequence[TreeListing], providers: _Providers) -> dict[str, _Providers]:
    """The entries of several trees' directories at one path, grouped by name, in tree order."""
    merged: dict[str, _Providers] = {}
    for index, entry in providers:
        if entry.children is None:
            raise ValueError(
                f"{trees[index].wheel}: a directory shared with another tree was not listed; "
                "make the listings with scan_trees()"
            )
        for name, child in entry.children.items():
            merged.setdefault(name, []).append((index, child))
    return merged


def _roots(trees: Sequence[TreeListing]) -> _Providers:
    return [(i, Entry("dir", children=t.entries)) for i, t in enumerate(trees)]


def dirs_to_expand(trees: Sequence[TreeListing]) -> list[tuple[int, str]]:
    """``(tree index, path)`` of the unlisted dirs that :func:`plan_view` needs to see into.

    Those are the dirs that every tree providing that path provides as a dir (a mix of kinds is
    a conflict, no listing needed), when more than one tree provides it.
    """
    wanted: list[tuple[int, str]] = []

    def visit(path: str, providers: _Providers) -> None:
        for name, group in sorted(_by_name(trees, providers).items()):
            if len(group) < 2 or any(e.kind != "dir" for _, e in group):
                continue
            child_path = join_path(path, name)
            unlisted = [(i, child_path) for i, e in group if e.children is None]
            if unlisted:
                wanted.extend(unlisted)
            else:
                visit(child_path, group)

    visit("", _roots(trees))
    return wanted


def with_children(listing: TreeListing, path: str, children: Mapping[str, Entry]) -> TreeListing:
    """``listing`` with the dir at ``path`` (``/``-separated) now listed as ``children``."""

    def put(entries: Mapping[str, Entry], parts: list[str]) -> dict[str, Entry]:
        name, rest = parts[0], parts[1:]
        entry = entries[name]
        if entry.kind != "dir":
            raise ValueError(f"{listing.wheel}: {path} is not a directory")
        if rest:
            if entry.children is None:
                raise ValueError(f"{listing.wheel}: a parent of {path} is not listed")
            inner = put(entry.children, rest)
        else:
            inner = dict(children)
        return {**entries, name: replace(entry, children=inner)}

    return replace(listing, entries=put(listing.entries, path.split("/")))


def _difference(first: Entry, other: Entry) -> str | None:
    """Why two entries at one path cannot be merged; None if they are (or may be) identical."""
    if first.kind != other.kind:
        return f"a {first.kind} vs a {other.kind}"
    if first.kind == "symlink" and first.target != other.target:
        return f"symlinks to {first.target!r} vs {other.target!r}"
    if first.kind == "file" and first.size != other.size:
        return f"{first.size} vs {other.size} bytes"
    return None


def plan_view(trees: Sequence[TreeListing]) -> ViewPlan:
    """The dirs and links of the view of ``trees`` (in the lock's order).

    Raises :class:`ViewConflict` with every clash that the listings show (different kinds,
    sizes or symlink targets). Same-size files with different inodes are returned as
    ``checks``: only their bytes can tell, and :func:`verify_plan` reads them. Where entries are
    identical the link goes to the first tree's.
    """
    dirs: list[str] = []
    links: list[ViewLink] = []
    checks: list[SameContent] = []
    clashes: list[Clash] = []

    def merge(path: str, group: _Providers) -> None:
        (first_index, first), others = group[0], group[1:]
        first_tree = trees[first_index]
        if others and all(e.kind == "dir" for _, e in group):
            dirs.append(path)
            for name, subgroup in sorted(_by_name(trees, group).items()):
                merge(join_path(path, name), subgroup)
            return
        links.append(ViewLink(path, first_tree.root / path, first.kind))
        for index, entry in others:
            other_tree = trees[index]
            if first.kind == entry.kind == "file" and is_bytecode(path):
                continue  # follows its source, the first tree's too (see the module docstring)
            detail = _difference(first, entry)
            if detail is not None:
                clashes.append(Clash(path, first_tree.wheel, other_tree.wheel, detail))
            elif entry.kind == "file" and (first.inode is None or first.inode != entry.inode):
                checks.append(
                    SameContent(
                        path,
                        first_tree.root / path,
                        first_tree.wheel,
                        other_tree.root / path,
                        other_tree.wheel,
                    )
                )

    for name, group in sorted(_by_name(trees, _roots(trees)).items()):
        merge(name, group)
    if clashes:
        raise ViewConflict(clashes)
    return ViewPlan(
        trees=tuple((t.wheel, t.root) for t in trees),
        dirs=tuple(dirs),
        links=tuple(links),
        checks=tuple(checks),
    )
