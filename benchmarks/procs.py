"""Subprocesses for the benchmarks: isolated environments, timed runs, tool paths, clean-up.

Every yardstick runs isolated from this machine's package-tool configuration: no ``PIP_*`` or
``UV_*`` variable is inherited, ``PIP_CONFIG_FILE=/dev/null`` and ``UV_NO_CONFIG=1`` switch the
config files off, and each command names the loopback index explicitly.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables that would let the host's configuration leak into a measured run.
_DROPPED_PREFIXES = ("PIP_", "UV_", "PYTHON", "VIRTUAL_ENV", "CONDA", "WHEELCAS_")


class CommandFailed(RuntimeError):
    """A benchmark subprocess exited non-zero; the message carries the tail of its output."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        tail = output[-3000:]
        super().__init__(f"{' '.join(argv)} exited {returncode}:\n{tail}")
        self.returncode = returncode


def isolated_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent environment without pip/uv/Python configuration, plus ``extra``.

    ``PYTHONDONTWRITEBYTECODE=1`` is kept on purpose: this machine sets it everywhere, and it
    guarantees that no measured process writes ``.pyc`` files behind our back.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["UV_NO_CONFIG"] = "1"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run ``argv`` to completion; return stdout; raise :class:`CommandFailed` on failure."""
    args = [str(a) for a in argv]
    proc = subprocess.run(
        args,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, proc.stdout + proc.stderr)
    return proc.stdout


@dataclass(frozen=True, slots=True)
class Timed:
    seconds: float
    stdout: str


def timed_run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Timed:
    """Wall time of one whole process, from spawn to exit (``perf_counter``)."""
    start = time.perf_counter()
    out = run(argv, env=env, cwd=cwd)
    return Timed(time.perf_counter() - start, out)


def uv_binary() -> Path:
    """The uv next to this interpreter (installed by ``.[bench]``), else the one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return beside
    found = shutil.which("uv")
    if found is None:
        raise RuntimeError("uv not found: install the bench extra (`pip install -e '.[bench]'`)")
    return Path(found)


def base_python() -> Path:
    """The interpreter this venv was made from: every measured venv is made from it too."""
    return Path(getattr(sys, "_base_executable", sys.executable))


def force_rmtree(path: Path) -> None:
    """Delete a tree even where the store made directories read-only."""
    if not path.exists():
        return
    for dirpath, _dirnames, _files in os.walk(path):
        mode = os.lstat(dirpath).st_mode
        if not mode & stat.S_IWUSR:
            Path(dirpath).chmod(mode | stat.S_IWUSR | stat.S_IXUSR)
    shutil.rmtree(path)


def tool_version(argv: Sequence[str | Path]) -> str:
    try:
        return run(argv).strip().splitlines()[0]
    except (CommandFailed, OSError, IndexError):
        return "unknown"
