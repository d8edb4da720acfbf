"""Three models that share most of R40, for the store's disk usage figure (``store_bytes``).

* ``r40``: R40 itself (40 wheels).
* ``r40-pandas-3.0.6``: R40 with an older pandas pinned (``pandas==3.0.6``); every other
  wheel as R40 pins it.
* ``r40-lite+matplotlib``: R40 without ``tokenizers``, ``huggingface-hub`` and
  ``safetensors`` (so without what only they need), plus ``matplotlib`` (and what it needs).

The two variants are resolved once, like the R40 mirror, by ``pip download --only-binary
:all:`` with this machine's own pip configuration, with R40's pins as constraints (so they
share R40's wheels wherever they can). The wheels R40 lacks are kept in
``~/.cache/wheelcas-bench/r40-variants/wheels/``; ``all/`` holds hard links to every wheel of
the three models (R40's and the extra ones), the directory the figure's loopback index
serves; ``variants.json`` (written last, keyed by R40's pins) names each model's wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from benchmarks.mirror import Mirror, Pin
from benchmarks.procs import run

MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class VariantSpec:
    name: str
    drop: tuple[str, ...] = ()  # requested names left out of R40's
    add: tuple[str, ...] = ()  # requirements added
    unpin: tuple[str, ...] = ()  # R40 pins not used as constraints


SPECS: tuple[VariantSpec, ...] = (
    VariantSpec(name="r40"),
    VariantSpec(name="r40-pandas-3.0.6", add=("pandas==3.0.6",), unpin=("pandas",)),
    VariantSpec(
        name="r40-lite+matplotlib",
        drop=("tokenizers", "huggingface-hub", "safetensors"),
        add=("matplotlib",),
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    name: str
    requested: tuple[str, ...]
    pins: tuple[Pin, ...]

    def requirements_text(self) -> str:
        return "".join(r + "\n" for r in self.requested)

    def pins_text(self) -> str:
        return "".join(p.requirement_line() + "\n" for p in self.pins)


@dataclass(frozen=True, slots=True, kw_only=True)
class Variants:
    root: Path
    models: tuple[Model, ...]

    @property
    def serve_dir(self) -> Path:
        """Every wheel of every model (hard links): what the figure's index serves."""
        return self.root / "all"

    def extra_wheels(self, mirror: Mirror) -> list[str]:
        r40 = {p.filename for p in mirror.pins}
        return sorted({p.filename for m in self.models for p in m.pins} - r40)


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _key(mirror: Mirror) -> str:
    specs = json.dumps([asdict(s) for s in SPECS], sort_keys=True)
    return hashlib.sha256(f"{mirror.pins_digest()} {specs}".encode()).hexdigest()


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _resolve(spec: VariantSpec, mirror: Mirror, staging: Path) -> Model:
    """``pip download`` the variant into ``staging``; its wheels R40 lacks go to ``wheels/``."""
    if not (spec.drop or spec.add or spec.unpin):
        return Model(name=spec.name, requested=mirror.requested, pins=mirror.pins)
    dropped = {canonicalize_name(n) for n in spec.drop}
    unpinned = {canonicalize_name(n) for n in spec.unpin}
    requested = [r for r in mirror.requested if canonicalize_name(r) not in dropped]
    requested += list(spec.add)
    constraints = [
        f"{p.name}=={p.version}" for p in mirror.pins if canonicalize_name(p.name) not in unpinned
    ]
    work = staging / f"resolve-{spec.name}"
    downloads = work / "wheels"
    downloads.mkdir(parents=True)
    (work / "requirements.txt").write_text("".join(r + "\n" for r in requested), encoding="utf-8")
    (work / "constraints.txt").write_text("".join(c + "\n" for c in constraints), encoding="utf-8")
    argv = [sys.executable, "-m", "pip", "download", "--only-binary", ":all:", "-q"]
    run([*argv, "-d", downloads, "-r", work / "requirements.txt", "-c", work / "constraints.txt"])
    r40 = {p.filename: p for p in mirror.pins}
    pins: list[Pin] = []
    for wheel in sorted(downloads.glob("*.whl")):
        sha = _sha256(wheel)
        known = r40.get(wheel.name)
        if known is not None:
            if known.sha256 != sha:
                raise RuntimeError(f"{wheel.name}: not the bytes R40 pinned ({sha})")
            pins.append(known)
            continue
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        kept = staging / "wheels" / wheel.name
        if not kept.exists():
            shutil.move(wheel, kept)
        size = kept.stat().st_size
        pin = Pin(name=str(name), version=str(version), filename=wheel.name, sha256=sha, size=size)
        pins.append(pin)
    shutil.rmtree(work)
    return Model(name=spec.name, requested=tuple(requested), pins=tuple(pins))


def _write(root: Path, key: str, models: tuple[Model, ...]) -> None:
    document = {
        "version": MANIFEST_VERSION,
        "key": key,
        "models": [
            {"name": m.name, "requested": list(m.requested), "pins": [asdict(p) for p in m.pins]}
            for m in models
        ],
    }
    (root / "variants.json").write_text(json.dumps(document, indent=1), encoding="utf-8")


def load_variants(cache: Path, mirror: Mirror) -> Variants | None:
    """The complete variants in ``cache`` for this mirror, or None (missing, partial, stale)."""
    root = cache / "r40-variants"
    try:
        document = json.loads((root / "variants.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if document.get("version") != MANIFEST_VERSION or document.get("key") != _key(mirror):
        return None
    models = tuple(
        Model(
            name=raw["name"],
            requested=tuple(raw["requested"]),
            pins=tuple(Pin(**p) for p in raw["pins"]),
        )
        for raw in document["models"]
    )
    variants = Variants(root=root, models=models)
    for model in models:
        for pin in model.pins:
            path = variants.serve_dir / pin.filename
            if not path.is_file() or path.stat().st_size != pin.size:
                return None
    return variants


def ensure_variants(cache: Path, mirror: Mirror, log: list[str]) -> Variants:
    """The three models, resolved on first use (downloads the few wheels R40 lacks, once)."""
    found = load_variants(cache, mirror)
    if found is not None:
        return found
    root = cache / "r40-variants"
    log.append(f"resolving the store_bytes models into {root} (once)")
    staging = Path(tempfile.mkdtemp(prefix="r40-variants-staging.", dir=cache))
    try:
        (staging / "wheels").mkdir()
        models = tuple(_resolve(spec, mirror, staging) for spec in SPECS)
        serve = staging / "all"
        serve.mkdir()
        for pin in mirror.pins:
            _link(mirror.wheels_dir / pin.filename, serve / pin.filename)
        for extra in (staging / "wheels").iterdir():
            _link(extra, serve / extra.name)
        _write(staging, _key(mirror), models)
        if root.exists():
            shutil.rmtree(root)
        staging.replace(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    variants = load_variants(cache, mirror)
    if variants is None:
        raise RuntimeError(f"the variants just made in {root} do not load")
    return variants
