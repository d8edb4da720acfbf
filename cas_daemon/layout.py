"""Where everything lives in the store. Pure path arithmetic: no I/O, no globals read here.

The layout carries its version in the path (``v1/``) so that a future layout abandons old
entries safely instead of misreading them::

    {root}/v1/
      blobs/ab/abcdef...            wheel bytes, named by their sha256 (verified before rename)
      trees/ab/abcdef.../           one published, read-only unpacked wheel (renamed into place),
                                    named by the sha256 of the bytes it was unpacked from (a
                                    compressed bundle's own: see bundle_keys.py)
          site/                     the importable root: what goes on sys.path
          pyc-cpython-311           marker: site/ holds .pyc for that interpreter's cache tag
          deferred-cpython-311      marker: its test dirs' .pyc are still to be compiled (a
                                    store that defers them; removed once they are)
      locks/ab/abcdef....lock       flock files, one per sha256, never deleted while in use
      tmp/                          staging space on the same filesystem, for atomic renames

Everything staged in ``tmp/`` for a sha256 is named ``{sha256}.*`` and only touched while that
sha256's lock is held, so a process holding the lock may delete leftovers of a crashed one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

LAYOUT_VERSION = "v1"
DEFERRED_PREFIX = "deferred-"
STORE_ENV_VAR = "WHEELCAS_HOME"
#: Dirs whose modules a store that defers test bytecode compiles only after the tree is
#: published (:func:`cas_daemon.precompile.complete_deferred`): test suites shipped inside
#: wheels, which no model imports when it loads. In R40 they are 2,122 of 4,789 modules and
#: 41 % of the source.
DEFERRED_DIR_NAMES = frozenset({"tests", "test"})


def is_bytecode(path: str) -> bool:
    """Whether ``path`` (relative to a tree, "/"-separated) is a ``__pycache__/*.pyc``."""
    parent, _, name = path.rpartition("/")
    return name.endswith(".pyc") and parent.rpartition("/")[2] == "__pycache__"


def is_deferred_dir(name: str) -> bool:
    """Whether modules in a dir of this name wait for
    :func:`cas_daemon.precompile.complete_deferred`."""
    return name in DEFERRED_DIR_NAMES


def default_store_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$WHEELCAS_HOME``, else ``$XDG_CACHE_HOME/wheelcas``, else ``~/.cache/wheelcas``."""
    env = os.environ if environ is None else environ
    if env.get(STORE_ENV_VAR):
        return Path(env[STORE_ENV_VAR]).expanduser()
    cache_home = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")) / ".cache")
    return Path(cache_home).expanduser() / "wheelcas"


@dataclass(frozen=True, slots=True)
class StoreLayout:
    root: Path
    #: ``trees_dir`` as a string ending in "/": the warm path builds 2 paths per wheel from it.
    _trees_prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_trees_prefix", f"{self.trees_dir}/")

    @property
    def base(self) -> Path:
        return self.root / LAYOUT_VERSION

    @property
    def blobs_dir(self) -> Path:
        return self.base / "blobs"

    @property
    def trees_dir(self) -> Path:
        return self.base / "trees"

    @property
    def locks_dir(self) -> Path:
        return self.base / "locks"

    @property
    def tmp_dir(self) -> Path:
        return self.base / "tmp"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256[:2] / sha256

    def tree_dir(self, sha256: str) -> Path:
        return self.trees_dir / sha256[:2] / sha256

    def site_dir(self, sha256: str) -> Path:
        """The directory that goes on ``sys.path`` for this wheel."""
        return self.tree_dir(sha256) / "site"

    def pyc_marker(self, sha256: str, cache_tag: str) -> Path:
        return self.tree_dir(sha256) / f"pyc-{cache_tag}"

    def tree_path(self, sha256: str) -> str:
        """:meth:`tree_dir` as a string, made without pathlib: a warm resolve asks it for every
        wheel, where five ``Path`` joins per call cost more than the ``stat`` that follows."""
        return f"{self._trees_prefix}{sha256[:2]}/{sha256}"

    def deferred_marker(self, sha256: str, cache_tag: str) -> Path:
        """Present while the tree's test dirs wait for their ``cache_tag`` bytecode."""
        return self.tree_dir(sha256) / f"{DEFERRED_PREFIX}{cache_tag}"

    def lock_path(self, sha256: str) -> Path:
        return self.locks_dir / sha256[:2] / f"{sha256}.lock"

    def staging_prefix(self, sha256: str) -> str:
        """Prefix of every temp name staged for ``sha256`` (see the module docstring)."""
        return f"{sha256}."

    def all_dirs(self) -> tuple[Path, ...]:
        return (self.blobs_dir, self.trees_dir, self.locks_dir, self.tmp_dir)

    @property
    def metadata_db(self) -> Path:
        """The SQLite index of the store (usage times, views, leases, roots): see metadata.py."""
        return self.base / "metadata.sqlite3"

    @property
    def daemon_lock(self) -> Path:
        """Held (flock) by the one daemon serving this store, for its whole life."""
        return self.base / "daemon.lock"

    def view_lock_path(self, key: str) -> Path:
        """The flock of one view: held by whoever builds or removes ``views/<key>``."""
        return self.locks_dir / "views" / f"{key}.lock"

    @property
    def views_dir(self) -> Path:
        """Merged views of several trees, one per lock entry and interpreter: see views.py."""
        return self.base / "views"

    def view_dir(self, key: str) -> Path:
        """One view, renamed into place whole: ``site/`` and ``manifest.json``."""
        return self.views_dir / key

    def view_site_dir(self, key: str) -> Path:
        """The directory of a view that goes on ``sys.path``."""
        return self.view_dir(key) / "site"

    def view_staging_prefix(self, key: str) -> str:
        """Prefix of every temp name staged for view ``key`` (touched under its view lock)."""
        return f"view-{key}."

    @property
    def dedupe_dir(self) -> Path:
        """The content index of tree files: hard links named by sha256, see dedupe.py."""
        return self.base / "dedupe"

    def dedupe_path(self, name: str) -> Path:
        """The index entry ``name`` (a content sha256, ``.x`` appended for executables)."""
        return self.dedupe_dir / name[:2] / name

    @property
    def models_dir(self) -> Path:
        """Packed models, unpacked once each, keyed by the sha256 of their ``MANIFEST``."""
        return self.base / "models"

    def model_dir(self, manifest_hash: str) -> Path:
        """One unpacked model (``carton.toml``, ``model/``, ...), read-only, renamed into place."""
        return self.models_dir / manifest_hash

    def model_lock_path(self, manifest_hash: str) -> Path:
        """The flock held while a packed model is unpacked into :meth:`model_dir`."""
        return self.locks_dir / "models" / f"{manifest_hash}.lock"
