"""The store's index in SQLite: sizes, last use, views, leases and roots.

The files under ``v1/`` are the truth; this database (``v1/metadata.sqlite3``) only remembers
what is expensive or impossible to read back from them: when each wheel and view was last
used, how big each tree is, which live processes hold which trees (leases), and which model
dirs must keep theirs (roots). If it is lost or corrupt, :func:`rebuild_from_disk` makes a new
one from the files, and ``wheelcas fsck`` (:func:`fsck`) reconciles the two.

Concurrency: WAL mode lets readers (a ``gc --dry-run``, ``fsck`` without ``--repair``) run
beside the daemon's writes; each method is one short transaction, serialized within a process
by a lock so that the daemon may call it from ``asyncio.to_thread``. Writes take SQLite's write
lock up front (``BEGIN IMMEDIATE``): :meth:`Metadata.transaction` is how the garbage collector
makes "nobody holds this tree" and "it is gone" one step with respect to :meth:`add_lease`.

Schema changes: append a function to ``_MIGRATIONS``; ``PRAGMA user_version`` says how many
have run, and a database from a newer wheelcas is refused rather than misread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from cas_daemon import leases
from cas_daemon.errors import StoreError
from cas_daemon.layout import StoreLayout

RootKind = Literal["watched", "pinned"]
ROOT_KINDS: tuple[RootKind, ...] = ("watched", "pinned")
IsAlive = Callable[[int, int], bool]
Clock = Callable[[], float]

BUSY_TIMEOUT_SECONDS = 10.0


def _v1(conn: sqlite3.Connection) -> None:
    # Shas in views, leases and roots are not foreign keys to wheels: a lock may name a wheel
    # the store does not have yet, and the index must be able to describe such states.
    for statement in (
        """CREATE TABLE wheels (
            sha256 TEXT PRIMARY KEY, filename TEXT NOT NULL,
            blob_bytes INTEGER NOT NULL, tree_bytes INTEGER NOT NULL, files INTEGER NOT NULL,
            published_at REAL NOT NULL, last_used_at REAL NOT NULL)""",
        """CREATE TABLE tree_pyc (
            sha256 TEXT NOT NULL REFERENCES wheels(sha256) ON DELETE CASCADE,
            cache_tag TEXT NOT NULL, PRIMARY KEY (sha256, cache_tag))""",
        """CREATE TABLE views (
            key TEXT PRIMARY KEY, nbytes INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, last_used_at REAL NOT NULL)""",
        """CREATE TABLE view_members (
            key TEXT NOT NULL REFERENCES views(key) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (key, position))""",
        "CREATE INDEX view_members_by_sha ON view_members(sha256)",
        """CREATE TABLE leases (
            id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL,
            pid_start_time INTEGER NOT NULL, view_key TEXT, created_at REAL NOT NULL)""",
        """CREATE TABLE lease_trees (
            lease_id INTEGER NOT NULL REFERENCES leases(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, PRIMARY KEY (lease_id, sha256))""",
        "CREATE INDEX lease_trees_by_sha ON lease_trees(sha256)",
        """CREATE TABLE roots (
            id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('watched', 'pinned')),
            path TEXT NOT NULL, updated_at REAL NOT NULL, UNIQUE (kind, path))""",
        """CREATE TABLE root_trees (
            root_id INTEGER NOT NULL REFERENCES roots(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL, PRIMARY KEY (root_id, sha256))""",
        "CREATE INDEX root_trees_by_sha ON root_trees(sha256)",
    ):
        conn.execute(statement)


#: ``_MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``, inside one transaction.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1,)
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(frozen=True, slots=True)
class WheelRow:
    sha256: str
    filename: str
    blob_bytes: int
    tree_bytes: int
    files: int
    published_at: float
    last_used_at: float
    cache_tags: frozenset[str]


@dataclass(frozen=True, slots=True)
class ViewRow:
    key: str
    nbytes: int
    created_at: float
    last_used_at: float
    members: tuple[str, ...]  # in sys.path order


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    pid: int
    pid_start_time: int
    view_key: str | None
    created_at: float
    shas: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"lease {self.id} (pid {self.pid})"


@dataclass(frozen=True, slots=True)
class Root:
    kind: RootKind
    path: str
    shas: tuple[str, ...]
    updated_at: float

    @property
    def label(self) -> str:
        return f"{self.kind} model {self.path}"


@dataclass(frozen=True, slots=True)
class MetadataStats:
    wheels: int
    blob_bytes: int
    tree_bytes: int
    files: int
    views: int
    leases: int
    roots: int


class Metadata:
    """One connection to the store's index. Close it (or use ``with``) when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Clock) -> None:
        self._conn = conn
        self.path = path
        self._clock = clock
        # RLock: a method called inside transaction() joins it instead of deadlocking.
        self._lock = threading.RLock()
        self._depth = 0

    @classmethod
    def open(
        cls,
        layout: StoreLayout,
        *,
        busy_timeout: float = BUSY_TIMEOUT_SECONDS,
        clock: Clock = time.time,
    ) -> Metadata:
        """Open (creating and migrating as needed) the index of the store at ``layout``.

        Raises :class:`StoreError` if the file is not a usable database of a known version.
        """
        path = layout.metadata_db
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _unusable(path, exc) from None
        meta = cls(conn, path, clock)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            meta._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _unusable(path, exc) from None
        except BaseException:
            conn.close()
            raise
        return meta

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Metadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self.transaction():
            version = self._one("PRAGMA user_version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this wheelcas "
                    f"understands ({SCHEMA_VERSION}). Upgrade wheelcas, or use a separate store."
                )
            for step in _MIGRATIONS[version:]:
                step(self._conn)
            # PRAGMA takes no parameters; the value is an int of ours.
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction (``BEGIN IMMEDIATE``); nested calls join the outer one."""
        return self._transaction("IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[None]:
        """A consistent read of several tables that does not hold up writers (WAL)."""
        return self._transaction("DEFERRED")

    @contextlib.contextmanager
    def _transaction(self, mode: Literal["IMMEDIATE", "DEFERRED"]) -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute(f"BEGIN {mode}")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._conn.execute("COMMIT")

    def _one(self, sql: str, params: Sequence[object] = ()) -> int:
        row = self._conn.execute(sql, params).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    # --- wheels -----------------------------------------------------------------------

    def record_published(
        self,
        sha256: str,
        filename: str,
        blob_bytes: int,
        tree_bytes: int,
        files: int,
        cache_tag: str,
    ) -> None:
        """A tree is ready for ``cache_tag`` (first publish, or another interpreter's pyc)."""
        self.record_wheel(sha256, filename, blob_bytes, tree_bytes, files, (cache_tag,))

    def record_wheel(
        self,
        sha256: str,
        filename: str,
        blob_bytes: int,
        tree_bytes: int,
        files: int,
        cache_tags: Iterable[str],
        *,
        last_used_at: float | None = None,
    ) -> None:
        """Insert or refresh a wheel's row; its first ``published_at`` is kept."""
        now = self._clock()
        used = now if last_used_at is None else last_used_at
        with self.transaction():
            self._conn.execute(
                """INSERT INTO wheels VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (sha256) DO UPDATE SET filename = excluded.filename,
                    blob_bytes = excluded.blob_bytes, tree_bytes = excluded.tree_bytes,
                    files = excluded.files,
                    last_used_at = max(wheels.last_used_at, excluded.last_used_at)""",
                (sha256, filename, blob_bytes, tree_bytes, files, now, used),
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO tree_pyc VALUES (?, ?)",
                [(sha256, tag) for tag in cache_tags],
            )

    def touch(self, shas: Iterable[str], view_key: str | None = None) -> None:
        """Mark wheels (and a view) as used now: the age limit of GC counts from here."""
        now = self._clock()
        with self.transaction():
            self._conn.executemany(
                "UPDATE wheels SET last_used_at = ? WHERE sha256 = ?", [(now, s) for s in shas]
            )
            if view_key is not None:
                self._conn.execute(
                    "UPDATE views SET last_used_at = ? WHERE key = ?", (now, view_key)
                )

    def wheels(self) -> list[WheelRow]:
        with self._read():
            tags: dict[str, set[str]] = {}
            for sha, tag in self._conn.execute("SELECT sha256, cache_tag FROM tree_pyc"):
                tags.setdefault(sha, set()).add(tag)
            rows = self._conn.execute("SELECT * FROM wheels ORDER BY sha256").fetchall()
        return [
            WheelRow(sha, name, blob, tree, files, published, used, frozenset(tags.get(sha, ())))
            for sha, name, blob, tree, files, published, used in rows
        ]

    def forget_tree(self, sha256: str) -> None:
        """The tree is gone (the blob may remain): sizes and pyc rows say so."""
        with self.transaction():
            self._conn.execute(
                "UPDATE wheels SET tree_bytes = 0, files = 0 WHERE sha256 = ?", (sha256,)
            )
            self._conn.execute("DELETE FROM tree_pyc WHERE sha256 = ?", (sha256,))

    def forget_blob(self, sha256: str) -> None:
        with self.transaction():
            self._conn.execute("UPDATE wheels SET blob_bytes = 0 WHERE sha256 = ?", (sha256,))

    def forget_wheel(self, sha256: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM wheels WHERE sha256 = ?", (sha256,))

    def forget_pyc(self, sha256: str, cache_tag: str) -> None:
        with self.transaction():
            self._conn.execute(
                "DELETE FROM tree_pyc WHERE sha256 = ? AND cache_tag = ?", (sha256, cache_tag)
            )

    def last_used(self, sha256: str) -> float | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT last_used_at FROM wheels WHERE sha256 = ?", (sha256,)
            ).fetchone()
        return None if row is None else float(row[0])

    # --- views ------------------------------------------------------------------------

    def record_view(
        self,
        key: str,
        shas: Sequence[str],
        *,
        nbytes: int = 0,
        last_used_at: float | None = None,
    ) -> None:
        """A view now exists with these member trees, in ``sys.path`` order."""
        now = self._clock()
        used = now if last_used_at is None else last_used_at
        with self.transaction():
            self._conn.execute(
                """INSERT INTO views VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET
                nbytes = excluded.nbytes,
                last_used_at = max(views.last_used_at, excluded.last_used_at)""",
                (key, nbytes, now, used),
            )
            self._conn.execute("DELETE FROM view_members WHERE key = ?", (key,))
            self._conn.executemany(
                "INSERT INTO view_members VALUES (?, ?, ?)",
                [(key, sha, position) for position, sha in enumerate(shas)],
            )

    def views(self) -> list[ViewRow]:
        with self._read():
            members: dict[str, list[str]] = {}
            for key, sha in self._conn.execute(
                "SELECT key, sha256 FROM view_members ORDER BY key, position"
            ):
                members.setdefault(key, []).append(sha)
            rows = self._conn.execute("SELECT * FROM views ORDER BY key").fetchall()
        return [
            ViewRow(key, nbytes, created, used, tuple(members.get(key, ())))
            for key, nbytes, created, used in rows
        ]

    def forget_view(self, key: str) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM views WHERE key = ?", (key,))

    def view_last_used(self, key: str) -> float | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT last_used_at FROM views WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else float(row[0])

    # --- leases -----------------------------------------------------------------------

    def add_lease(
        self, pid: int, pid_start_time: int, shas: Iterable[str], view_key: str | None
    ) -> int:
        """Protect ``shas`` (and the view) from GC for the life of process ``pid``; its id.

        Take it *before* making the trees ready or answering with their paths: a GC that
        removes a tree either committed before this lease (and the caller then finds the
        tree missing and publishes it again) or sees the lease and keeps the tree.
        """
        with self.transaction():
            cursor = self._conn.execute(
                "INSERT INTO leases (pid, pid_start_time, view_key, created_at) "
                "VALUES (?, ?, ?, ?)",
                (pid, pid_start_time, view_key, self._clock()),
            )
            # An INSERT into a rowid table always sets lastrowid.
            lease_id = int(cursor.lastrowid or 0)
            self._conn.executemany(
                "INSERT OR IGNORE INTO lease_trees VALUES (?, ?)",
                [(lease_id, sha) for sha in shas],
            )
        return lease_id

    def restore_lease(self, lease: Lease) -> None:
        """Carry a lease over from another index as it was (same id: its holder knows it)."""
        with self.transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                (lease.id, lease.pid, lease.pid_start_time, lease.view_key, lease.created_at),
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO lease_trees VALUES (?, ?)",
                [(lease.id, sha) for sha in lease.shas],
            )

    def drop_lease(self, lease_id: int) -> None:
        with self.transaction():
            self._conn.execute("DELETE FROM leases WHERE id = ?", (lease_id,))

    def leases(self) -> list[Lease]:
        with self._read():
            shas: dict[int, list[str]] = {}
            for lease_id, sha in self._conn.execute(
                "SELECT lease_id, sha256 FROM lease_trees ORDER BY lease_id, sha256"
            ):
                shas.setdefault(lease_id, []).append(sha)
            rows = self._conn.execute("SELECT * FROM leases ORDER BY id").fetchall()
        return [
            Lease(i, pid, start, view, created, tuple(shas.get(i, ())))
            for i, pid, start, view, created in rows
        ]

    def drop_dead_leases(self, is_alive: IsAlive) -> list[Lease]:
        """Delete the leases whose process is gone (or whose pid was reused); those leases."""
        dead = [lease for lease in self.leases() if not is_alive(lease.pid, lease.pid_start_time)]
        with self.transaction():
            self._conn.executemany("DELETE FROM leases WHERE id = ?", [(d.id,) for d in dead])
        return dead

    # --- roots ------------------------------------------------------------------------

    def set_root(self, kind: RootKind, path: str | os.PathLike[str], shas: Iterable[str]) -> None:
        """The wheels of a watched or pinned model dir's lock (replacing its previous set)."""
        if kind not in ROOT_KINDS:
            raise ValueError(f"root kind must be one of {ROOT_KINDS}, not {kind!r}")
        with self.transaction():
            self._conn.execute(
                """INSERT INTO roots (kind, path, updated_at) VALUES (?, ?, ?)
                ON CONFLICT (kind, path) DO UPDATE SET updated_at = excluded.updated_at""",
                (kind, os.fspath(path), self._clock()),
            )
            root_id = self._one(
                "SELECT id FROM roots WHERE kind = ? AND path = ?", (kind, os.fspath(path))
            )
            self._conn.execute("DELETE FROM root_trees WHERE root_id = ?", (root_id,))
            self._conn.executemany(
                "INSERT OR IGNORE INTO root_trees VALUES (?, ?)", [(root_id, s) for s in shas]
            )

    def drop_root(self, kind: RootKind, path: str | os.PathLike[str]) -> None:
        with self.transaction():
            self._conn.execute(
                "DELETE FROM roots WHERE kind = ? AND path = ?", (kind, os.fspath(path))
            )

    def roots(self) -> list[Root]:
        with self._read():
            shas: dict[int, list[str]] = {}
            for root_id, sha in self._conn.execute(
                "SELECT root_id, sha256 FROM root_trees ORDER BY root_id, sha256"
            ):
                shas.setdefault(root_id, []).append(sha)
            rows = self._conn.execute(
                "SELECT id, kind, path, updated_at FROM roots ORDER BY kind, path"
            ).fetchall()
        return [Root(kind, path, tuple(shas.get(i, ())), at) for i, kind, path, at in rows]

    # --- what holds an item right now (GC's re-check, under transaction()) -------------

    def tree_holders(self, sha256: str, is_alive: IsAlive) -> list[str]:
        """Why ``sha256``'s tree must stay: live leases, roots, indexed views holding it."""
        with self._read():
            holding = self._conn.execute(
                """SELECT l.id, l.pid, l.pid_start_time FROM leases l
                JOIN lease_trees t ON t.lease_id = l.id WHERE t.sha256 = ?
                UNION SELECT l.id, l.pid, l.pid_start_time FROM leases l
                JOIN view_members m ON m.key = l.view_key WHERE m.sha256 = ?""",
                (sha256, sha256),
            ).fetchall()
            roots = self._conn.execute(
                """SELECT r.kind, r.path FROM roots r JOIN root_trees t ON t.root_id = r.id
                WHERE t.sha256 = ?""",
                (sha256,),
            ).fetchall()
            views = self._conn.execute(
                "SELECT DISTINCT key FROM view_members WHERE sha256 = ?", (sha256,)
            ).fetchall()
        why = [f"lease {i} (pid {pid})" for i, pid, start in holding if is_alive(pid, start)]
        why += [f"{kind} model {path}" for kind, path in roots]
        why += [f"member of view {key}" for (key,) in views]
        return why

    def view_holders(self, key: str, is_alive: IsAlive) -> list[str]:
        with self._lock:
            holding = self._conn.execute(
                "SELECT id, pid, pid_start_time FROM leases WHERE view_key = ?", (key,)
            ).fetchall()
        return [f"lease {i} (pid {pid})" for i, pid, start in holding if is_alive(pid, start)]

    def stats(self) -> MetadataStats:
        with self._read():
            wheels, blob_bytes, tree_bytes, files = self._conn.execute(
                "SELECT count(*), total(blob_bytes), total(tree_bytes), total(files) FROM wheels"
            ).fetchone()
            return MetadataStats(
                wheels=int(wheels),
                blob_bytes=int(blob_bytes),
                tree_bytes=int(tree_bytes),
                files=int(files),
                views=self._one("SELECT count(*) FROM views"),
                leases=self._one("SELECT count(*) FROM leases"),
                roots=self._one("SELECT count(*) FROM roots"),
            )

    def integrity_problems(self) -> list[str]:
        """SQLite's own ``quick_check``: empty when the file is sound."""
        with self._lock:
            rows = self._conn.execute("PRAGMA quick_check").fetchall()
        return [str(r[0]) for r in rows if r[0] != "ok"]


def _unusable(path: Path, exc: BaseException) -> StoreError:
    return StoreError(
        f"the store index {path} cannot be used ({exc}). It holds no wheel data: run "
        "`wheelcas fsck --repair` (with the daemon stopped) to rebuild it from the store."
    )


# --- the store on disk: what the index is rebuilt and checked from ---------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
#: Written into each view by views.py: its trees' site dirs, in sys.path order.
VIEW_MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class DiskScan:
    """What the store's directories hold, from listings and ``stat`` only (no hashing)."""

    trees: Mapping[str, frozenset[str]]  # sha256 -> cache tags that have a pyc marker
    blobs: Mapping[str, int]  # sha256 -> size
    views: tuple[str, ...]
    strays: tuple[Path, ...]  # names the layout never produces: reported, never removed


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as found:
            return sorted(found, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _sharded(top: Path, strays: list[Path]) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(sha256, entry)`` of ``top/<aa>/<sha256>``; other names go to ``strays``."""
    for shard in _entries(top):
        if not (_SHARD.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
            strays.append(Path(shard.path))
            continue
        for entry in _entries(Path(shard.path)):
            if _SHA256.fullmatch(entry.name) and entry.name[:2] == shard.name:
                yield entry.name, entry
            else:
                strays.append(Path(entry.path))


def scan_disk(layout: StoreLayout) -> DiskScan:
    strays: list[Path] = []
    trees: dict[str, frozenset[str]] = {}
    for sha, entry in _sharded(layout.trees_dir, strays):
        trees[sha] = frozenset(
            e.name.removeprefix("pyc-")
            for e in _entries(Path(entry.path))
            if e.name.startswith("pyc-") and e.is_file(follow_symlinks=False)
        )
    blobs = {
        sha: entry.stat(follow_symlinks=False).st_size
        for sha, entry in _sharded(layout.blobs_dir, strays)
    }
    views = tuple(e.name for e in _entries(layout.views_dir) if e.is_dir(follow_symlinks=False))
    return DiskScan(trees, blobs, views, tuple(strays))


def measure_tree(top: Path) -> tuple[int, int]:
    """``(bytes, files)`` under ``top``: apparent sizes, shared (hard-linked) files included."""
    size = files = 0
    for root, _dirs, names in os.walk(top):
        for name in names:
            files += 1
            size += Path(root, name).lstat().st_size
    return size, files


def measure_view(top: Path) -> int:
    """The bytes a view holds on its own: files it shares with trees (hard links) are free."""
    size = 0
    for root, _dirs, names in os.walk(top):
        for name in names:
            info = Path(root, name).lstat()
            if info.st_nlink == 1:
                size += info.st_size
    return size


def read_view_members(layout: StoreLayout, key: str) -> tuple[str, ...]:
    """The shas of a view's trees, in sys.path order, as far as the disk can tell.

    From the view's ``manifest.json`` (``{"trees": [{"site": ".../trees/aa/<sha>/site"}]}``);
    without one, from where the view's symlinks point (``symlink`` mode: order of first
    appearance, not sys.path order). A hard-linked view without a manifest cannot say: no
    members, so it holds no tree alive.
    """
    view = layout.view_dir(key)
    try:
        doc = json.loads((view / VIEW_MANIFEST).read_text(encoding="utf-8"))
        sites = [str(tree["site"]) for tree in doc["trees"]]
    except (OSError, ValueError, KeyError, TypeError):
        sites = _symlink_targets(view)
    shas = (_tree_sha(layout, site) for site in sites)
    return tuple(dict.fromkeys(sha for sha in shas if sha is not None))


def _symlink_targets(view: Path) -> list[str]:
    targets: list[str] = []
    for root, dirs, names in os.walk(view):
        for name in sorted([*dirs, *names]):
            path = Path(root, name)
            if path.is_symlink():
                targets.append(str(path.parent / path.readlink()))
    return targets


def _tree_sha(layout: StoreLayout, path: str) -> str | None:
    """The sha of the tree ``path`` lies in (``trees/aa/<sha>/...``), if it does."""
    try:
        relative = Path(os.path.normpath(path)).relative_to(layout.trees_dir)
    except ValueError:
        return None
    parts = relative.parts
    return parts[1] if len(parts) >= 2 and _SHA256.fullmatch(parts[1]) else None


def guess_filename(site: Path) -> str:
    """A wheel file name rebuilt from a tree's ``*.dist-info``: for people, not for lookups."""
    for info in sorted(site.glob("*.dist-info")):
        try:
            text = (info / "WHEEL").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        tags = [
            line.partition(":")[2].strip().split("-")
            for line in text.splitlines()
            if line.startswith("Tag:")
        ]
        if tags and all(len(t) == 3 for t in tags):
            compressed = "-".join(".".join(sorted({t[i] for t in tags})) for i in range(3))
            return f"{info.name.removesuffix('.dist-info')}-{compressed}.whl"
    return ""


def index_tree(
    metadata: Metadata,
    layout: StoreLayout,
    sha256: str,
    cache_tags: Iterable[str],
    blob_bytes: int,
    *,
    last_used_at: float | None = None,
) -> None:
    """Record a tree found on disk: measured now, used "now" unless told (see docs/gc.md)."""
    tree_bytes, files = measure_tree(layout.tree_dir(sha256))
    filename = guess_filename(layout.site_dir(sha256))
    metadata.record_wheel(
        sha256, filename, blob_bytes, tree_bytes, files, cache_tags, last_used_at=last_used_at
    )


def index_view(
    metadata: Metadata, layout: StoreLayout, key: str, *, last_used_at: float | None = None
) -> None:
    members = read_view_members(layout, key)
    nbytes = measure_view(layout.view_dir(key))
    metadata.record_view(key, members, nbytes=nbytes, last_used_at=last_used_at)


def rebuild_from_disk(layout: StoreLayout, *, clock: Clock = time.time) -> Metadata:
    """Replace the index by one made from the store's files; the new index, open.

    Everything recorded is "used now": the old usage times are gone, and guessing them old
    could let GC remove trees a running model imports. Leases and roots cannot be read from
    the files; they are carried over from the old index as far as it can still be read.
    Run it with the daemon stopped: its open connection would keep writing the old file.
    """
    old_leases, old_roots = _salvage(layout.metadata_db)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{layout.metadata_db}{suffix}").unlink(missing_ok=True)
    metadata = Metadata.open(layout, clock=clock)
    try:
        disk = scan_disk(layout)
        with metadata.transaction():
            for sha, tags in disk.trees.items():
                index_tree(metadata, layout, sha, tags, disk.blobs.get(sha, 0))
            for sha, size in disk.blobs.items():
                if sha not in disk.trees:
                    metadata.record_wheel(sha, "", size, 0, 0, ())
            for key in disk.views:
                index_view(metadata, layout, key)
            for lease in old_leases:
                metadata.restore_lease(lease)
            for root in old_roots:
                metadata.set_root(root.kind, root.path, root.shas)
    except BaseException:
        metadata.close()
        raise
    return metadata


def _salvage(path: Path) -> tuple[list[Lease], list[Root]]:
    """The leases and roots of a damaged index, if it still answers; else none."""
    if not path.exists():
        return [], []
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return [], []
    try:
        old = Metadata(conn, path, time.time)
        return old.leases(), old.roots()
    except sqlite3.Error:
        return [], []
    finally:
        conn.close()


# --- fsck: the index against the files, and the files against their names --------------------

FindingKind = Literal[
    "index-missing",  # no index, but a store with content
    "index-corrupt",  # SQLite cannot read it, or its own check fails
    "tmp-leftover",  # staging of a crashed process (or of an interrupted GC)
    "incomplete-tree",  # a tree without any pyc marker: never published that way
    "corrupt-blob",  # a blob whose bytes do not hash to its name
    "stray",  # a name the layout never produces
    "row-without-entry",  # the index names a tree, blob, marker or view that is not there
    "entry-without-row",  # a tree, blob, marker or view the index does not know
    "dead-lease",  # a lease whose process is gone
]
#: The daemon's own upload area (it empties it at start): fsck leaves it alone.
_DAEMON_TMP = frozenset({"uploads"})
TMP_GRACE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    path: Path | None
    detail: str
    repaired: bool = False


@dataclass(frozen=True, slots=True)
class FsckReport:
    findings: tuple[Finding, ...]
    repair: bool

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def unrepaired(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.repaired)

    def lines(self) -> list[str]:
        if not self.findings:
            return ["the store and its index agree: nothing to repair"]
        out = []
        for f in self.findings:
            state = "repaired" if f.repaired else ("left as is" if self.repair else "found")
            where = f" {f.path}" if f.path is not None else ""
            out.append(f"{f.kind} ({state}):{where}: {f.detail}")
        return out


@contextlib.contextmanager
def try_flock(path: Path) -> Iterator[bool]:
    """Hold ``path``'s exclusive flock for the block if it is free; whether it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _lock_of_tmp_entry(layout: StoreLayout, name: str) -> Path | None:
    """The lock that guards a staged name (``{sha}.*``, ``view-{key}.*``); None if unknown."""
    head, dot, _ = name.partition(".")
    if dot and _SHA256.fullmatch(head):
        return layout.lock_path(head)
    if dot and head.startswith("view-") and len(head) > len("view-"):
        return layout.view_lock_path(head.removeprefix("view-"))
    return None


def fsck(
    layout: StoreLayout,
    *,
    repair: bool,
    clock: Clock = time.time,
    is_alive: IsAlive = leases.is_alive,
    tmp_grace_seconds: float = TMP_GRACE_SECONDS,
) -> FsckReport:
    """Check the store against its names and the index against the store; fix if ``repair``.

    Without ``repair`` nothing is written (safe beside a running daemon). With it: the index is
    rebuilt if missing or corrupt, leftovers and corrupt blobs are deleted (each under its
    lock; one in use is left alone), rows are made to match the files. Incomplete trees and
    stray names are only reported: they should never exist, and someone should look.
    """
    findings: list[Finding] = []
    metadata = _check_index(layout, repair, clock, findings)
    try:
        findings += _check_tmp(layout, repair, clock() - tmp_grace_seconds)
        disk = scan_disk(layout)
        findings += [Finding("stray", p, "not a name the store layout makes") for p in disk.strays]
        for sha, tags in disk.trees.items():
            if not tags:
                detail = "tree without a pyc marker: it was not published by wheelcas"
                findings.append(Finding("incomplete-tree", layout.tree_dir(sha), detail))
        findings += _check_blobs(layout, disk, repair, metadata)
        if metadata is not None:
            disk = scan_disk(layout) if repair else disk  # corrupt blobs may be gone now
            findings += _check_rows(layout, disk, metadata, repair, is_alive)
    finally:
        if metadata is not None:
            metadata.close()
    return FsckReport(tuple(findings), repair)


def _check_index(
    layout: StoreLayout, repair: bool, clock: Clock, findings: list[Finding]
) -> Metadata | None:
    """The open index if it is sound (or was rebuilt); a finding if it is not."""
    path = layout.metadata_db
    if not path.exists():
        disk = scan_disk(layout)
        if not (disk.trees or disk.blobs or disk.views):
            return Metadata.open(layout, clock=clock) if repair else None
        kind: FindingKind = "index-missing"
        detail = "the store has content but no index"
    else:
        try:
            metadata = Metadata.open(layout, clock=clock)
        except StoreError as exc:
            kind, detail = "index-corrupt", str(exc)
        else:
            try:
                problems = metadata.integrity_problems()
            except sqlite3.DatabaseError as exc:
                problems = [str(exc)]
            if not problems:
                return metadata
            metadata.close()
            kind, detail = "index-corrupt", "; ".join(problems[:5])
    if not repair:
        findings.append(Finding(kind, path, detail))
        return None
    # A running daemon keeps its connection to the old file: replacing it under the daemon
    # would split the index in two. Holding the lock also keeps a daemon from starting.
    with try_flock(layout.daemon_lock) as no_daemon:
        if not no_daemon:
            detail += "; a daemon serves this store: stop it, then run fsck --repair again"
            findings.append(Finding(kind, path, detail))
            return None
        rebuilt = rebuild_from_disk(layout, clock=clock)
    findings.append(Finding(kind, path, f"{detail}; rebuilt from the store", repaired=True))
    return rebuilt


def _check_tmp(layout: StoreLayout, repair: bool, older_than: float) -> list[Finding]:
    from cas_daemon.precompile import remove_sealed

    findings = []
    for entry in _entries(layout.tmp_dir):
        if entry.name in _DAEMON_TMP:
            continue
        path = Path(entry.path)
        lock = _lock_of_tmp_entry(layout, entry.name)
        if lock is None:
            # Nobody's lock says whether it is in use: only old enough is safe to call dead.
            if entry.stat(follow_symlinks=False).st_mtime > older_than:
                continue
            if repair:
                remove_sealed(path)
            findings.append(Finding("tmp-leftover", path, "unknown staging, old", repair))
            continue
        with try_flock(lock) as free:
            if not free:
                continue  # being staged right now by the holder of its lock
            if repair:
                remove_sealed(path)
            findings.append(Finding("tmp-leftover", path, "left by a crashed process", repair))
    return findings


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_blobs(
    layout: StoreLayout, disk: DiskScan, repair: bool, metadata: Metadata | None
) -> list[Finding]:
    findings = []
    for sha in disk.blobs:
        path = layout.blob_path(sha)
        actual = _sha256_of(path)
        if actual == sha:
            continue
        detail = f"its bytes hash to {actual}"
        repaired = False
        if repair:
            with try_flock(layout.lock_path(sha)) as free:
                if free:
                    path.unlink(missing_ok=True)
                    if metadata is not None:
                        metadata.forget_blob(sha)
                    repaired = True
                else:
                    detail += " (in use now: run fsck again)"
        findings.append(Finding("corrupt-blob", path, detail, repaired))
    return findings


def _check_rows(
    layout: StoreLayout, disk: DiskScan, metadata: Metadata, repair: bool, is_alive: IsAlive
) -> list[Finding]:
    """Rows that point at nothing, and files no row describes."""
    found: list[Finding] = []

    def note(kind: FindingKind, path: Path | None, detail: str, fix: Callable[[], None]) -> None:
        if repair:
            fix()
        found.append(Finding(kind, path, detail, repair))

    rows = {row.sha256: row for row in metadata.wheels()}
    for sha, row in rows.items():
        tree, blob = layout.tree_dir(sha), layout.blob_path(sha)
        if sha not in disk.trees and sha not in disk.blobs:
            note(
                "row-without-entry",
                tree,
                "no tree and no blob",
                partial(metadata.forget_wheel, sha),
            )
            continue
        if sha not in disk.trees and (row.tree_bytes or row.cache_tags):
            note("row-without-entry", tree, "the tree is gone", partial(metadata.forget_tree, sha))
        if sha not in disk.blobs and row.blob_bytes:
            note("row-without-entry", blob, "the blob is gone", partial(metadata.forget_blob, sha))
        for tag in sorted(row.cache_tags - disk.trees.get(sha, row.cache_tags)):
            marker = layout.pyc_marker(sha, tag)
            note(
                "row-without-entry",
                marker,
                "no such marker",
                partial(metadata.forget_pyc, sha, tag),
            )
    for sha, tags in disk.trees.items():
        known = rows.get(sha)
        if known is None or not tags <= known.cache_tags or not known.tree_bytes:
            blob_bytes = disk.blobs.get(sha, 0)
            fix = partial(index_tree, metadata, layout, sha, tags, blob_bytes)
            note("entry-without-row", layout.tree_dir(sha), "tree not in the index", fix)
    for sha, size in disk.blobs.items():
        if sha not in rows and sha not in disk.trees:
            fix = partial(metadata.record_wheel, sha, "", size, 0, 0, ())
            note("entry-without-row", layout.blob_path(sha), "blob not in the index", fix)
    indexed_views = {view.key for view in metadata.views()}
    for key in sorted(indexed_views - set(disk.views)):
        fix = partial(metadata.forget_view, key)
        note("row-without-entry", layout.view_dir(key), "the view is gone", fix)
    for key in sorted(set(disk.views) - indexed_views):
        fix = partial(index_view, metadata, layout, key)
        note("entry-without-row", layout.view_dir(key), "view not in the index", fix)
    for lease in metadata.leases():
        if not is_alive(lease.pid, lease.pid_start_time):
            fix = partial(metadata.drop_lease, lease.id)
            note("dead-lease", None, f"{lease.label}: its process is gone", fix)
    return found
