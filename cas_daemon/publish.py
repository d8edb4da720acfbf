"""Publishing one tree: the blocking steps a store runs in a thread, under the wheel's lock.

"Publishing a tree" in docs/design.md, steps 1-5, for the bytes of one wheel already on
disk: clear what a crashed process left staged, unpack into a private staging dir, compile,
write the markers, seal, rename into place, then share identical files with other trees. Also
the later completion of a tree's deferred test bytecode. Every function here blocks and
expects its caller (:class:`cas_daemon.store.Store`) to hold the tree's ``flock``; the
asyncio side (single flight, downloads, locks, threads) stays in the store.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cas_daemon.bundle_keys import sha256_file
from cas_daemon.errors import HashMismatch, StoreError
from cas_daemon.layout import StoreLayout

if TYPE_CHECKING:
    from cas_daemon.compile_pool import CompilerPools
    from cas_daemon.store import WheelRef
    from cas_daemon.unpack import UnpackLimits

log = logging.getLogger(__name__)


def remove_leftovers(layout: StoreLayout, sha: str) -> None:
    """Delete whatever a crashed process staged for ``sha`` (step 1; lock held)."""
    from cas_daemon.precompile import remove_sealed

    for path in layout.tmp_dir.glob(f"{layout.staging_prefix(sha)}*"):
        remove_sealed(path)


def publish_tree(
    layout: StoreLayout,
    ref: WheelRef,
    source: Path,
    python: str,
    cache_tag: str,
    *,
    limits: UnpackLimits | None,
    pools: CompilerPools,
    defer_test_bytecode: bool,
) -> int:
    """Unpack ``source`` (the blob or the bundled file of ``ref``) into tree ``ref.sha256``
    with ``python``'s bytecode, atomically; the source's size in bytes.

    Nothing is visible until the staging dir is renamed into place, and a failure removes it
    whole. ``limits``: unpack's defaults if None.
    """
    from cas_daemon.dedupe import MIN_DEDUPE_SIZE
    from cas_daemon.precompile import compile_tree, remove_sealed, seal_read_only, write_marker
    from cas_daemon.unpack import UnpackLimits, unpack_wheel
    from lockgen.classify import strip_credentials

    staging = layout.tmp_dir / f"{layout.staging_prefix(ref.sha256)}{secrets.token_hex(8)}"
    staging.mkdir()
    try:
        # A blob was hashed on its way in, a bundle is checked here: RECORD need only be
        # checked for a compressed bundle, which the lock's sha256 cannot vouch for.
        bundled = ref.bundle_path is not None and check_bundled(source, ref)
        shown = str(ref.bundle_path) if ref.url is None else strip_credentials(ref.url)
        site = staging / "site"
        unpacked = unpack_wheel(
            source,
            site,
            limits=limits if limits is not None else UnpackLimits(),
            verify_record=bundled,
            display_name=shown,
            digest_min_size=MIN_DEDUPE_SIZE,
        )
        deferred = compile_tree(
            site,
            python,
            display_dir=layout.site_dir(ref.sha256),
            pools=pools,
            defer=defer_test_bytecode,
        )
        if deferred:  # before the ready marker: both are in the tree when it appears
            write_marker(staging / layout.deferred_marker(ref.sha256, cache_tag).name, python)
        write_marker(staging / layout.pyc_marker(ref.sha256, cache_tag).name, python)
        seal_read_only(site)
        tree = layout.tree_dir(ref.sha256)
        tree.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(tree)
    except BaseException:
        remove_sealed(staging)
        raise
    dedupe_published(layout, ref.sha256, unpacked.digests)
    return source.stat().st_size


def dedupe_published(layout: StoreLayout, key: str, known_digests: Mapping[str, str]) -> None:
    """Share files of tree ``key`` identical to ones of other trees (:mod:`cas_daemon.dedupe`).

    Only an optimisation: a tree that could not be deduplicated is still complete.
    """
    from cas_daemon.dedupe import dedupe_tree

    try:
        result = dedupe_tree(layout, layout.site_dir(key), known_digests=known_digests)
    except OSError as exc:
        log.warning("could not deduplicate %s: %s", layout.site_dir(key), exc)
        return
    if result.files_linked:
        log.debug(
            "%s: %d files shared, %d bytes saved", key, result.files_linked, result.bytes_saved
        )


def check_bundled(source: Path, ref: WheelRef) -> bool:
    """Check a bundled file before unpacking it; True if it is a compressed bundle.

    Its bytes must hash to the store key, the tree's name: whoever supplied them, a tree is
    then what those bytes unpack to. A plain ``.whl`` is keyed by the lock's sha256, so this
    is the lock's own check. A compressed bundle's header must also name the lock's wheel:
    no proof of anything (its members are checked against RECORD when unpacking), but it
    catches a stale bundle under the wrong directory.
    """
    from lockgen.bundle import is_bundle, read_bundle_header

    actual = sha256_file(source)
    if actual != ref.sha256:
        raise HashMismatch(str(source), ref.sha256, actual)
    compressed = is_bundle(source)
    named = read_bundle_header(source).wheel_sha256 if compressed else actual
    if named != ref.wheel_sha256:  # a plain wheel's bytes are not the lock's wheel
        raise HashMismatch(str(source), ref.wheel_sha256, named)
    return compressed


def complete_deferred_tree(
    layout: StoreLayout, sha: str, cache_tag: str, *, pools: CompilerPools
) -> int | None:
    """Compile tree ``sha``'s deferred test dirs for ``cache_tag``, then drop its marker; how
    many modules (None: nothing deferred, or the tree is gone). Lock held.

    With the interpreter that published the tree, named in the marker (written by a store).
    """
    from cas_daemon.precompile import complete_deferred, interpreter_cache_tag

    marker = layout.deferred_marker(sha, cache_tag)
    site = layout.site_dir(sha)
    try:
        python = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None  # completed, or the tree removed, while this waited for the lock
    if not site.is_dir() or not layout.pyc_marker(sha, cache_tag).exists():
        marker.unlink(missing_ok=True)
        return None
    if interpreter_cache_tag(python) != cache_tag:
        raise StoreError(
            f"the deferred bytecode of {site} was for {cache_tag}, but {python} (which "
            "published it) now has another cache tag: its test modules stay uncompiled. "
            f"Remove {marker} to stop retrying."
        )
    # Not deduplicated again: bytecode never matches another tree's (cas_daemon.dedupe).
    count = complete_deferred(site, python, pools=pools, display_dir=site)
    marker.unlink()
    return count
