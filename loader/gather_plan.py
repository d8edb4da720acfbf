"""What a gathered model holds, computed without touching the disk.

A *plan* maps each destination path of the gathered dir to where its content comes from: a
file (its sha256 and executable bit) or a symlink kept as a relative link. The model dir lands
at the top; each external package dir's contents land in the bundled packages dir (or, with
``keep_external_dir_names``, in ``<bundled>/<its basename>/``). Two sources for one path are
fine when they agree and an error naming both otherwise. The plan's digest names the gathered
tree by content alone: the same files gathered from another place, or with other mtimes, have
the same digest.

The I/O (the walk, hashing, the file pool, the output dir) is in :mod:`loader.gathering`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from loader.errors import ModelConfigError
from loader.options import (
    BUNDLED_PACKAGES_DIR,
    EXTERNAL_PACKAGE_DIRS,
    KEEP_EXTERNAL_DIR_NAMES,
    OptionValue,
    normalize_runner_opts,
    parse_runner_opts,
)

#: Never gathered or packed, at any depth, files or dirs; not negatable by ``!`` (packing a
#: gathered dir prunes them again, so re-including one could not survive a pack).
IGNORED_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
    }
)
#: A dir holding this file is a virtual environment (PEP 405), whatever its name (``venv``,
#: ``env``, ``.env``...): pruned, because a name list would both miss some and catch real code.
VENV_MARKER = "pyvenv.cfg"
#: User patterns, read at the root of each walked dir; consumed by the walk, never copied.
IGNORE_FILE = ".wheelcasignore"
#: Written at the root of every gathered dir, last; the walk always skips it there.
MARKER_NAME = ".wheelcas-gathered.json"
MARKER_FORMAT = "wheelcas-gathered"
#: Bumped when the digest's input changes, so old digests never match new trees.
PLAN_VERSION = 1
#: Lock staging dirs (lockgen.resolve) are not part of the model while they exist.
_LOCK_STAGING = re.compile(r"\.carton/\.staging-[^/]*")


# --- ignore rules -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    pattern: str
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool


def _class_regex(body: str) -> str:
    negate = body.startswith("!")
    chars = "".join(c if c == "-" else re.escape(c) for c in body[negate:])
    return f"[^/{chars}]" if negate else f"(?!/)[{chars}]"


def glob_regex(glob: str) -> str:
    """A gitignore glob as a regex over ``/``-separated paths: ``*`` and ``?`` stay within one
    name, ``**`` crosses dirs (``**/x``, ``a/**``, ``a/**/b``), ``[...]`` is a class,
    backslash escapes."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) != -1:
            out.append(_class_regex(glob[i + 1 : end]))
            i = end + 1
        elif glob[i] == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def parse_ignore_file(text: str) -> tuple[IgnoreRule, ...]:
    """The rules of a ``.wheelcasignore``: a gitignore subset.

    One glob a line; ``#`` starts a comment line; ``!`` re-includes what an earlier line
    excluded (the last matching line wins); a trailing ``/`` matches dirs only; a glob with a
    ``/`` before its end is matched against the path relative to the walked dir (a leading
    ``/`` only anchors it), one without against the name at any depth.
    """
    rules: list[IgnoreRule] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate or line.startswith(("\\!", "\\#")):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        line = line.lstrip("/")
        if not line:
            continue
        regex = re.compile(glob_regex(line), re.DOTALL)
        rules.append(IgnoreRule(raw.rstrip(), regex, negate, dir_only, anchored))
    return tuple(rules)


def is_ignored(rules: Sequence[IgnoreRule], relpath: str, name: str, *, is_dir: bool) -> bool:
    """Whether the walk skips ``relpath`` (relative to the walked dir, ``/``-separated).

    A skipped dir is never entered, so nothing under it can be re-included (as in git).
    """
    if name in IGNORED_NAMES or (is_dir and _LOCK_STAGING.fullmatch(relpath)):
        return True
    ignored = False
    for rule in rules:
        if rule.dir_only and not is_dir:
            continue
        if rule.regex.fullmatch(relpath if rule.anchored else name):
            ignored = not rule.negate
    return ignored


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A regular file: copied into the pool once, hard-linked into every gathered dir."""

    source: str
    digest: str
    executable: bool
    #: Implied by the digest (not part of it): lets a rebuild check an output with ``lstat``.
    size: int


@dataclass(frozen=True, slots=True)
class LinkEntry:
    """A symlink whose target stays inside its walked dir: recreated with this relative
    ``target``, so the gathered dir is as self-contained as the source."""

    source: str
    target: str


PlanEntry = FileEntry | LinkEntry


@dataclass(frozen=True, slots=True)
class Plan:
    entries: Mapping[str, PlanEntry]
    bundled_packages_dir: str
    digest: str

    @property
    def files(self) -> int:
        return sum(isinstance(e, FileEntry) for e in self.entries.values())

    @property
    def symlinks(self) -> int:
        return sum(isinstance(e, LinkEntry) for e in self.entries.values())


def _same(a: PlanEntry, b: PlanEntry) -> bool:
    if isinstance(a, FileEntry) and isinstance(b, FileEntry):
        return (a.digest, a.executable) == (b.digest, b.executable)
    if isinstance(a, LinkEntry) and isinstance(b, LinkEntry):
        return a.target == b.target
    return False


def _clash(path: str, first: PlanEntry, second: PlanEntry, why: str) -> ModelConfigError:
    return ModelConfigError(
        f"two sources for {path} in the gathered model {why}: {first.source} and "
        f"{second.source}. Rename one, remove one, add one to a {IGNORE_FILE}, or gather with "
        "keep_external_dir_names (--keep-dir-names) so each external dir keeps its own name."
    )


def merge(parts: Iterable[tuple[str, Mapping[str, PlanEntry]]]) -> dict[str, PlanEntry]:
    """The entries of every walked dir, each under its destination prefix (``""`` or
    ``packages/...``). Equal duplicates are kept once; different ones, and a path that is a
    file in one source and a dir in another, are errors naming both sources."""
    merged: dict[str, PlanEntry] = {}
    for prefix, entries in parts:
        for relpath, entry in entries.items():
            path = f"{prefix}{relpath}"
            earlier = merged.get(path)
            if earlier is not None and not _same(earlier, entry):
                raise _clash(path, earlier, entry, "with different contents")
            merged.setdefault(path, entry)
    for path, entry in merged.items():
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            above = merged.get(parent)
            if above is not None:
                raise _clash(parent, above, entry, "as both a file and a directory")
    return merged


def destination_prefix(bundled_packages_dir: str, external_name: str | None) -> str:
    """Where an external dir's contents go: the bundled dir, or a dir of its own name in it."""
    bundled = bundled_packages_dir.strip("/")
    return f"{bundled}/{external_name}/" if external_name else f"{bundled}/"


def check_links(entries: Mapping[str, PlanEntry]) -> None:
    """Every kept symlink's target is in the gathered dir (a file, a kept link or a dir with
    files), else the output would hold a dangling link: the target was ignored."""
    dirs = {p.rsplit("/", 1)[0] for p in entries if "/" in p}
    every_dir = set(dirs)
    for d in dirs:
        while "/" in d:
            d = d.rsplit("/", 1)[0]
            every_dir.add(d)
    for path, entry in entries.items():
        if not isinstance(entry, LinkEntry):
            continue
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        target = _normalize(f"{parent}/{entry.target}" if parent else entry.target)
        if target is None or not (target in entries or target in every_dir or target == ""):
            raise ModelConfigError(
                f"symlink {entry.source} points to {entry.target}, which is not gathered (an "
                f"ignored or empty dir, or outside). Remove the link, add it to a {IGNORE_FILE}, "
                "or stop ignoring its target."
            )


def _normalize(path: str) -> str | None:
    """``a/./b/../c`` as ``a/c``; None when it climbs out of the root."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def tree_digest(entries: Mapping[str, PlanEntry], bundled_packages_dir: str) -> str:
    """sha256 of the sorted entries (paths, digests, executable bits, link targets) and the
    bundled dir the tree is laid out for: no locations, no mtimes, no other options (a pack
    with another ``model.*`` option reuses the same gathered tree)."""
    rows: list[list[object]] = []
    for path in sorted(entries, key=lambda p: p.encode("utf-8", "surrogateescape")):
        entry = entries[path]
        if isinstance(entry, FileEntry):
            rows.append([path, "f", entry.digest, entry.executable])
        else:
            rows.append([path, "l", entry.target])
    payload = {"version": PLAN_VERSION, "bundled": bundled_packages_dir, "entries": rows}
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def make_plan(
    model_entries: Mapping[str, PlanEntry],
    external: Sequence[tuple[str | None, Mapping[str, PlanEntry]]],
    bundled_packages_dir: str,
) -> Plan:
    """The model's entries at the top, then each external dir's under its prefix (``None``
    as the name merges its contents into the bundled dir)."""
    parts = [("", model_entries)] + [
        (destination_prefix(bundled_packages_dir, name), entries) for name, entries in external
    ]
    merged = merge(parts)
    check_links(merged)
    return Plan(merged, bundled_packages_dir, tree_digest(merged, bundled_packages_dir))


# --- options ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatherOptions:
    """The local-package options of a model to gather, checked (no entrypoint needed)."""

    bundled_packages_dir: str
    external_package_dirs: tuple[str, ...]
    keep_external_dir_names: bool
    #: The model's options after gathering: the external dirs and the keep switch dropped.
    gathered_runner_opts: Mapping[str, OptionValue]


def gather_options(
    runner_opts: Mapping[str, object] | None, keep_dir_names: bool | None = None
) -> GatherOptions:
    """Check ``runner_opts`` as a load would (an entrypoint is not required to gather);
    ``keep_dir_names`` overrides the ``keep_external_dir_names`` option when given."""
    normalized = normalize_runner_opts(runner_opts)
    placeholders = {"entrypoint_package": "_", "entrypoint_fn": "_"}
    options = parse_runner_opts({**placeholders, **normalized})
    kept: dict[str, OptionValue] = {}
    for key, value in normalized.items():
        if key in (EXTERNAL_PACKAGE_DIRS, KEEP_EXTERNAL_DIR_NAMES):
            continue
        if key == BUNDLED_PACKAGES_DIR:  # its one canonical spelling, as the plan has it
            kept[key] = options.bundled_packages_dir
        elif isinstance(value, bool | int | float | str):  # checked by parse_runner_opts
            kept[key] = value
    keep = options.keep_external_dir_names if keep_dir_names is None else keep_dir_names
    return GatherOptions(
        bundled_packages_dir=options.bundled_packages_dir,
        external_package_dirs=options.external_package_dirs,
        keep_external_dir_names=keep,
        gathered_runner_opts=kept,
    )


# --- the marker ---------------------------------------------------------------------------


def marker_text(plan: Plan) -> str:
    """The marker of a gathered dir: what it is, and the digest of what it holds."""
    return (
        json.dumps(
            {
                "format": MARKER_FORMAT,
                "version": PLAN_VERSION,
                "digest": plan.digest,
                BUNDLED_PACKAGES_DIR: plan.bundled_packages_dir,
                "files": plan.files,
                "symlinks": plan.symlinks,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )


def marker_digest(text: str) -> str | None:
    """The digest a marker records; None for anything that is not a current marker."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("format") != MARKER_FORMAT:
        return None
    if value.get("version") != PLAN_VERSION:
        return None
    digest = value.get("digest")
    return digest if isinstance(digest, str) else None
