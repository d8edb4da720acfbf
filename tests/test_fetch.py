"""fetch_blob against a real loopback index: verified renames, and nothing left on failure."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from cas_daemon.errors import FetchError, HashMismatch
from cas_daemon.fetch import fetch_blob, open_session, redact_url
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file


def _big_wheel(wheel_dir: Path, name: str = "bigpkg") -> Path:
    # Random bytes do not compress: the wheel stays larger than one read chunk.
    return build_wheel(wheel_dir, name, files={f"{name}/blob.bin": os.urandom(300_000)})


def _fetch(url: str, sha: str, dest: Path, tmp: Path, seen: list[int] | None = None) -> int:
    async def go() -> int:
        async with open_session() as session:
            return await fetch_blob(
                session, url, sha, dest, tmp, on_bytes=None if seen is None else seen.append
            )

    return asyncio.run(go())


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "blobs" / "ab" / "blob", tmp_path / "tmp"


def _leftovers(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*") if p.is_file()]


def test_fetch_stores_verified_bytes(
    package_index: PackageIndex, wheel_dir: Path, dirs: tuple[Path, Path]
) -> None:
    wheel = _big_wheel(wheel_dir)
    dest, tmp = dirs
    seen: list[int] = []

    size = _fetch(package_index.file_url(wheel.name), sha256_file(wheel), dest, tmp, seen)

    assert size == wheel.stat().st_size == sum(seen)
    assert dest.read_bytes() == wheel.read_bytes()
    assert _leftovers(tmp) == []


def test_corrupt_download_raises_hash_mismatch_and_keeps_nothing(
    package_index: PackageIndex, wheel_dir: Path, dirs: tuple[Path, Path]
) -> None:
    wheel = _big_wheel(wheel_dir)
    dest, tmp = dirs
    package_index.corrupt(wheel.name)
    url = package_index.file_url(wheel.name)

    with pytest.raises(HashMismatch) as caught:
        _fetch(url, sha256_file(wheel), dest, tmp)

    assert caught.value.url == url
    assert caught.value.expected == sha256_file(wheel)
    assert len(caught.value.actual) == 64
    assert caught.value.actual != caught.value.expected
    assert not dest.exists()
    assert _leftovers(dest.parent, tmp) == []


def test_truncated_download_raises_fetch_error_and_keeps_nothing(
    package_index: PackageIndex, wheel_dir: Path, dirs: tuple[Path, Path]
) -> None:
    wheel = _big_wheel(wheel_dir)
    dest, tmp = dirs
    package_index.truncate(wheel.name, 1000)

    with pytest.raises(FetchError) as caught:
        _fetch(package_index.file_url(wheel.name), sha256_file(wheel), dest, tmp)

    assert caught.value.url == package_index.file_url(wheel.name)
    assert not dest.exists()
    assert _leftovers(dest.parent, tmp) == []


def test_http_404_raises_fetch_error(package_index: PackageIndex, dirs: tuple[Path, Path]) -> None:
    dest, tmp = dirs
    with pytest.raises(FetchError, match="404"):
        _fetch(package_index.file_url("nope-1.0-py3-none-any.whl"), "0" * 64, dest, tmp)
    assert _leftovers(tmp) == []


def test_connection_refused_raises_fetch_error(dirs: tuple[Path, Path]) -> None:
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest, tmp = dirs
    with pytest.raises(FetchError):
        _fetch(f"http://127.0.0.1:{port}/x.whl", "0" * 64, dest, tmp)
    assert _leftovers(tmp) == []


def test_credentials_never_reach_the_error(
    package_index: PackageIndex, dirs: tuple[Path, Path]
) -> None:
    url = package_index.file_url("gone-1.0-py3-none-any.whl")
    secret_url = url.replace("http://", "http://alice:s3cr3t@")
    dest, tmp = dirs

    with pytest.raises(FetchError) as caught:
        _fetch(secret_url, "0" * 64, dest, tmp)

    assert "s3cr3t" not in str(caught.value)
    assert "s3cr3t" not in caught.value.url
    assert caught.value.url == redact_url(secret_url) == url.replace("http://", "http://***@")


def test_file_url_is_copied_with_the_same_checks(wheel_dir: Path, dirs: tuple[Path, Path]) -> None:
    wheel = _big_wheel(wheel_dir)
    dest, tmp = dirs

    assert _fetch(wheel.as_uri(), sha256_file(wheel), dest, tmp) == wheel.stat().st_size
    assert dest.read_bytes() == wheel.read_bytes()

    other = dest.with_name("other")
    with pytest.raises(HashMismatch):
        _fetch(wheel.as_uri(), "f" * 64, other, tmp)
    with pytest.raises(FetchError, match="cannot read"):
        _fetch((wheel_dir / "missing.whl").as_uri(), "f" * 64, other, tmp)
    assert not other.exists()
    assert _leftovers(tmp) == []


def test_cancelled_download_leaves_nothing(
    package_index: PackageIndex, wheel_dir: Path, dirs: tuple[Path, Path]
) -> None:
    wheel = _big_wheel(wheel_dir)
    dest, tmp = dirs
    package_index.delay(wheel.name, 30)

    async def go() -> None:
        async with open_session() as session:
            task = asyncio.create_task(
                fetch_blob(session, package_index.file_url(wheel.name), "0" * 64, dest, tmp)
            )
            await asyncio.sleep(0.3)  # the index holds the body back for 30 s
            staged = _leftovers(tmp)
            assert [p.name.startswith("0" * 64 + ".") for p in staged] == [True]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(go(), 20))
    assert not dest.exists()
    assert _leftovers(tmp) == []
