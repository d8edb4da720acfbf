"""``gather``: a self-contained copy of a scattered model, cached by content.

The external package dirs' contents join the bundled packages dir (or each keeps its own name
in it) and the option is dropped, so the result loads and packs with no dir outside it.

Cached by content, in ``<store root>/gather/v1/``::

    objects/ab/abcdef...[.x]   the pool: one read-only file per (sha256, executable bit)
    trees/<digest>/            gathered dirs with no output given, named by their plan digest
    stat/<key>.json            per walked dir: path -> (dev, ino, size, mtime, ctime, digest)
    locks/<key>.lock           one flock per output dir
    tmp/                       staging on the pool's filesystem

A gather walks the model dir and each external dir (ignored dirs pruned during the walk),
takes each file's digest from the stat cache or reads it (copying new content into the pool
in the same pass), computes the pure plan and its digest (:mod:`loader.gather_plan`), and
builds the output from hard links to pool objects: unchanged files share inodes between
gathers, and only changed files are copied. An output already holding the digest is left
alone; another one is rebuilt beside it and swapped in by one ``rename``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cas_daemon.layout import default_store_root
from loader.errors import ModelConfigError
from loader.gather_plan import (
    FileEntry,
    GatherOptions,
    LinkEntry,
    Plan,
    PlanEntry,
    gather_options,
    make_plan,
)
from loader.gather_pool import (
    Pool,
    check_output,
    path_key,
    publish_cached,
    publish_output,
    remove_stale,
)
from loader.gather_walk import StatCache, Walk, WalkedFile, hash_file, walk
from loader.localpkgs import LocalPackageDirs, local_package_dirs
from loader.options import OptionValue, RunnerOptions

log = logging.getLogger("wheelcas.gather")

_HASH_THREADS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class GatherResult:
    """What :func:`gather` made.

    ``copied``: files whose content this gather copied into the pool (new or changed);
    ``linked``: the others, hard links to content already there. ``reused``: the output
    already held this content, so nothing was written. Load the output with ``runner_opts``.
    """

    path: Path
    digest: str
    runner_opts: Mapping[str, OptionValue]
    files: int
    symlinks: int
    linked: int
    copied: int
    reused: bool
    warnings: tuple[str, ...]


def gather_home() -> Path:
    return default_store_root() / "gather" / "v1"


# --- planning -----------------------------------------------------------------------------


def _entries(found: Walk, cache: StatCache, pool: Pool) -> tuple[dict[str, PlanEntry], int]:
    """The walk's files with their digests: from the stat cache, else read (and copied into
    the pool in the same pass, unless the file was only touched and the pool has it)."""
    entries: dict[str, PlanEntry] = {}
    misses: list[WalkedFile] = []
    for f in found.files:
        digest = cache.get(f.path, f.stat)
        if digest is None:
            misses.append(f)
        else:
            entries[f.relpath] = _file_entry(f.path, f.stat, digest)

    def read(path: str, st: os.stat_result) -> tuple[str, bool]:
        executable = bool(st.st_mode & 0o111)
        if cache.previous_size(path) == st.st_size:  # probably touched, not changed
            digest = hash_file(path, st.st_size)
            if pool.has(digest, executable, st.st_size):
                return digest, False
        return pool.ingest(path, st), True

    copied = 0
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as executor:
        started = time.time_ns()
        for f, (digest, was_copied) in zip(
            misses, executor.map(lambda f: read(f.path, f.stat), misses), strict=True
        ):
            cache.put(f.path, f.stat, digest, started)
            entries[f.relpath] = _file_entry(f.path, f.stat, digest)
            copied += was_copied
    for link in found.links:
        entries[link.relpath] = LinkEntry(link.path, link.target)
    return entries, copied


def _file_entry(path: str, st: os.stat_result, digest: str) -> FileEntry:
    return FileEntry(path, digest, bool(st.st_mode & 0o111), st.st_size)


def _local_dirs(model_dir: Path, options: GatherOptions) -> LocalPackageDirs:
    dirs = local_package_dirs(
        model_dir,
        RunnerOptions(
            entrypoint_package="_",
            entrypoint_fn="_",
            bundled_packages_dir=options.bundled_packages_dir,
            external_package_dirs=options.external_package_dirs,
            keep_external_dir_names=options.keep_external_dir_names,
        ),
    )
    real_model = os.path.realpath(model_dir)
    for external in dirs.external:
        if real_model.startswith(str(external).rstrip(os.sep) + os.sep):
            raise ModelConfigError(
                f"external package dir {external} holds the model dir {model_dir}: gathering "
                "would copy the model into itself. Point the option at the dirs with the "
                "packages instead."
            )
    return dirs


def _plan(
    model_dir: Path,
    dirs: LocalPackageDirs,
    bundled: str,
    pool: Pool,
    home: Path,
    skip: frozenset[str] = frozenset(),
) -> tuple[Plan, int, list[str]]:
    """The plan, the files copied into the pool, and the warnings. ``skip``: real paths
    left out of every walk."""
    walked: list[tuple[str | None, Walk]] = [(None, walk(model_dir, keep_links=True, skip=skip))]
    for external in dirs.external:
        name = external.name if dirs.keep_external_names else None
        walked.append((name, walk(external, keep_links=True, skip=skip)))
    copied = 0
    parts: list[tuple[str | None, dict[str, PlanEntry]]] = []
    warnings: list[str] = []
    for name, found in walked:
        cache = StatCache(home / "stat" / f"{path_key(found.root)}.json")
        entries, n = _entries(found, cache, pool)
        cache.save()
        copied += n
        parts.append((name, entries))
        warnings += found.warnings
    return make_plan(parts[0][1], parts[1:], bundled), copied, warnings


# --- the API ------------------------------------------------------------------------------


def gather(
    model_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    runner_opts: Mapping[str, object] | None = None,
    keep_dir_names: bool | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> GatherResult:
    """Gather the model dir and its external package dirs (``runner_opts``'s
    ``external_package_dirs``) into one self-contained dir.

    ``output=None``: a content-keyed dir in the store's gather cache, reused as is when the
    content is unchanged. Otherwise ``output`` must be new, empty, or an earlier gather output
    (rebuilt only when its content changed, and swapped in whole). ``keep_dir_names``
    overrides the ``keep_external_dir_names`` option: each external dir keeps its name inside
    the bundled packages dir instead of its contents being merged there. ``exclude``: exact
    paths (files or dirs) left out wherever they are found, e.g. the ``.carton`` that
    :func:`~loader.packing.pack` writes into the model dir (an older one there would otherwise
    be packed into the new one).
    """
    options = gather_options(runner_opts, keep_dir_names)
    model = Path(model_dir).absolute()
    if not model.is_dir():
        raise ModelConfigError(f"{model} is not a directory; pass the model's code dir.")
    dirs = _local_dirs(model, options)
    path = None if output is None else Path(output).absolute()
    if path is not None:
        check_output(path, [os.path.realpath(model), *map(str, dirs.external)])
    home = gather_home()
    pool = Pool(home)
    remove_stale(pool.tmp)
    skip = frozenset(os.path.realpath(p) for p in exclude)
    plan, copied, warnings = _plan(model, dirs, options.bundled_packages_dir, pool, home, skip)
    for line in warnings:
        log.warning("%s", line)
    if path is None:
        path, reused, more = publish_cached(plan, pool, home)
    else:
        reused, more = publish_output(plan, path, pool, home)
    return GatherResult(
        path=path,
        digest=plan.digest,
        runner_opts=dict(options.gathered_runner_opts),
        files=plan.files,
        symlinks=plan.symlinks,
        linked=plan.files - copied - more,
        copied=copied + more,
        reused=reused,
        warnings=tuple(warnings),
    )


def describe(result: GatherResult) -> list[str]:
    """What ``wheelcas gather`` prints: what it did, and how to load the result."""
    import json

    links = f", {_count(result.symlinks, 'symlink')}" if result.symlinks else ""
    if result.reused:
        done = f"up to date: {result.path} ({_count(result.files, 'file')}{links})"
    else:
        done = (
            f"gathered {result.path}: {_count(result.files, 'file')} ({result.linked} linked "
            f"from the gather pool, {result.copied} copied into it){links}"
        )
    opts = json.dumps(dict(result.runner_opts), sort_keys=True)
    return [done, f"digest: {result.digest}", f"load it with runner options: {opts}"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
