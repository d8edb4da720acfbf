"""The R40 wheel mirror: the reference requirements resolved once, their wheels kept on disk.

Layout, outside the repository (``~/.cache/wheelcas-bench/r40/`` by default)::

    wheels/            the downloaded wheels, one per pin
    pins.txt           ``name==version --hash=sha256:...``, one line per wheel (uv/pip input)
    requirements.txt   the requested names (the reference list less what had no wheel)
    mirror.json        the manifest, written last: its presence means the mirror is complete

The resolution is done once by pip (``pip download --only-binary :all:``) with this machine's
own pip configuration, for the interpreter running the benchmarks; later runs only check that
every file is still there with its recorded size.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from benchmarks.procs import CommandFailed, run

REFERENCE_REQUIREMENTS = Path("/work/shared/reference/reference-requirements.txt")
DEFAULT_CACHE = Path.home() / ".cache" / "wheelcas-bench"
MANIFEST_VERSION = 1
_REQ_NAME = re.compile(r"[\s\[<>=!~;@]")
_NO_DIST = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pin:
    name: str
    version: str
    filename: str
    sha256: str
    size: int

    def requirement_line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mirror:
    root: Path
    pins: tuple[Pin, ...]
    requested: tuple[str, ...]
    dropped: tuple[str, ...]
    python_version: str

    @property
    def wheels_dir(self) -> Path:
        return self.root / "wheels"

    @property
    def pins_path(self) -> Path:
        return self.root / "pins.txt"

    @property
    def requirements_path(self) -> Path:
        return self.root / "requirements.txt"

    @property
    def total_bytes(self) -> int:
        return sum(p.size for p in self.pins)

    def pins_digest(self) -> str:
        """Identifies this set of wheels (used to key anything built from them)."""
        return hashlib.sha256(self.pins_path.read_bytes()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _requested_names(requirements: Path) -> list[str]:
    lines = requirements.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _download(requested: Sequence[str], dest: Path, log: list[str]) -> list[str]:
    """``pip download`` the wheels; drop requested names pip finds no wheel for.

    Returns the names dropped. A transitive dependency without a wheel is an error: dropping it
    would leave a broken set.
    """
    remaining = list(requested)
    dropped: list[str] = []
    while remaining:
        req_file = dest.parent / "requested.txt"
        req_file.write_text("\n".join(remaining) + "\n", encoding="utf-8")
        argv = [sys.executable, "-m", "pip", "download", "--only-binary", ":all:", "-q"]
        try:
            run([*argv, "-d", dest, "-r", req_file])
            return dropped
        except CommandFailed as exc:
            match = _NO_DIST.search(str(exc))
            wanted = {canonicalize_name(_REQ_NAME.split(r, 1)[0]): r for r in remaining}
            name = canonicalize_name(match.group(1)) if match else None
            if name is None or name not in wanted:
                raise
            log.append(f"no wheel for {wanted[name]!r}: dropped from R40")
            remaining.remove(wanted[name])
            dropped.append(wanted[name])
    return dropped


def build_mirror(cache: Path, requirements: Path, log: list[str]) -> Mirror:
    """Resolve and download R40 into ``cache/r40`` (atomically: all of it or nothing)."""
    root = cache / "r40"
    root.parent.mkdir(parents=True, exist_ok=True)
    requested = _requested_names(requirements)
    staging = Path(tempfile.mkdtemp(prefix="r40-staging.", dir=root.parent))
    try:
        wheels = staging / "wheels"
        wheels.mkdir()
        dropped = _download(requested, wheels, log)
        pins: list[Pin] = []
        for wheel in sorted(wheels.iterdir()):
            if wheel.suffix != ".whl":
                log.append(f"not a wheel, left out: {wheel.name}")
                wheel.unlink()
                continue
            name, version, _build, _tags = parse_wheel_filename(wheel.name)
            pins.append(
                Pin(
                    name=str(name),
                    version=str(version),
                    filename=wheel.name,
                    sha256=_file_sha256(wheel),
                    size=wheel.stat().st_size,
                )
            )
        kept = tuple(r for r in requested if r not in dropped)
        mirror = Mirror(
            root=root,
            pins=tuple(pins),
            requested=kept,
            dropped=tuple(dropped),
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        )
        (staging / "pins.txt").write_text(
            "".join(p.requirement_line() + "\n" for p in pins), encoding="utf-8"
        )
        (staging / "requirements.txt").write_text("".join(r + "\n" for r in kept), encoding="utf-8")
        (staging / "requested.txt").unlink(missing_ok=True)
        _write_manifest(staging, mirror)
        if root.exists():
            shutil.rmtree(root)
        staging.replace(root)
        return mirror
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _write_manifest(directory: Path, mirror: Mirror) -> None:
    document = {
        "version": MANIFEST_VERSION,
        "python_version": mirror.python_version,
        "requested": list(mirror.requested),
        "dropped": list(mirror.dropped),
        "pins": [asdict(p) for p in mirror.pins],
    }
    (directory / "mirror.json").write_text(json.dumps(document, indent=1), encoding="utf-8")


def load_mirror(cache: Path) -> Mirror | None:
    """The complete mirror in ``cache``, or None when it is missing, partial or stale."""
    root = cache / "r40"
    try:
        document = json.loads((root / "mirror.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if document.get("version") != MANIFEST_VERSION:
        return None
    if document.get("python_version") != python_version:
        return None
    pins = tuple(Pin(**raw) for raw in document["pins"])
    for pin in pins:
        path = root / "wheels" / pin.filename
        if not path.is_file() or path.stat().st_size != pin.size:
            return None
    return Mirror(
        root=root,
        pins=pins,
        requested=tuple(document["requested"]),
        dropped=tuple(document["dropped"]),
        python_version=python_version,
    )


def ensure_mirror(cache: Path, requirements: Path, log: list[str]) -> Mirror:
    """The mirror, built on first use (downloads about 94 MB once)."""
    mirror = load_mirror(cache)
    if mirror is not None:
        return mirror
    log.append(f"building the R40 mirror in {cache / 'r40'} (once; about 94 MB)")
    return build_mirror(cache, requirements, log)
