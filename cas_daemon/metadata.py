"""The store's index in SQLite: sizes, last use, views, leases and roots.

The files under ``v1/`` are the truth; this database (``v1/metadata.sqlite3``) only remembers
what is expensive or impossible to read back from them: when each wheel and view was last
used, how big each tree is, which live processes hold which trees (leases), and which model
dirs must keep theirs (roots). If it is lost or corrupt,
:func:`cas_daemon.fsck.rebuild_from_disk` makes a new one from the files, and ``wheelcas fsck``
(:func:`cas_daemon.fsck.fsck`) reconciles the two; what the files hold is read by
:mod:`cas_daemon.diskscan`.

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
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
        self.touch_all(shas, () if view_key is None else (view_key,))

    def touch_all(self, shas: Iterable[str], view_keys: Iterable[str]) -> None:
        """:meth:`touch` for any number of views, in one transaction (the daemon's batches)."""
        now = self._clock()
        with self.transaction():
            self._conn.executemany(
                "UPDATE wheels SET last_used_at = ? WHERE sha256 = ?", [(now, s) for s in shas]
            )
            self._conn.executemany(
                "UPDATE views SET last_used_at = ? WHERE key = ?", [(now, k) for k in view_keys]
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
        return self._last_used("SELECT last_used_at FROM wheels WHERE sha256 = ?", sha256)

    def _last_used(self, query: str, key: str) -> float | None:
        with self._lock:
            row = self._conn.execute(query, (key,)).fetchone()
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
        return self._last_used("SELECT last_used_at FROM views WHERE key = ?", key)

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
