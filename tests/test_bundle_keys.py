"""Store keys of bundled files, and the per-user file that spares warm loads from hashing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cas_daemon import bundle_keys
from cas_daemon.bundle_keys import DigestCache, default_cache_path
from lockgen.bundle import bundle_filename, write_bundle
from lockgen.lockfile import Sha256, sha256_hex
from tests.support.wheels import build_wheel, sha256_file

LOCKED = sha256_hex("e" * 64)


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file :mod:`cas_daemon.bundle_keys` hashes, in order."""
    calls: list[Path] = []
    real = bundle_keys.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(bundle_keys, "sha256_file", counting)
    return calls


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return build_wheel(tmp_path / "dists", "alpha", files={"alpha/__init__.py": "X = 1\n"})


@pytest.fixture
def bundle(tmp_path: Path, wheel: Path) -> Path:
    path = tmp_path / bundle_filename(wheel.name)
    write_bundle(wheel, path)
    return path


def _key(path: Path, cache: DigestCache | None = None) -> Sha256:
    return (cache or DigestCache(default_cache_path())).key(path, LOCKED)


def test_a_compressed_bundle_is_keyed_by_its_bytes_and_hashed_once(
    bundle: Path, hashed: list[Path]
) -> None:
    assert _key(bundle) == sha256_file(bundle)
    assert _key(bundle) == sha256_file(bundle)  # another process: the file remembers
    assert hashed == [bundle]
    assert default_cache_path().is_file()


def test_a_plain_wheel_and_a_missing_file_keep_the_locks_sha(
    wheel: Path, tmp_path: Path, hashed: list[Path]
) -> None:
    assert _key(wheel) == LOCKED
    assert _key(tmp_path / "gone.whl.wcb.zst") == LOCKED
    assert hashed == []


def test_a_changed_file_is_hashed_again(bundle: Path, tmp_path: Path, hashed: list[Path]) -> None:
    cache = DigestCache(default_cache_path())
    first = _key(bundle, cache)
    other = build_wheel(tmp_path / "other", "beta", files={"beta/__init__.py": "Y = 2\n"})
    write_bundle(other, bundle)  # the same path, new bytes
    second = _key(bundle, cache)
    os.utime(bundle, ns=(0, 0))  # only the times: ctime still moves, so hashed again

    assert (first, second, _key(bundle, cache)) != (first, first, first)
    assert second == sha256_file(bundle)
    assert len(hashed) == 3


def test_a_damaged_or_foreign_cache_file_is_ignored(
    bundle: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = default_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert _key(bundle) == sha256_file(bundle)
    assert json.loads(path.read_text())["version"] == 1  # rewritten whole

    info = bundle.stat()
    stamp = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    lie = {"version": 1, "entries": {str(bundle): [*stamp, "f" * 64]}}
    path.write_text(json.dumps(lie))
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # the file is not "ours"
    assert _key(bundle) == sha256_file(bundle)
    assert len(hashed) == 2


def test_the_cache_file_keeps_the_newest_entries(
    tmp_path: Path, wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle_keys, "MAX_ENTRIES", 2)
    cache = DigestCache(default_cache_path())
    paths = []
    for name in ("a", "b", "c"):
        paths.append(tmp_path / f"{name}.whl.wcb.zst")
        write_bundle(wheel, paths[-1])
        cache.key(paths[-1], LOCKED)
    kept = json.loads(default_cache_path().read_text())["entries"]
    assert list(kept) == [str(p) for p in paths[1:]]


def test_an_unwritable_cache_only_costs_hashing(
    bundle: Path, tmp_path: Path, hashed: list[Path]
) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    cache = DigestCache(blocked / "wheelcas" / "bundle-digests.json")
    assert cache.key(bundle, LOCKED) == sha256_file(bundle)
    assert cache.key(bundle, LOCKED) == sha256_file(bundle)  # remembered in memory
    assert hashed == [bundle]
