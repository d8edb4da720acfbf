"""Which compressed form should bundled wheels take? Measure it on real wheels.

Run ``.venv/bin/python -m benchmarks.bundle_format`` (``--help`` for options); it prints a
markdown table. For each candidate form: the total size of the sample wheels in that form,
the single-threaded time to write it, the best time to decompress every member to nowhere
(CPU only), and the best time to unpack every member into a fresh directory (decompress +
write; ``--unpack-to /dev/shm`` keeps disk writeback out of it). The first row is the wheels
as published, read with ``zipfile``. The candidates are written here independently of
``lockgen.bundle``; the last two rows then time the shipped code, ``unpack_wheel`` on the
``.whl`` and on ``write_bundle``'s output, both hashing every member against RECORD.

Every candidate is decompressed as a stream, as the store reads a bundle: a zip inside zstd
must first be decompressed to a file to be read at random, which its row pays for.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import struct
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

DEFAULT_WHEELS_DIR = Path("/opt/pypi/files")
# The sample: the heavy compiled wheels of the reference workload plus a few pure ones.
DEFAULT_SAMPLE = (
    "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "pandas-2.3.3-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "scipy-1.16.3-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "pillow-11.3.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "pydantic_core-2.49.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "tokenizers-0.22.2-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "pyyaml-6.0.3-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "requests-2.34.2-py3-none-any.whl",
    "jinja2-3.1.6-py3-none-any.whl",
)
CHUNK = 1 << 20
DEV_NULL = Path(os.devnull)

Member = tuple[str, bytes, int]  # name, content, permission bits
Payload = Callable[[Sequence[Member]], Callable[[BinaryIO], None]]


@dataclass
class Row:
    form: str
    size: int
    write_s: float | None
    decompress_s: float | None
    unpack_s: float | None


def read_members(wheel: Path) -> list[Member]:
    with zipfile.ZipFile(wheel) as zf:
        return [
            (i.filename, zf.read(i), (i.external_attr >> 16) & 0o777)
            for i in zf.infolist()
            if not i.is_dir()
        ]


class TreeWriter:
    """Writes files under a root, creating each parent directory once; or nowhere.

    A root of ``/dev/null`` throws the bytes away, which times decompression alone.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: set[Path] = set()

    def open(self, name: str) -> io.BufferedWriter:
        if self.root == DEV_NULL:
            return open(os.devnull, "wb")
        path = self.root / name
        if path.parent not in self.made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.made.add(path.parent)
        return open(path, "wb")


def compress(level: int, ldm: bool, payload: Callable[[BinaryIO], None], out: Path) -> float:
    params = zstandard.ZstdCompressionParameters.from_level(
        level, enable_ldm=ldm, window_log=27 if ldm else 0, write_checksum=True
    )
    cctx = zstandard.ZstdCompressor(compression_params=params)
    start = time.perf_counter()
    with open(out, "wb") as raw, cctx.stream_writer(raw) as writer:
        payload(writer)
    return time.perf_counter() - start


def concat_payload(members: Sequence[Member]) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        manifest = json.dumps([[n, len(d), m] for n, d, m in members]).encode()
        out.write(struct.pack("<I", len(manifest)) + manifest)
        for _, data, _ in members:
            out.write(data)

    return write


def tar_payload(members: Sequence[Member]) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, data, mode in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))

    return write


def zip_stored_payload(members: Sequence[Member]) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        buf = io.BytesIO()  # zipfile needs to seek; the stream writer cannot
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for name, data, _ in members:
                zf.writestr(name, data)
        out.write(buf.getbuffer())

    return write


def unpack_zip(path: Path | BinaryIO, dest: Path) -> None:
    tree = TreeWriter(dest)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            with zf.open(info) as src, tree.open(info.filename) as out:
                shutil.copyfileobj(src, out, CHUNK)


@contextlib.contextmanager
def _stream(path: Path) -> Iterator[BinaryIO]:
    with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        yield reader


def unpack_concat(path: Path, dest: Path) -> None:
    tree = TreeWriter(dest)
    with _stream(path) as reader:
        (length,) = struct.unpack("<I", reader.read(4))
        for name, size, _ in json.loads(reader.read(length)):
            with tree.open(name) as out:
                left = size
                while left:
                    data = reader.read(min(CHUNK, left))
                    left -= len(data)
                    out.write(data)


def unpack_tar(path: Path, dest: Path) -> None:
    tree = TreeWriter(dest)
    with _stream(path) as reader, tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            src = tar.extractfile(info)
            assert src is not None
            with tree.open(info.name) as out:
                shutil.copyfileobj(src, out, CHUNK)


def unpack_zip_stored(path: Path, dest: Path) -> None:
    # zipfile must seek, so the decompressed archive goes to a file first.
    with tempfile.TemporaryFile() as plain:
        with _stream(path) as reader:
            shutil.copyfileobj(reader, plain, CHUNK)
        unpack_zip(plain, dest)


def time_unpack(
    files: Sequence[Path], unpack: Callable[[Path, Path], None], repeat: int, where: Path | None
) -> float:
    """Best seconds to unpack all ``files``: into fresh dirs under ``where``, or to nowhere.

    The best run, not the median: on a shared machine noise only ever adds time.
    """
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bundle-bench-", dir=where) as tmp:
            start = time.perf_counter()
            for i, path in enumerate(files):
                unpack(path, Path(tmp) / str(i) if where else DEV_NULL)
            runs.append(time.perf_counter() - start)
    return min(runs)


@dataclass
class Bench:
    wheels: Sequence[Path]
    work: Path  # where candidate files are written
    where: Path | None  # where unpacked trees go (None: time decompression only)
    repeat: int

    def unpack_times(self, files: Sequence[Path], unpack: Callable[[Path, Path], None]) -> Row:
        row = Row("", sum(f.stat().st_size for f in files), None, None, None)
        row.decompress_s = time_unpack(files, unpack, self.repeat, None)
        row.unpack_s = time_unpack(files, unpack, self.repeat, self.where or self.work)
        return row

    def form(
        self,
        label: str,
        payload: Payload,
        level: int,
        ldm: bool,
        unpack: Callable[[Path, Path], None],
    ) -> Row:
        files, write_s = [], 0.0
        for i, wheel in enumerate(self.wheels):
            out = self.work / f"candidate-{i}"
            write_s += compress(level, ldm, payload(read_members(wheel)), out)
            files.append(out)
        row = self.unpack_times(files, unpack)
        row.form, row.write_s = label, write_s
        for f in files:
            f.unlink()
        return row


def measure(bench: Bench, levels: Sequence[int], shipped: bool) -> list[Row]:
    base = bench.unpack_times(bench.wheels, unpack_zip)
    base.form = "wheels as published (zip, deflate), zipfile"
    whl_zst = sum(
        len(zstandard.ZstdCompressor(level=19).compress(w.read_bytes())) for w in bench.wheels
    )
    rows = [base, Row("zstd-19 over the .whl bytes", whl_zst, None, None, None)]
    rows.append(
        bench.form("zip stored + zstd-10", zip_stored_payload, 10, False, unpack_zip_stored)
    )
    rows.append(bench.form("tar + zstd-10", tar_payload, 10, False, unpack_tar))
    for level in levels:
        rows.append(
            bench.form(
                f"manifest+concat + zstd-{level}", concat_payload, level, False, unpack_concat
            )
        )
    rows.append(
        bench.form("manifest+concat + zstd-10 --long=27", concat_payload, 10, True, unpack_concat)
    )
    if shipped:
        rows.extend(measure_wheelcas(bench))
    return rows


def measure_wheelcas(bench: Bench) -> list[Row]:
    """The shipped code. It always writes (no decompress-only figure) and hashes every member."""
    from cas_daemon.unpack import unpack_wheel
    from lockgen.bundle import BUNDLE_SUFFIX, write_bundle

    def unpack(path: Path, dest: Path) -> None:
        unpack_wheel(path, dest)

    def row(form: str, files: Sequence[Path], write_s: float | None) -> Row:
        size = sum(f.stat().st_size for f in files)
        unpack_s = time_unpack(files, unpack, bench.repeat, bench.where or bench.work)
        return Row(form, size, write_s, None, unpack_s)

    bundles, write_s = [], 0.0
    for wheel in bench.wheels:
        dest = bench.work / (wheel.name + BUNDLE_SUFFIX)
        start = time.perf_counter()
        write_bundle(wheel, dest)
        write_s += time.perf_counter() - start
        bundles.append(dest)
    return [
        row("wheelcas: unpack_wheel(.whl)", bench.wheels, None),
        row("wheelcas: write_bundle, unpack_wheel(bundle)", bundles, write_s),
    ]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(rows: Sequence[Row]) -> str:
    base = rows[0]
    lines = [
        "| form | size | vs wheels | write s | decompress s | unpack s | unpack vs zipfile |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{base.unpack_s / r.unpack_s:.2f}x" if r.unpack_s and base.unpack_s else "-"
        lines.append(
            f"| {r.form} | {r.size / 1e6:.1f} MB | {r.size / base.size:.1%} | "
            f"{_secs(r.write_s)} | {_secs(r.decompress_s)} | {_secs(r.unpack_s)} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--wheels-dir", type=Path, default=DEFAULT_WHEELS_DIR)
    parser.add_argument("--wheel", action="append", help="a wheel file name (repeatable)")
    parser.add_argument("--levels", default="3,6,10,15,19", help="zstd levels, comma separated")
    parser.add_argument("--repeat", type=int, default=5, help="unpack runs; the best is shown")
    parser.add_argument("--unpack-to", type=Path, help="where trees are written (default: temp)")
    parser.add_argument("--candidates-only", action="store_true", help="skip the shipped code")
    args = parser.parse_args(argv)
    wheels = [args.wheels_dir / n for n in (args.wheel or DEFAULT_SAMPLE)]
    wheels = [w for w in wheels if w.exists()]
    if not wheels:
        raise SystemExit(f"none of the sample wheels is in {args.wheels_dir}")
    unpacked = sum(len(d) for w in wheels for _, d, _ in read_members(w))
    with tempfile.TemporaryDirectory(prefix="bundle-forms-") as work:
        bench = Bench(wheels, Path(work), args.unpack_to, args.repeat)
        rows = measure(bench, [int(x) for x in args.levels.split(",")], not args.candidates_only)
    print(
        f"{len(wheels)} wheels ({', '.join(w.name.split('-')[0] for w in wheels)}), "
        f"{unpacked / 1e6:.1f} MB unpacked, {os.cpu_count()} CPUs. Seconds, best of "
        f"{args.repeat}; writes single-threaded; decompress = to nowhere; unpack = to "
        f"{args.unpack_to or 'the temp dir'}.\n"
    )
    print(render(rows))


if __name__ == "__main__":
    main()
