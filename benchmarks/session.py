"""One benchmark run's shared state: the mirror, the index, scratch space, prepared fixtures.

Fixtures are made lazily and at most once per run, untimed: a warm uv cache, a warm wheelcas
store, a locked model dir, an empty venv. The pip-installed venv is kept across runs in the
cache (keyed by the pins and the interpreter) because it does not depend on the index's port.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.index_server import IndexInfo
from benchmarks.mirror import Mirror
from benchmarks.procs import REPO_ROOT, base_python, force_rmtree, isolated_env, run, uv_binary
from benchmarks.settle import Settler

#: The R40 import line, the same in every layout measured.
R40_IMPORTS = (
    "import numpy, pandas, scipy.stats, sklearn.linear_model, requests, yaml, jinja2, pydantic"
)
#: Below this much free disk, a discarded sample is deleted at once (with the trash) instead
#: of kept until the run ends (:meth:`Session.discard`). A cold R40 sample leaves ~0.7 GB.
TRASH_FREE_MIN_BYTES = 8 << 30
#: Modules whose ``__file__`` is checked to come from the layout under test.
CHECKED_MODULES = ("numpy", "pandas", "scipy", "sklearn", "requests", "yaml", "jinja2", "pydantic")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    runs: int
    cheap_runs: int
    cache: Path
    keep_work: bool = False


@dataclass(slots=True)
class Session:
    settings: Settings
    mirror: Mirror
    index: IndexInfo
    work: Path
    log: list[str] = field(default_factory=list)
    #: name -> samples (seconds), filled by the figures; yardsticks are shared through it.
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: name -> the in-process part of each sample, where the measured process reports one.
    inner: dict[str, list[float]] = field(default_factory=dict)
    #: name -> notes for the figure's row, rewritten by its measure after each sample.
    notes: dict[str, list[str]] = field(default_factory=dict)
    #: Fixtures that are not a path (an index server's URLs, ...), by name; made once a run.
    resources: dict[str, object] = field(default_factory=dict)
    _memo: dict[str, Path] = field(default_factory=dict)
    _closers: list[Callable[[], None]] = field(default_factory=list)
    #: Waits before each sample while the disk is slow at creating files (see settle.py).
    settler: Settler = field(init=False)

    def __post_init__(self) -> None:
        self.settler = Settler(self.work / "trash" / "probes")

    # --- scratch ---------------------------------------------------------------------------

    def scratch(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{prefix}.", dir=self.work))

    def discard(self, path: Path) -> None:
        """Put a sample's files out of the way; they are deleted when the run ends.

        Not deleted at once, because the next sample would pay for it: ext4 without a journal
        (this machine's disk) skips every inode freed in the last minute or more when it
        allocates one (``recently_deleted()`` in the kernel's ``fs/ext4/ialloc.c``), so
        after the tens of thousands of unlinks of a store or a venv, creating a file cost
        200-700 us of system time instead of 30 us (benchmarks/README.md, "Deleting between
        samples"). Moved into ``trash/``, a rename, when the disk has room; deleted now when
        it has not.
        """
        if self.settings.keep_work or not path.exists():
            return
        trash = self.work / "trash"
        if shutil.disk_usage(self.work).free >= TRASH_FREE_MIN_BYTES:
            trash.mkdir(exist_ok=True)
            try:
                path.rename(trash / f"{len(list(trash.iterdir()))}-{path.name}")
            except OSError:  # another file system, say: deleted, as before
                pass
            else:
                return
        force_rmtree(trash)
        force_rmtree(path)

    def has(self, key: str) -> bool:
        return key in self._memo

    def once(self, key: str, make: Callable[[], Path]) -> Path:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def inner_sample(self, name: str, seconds: float) -> None:
        self.inner.setdefault(name, []).append(seconds)

    def on_close(self, close: Callable[[], None]) -> None:
        """Run ``close`` when the run ends (daemons, index servers: no process outlives it)."""
        self._closers.append(close)

    def close(self) -> None:
        """Run every ``on_close`` callback, last registered first; each one runs whatever
        the others raise (the first error is raised at the end)."""
        failure: BaseException | None = None
        while self._closers:
            try:
                self._closers.pop()()
            except BaseException as exc:  # the others must still run
                failure = failure or exc
        if failure is not None:
            raise failure

    # --- inputs ----------------------------------------------------------------------------

    @property
    def pins_file(self) -> Path:
        return self.mirror.pins_path

    def locked_deps(self) -> list[tuple[str, str]]:
        """(sha256, loopback URL) of every pinned wheel, in pin order."""
        return [(p.sha256, self.index.file_urls[p.filename]) for p in self.mirror.pins]

    def model_dir(self) -> Path:
        """A model dir with R40's requirements.txt and a lockfile pointing at the index."""

        def make() -> Path:
            from benchmarks import wheelcas_adapter as wc

            model = self.work / "model"
            text = self.mirror.requirements_path.read_text(encoding="utf-8")
            wc.write_model_dir(model, text, self.locked_deps())
            return model

        return self.once("model_dir", make)

    # --- venvs -----------------------------------------------------------------------------

    def new_uv_venv(self, cache: Path | None = None) -> Path:
        """An empty venv made by ``uv venv`` (untimed).

        With ``cache``, made with that uv cache, as a user's ``uv venv && uv pip sync`` would:
        uv then already knows the interpreter when it syncs. Without, uv's default cache is
        used, so a cold sync pays for everything itself.
        """
        venv = self.scratch("uv-venv")
        env = isolated_env(None if cache is None else {"UV_CACHE_DIR": str(cache)})
        run([uv_binary(), "venv", "-q", "--python", base_python(), venv], env=env)
        return venv

    def uv_sync_argv(self, venv: Path, *, compile_bytecode: bool) -> list[str | Path]:
        argv: list[str | Path] = [uv_binary(), "pip", "sync", "-q", "--python", venv / "bin/python"]
        argv += ["--index-url", self.index.simple_url]
        if compile_bytecode:
            argv.append("--compile-bytecode")
        return [*argv, self.pins_file]

    def warm_uv_cache(self) -> Path:
        """A uv cache holding every R40 wheel from this run's index (made by one sync)."""

        def make() -> Path:
            cache = self.scratch("uv-cache-warm")
            venv = self.new_uv_venv(cache)
            run(
                self.uv_sync_argv(venv, compile_bytecode=False),
                env=isolated_env({"UV_CACHE_DIR": str(cache)}),
            )
            self.discard(venv)
            return cache

        return self.once("uv_warm_cache", make)

    def empty_venv(self) -> Path:
        """A venv with nothing installed: the interpreter for the store's import figure."""

        def make() -> Path:
            venv = self.work / "empty-venv"
            run([base_python(), "-m", "venv", "--without-pip", venv], env=isolated_env())
            return venv

        return self.once("empty_venv", make)

    def pip_venv(self) -> Path:
        """R40 installed by pip from the index, every file compiled to .pyc (kept across runs)."""
        return self.once("pip_venv", self._pip_venv)

    def _pip_venv(self) -> Path:
        python = base_python()
        key = hashlib.sha256(
            f"{self.mirror.pins_digest()} {python.resolve()} {sys.version}".encode()
        ).hexdigest()
        venv = self.settings.cache / "r40" / "pip-venv"
        stamp = venv / ".wheelcas-bench-stamp"
        if stamp.exists() and stamp.read_text(encoding="utf-8") == key:
            return venv
        self.log.append(f"making the pip venv of R40 in {venv} (once)")
        if venv.exists():
            shutil.rmtree(venv)
        env = isolated_env()
        run([python, "-m", "venv", venv], env=env)
        vpy = venv / "bin" / "python"
        install: list[str | Path] = [vpy, "-m", "pip", "install", "-q", "--no-deps"]
        install += ["--require-hashes", "--index-url", self.index.simple_url]
        run([*install, "-r", self.pins_file], env=env)
        # pip compiles as it installs; compile again explicitly so that nothing is left out
        # (this machine sets PYTHONDONTWRITEBYTECODE=1, so imports would never write any).
        site = run([vpy, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env)
        run([vpy, "-m", "compileall", "-q", "-j0", site.strip()], env=env)
        stamp.write_text(key, encoding="utf-8")
        return venv


def compile_project() -> None:
    """Compile wheelcas's own packages: an installed wheelcas would have its .pyc too."""
    packages = [REPO_ROOT / p for p in ("lockgen", "cas_daemon", "loader", "benchmarks")]
    present = [p for p in packages if p.is_dir()]
    run([sys.executable, "-m", "compileall", "-q", *present], env=isolated_env())
