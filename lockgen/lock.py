"""``lock(model_dir)``: requirements.txt to ``.carton/carton.lock``, the way Carton does it.

1. Hash requirements.txt. Same hash and an entry for the target environment: done, without
   starting pip. Same hash, no entry: append one. New hash: start a new lockfile.
2. Otherwise :mod:`lockgen.resolve` resolves with pip, bundles what must be bundled, and
   publishes the new lockfile atomically.

This module is the fast path every model load goes through, so it imports only what step 1
needs; pip, staging and bundling are imported when step 2 runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lockgen.errors import RequirementsError
from lockgen.interpreters import interpreter_environment, resolve_interpreter
from lockgen.lockfile import (
    LOCKFILE_RELPATH,
    REQUIREMENTS_FILENAME,
    LockEntry,
    LockFile,
    read_lockfile,
)

TYPE_CHECKING = False  # `typing` stays off the fast path; mypy reads the branch below
if TYPE_CHECKING:
    from typing import Literal

    BundleFormat = Literal["zst", "whl"]
    LockAction = Literal["unchanged", "appended", "new"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LockResult:
    action: LockAction
    lockfile: LockFile
    entry: LockEntry
    path: Path


def lock(
    model_dir: Path | str,
    *,
    python: str | None = None,
    pip_args: Sequence[str] = (),
    bundle_format: BundleFormat = "zst",
) -> LockResult:
    """Make sure ``model_dir``'s lockfile has an entry for the ``python`` environment."""
    model_dir = Path(model_dir).absolute()
    req_bytes = read_requirements(model_dir)
    deps_hash = hashlib.sha256(req_bytes).hexdigest()
    interpreter = resolve_interpreter(python)
    environment = interpreter_environment(interpreter)
    existing = read_lockfile(model_dir)
    if existing is not None and existing.orig_deps_hash == deps_hash:
        found = existing.find_entry(environment)
        if found is not None:
            path = model_dir / LOCKFILE_RELPATH
            return LockResult(action="unchanged", lockfile=existing, entry=found, path=path)
    from lockgen.resolve import relock

    return relock(
        model_dir,
        req_bytes=req_bytes,
        interpreter=interpreter,
        environment=environment,
        pip_args=pip_args,
        bundle_format=bundle_format,
    )


def read_requirements(model_dir: Path) -> bytes:
    """requirements.txt's bytes (through a symlink); a clear error when there is none."""
    try:
        return (model_dir / REQUIREMENTS_FILENAME).read_bytes()
    except FileNotFoundError:
        if not model_dir.is_dir():
            raise RequirementsError(f"{model_dir} is not a directory (the model dir).") from None
        raise RequirementsError(
            f"{model_dir} has no {REQUIREMENTS_FILENAME}; create one listing the model's "
            "dependencies (it may be empty)."
        ) from None
    except IsADirectoryError:
        raise RequirementsError(f"{model_dir / REQUIREMENTS_FILENAME} is a directory.") from None
