"""The store key of a bundled wheel, remembered so that a warm load never hashes a bundle.

Every tree in the store is named by the sha256 of the exact bytes it was unpacked from, and
the store checks those bytes before unpacking them:

- a wheel fetched from an index, and a plain bundled ``.whl``: the lock's sha256;
- a compressed bundle (``.wcb.zst``): the sha256 of the bundle *file*. The lock's sha256 is
  the original wheel's, which a bundle's bytes cannot be checked against; keying its tree by
  that would let whoever supplied the first bundle claiming a wheel decide what every later
  load of that wheel gets, whatever lock names it (docs/daemon.md, "Uploads").

So keys never collide in a way that matters: one key is one byte string (short of a sha256
collision), and the same bytes make the same tree whichever way they arrived.

Hashing a bundle reads all of it (tens of MB), too much for every warm load. The digest is
kept in a small per-user file, ``$XDG_CACHE_HOME/wheelcas/bundle-digests.json`` (never in
``$WHEELCAS_HOME``, which may be shared), for each path, as long as the file's device, inode,
size, ``mtime_ns`` and ``ctime_ns`` stay the same (ctime cannot be set back: an edit always
shows). A plain ``.whl`` is remembered as such, without hashing: its key is the lock's. The
file is only a hint to its own user: a stale or forged entry makes the daemon (or the store in
embedded mode) refuse the bytes, or serve the tree of the bytes the entry names, never a tree
under a key its bytes do not have.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from lockgen.lockfile import Sha256, sha256_hex

CACHE_NAME = "bundle-digests.json"
#: Entries kept; the oldest go first. Each is ~200 bytes: the file stays small to rewrite.
MAX_ENTRIES = 1024
_VERSION = 1
_CHUNK = 1 << 20
#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): what must not change for a digest to hold.
Stamp = tuple[int, int, int, int, int]


def default_cache_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/wheelcas/bundle-digests.json``, else under ``~/.cache``."""
    env = os.environ if environ is None else environ
    cache_home = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")) / ".cache")
    return Path(cache_home).expanduser() / "wheelcas" / CACHE_NAME


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes (the one place this module hashes)."""
    import hashlib  # only when a bundle is hashed: not on the warm path

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(info: os.stat_result) -> Stamp:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class DigestCache:
    """The digests of bundled files, by absolute path; persisted in ``path`` (None: memory).

    Loaded on first use. A miss is written back at once (read, merge, atomic rename), so that
    processes sharing the file lose at most each other's newest entries, which then cost one
    more hash.
    """

    _shared: ClassVar[dict[Path, DigestCache]] = {}  # one per cache file, per process

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] | None = None

    @classmethod
    def for_user(cls) -> DigestCache:
        """The process's cache over :func:`default_cache_path` (one load per process)."""
        path = default_cache_path()
        cache = cls._shared.get(path)
        if cache is None:
            cache = cls._shared[path] = cls(path)
        return cache

    def key(self, bundle: Path, wheel_sha256: Sha256) -> Sha256:
        """The store key of the bundled file ``bundle`` locked as ``wheel_sha256``.

        A compressed bundle's own sha256; the lock's for a plain ``.whl``. For a file that
        cannot be read, also the lock's: a tree under it holds that very wheel (its bytes
        were checked against it), and if there is none, the missing file is reported where
        its bytes are needed.
        """
        try:
            before = _stamp(bundle.stat())
        except OSError:
            return wheel_sha256
        entries = self._load()
        name = str(bundle)
        entry = entries.get(name)
        if entry is not None and tuple(entry[:5]) == before:
            digest = str(entry[5])
        else:
            try:
                digest = _digest_if_compressed(bundle)
                after = _stamp(bundle.stat())
            except OSError:
                return wheel_sha256
            if after == before:  # not written to while it was read: worth remembering
                entries.pop(name, None)
                entries[name] = [*before, digest]
                self._save({name: entries[name]})
        return sha256_hex(digest) if digest else wheel_sha256

    def forget(self, bundle: Path) -> None:
        """Drop what is known of ``bundle`` (its bytes turned out not to match)."""
        if self._load().pop(str(bundle), None) is not None:
            self._save({str(bundle): None})

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            self._entries = _read(self.path) if self.path is not None else {}
        return self._entries

    def _save(self, changes: dict[str, list[Any] | None]) -> None:
        if self.path is None:
            return
        import json  # this module's imports stay light: the client's warm path loads it
        import secrets

        merged = _read(self.path)
        for name, entry in changes.items():
            merged.pop(name, None)
            if entry is not None:
                merged[name] = entry
        kept = dict(list(merged.items())[-MAX_ENTRIES:])
        text = json.dumps({"version": _VERSION, "entries": kept}, separators=(",", ":"))
        part = self.path.with_name(f"{self.path.name}.{secrets.token_hex(6)}.part")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            part.write_text(text, encoding="utf-8")
            part.replace(self.path)
        except OSError as exc:  # a read-only home only costs hashing again next time
            import logging

            logging.getLogger("wheelcas.store").debug(
                "cannot remember bundle digests in %s: %s", self.path, exc
            )
            with contextlib.suppress(OSError):
                part.unlink()


def _digest_if_compressed(bundle: Path) -> str:
    """The file's sha256 if it is a compressed bundle, ``""`` for anything else (a ``.whl``)."""
    from lockgen.bundle import is_bundle  # imports zipfile: only on a miss

    return sha256_file(bundle) if is_bundle(bundle) else ""


def _read(path: Path) -> dict[str, list[Any]]:
    """The entries of the cache file; none if it is missing, unreadable or not this user's."""
    import json

    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_uid != os.geteuid():
                return {}  # someone else's hints are not to be followed
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or data.get("version") != _VERSION:
        return {}
    return {name: entry for name, entry in entries.items() if _well_formed(entry)}


def _well_formed(entry: object) -> bool:
    """``[dev, ino, size, mtime_ns, ctime_ns, digest]``, the digest a sha256 or ``""``."""
    if not (isinstance(entry, list) and len(entry) == 6 and isinstance(entry[5], str)):
        return False
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:5]):
        return False
    try:
        return entry[5] == "" or bool(sha256_hex(entry[5]))
    except ValueError:
        return False
