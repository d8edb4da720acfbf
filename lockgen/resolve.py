"""Resolve requirements.txt with pip, bundle what must be bundled, publish atomically.

Step 2 of :func:`lockgen.lock.lock`:

1. Resolve with pip's installation report, run by the *target* interpreter.
2. Classify (see :mod:`lockgen.classify`); copy or build what is bundled into a staging dir.
3. Publish: move staged bundles into ``.carton/bundled_wheels/``, replace the lockfile in one
   rename, then prune bundles no entry references.

A failure before step 3 leaves the model dir exactly as it was. Concurrent calls on one
model dir are serialized by an flock on the directory itself (no lock file is left behind).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lockgen.classify import (
    Disposition,
    disposition,
    index_urls_in_args,
    index_urls_in_requirements,
    kept_hosts,
    strip_credentials,
    url_host,
)
from lockgen.errors import BundleError, RequirementsError
from lockgen.lock import LockResult, read_requirements
from lockgen.lockfile import (
    BUNDLED_WHEELS_RELDIR,
    LOCKFILE_RELPATH,
    REQUIREMENTS_FILENAME,
    LockedDep,
    LockEntry,
    LockFile,
    Sha256,
    entry_markers,
    read_lockfile,
    referenced_bundles,
    sha256_hex,
    write_lockfile,
)
from lockgen.pip_report import (
    ResolvedItem,
    configured_index_urls,
    file_url_path,
    resolve_requirements,
    run_pip,
)

if TYPE_CHECKING:
    from lockgen.lock import BundleFormat, LockAction

log = logging.getLogger("wheelcas.lock")

_SHA_DIR = re.compile(r"[0-9a-f]{64}")


def relock(
    model_dir: Path,
    *,
    req_bytes: bytes,
    interpreter: str,
    environment: Mapping[str, str],
    pip_args: Sequence[str],
    bundle_format: BundleFormat,
) -> LockResult:
    """Add an entry for ``environment`` (or start a new lockfile), under the model dir's flock."""
    deps_hash = hashlib.sha256(req_bytes).hexdigest()
    requirements = model_dir / REQUIREMENTS_FILENAME
    path = model_dir / LOCKFILE_RELPATH
    with _exclusive(model_dir):
        # Another process may have locked while we waited for the flock.
        existing = read_lockfile(model_dir)
        base = LockFile(orig_deps_hash=deps_hash)
        action: LockAction = "new"
        if existing is not None and existing.orig_deps_hash == deps_hash:
            found = existing.find_entry(environment)
            if found is not None:
                return LockResult(action="unchanged", lockfile=existing, entry=found, path=path)
            base, action = existing, "appended"
        log.info("resolving %s with %s", requirements, interpreter)
        with _staging(model_dir) as staging:
            report = resolve_requirements(
                interpreter, requirements, cwd=model_dir, pip_args=pip_args
            )
            if read_requirements(model_dir) != req_bytes:
                raise RequirementsError(
                    f"{requirements} changed while it was being locked; run the lock again."
                )
            deps = _lock_items(
                report.items,
                interpreter=interpreter,
                model_dir=model_dir,
                staging=staging,
                pip_args=pip_args,
                requirements_text=req_bytes.decode("utf-8", "replace"),
                bundle_format=bundle_format,
            )
            entry = LockEntry(markers=entry_markers(report.environment), locked_deps=deps)
            lockfile = base.with_entry(entry)
            _publish(model_dir, staging, lockfile)
    log.info("%s %s: %d locked wheels", action, path, len(deps))
    return LockResult(action=action, lockfile=lockfile, entry=entry, path=path)


@contextlib.contextmanager
def _exclusive(model_dir: Path) -> Iterator[None]:
    fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staging(model_dir: Path) -> Iterator[Path]:
    """A scratch dir inside ``.carton`` (same filesystem: publishing is a rename).

    Only used under the model dir's flock (:func:`_exclusive`), so any ``.staging-*`` dir
    found there belongs to a run that was killed (SIGKILL, or the daemon stopping a re-lock
    that ignored SIGTERM): a live run would hold the flock. Those are removed first.
    """
    carton_dir = model_dir / ".carton"
    created = not carton_dir.exists()
    carton_dir.mkdir(exist_ok=True)
    for stale in carton_dir.glob(".staging-*"):
        if stale.is_dir() and not stale.is_symlink():
            log.info("removing %s, left by a lock that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=carton_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(carton_dir.iterdir()):
            carton_dir.rmdir()


def _lock_items(
    items: Sequence[ResolvedItem],
    *,
    interpreter: str,
    model_dir: Path,
    staging: Path,
    pip_args: Sequence[str],
    requirements_text: str,
    bundle_format: BundleFormat,
) -> tuple[LockedDep, ...]:
    hosts = _kept_hosts(items, interpreter, model_dir, pip_args, requirements_text)
    plan = [(item, disposition(item, hosts)) for item in items]
    to_build = [item for item, d in plan if d is Disposition.BUILD]
    built = _build_wheels(to_build, interpreter, model_dir, staging, pip_args) if to_build else {}
    fetched = _obtain_wheels(
        [item for item, d in plan if d is Disposition.BUNDLE], interpreter, model_dir, staging
    )
    deps: list[LockedDep] = []
    for item, how in plan:
        if how is Disposition.URL:
            deps.append(_url_dep(item))
            continue
        wheel = built[item.name] if how is Disposition.BUILD else fetched[item.url]
        deps.append(_stage_bundle(wheel, model_dir, staging, bundle_format))
    return tuple(deps)


def _kept_hosts(
    items: Sequence[ResolvedItem],
    interpreter: str,
    model_dir: Path,
    pip_args: Sequence[str],
    requirements_text: str,
) -> frozenset[str]:
    explicit = index_urls_in_args(pip_args) + index_urls_in_requirements(requirements_text)
    hosts = kept_hosts(explicit)
    # Reading pip's configuration costs a pip start-up: only pay it when it can matter.
    undecided = [i for i in items if i.is_wheel and url_host(i.url) not in (None, *hosts)]
    if undecided:
        hosts = kept_hosts([*explicit, *configured_index_urls(interpreter, cwd=model_dir)])
    return hosts


def _url_dep(item: ResolvedItem) -> LockedDep:
    if item.sha256 is None:
        raise BundleError(
            f"the index gave no sha256 for {item.url}; a lockfile needs one. Use an index "
            "that publishes hashes (PEP 503 #sha256= fragments)."
        )
    url = strip_credentials(item.url)
    if url != item.url:
        log.warning("removed credentials from %s before writing it to the lockfile", url)
    return LockedDep(sha256=item.sha256, url=url)


def _file_sha256(path: Path) -> Sha256:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return sha256_hex(digest.hexdigest())


def _obtain_wheels(
    items: Sequence[ResolvedItem], interpreter: str, model_dir: Path, staging: Path
) -> dict[str, Path]:
    """Local copies of wheels to bundle, keyed by URL, each checked against pip's sha256."""
    incoming = staging / "incoming"
    incoming.mkdir()
    found: dict[str, Path] = {}
    remote = [i for i in items if urllib.parse.urlsplit(i.url).scheme != "file"]
    if remote:
        # pip downloads them, so the user's certificates, proxies and credentials apply.
        run_pip(
            interpreter,
            ["download", "--no-deps", "--quiet", "--dest", str(incoming)] + [i.url for i in remote],
            cwd=model_dir,
            action="downloading wheels to bundle",
        )
    for item in items:
        local = incoming / item.filename if item in remote else file_url_path(item.url)
        if not local.is_file():
            raise BundleError(f"{item.url}: pip reported this wheel but it is not readable.")
        actual = _file_sha256(local)
        if item.sha256 is not None and actual != item.sha256:
            raise BundleError(
                f"{item.url}: sha256 is {actual}, pip's report says {item.sha256}. The file "
                "changed during locking or is corrupt; lock again."
            )
        found[item.url] = local
    return found


def _build_wheels(
    items: Sequence[ResolvedItem],
    interpreter: str,
    model_dir: Path,
    staging: Path,
    pip_args: Sequence[str],
) -> dict[str, Path]:
    """Build every non-wheel with ``pip wheel --no-deps``; result keyed by the item's name."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    out = staging / "built"
    out.mkdir()
    log.info("building %d wheels: %s", len(items), ", ".join(i.name for i in items))
    run_pip(
        interpreter,
        ["wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), *pip_args]
        + [i.build_requirement for i in items],
        cwd=model_dir,
        action="building wheels with `pip wheel`",
    )
    by_name = {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in out.glob("*.whl")}
    built: dict[str, Path] = {}
    for item in items:
        wheel = by_name.get(canonicalize_name(item.name))
        if wheel is None:
            raise BundleError(f"`pip wheel` built no wheel for {item.name} ({item.url}).")
        built[item.name] = wheel
    return built


def _stage_bundle(
    wheel: Path, model_dir: Path, staging: Path, bundle_format: BundleFormat
) -> LockedDep:
    from lockgen import bundle  # zstandard is only needed when a bundle is written

    sha = _file_sha256(wheel)
    name = wheel.name + (bundle.BUNDLE_SUFFIX if bundle_format == "zst" else "")
    relpath = f"{BUNDLED_WHEELS_RELDIR}/{sha}/{name}"
    if not (model_dir / relpath).is_file():
        target = staging / "bundles" / sha / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if bundle_format == "zst":
            bundle.write_bundle(wheel, target)
        else:
            shutil.copyfile(wheel, target)
    return LockedDep(sha256=sha, bundled_whl_path=relpath)


def _publish(model_dir: Path, staging: Path, lockfile: LockFile) -> None:
    """Bundles first, then the lockfile in one rename, then prune what nothing references."""
    bundles_dir = model_dir / BUNDLED_WHEELS_RELDIR
    staged = staging / "bundles"
    if staged.is_dir():
        for sha_dir in staged.iterdir():
            final = bundles_dir / sha_dir.name
            final.mkdir(parents=True, exist_ok=True)
            for file in sha_dir.iterdir():
                file.replace(final / file.name)
    write_lockfile(model_dir, lockfile)
    keep = {Path(p).parts[2] for p in referenced_bundles(lockfile) if len(Path(p).parts) > 3}
    if bundles_dir.is_dir():
        for sha_dir in bundles_dir.iterdir():
            if _SHA_DIR.fullmatch(sha_dir.name) and sha_dir.name not in keep:
                shutil.rmtree(sha_dir, ignore_errors=True)
