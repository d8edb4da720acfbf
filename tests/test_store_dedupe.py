"""Publishing a tree shares files that other trees already hold (one inode, read-only)."""

from __future__ import annotations

from pathlib import Path

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
