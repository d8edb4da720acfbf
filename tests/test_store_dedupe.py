"""Publishing a tree shares files that other trees already hold (one inode, read-only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cas_daemon import dedupe
from cas_daemon.dedupe import dedupe_savings
from cas_daemon.layout import StoreLayout, default_store_root
from cas_daemon.store import Store, WheelRef
from lockgen.lockfile import sha256_hex
from tests.support.wheels import build_wheel, sha256_file

SHARED = "# the same module in two versions of a package\n" + "x = 1\n" * 400


def test_identical_files_of_two_versions_are_stored_once(tmp_path: Path) -> None:
    wheels = [
        build_wheel(
            tmp_path, "pkg", version, files={"pkg/__init__.py": version, "pkg/big.py": SHARED}
        )
        for version in ("1.0", "2.0")
    ]
    refs = [WheelRef(sha256_hex(sha256_file(w)), w.name, bundle_path=w.absolute()) for w in wheels]
    store = Store(StoreLayout(default_store_root()))
    first, second = store.ready(refs)
    assert (first / "pkg" / "big.py").stat().st_ino == (second / "pkg" / "big.py").stat().st_ino
    assert (second / "pkg" / "big.py").read_text() == SHARED
    assert (first / "pkg" / "__init__.py").read_text() == "1.0"
    assert (second / "pkg" / "__init__.py").read_text() == "2.0"
    assert dedupe_savings(store.layout) >= len(SHARED)


def test_publishing_hashes_files_as_they_are_unpacked_not_by_reading_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_back(path: str) -> str:
        raise AssertionError(f"{path} was read back to be hashed")

    monkeypatch.setattr(dedupe, "_digest", read_back)
    wheels = [
        build_wheel(tmp_path, "pkg", v, files={"pkg/__init__.py": v, "pkg/big.py": SHARED})
        for v in ("1.0", "2.0")
    ]
    refs = [WheelRef(sha256_hex(sha256_file(w)), w.name, bundle_path=w.absolute()) for w in wheels]
    store = Store(StoreLayout(default_store_root()))
    first, second = store.ready(refs)

    digest = hashlib.sha256(SHARED.encode()).hexdigest()
    entry = store.layout.dedupe_dir / digest[:2] / digest
    assert entry.stat().st_ino == (first / "pkg" / "big.py").stat().st_ino
    assert (second / "pkg" / "big.py").stat().st_ino == entry.stat().st_ino
