"""Safe extraction of a ``.whl`` or a bundle: the one place that writes unpacked wheel files.

Everything the archive declares (names, kinds, sizes, member count) is checked against the
rules and the limits before a byte is written; then each member is written in one pass that
counts and hashes it, so a member that inflates past its declared size is stopped within one
chunk and RECORD is checked without reading anything twice.

Zip members are inflated here, from the offsets in the central directory, rather than by
``zipfile``'s reader: that keeps the "never more bytes than declared" check ours (``zipfile``
silently truncates at the declared size instead) and skips its CRC, which adds nothing to a
sha256 check against the lock or RECORD.

Synchronous on purpose: the store runs it in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, cast

from cas_daemon.errors import RecordMismatch, UnsafeWheelError, WheelTooLarge
from lockgen.bundle import CorruptBundle, is_bundle, open_bundle
from lockgen.record import Hasher, RecordVerifier, record_path_of, summarize_problems

try:  # Inflates R40's 322 MB in 0.6 CPU-s where the stdlib's zlib takes 1.0 (docs/design.md).
    from zlib_ng import zlib_ng as _inflate_lib
except ImportError:  # no wheel of it for this platform: the stdlib's zlib does the same job
    _inflate_lib = zlib  # type: ignore[misc]
#: Which library inflates wheel members here (for diagnostics and tests).
INFLATE_LIBRARY = _inflate_lib.__name__
# zlib_ng's stub types its error class as an instance.
_INFLATE_ERRORS: tuple[type[Exception], ...] = (
    zlib.error,
    cast(type[Exception], _inflate_lib.error),
)

CHUNK = 1 << 20
MAX_RECORD_BYTES = 64 << 20  # RECORD is held in memory to be parsed
_ROOT_SCHEMES = ("purelib", "platlib")  # .data schemes that belong on sys.path itself
_DRIVE = re.compile(r"[A-Za-z]:")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (skipped fields), name and extra lengths
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

Kind = Literal["file", "dir", "symlink", "other"]
ChunkSource = Callable[["PlannedFile"], Iterable[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpackLimits:
    max_total_bytes: int = 16 * 2**30
    max_members: int = 500_000
    max_member_bytes: int = 8 * 2**30


@dataclass(frozen=True, slots=True)
class UnpackResult:
    files: int
    bytes: int
    dist_info: str  # the ``.dist-info`` directory's name
    #: sha256 (hex) of the bytes written, by ``dest``, for files of at least the caller's
    #: ``digest_min_size``: what dedupe would otherwise read back and hash again.
    digests: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemberSpec:
    """What an archive declares about one member, whatever the archive's format."""

    name: str
    size: int
    kind: Kind
    executable: bool


@dataclass(frozen=True, slots=True)
class PlannedFile:
    name: str  # as in the archive and in RECORD
    dest: str  # relative to the target, after the .data remapping
    size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class UnpackPlan:
    dist_info: str
    record: str  # RECORD's member name
    files: tuple[PlannedFile, ...]  # RECORD first, when there is one


def member_name_problem(name: str) -> str | None:
    """Why ``name`` may not be written under a target directory, or None if it may."""
    if not name.rstrip("/"):
        return "has an empty name"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    parts = name.removesuffix("/").split("/")  # a trailing "/" marks a directory entry
    if ".." in parts:
        return "has a '..' segment"
    if "" in parts or "." in parts:
        return "has an empty or '.' segment"
    return None


def zip_member_spec(info: zipfile.ZipInfo) -> MemberSpec:
    mode = info.external_attr >> 16  # unix st_mode; 0 when the zip was made elsewhere
    file_type = stat.S_IFMT(mode)
    kind: Kind = "other"
    if info.is_dir() or file_type == stat.S_IFDIR:
        kind = "dir"
    elif file_type == stat.S_IFLNK:
        kind = "symlink"
    elif file_type in (0, stat.S_IFREG):
        kind = "file"
    return MemberSpec(info.filename, info.file_size, kind, bool(mode & 0o111))


def bundle_member_spec(name: str, size: int, mode: int) -> MemberSpec:
    # A bundle holds regular files only: a directory in one is as wrong as a device.
    kind: Kind = "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "other"
    return MemberSpec(name, size, kind, bool(mode & 0o111))


def data_scheme_dest(name: str, data_dir: str) -> str:
    """Where ``name`` lands: ``{data_dir}/purelib/x`` and ``.../platlib/x`` go to ``x``."""
    for scheme in _ROOT_SCHEMES:
        prefix = f"{data_dir}/{scheme}/"
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def find_dist_info(names: Iterable[str]) -> list[str]:
    """The distinct top-level ``*.dist-info`` directories among member names."""
    found = {n.split("/", 1)[0] for n in names if "/" in n}
    return sorted(d for d in found if d.endswith(".dist-info"))


def plan_unpack(specs: Sequence[MemberSpec], limits: UnpackLimits, source: str) -> UnpackPlan:
    """Check every declared member against the rules and limits; say where each file goes."""
    if len(specs) > limits.max_members:
        raise WheelTooLarge(source, f"the member count ({len(specs)})", limits.max_members)
    for spec in specs:
        problem = member_name_problem(spec.name)
        if spec.kind == "symlink":
            problem = problem or "is a symbolic link"
        elif spec.kind == "other":
            problem = problem or "is not a regular file"
        if problem:
            raise UnsafeWheelError(source, spec.name, problem)
    files = [s for s in specs if s.kind == "file"]
    dist_infos = find_dist_info(s.name for s in files)
    if len(dist_infos) != 1:
        what = ", ".join(dist_infos) or "none"
        raise UnsafeWheelError(source, "*.dist-info/", f"must exist exactly once (found {what})")
    record = record_path_of(dist_infos[0])
    _check_sizes(files, limits, source, record)
    data_dir = dist_infos[0].removesuffix(".dist-info") + ".data"
    planned = [
        PlannedFile(s.name, data_scheme_dest(s.name, data_dir), s.size, s.executable) for s in files
    ]
    _check_destinations(planned, [s.name.rstrip("/") for s in specs if s.kind == "dir"], source)
    ordered = sorted(planned, key=lambda f: f.name != record)  # stable: RECORD first
    return UnpackPlan(dist_infos[0], record, tuple(ordered))


def _check_sizes(
    files: Sequence[MemberSpec], limits: UnpackLimits, source: str, record: str
) -> None:
    total = 0
    for spec in files:
        limit = MAX_RECORD_BYTES if spec.name == record else limits.max_member_bytes
        if spec.size > limit:
            raise WheelTooLarge(source, f"member {spec.name!r} ({spec.size} bytes)", limit)
        total += spec.size
    if total > limits.max_total_bytes:
        raise WheelTooLarge(source, f"the unpacked size ({total} bytes)", limits.max_total_bytes)


def _check_destinations(files: Sequence[PlannedFile], dirs: Sequence[str], source: str) -> None:
    """No two files on one path, and no path both a file and a directory."""
    taken: dict[str, str] = {}
    parents = set(dirs)
    for f in files:
        if f.dest in taken:
            raise UnsafeWheelError(source, f.name, f"lands on the same path as {taken[f.dest]!r}")
        taken[f.dest] = f.name
        parts = f.dest.split("/")
        parents.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for dest in parents.intersection(taken):
        raise UnsafeWheelError(source, taken[dest], "is both a file and a directory")


def zip_storage_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member's bytes cannot be read here (wheels use only stored and deflate)."""
    if info.flag_bits & 0x1:
        return "is encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"uses compression method {info.compress_type}, which wheels do not use"
    return None


def unpack_wheel(
    source: Path,
    target: Path,
    *,
    limits: UnpackLimits = UnpackLimits(),  # frozen, so one shared default is safe
    verify_record: bool = True,
    display_name: str | None = None,
    digest_min_size: int | None = None,
) -> UnpackResult:
    """Unpack the wheel or bundle ``source`` into the new directory ``target``.

    ``source`` is told apart by content. A bundle is always checked against its RECORD (the
    lock's sha256 is of the original ``.whl`` and cannot vouch for it); a ``.whl`` whose
    sha256 the caller already checked may skip that with ``verify_record=False``. On any
    failure ``target`` is removed again, so nothing is left behind. ``display_name`` names
    the source in errors (a URL, a path in the model dir) instead of a staging path.
    With ``digest_min_size``, the sha256 of every file of at least that many bytes is
    computed as it is written (:attr:`UnpackResult.digests`), for
    :func:`cas_daemon.dedupe.dedupe_tree`: the bytes are in memory here anyway.
    """
    display = display_name or str(source)
    bundled = is_bundle(source)
    target.mkdir(parents=True)  # FileExistsError if it exists: never mix with other files
    try:
        if bundled:
            return _unpack_bundle(source, target, limits, display, digest_min_size)
        return _unpack_zip(source, target, limits, verify_record, display, digest_min_size)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def _unpack_zip(
    source: Path,
    target: Path,
    limits: UnpackLimits,
    verify: bool,
    display: str,
    digest_min_size: int | None,
) -> UnpackResult:
    with open(source, "rb") as raw:
        try:
            with zipfile.ZipFile(raw) as zf:  # only for its central directory
                infos = zf.infolist()
        except (zipfile.BadZipFile, ValueError) as exc:
            raise UnsafeWheelError(display, "(archive)", f"is unreadable ({exc})") from exc
        plan = plan_unpack([zip_member_spec(i) for i in infos], limits, display)
        by_name = {i.filename: i for i in infos}
        for f in plan.files:
            problem = zip_storage_problem(by_name[f.name])
            if problem:
                raise UnsafeWheelError(display, f.name, problem)
        if verify and plan.files[0].name != plan.record:
            raise RecordMismatch(display, plan.record, "is missing")
        writer = _Writer(target, display, digest_min_size)
        return writer.write_all(plan, lambda f: _zip_chunks(raw, by_name[f.name], display), verify)


def _zip_chunks(raw: BinaryIO, info: zipfile.ZipInfo, display: str) -> Iterator[bytes]:
    """The member's bytes, inflated in bounded chunks from its local header's data."""

    def corrupt(why: str) -> UnsafeWheelError:
        return UnsafeWheelError(display, info.filename, f"is corrupt in the archive: {why}")

    raw.seek(info.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise corrupt("no local header where the central directory points")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    raw.seek(name_len + extra_len, os.SEEK_CUR)
    left = info.compress_size
    inflater = _inflate_lib.decompressobj(-zlib.MAX_WBITS) if info.compress_type else None
    pending = b""
    while True:
        if not pending and left:
            pending = raw.read(min(CHUNK, left))
            if not pending:
                raise corrupt("the file ends inside its data")
            left -= len(pending)
        if inflater is None:
            data, pending = pending, b""
        else:
            try:  # max_length bounds what one small input can inflate to (the bomb case)
                data = inflater.decompress(pending, CHUNK)
            except _INFLATE_ERRORS as exc:
                raise corrupt(str(exc)) from exc
            pending = inflater.unconsumed_tail
        if data:
            yield data
        elif not pending and (not left or (inflater is not None and inflater.eof)):
            break
    if inflater is not None and not inflater.eof:
        raise corrupt("its deflate stream is cut short")


def _unpack_bundle(
    source: Path, target: Path, limits: UnpackLimits, display: str, digest_min_size: int | None
) -> UnpackResult:
    try:
        with open_bundle(source) as bundle:
            specs = [bundle_member_spec(e.name, e.size, e.mode) for e in bundle.entries]
            plan = plan_unpack(specs, limits, display)
            if [f.name for f in plan.files] != [e.name for e in bundle.entries]:
                raise RecordMismatch(display, plan.record, "is not the bundle's first member")
            members = bundle.iter_members()
            result = _Writer(target, display, digest_min_size).write_all(
                plan, lambda f: next(members).chunks(), verify=True
            )
            for _ in members:  # runs the end-of-stream checks: checksum, no trailing data
                pass
            return result
    except CorruptBundle as exc:
        raise UnsafeWheelError(display, exc.member or "(bundle)", exc.problem) from exc


class _Writer:
    """Writes planned files under ``target``, counting and hashing each as it goes."""

    def __init__(self, target: Path, display: str, digest_min_size: int | None = None) -> None:
        self.target = target
        self.display = display
        self.made_dirs = {target}
        self.digest_min_size = digest_min_size

    def write_all(self, plan: UnpackPlan, chunks: ChunkSource, verify: bool) -> UnpackResult:
        verifier: RecordVerifier | None = None
        digests: dict[str, str] = {}
        total = 0
        for f in plan.files:
            keep = verify and f.name == plan.record
            hasher = verifier.hasher(f.name) if verifier else None
            content = self._content_hasher(f, hasher)
            kept = self.write(f, chunks(f), hasher, keep, content)
            if content is not None:
                digests[f.dest] = content.digest().hex()
            total += f.size
            if keep:
                verifier = RecordVerifier(kept, f.name)
            elif verifier:
                verifier.check(f.name, hasher, f.size)
        problems = verifier.finish() if verifier else []
        if problems:
            member, text = summarize_problems(problems)
            raise RecordMismatch(self.display, member, text)
        return UnpackResult(len(plan.files), total, plan.dist_info, digests)

    def _content_hasher(self, f: PlannedFile, record_hasher: Hasher | None) -> Hasher | None:
        """The sha256 to compute for ``f`` (RECORD's own when it is one), or None."""
        if self.digest_min_size is None or f.size < max(self.digest_min_size, 1):
            return None
        if getattr(record_hasher, "name", None) == "sha256":
            return record_hasher
        return hashlib.sha256()

    def write(
        self,
        f: PlannedFile,
        chunks: Iterable[bytes],
        hasher: Hasher | None,
        keep: bool,
        content: Hasher | None = None,
    ) -> bytes:
        """Write one file; return its bytes if ``keep``. Exactly ``f.size`` bytes, or refuse."""
        path = self.target / f.dest
        try:
            if path.parent not in self.made_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.made_dirs.add(path.parent)
            fd = os.open(path, _OPEN_FLAGS, 0o600)
        except (FileExistsError, NotADirectoryError):
            # The plan rules out clashes, so this is a case-insensitive file system at work.
            why = "collides with another member on this file system"
            raise UnsafeWheelError(self.display, f.name, why) from None
        kept, written = bytearray(), 0
        with open(fd, "wb") as out:
            for data in chunks:
                written += len(data)
                if written > f.size:
                    what = f"member {f.name!r}, inflating past its declared size,"
                    raise WheelTooLarge(self.display, what, f.size)
                out.write(data)
                if hasher:
                    hasher.update(data)
                if content is not None and content is not hasher:
                    content.update(data)
                if keep:
                    kept += data
            os.fchmod(out.fileno(), 0o755 if f.executable else 0o644)
        if written != f.size:
            raise UnsafeWheelError(self.display, f.name, f"has {written} bytes, not {f.size}")
        return bytes(kept)
