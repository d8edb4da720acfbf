"""The zip container of a packed model, written and read here (zstd is zip method 93).

Python's ``zipfile`` reads and writes method 93 only from 3.14, so both directions are
implemented on the zip specification (PKWARE APPNOTE 6.3): local headers, the central
directory, zip64 records where sizes or offsets pass 32 bits. Header encoding and decoding
are pure functions; :func:`write_zip` and :class:`ZipReader` do the file I/O.

Writing is deterministic: members in the order given, a fixed timestamp (1980-01-01 00:00),
attributes derived only from the executable bit, fixed compression parameters. Each member
is streamed (compressed while read, hashed while written), so a large weight file is never
held in memory; its local header is patched with the CRC and compressed size afterwards,
which needs a seekable output (a temp file, renamed into place by the caller).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lockgen.errors import WheelcasError

if TYPE_CHECKING:
    from types import TracebackType

METHOD_STORED = 0
METHOD_DEFLATE = 8
METHOD_ZSTD = 93
ZSTD_LEVEL = 3
CHUNK = 1 << 20

_LOCAL_SIG = 0x04034B50
_CENTRAL_SIG = 0x02014B50
_EOCD_SIG = 0x06054B50
_ZIP64_EOCD_SIG = 0x06064B50
_ZIP64_LOCATOR_SIG = 0x07064B50
_ZIP64_EXTRA_ID = 0x0001
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF
#: Members at least this large get a zip64 local header before their data is written: the
#: compressed size is known only afterwards, and zstd's worst-case growth (size/256 plus a
#: few bytes) keeps anything smaller below 4 GiB.
ZIP64_THRESHOLD = 0xFF000000
_FLAG_UTF8 = 0x0800
_DOS_TIME = 0
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01
_MADE_BY = (3 << 8) | 63  # unix, APPNOTE 6.3
_FILE_ATTR = (0o100644 << 16) & _MAX32
_EXEC_ATTR = (0o100755 << 16) & _MAX32


class PackedFormatError(WheelcasError):
    """A ``.carton`` file that is not a zip we can read, or whose data is damaged."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"{path}: {problem}. The file is damaged or not a packed model; get it again or "
            "pack it again with `wheelcas pack`."
        )


def _version_needed(method: int, zip64: bool) -> int:
    if method == METHOD_ZSTD:
        return 63
    return 45 if zip64 else 20


# --- pure: header encoding ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ZipEntry:
    """One member as the central directory describes it."""

    name: str
    method: int
    crc32: int
    compressed_size: int
    file_size: int
    header_offset: int
    flags: int = _FLAG_UTF8
    external_attr: int = _FILE_ATTR

    @property
    def executable(self) -> bool:
        return bool((self.external_attr >> 16) & 0o111)


def encode_local_header(
    name: bytes, method: int, crc: int, compressed: int, size: int, *, zip64: bool
) -> bytes:
    """A local file header; with ``zip64`` the sizes move into a zip64 extra field."""
    extra = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, compressed) if zip64 else b""
    header = _LOCAL.pack(
        _LOCAL_SIG,
        _version_needed(method, zip64),
        _FLAG_UTF8,
        method,
        _DOS_TIME,
        _DOS_DATE,
        crc,
        _MAX32 if zip64 else compressed,
        _MAX32 if zip64 else size,
        len(name),
        len(extra),
    )
    return header + name + extra


def encode_central_header(entry: ZipEntry) -> bytes:
    """A central directory record; fields past 32 bits go to a zip64 extra field."""
    values: list[int] = []
    size, compressed, offset = entry.file_size, entry.compressed_size, entry.header_offset
    if size >= _MAX32:
        values.append(size)
        size = _MAX32
    if compressed >= _MAX32:
        values.append(compressed)
        compressed = _MAX32
    if offset >= _MAX32:
        values.append(offset)
        offset = _MAX32
    extra = b""
    if values:
        extra = struct.pack(f"<HH{len(values)}Q", _ZIP64_EXTRA_ID, 8 * len(values), *values)
    name = entry.name.encode("utf-8")
    header = _CENTRAL.pack(
        _CENTRAL_SIG,
        _MADE_BY,
        _version_needed(entry.method, bool(values)),
        entry.flags,
        entry.method,
        _DOS_TIME,
        _DOS_DATE,
        entry.crc32,
        compressed,
        size,
        len(name),
        len(extra),
        0,  # comment length
        0,  # disk number
        0,  # internal attributes
        entry.external_attr,
        offset,
    )
    return header + name + extra


def encode_end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    """The end of central directory record, preceded by the zip64 ones when needed."""
    out = b""
    zip64 = count >= _MAX16 or cd_offset >= _MAX32 or cd_size >= _MAX32
    if zip64:
        zip64_offset = cd_offset + cd_size
        out += _ZIP64_EOCD.pack(
            _ZIP64_EOCD_SIG, _ZIP64_EOCD.size - 12, _MADE_BY, 45, 0, 0, count, count, cd_size,
            cd_offset,
        )  # fmt: skip
        out += _ZIP64_LOCATOR.pack(_ZIP64_LOCATOR_SIG, 0, zip64_offset, 1)
    out += _EOCD.pack(
        _EOCD_SIG,
        0,
        0,
        min(count, _MAX16),
        min(count, _MAX16),
        min(cd_size, _MAX32),
        min(cd_offset, _MAX32),
        0,
    )
    return out


# --- pure: header decoding ----------------------------------------------------------------


def _zip64_values(extra: bytes) -> list[int]:
    """The 8-byte values of the zip64 extra field in ``extra``, if there is one."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if kind == _ZIP64_EXTRA_ID:
            body = extra[pos + 4 : pos + 4 + length]
            return list(struct.unpack(f"<{len(body) // 8}Q", body[: len(body) // 8 * 8]))
        pos += 4 + length
    return []


def find_end_records(tail: bytes, where: str) -> tuple[int, int, int, int | None]:
    """``(entry count, central directory offset, its size, zip64 EOCD offset or None)`` from
    the last bytes of the file."""
    pos = tail.rfind(struct.pack("<I", _EOCD_SIG))
    if pos < 0 or pos + _EOCD.size > len(tail):
        raise PackedFormatError(where, "no zip end of central directory record")
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
    if disk != 0 or cd_disk != 0:
        raise PackedFormatError(where, "multi-disk zip files are not supported")
    locator = pos - _ZIP64_LOCATOR.size
    if locator >= 0 and struct.unpack_from("<I", tail, locator)[0] == _ZIP64_LOCATOR_SIG:
        _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, locator)
        return count, cd_offset, cd_size, zip64_offset
    return count, cd_offset, cd_size, None


def decode_zip64_end(record: bytes, where: str) -> tuple[int, int, int]:
    """``(entry count, central directory offset, size)`` from a zip64 EOCD record."""
    if len(record) < _ZIP64_EOCD.size:
        raise PackedFormatError(where, "truncated zip64 end of central directory record")
    sig, _, _, _, _, _, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack_from(record)
    if sig != _ZIP64_EOCD_SIG:
        raise PackedFormatError(where, "bad zip64 end of central directory record")
    return count, cd_offset, cd_size


def decode_central_directory(data: bytes, count: int, where: str) -> list[ZipEntry]:
    """Every record of a central directory; names must be unique."""
    entries: list[ZipEntry] = []
    seen: set[str] = set()
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(data):
            raise PackedFormatError(where, "truncated central directory")
        fields = _CENTRAL.unpack_from(data, pos)
        (sig, _, _, flags, method, _, _, crc, compressed, size, nlen, xlen, clen) = fields[:13]
        external, offset = fields[15], fields[16]
        if sig != _CENTRAL_SIG:
            raise PackedFormatError(where, "bad central directory record")
        start = pos + _CENTRAL.size
        raw_name = data[start : start + nlen]
        extra = data[start + nlen : start + nlen + xlen]
        pos = start + nlen + xlen + clen
        if flags & 0x1:
            raise PackedFormatError(where, "encrypted members are not supported")
        name = raw_name.decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
        values = iter(_zip64_values(extra))
        try:
            if size == _MAX32:
                size = next(values)
            if compressed == _MAX32:
                compressed = next(values)
            if offset == _MAX32:
                offset = next(values)
        except StopIteration:
            raise PackedFormatError(where, f"{name}: missing zip64 sizes") from None
        if name in seen:
            raise PackedFormatError(where, f"{name} appears twice")
        seen.add(name)
        entries.append(
            ZipEntry(
                name=name,
                method=method,
                crc32=crc,
                compressed_size=compressed,
                file_size=size,
                header_offset=offset,
                flags=flags,
                external_attr=external,
            )
        )
    return entries


# --- writing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberSource:
    """A member to write: bytes in memory or a file on disk (streamed)."""

    name: str
    data: bytes | None = None
    path: Path | None = None
    method: int = METHOD_ZSTD
    executable: bool = False


@dataclass(frozen=True, slots=True)
class WrittenMember:
    name: str
    sha256: str
    size: int


def _chunks(source: MemberSource) -> Iterator[bytes]:
    if source.data is not None:
        yield source.data
        return
    if source.path is None:
        raise ValueError(f"member {source.name} has neither data nor path")
    with source.path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _source_size(source: MemberSource) -> int:
    if source.data is not None:
        return len(source.data)
    if source.path is None:
        raise ValueError(f"member {source.name} has neither data nor path")
    return source.path.stat().st_size


class _Counter:
    """A write target that forwards to ``out`` and counts the bytes (the compressed size)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)


class ZipWriter:
    """Appends members to the seekable ``out``; :meth:`finish` writes the central directory.

    ``zip64_threshold`` exists so that tests can exercise zip64 records with small files.
    """

    def __init__(self, out: IO[bytes], *, zip64_threshold: int = ZIP64_THRESHOLD) -> None:
        import zstandard

        self._out = out
        self._zip64_threshold = zip64_threshold
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self._central: list[ZipEntry] = []

    def add(self, source: MemberSource) -> WrittenMember:
        """Write one member; returns the sha256 and size of its uncompressed bytes."""
        import zstandard

        out = self._out
        name = source.name.encode("utf-8")
        offset = out.tell()
        expected = _source_size(source)
        zip64 = expected >= self._zip64_threshold
        out.write(encode_local_header(name, source.method, 0, 0, 0, zip64=zip64))
        counter = _Counter(out)
        sha = hashlib.sha256()
        crc = size = 0
        sink: Callable[[bytes], int]
        if source.method == METHOD_ZSTD:
            writer = self._compressor.stream_writer(counter, size=expected, closefd=False)  # type: ignore[arg-type]
            sink = writer.write
        elif source.method == METHOD_STORED:
            sink = counter.write
        else:
            raise ValueError(f"cannot write method {source.method}")
        for chunk in _chunks(source):
            sha.update(chunk)
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            sink(chunk)
        if source.method == METHOD_ZSTD:
            writer.flush(zstandard.FLUSH_FRAME)
        if size != expected:
            raise OSError(f"{source.path or source.name} changed size while it was being packed")
        compressed = counter.count
        if not zip64 and (compressed >= _MAX32 or size >= _MAX32):
            raise OSError(f"{source.name}: sizes past 4 GiB without a zip64 header")
        end = out.tell()
        out.seek(offset)
        out.write(encode_local_header(name, source.method, crc, compressed, size, zip64=zip64))
        out.seek(end)
        self._central.append(
            ZipEntry(
                name=source.name,
                method=source.method,
                crc32=crc,
                compressed_size=compressed,
                file_size=size,
                header_offset=offset,
                external_attr=_EXEC_ATTR if source.executable else _FILE_ATTR,
            )
        )
        return WrittenMember(source.name, sha.hexdigest(), size)

    def finish(self) -> None:
        cd_offset = self._out.tell()
        for entry in self._central:
            self._out.write(encode_central_header(entry))
        cd_size = self._out.tell() - cd_offset
        self._out.write(encode_end_records(len(self._central), cd_offset, cd_size))


def write_zip(
    out: IO[bytes], members: Sequence[MemberSource], *, zip64_threshold: int = ZIP64_THRESHOLD
) -> list[WrittenMember]:
    """Write ``members`` in order to the seekable ``out``; returns each one's sha256 and size."""
    writer = ZipWriter(out, zip64_threshold=zip64_threshold)
    written = [writer.add(source) for source in members]
    writer.finish()
    return written


# --- reading ------------------------------------------------------------------------------


class ZipReader:
    """Random access to the members of a zip file: stored, deflate and zstd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._where = str(path)
        self._file: IO[bytes] = path.open("rb")
        try:
            self.entries: dict[str, ZipEntry] = {e.name: e for e in self._read_central_directory()}
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ZipReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read_central_directory(self) -> list[ZipEntry]:
        handle = self._file
        file_size = handle.seek(0, 2)
        tail_size = min(file_size, _EOCD.size + _MAX16 + _ZIP64_LOCATOR.size)
        handle.seek(file_size - tail_size)
        tail = handle.read(tail_size)
        count, cd_offset, cd_size, zip64_offset = find_end_records(tail, self._where)
        if zip64_offset is not None:
            handle.seek(zip64_offset)
            count, cd_offset, cd_size = decode_zip64_end(handle.read(_ZIP64_EOCD.size), self._where)
        if cd_offset + cd_size > file_size:
            raise PackedFormatError(self._where, "the central directory lies past the end")
        handle.seek(cd_offset)
        return decode_central_directory(handle.read(cd_size), count, self._where)

    def _data_offset(self, entry: ZipEntry) -> int:
        self._file.seek(entry.header_offset)
        header = self._file.read(_LOCAL.size)
        if len(header) < _LOCAL.size or _LOCAL.unpack(header)[0] != _LOCAL_SIG:
            raise PackedFormatError(self._where, f"{entry.name}: bad local header")
        name_length, extra_length = struct.unpack_from("<HH", header, _LOCAL.size - 4)
        return int(entry.header_offset + _LOCAL.size + name_length + extra_length)

    def iter_member(self, name: str) -> Iterator[bytes]:
        """The uncompressed bytes of ``name`` in chunks, checked against its size and CRC.

        Never yields more than the declared size: a member that inflates past it is refused
        before it can fill the disk.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise PackedFormatError(self._where, f"no member named {name}")
        offset = self._data_offset(entry)
        raw = _BoundedReader(self._file, offset, entry.compressed_size)
        crc = produced = 0
        for chunk in _decompress(raw, entry.method, self._where, entry.name):
            produced += len(chunk)
            if produced > entry.file_size:
                raise PackedFormatError(self._where, f"{name}: data longer than its declared size")
            crc = zlib.crc32(chunk, crc)
            yield chunk
        if produced != entry.file_size or crc != entry.crc32:
            raise PackedFormatError(self._where, f"{name}: data does not match its CRC or size")

    def read(self, name: str) -> bytes:
        return b"".join(self.iter_member(name))


class _BoundedReader:
    """``read(n)`` over ``length`` bytes of ``handle`` from ``offset``."""

    def __init__(self, handle: IO[bytes], offset: int, length: int) -> None:
        self._handle = handle
        self._pos = offset
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size < 0 else min(size, self._left)
        self._handle.seek(self._pos)
        data = self._handle.read(size)
        self._pos += len(data)
        self._left = self._left - len(data) if data else 0
        return data


def _decompress(raw: _BoundedReader, method: int, where: str, name: str) -> Iterator[bytes]:
    if method == METHOD_STORED:
        while chunk := raw.read(CHUNK):
            yield chunk
    elif method == METHOD_DEFLATE:
        inflater = zlib.decompressobj(-15)
        while chunk := raw.read(CHUNK):
            while chunk:
                out = inflater.decompress(chunk, CHUNK)
                if out:
                    yield out
                chunk = inflater.unconsumed_tail
        if tail := inflater.flush():
            yield tail
    elif method == METHOD_ZSTD:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[arg-type]
        try:
            while chunk := reader.read(CHUNK):
                yield chunk
        except zstandard.ZstdError as exc:
            raise PackedFormatError(where, f"{name}: bad zstd data ({exc})") from None
    else:
        raise PackedFormatError(where, f"{name}: compression method {method} is not supported")
