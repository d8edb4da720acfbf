"""The gather pool and the dirs built from it: the writing half of :mod:`loader.gathering`.

Pool objects are read-only files named by content, written atomically (a temp file in
``tmp/``, then ``rename``) and hashed in the same pass as they are copied. A gathered dir is
built as hard links to them in a staging dir beside its final place, its marker written
last, and put in place by one ``rename`` (or ``renameat2(RENAME_EXCHANGE)`` over an earlier
output): killed at any moment, a gather leaves the earlier output whole, or none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from loader.errors import ModelConfigError
from loader.gather_plan import (
    MARKER_NAME,
    FileEntry,
    LinkEntry,
    Plan,
    marker_digest,
    marker_text,
)
from loader.gather_walk import read_chunks, same_file_state

log = logging.getLogger("wheelcas.gather")

#: Leftover staging dirs in ``tmp/`` older than this belong to killed processes.
STALE_TMP_S = 24 * 3600

#: The mtime of every pool object: 2000-01-01T00:00:00Z (as the Nix store gives its files one
#: fixed mtime). Outputs and cached trees are hard links to the objects, and mode 0444 stops
#: neither root nor an editor that writes in place; but any write moves the mtime, so an
#: object whose mtime is not this one has been edited through a link, which the pool sees
#: from a ``stat`` alone (:meth:`Pool.has`). Not before 1980: a zip (a ``.carton``) cannot
#: store earlier times. Packing is unaffected (it writes one fixed timestamp, whatever the
#: files'), and so is the stat cache (it keys on ctime too, which a link or edit moves).
POOL_MTIME_NS = 946_684_800 * 1_000_000_000

#: Tries of an ingest whose temp file vanished before its rename (a concurrent cleanup of
#: ``tmp/`` took it for a stale leftover: it already had the old pool mtime).
_INGEST_TRIES = 3


def path_key(text: str) -> str:
    """A fixed-length file name for a path (stat caches and locks are kept per path)."""
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:40]


# --- the pool -----------------------------------------------------------------------------


class Pool:
    """Read-only files named by content. The executable bit belongs to the inode, so it is
    part of the name: ``<sha256>`` (0444) and ``<sha256>.x`` (0555)."""

    def __init__(self, home: Path) -> None:
        self.objects = home / "objects"
        self.tmp = home / "tmp"
        #: Objects found edited and already warned about (a gather may check one twice).
        self._warned: set[Path] = set()

    def path(self, digest: str, executable: bool) -> Path:
        return self.objects / digest[:2] / (digest + (".x" if executable else ""))

    def has(self, digest: str, executable: bool, size: int) -> bool:
        """Whether the pool holds this object, intact: its size, and the pool's mtime
        (:data:`POOL_MTIME_NS`), which any write in place moves. An object edited through an
        output's link is reported (a warning) and counts as missing, so that the caller
        copies it again from its source, without the pool reading a byte of it."""
        obj = self.path(digest, executable)
        try:
            st = obj.lstat()
        except FileNotFoundError:
            return False
        if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, POOL_MTIME_NS):
            return True
        if obj in self._warned:
            return False
        self._warned.add(obj)
        log.warning(
            "the gather pool's %s was changed in place (through a gather output or cached "
            "tree, which are hard links to it): copying it again from its source. Gathered "
            "files are shared and read-only; gather again instead of editing them",
            obj,
        )
        return False

    def ingest(self, source: str, before: os.stat_result, expected: str | None = None) -> str:
        """Copy ``source`` into the pool, hashing in the same pass; its digest. The file
        must not change meanwhile (``before`` is its stat when it was planned).

        An object already there is kept only while :meth:`has` finds it intact (the pool's
        mtime): the trees and outputs linking it go on sharing its inode, and `wheelcas gc`
        frees it once none of them is left. One edited in place through a link is replaced
        by the verified copy, so the edit never reaches a later gather of this content
        (trees and outputs linking the edited inode keep it)."""
        for _ in range(_INGEST_TRIES):
            found = self._ingest_once(source, before, expected)
            if found is not None:
                return found
        raise ModelConfigError(
            f"could not copy {source} into the gather pool {self.objects}: its temp file in "
            f"{self.tmp} kept being removed by a concurrent cleanup; run the command again."
        )

    def _ingest_once(self, source: str, before: os.stat_result, expected: str | None) -> str | None:
        """:meth:`ingest`; None when the temp file vanished before its rename."""
        executable = bool(before.st_mode & 0o111)
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="object.", dir=self.tmp)
        tmp = Path(name)
        try:
            digest = hashlib.sha256()
            with open(source, "rb", buffering=0) as src, os.fdopen(fd, "wb") as dst:
                for data in read_chunks(src, before.st_size):
                    digest.update(data)
                    dst.write(data)
            found = digest.hexdigest()
            if not same_file_state(before, Path(source).stat()) or expected not in (None, found):
                raise ModelConfigError(
                    f"{source} changed while it was being gathered; run the command again "
                    "once nothing writes to it."
                )
            if self.has(found, executable, before.st_size):
                return found
            tmp.chmod(0o555 if executable else 0o444)
            os.utime(tmp, ns=(POOL_MTIME_NS, POOL_MTIME_NS))
            final = self.path(found, executable)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.replace(final)  # over an equal twin, or over an object edited in place
            except FileNotFoundError:
                if tmp.exists():
                    raise
                return None
            return found
        finally:
            tmp.unlink(missing_ok=True)

    def place(self, entry: FileEntry, target: Path) -> tuple[bool, bool]:
        """Hard-link the entry's object at ``target``: (copied into the pool first, because
        it went missing since planning; copied to ``target`` instead of linked)."""
        obj = self.path(entry.digest, entry.executable)
        ingested = False
        if not self.has(entry.digest, entry.executable, entry.size):
            self.ingest(entry.source, Path(entry.source).stat(), expected=entry.digest)
            ingested = True
        try:
            os.link(obj, target)
        except FileNotFoundError:
            # `wheelcas gc` removed the object (no output linked it) since it was checked.
            self.ingest(entry.source, Path(entry.source).stat(), expected=entry.digest)
            ingested = True
            os.link(obj, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                raise
            # Another filesystem, too many links to one inode, or no hard links there.
            shutil.copyfile(obj, target)
            target.chmod(0o555 if entry.executable else 0o444)
            os.utime(target, ns=(POOL_MTIME_NS, POOL_MTIME_NS))  # like a link: edits show
            return ingested, True
        return ingested, False


# --- gathered dirs -----------------------------------------------------------------------


def build(plan: Plan, staging: Path, pool: Pool) -> int:
    """Fill the empty ``staging`` dir; the marker is written last. Returns files copied into
    the pool (only when objects went missing since planning)."""
    made = {staging}
    ingested = copied = 0
    for path in sorted(plan.entries):
        entry = plan.entries[path]
        target = staging / path
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.update(target.parents)
        if isinstance(entry, FileEntry):
            into_pool, not_linked = pool.place(entry, target)
            ingested += into_pool
            copied += not_linked
        else:
            target.symlink_to(entry.target)
    if copied:
        log.info(
            "%d of %d files were copied, not hard-linked, from the gather pool %s (another "
            "filesystem, or too many links): they take space of their own",
            copied,
            plan.files,
            pool.objects,
        )
    (staging / MARKER_NAME).write_text(marker_text(plan), encoding="utf-8")
    return ingested


def _intact(output: Path, plan: Plan) -> bool:
    """Whether ``output`` still holds every planned file and link, unedited (``lstat``
    only: a file written in place has lost the pool's mtime)."""
    for path, entry in plan.entries.items():
        try:
            st = (output / path).lstat()
        except OSError:
            return False
        if isinstance(entry, LinkEntry):
            if not stat.S_ISLNK(st.st_mode) or str((output / path).readlink()) != entry.target:
                return False
        elif not stat.S_ISREG(st.st_mode) or (
            st.st_size,
            bool(st.st_mode & 0o111),
            st.st_mtime_ns,
        ) != (entry.size, entry.executable, POOL_MTIME_NS):
            return False
    return True


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _open_up(staging: Path) -> None:
    """Give ``staging`` (made 0700 by ``mkdtemp``) the mode a plain ``mkdir`` would give it
    here, ``0o777`` less the umask (and default ACLs), as for its subdirs: a gathered dir is
    for others to read as much as its source. The umask is read by making a probe dir, not
    by ``os.umask``, whose set-and-restore would race with other threads making files."""
    probe = staging / ".umask-probe"
    probe.mkdir(0o777)
    try:
        mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()
    staging.chmod(mode)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold ``path``'s exclusive flock for the block, waiting for it.

    `wheelcas gc` deletes the lock file of a cached tree it removes, while holding it; a
    gather that was waiting then holds a lock on a file no longer there, so it takes the lock
    again on the file now at ``path`` (the usual flock-and-unlink protocol).
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = path.stat()
            except FileNotFoundError:
                continue
            held = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
                continue
            yield
            return
        finally:
            os.close(fd)


def tree_lock_path(home: Path, digest: str) -> Path:
    """The lock of ``trees/<digest>``: held while a gather looks it up, marks it used or
    builds it, and by `wheelcas gc` while it removes it (:mod:`loader.gather_gc`)."""
    return home / "locks" / f"tree-{digest}.lock"


def mark_used(marker: Path) -> None:
    """Record a cached tree's last use as its marker's mtime, which `wheelcas gc` reads
    to find trees unused for longer than its age limit."""
    with contextlib.suppress(OSError):  # a cache shared read-only: the age limit still works
        os.utime(marker)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two dirs in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(staging: Path, output: Path) -> None:
    """Put the complete ``staging`` at ``output``; the old output ends up at ``staging``'s
    name (removed by the caller, or as a leftover by the next gather)."""
    if _exchange(staging, output):
        return
    # Two renames: killed between them, ``output`` is missing (never half-written) and the
    # next gather into it removes both leftovers and builds it again.
    old = output.with_name(f"{_staging_prefix(output)}{secrets.token_hex(4)}")
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    old.rename(staging)


def _staging_prefix(output: Path) -> str:
    """Names of the dirs built (or left) beside ``output``: hidden, and never a gather
    output's own name."""
    return f".{output.name}.gather-"


def _existing_digest(output: Path) -> str | None:
    """The digest of an earlier gather output; None for a missing or empty dir; an error
    for anything else (wheelcas never replaces what it did not make)."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise ModelConfigError(
            f"{output} exists and is not a directory; gather into a new or an empty dir, or "
            "into an earlier gather output."
        )
    if not output.exists() or not any(output.iterdir()):
        return None
    try:
        digest = marker_digest((output / MARKER_NAME).read_text(encoding="utf-8"))
    except OSError:
        digest = None
    if digest is None:
        raise ModelConfigError(
            f"{output} is not empty and is not an earlier `wheelcas gather` output (it has "
            f"no {MARKER_NAME}); gather into a new or an empty dir."
        )
    return digest


def publish_output(plan: Plan, output: Path, pool: Pool, home: Path) -> tuple[bool, int]:
    """(reused, files copied into the pool while building)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with _flock(home / "locks" / f"{path_key(os.path.realpath(output))}.lock"):
        prefix = _staging_prefix(output)
        for leftover in output.parent.iterdir():
            if leftover.name.startswith(prefix):
                _rmtree(leftover)  # from a killed gather: this lock serializes gathers into it
        existing = _existing_digest(output)
        if existing == plan.digest and _intact(output, plan):
            return True, 0
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(output), dir=output.parent))
        try:
            copied = build(plan, staging, pool)
            _open_up(staging)
            if output.exists() and any(output.iterdir()):
                _swap_in(staging, output)
            else:
                staging.rename(output)  # replaces a missing or empty dir in one step
        finally:
            _rmtree(staging)
    return False, copied


def publish_cached(plan: Plan, pool: Pool, home: Path) -> tuple[Path, bool, int]:
    """``trees/<digest>``, built unless there: (its path, reused, files copied into the pool
    while building). Never changed once there: a new content is a new digest.

    Under the tree's lock, which `wheelcas gc` takes too: a tree found here is marked used
    (its marker's mtime) before the lock is released, so GC, which checks the last use again
    under the lock, never removes a tree a gather has just returned.
    """
    final = home / "trees" / plan.digest
    marker = final / MARKER_NAME
    with _flock(tree_lock_path(home, plan.digest)):
        if marker.is_file():
            mark_used(marker)
            return final, True, 0
        pool.tmp.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"tree-{plan.digest[:16]}.", dir=pool.tmp))
        try:
            copied = build(plan, staging, pool)  # the marker, written last, dates its use
            _open_up(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                mark_used(marker)
                return final, True, copied  # made meanwhile by a gather not taking the lock
        finally:
            _rmtree(staging)
    return final, False, copied


def remove_stale(tmp: Path) -> None:
    """Remove what killed gathers left in the pool's ``tmp/`` (nothing stays there for a day
    while in use: objects and trees are renamed out of it when complete). Its age is the
    later of mtime and ctime: an object about to be renamed already has the old pool mtime."""
    if not tmp.is_dir():
        return
    cutoff = time.time() - STALE_TMP_S
    for leftover in tmp.iterdir():
        with contextlib.suppress(OSError):
            st = leftover.lstat()
            if max(st.st_mtime, st.st_ctime) < cutoff:
                if leftover.is_dir() and not leftover.is_symlink():
                    _rmtree(leftover)
                else:
                    leftover.unlink()


def check_output(output: Path, roots: list[str]) -> None:
    """An output inside a dir being gathered would be gathered into itself; one holding such
    a dir would be replaced with it inside."""
    real = os.path.realpath(output)
    for root in roots:
        if real == root or real.startswith(root + os.sep) or root.startswith(real + os.sep):
            raise ModelConfigError(
                f"output {output} overlaps {root}, a dir being gathered; gather into a dir "
                "outside the model and its external package dirs."
            )
