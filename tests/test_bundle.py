"""The bundled-wheel format: writing, reading, detection by content, RECORD checks."""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

import pytest

from cas_daemon.unpack import unpack_wheel
from lockgen import bundle
from lockgen.bundle import (
    BUNDLE_SUFFIX,
    BundleHeader,
    CorruptBundle,
    is_bundle,
    iter_bundle_members,
    open_bundle,
    read_bundle_header,
    wheel_filename_of,
    write_bundle,
)
from lockgen.errors import BundleError
from tests.support.wheels import build_wheel, record_hash, sha256_file

DIST_INFO = "demo-1.0.dist-info"


def python_source(index: int) -> str:
    """A module that looks like real code: repetitive across modules, as packages are."""
    funcs = "\n".join(
        f"def handler_{index}_{n}(request, *, timeout=30, retries={n % 5}):\n"
        f'    """Handle request kind {n} of module {index}."""\n'
        f"    if request is None:\n"
        f'        raise ValueError("module {index}: request {n} is missing")\n'
        f"    return dispatch(request, timeout=timeout, retries=retries)\n"
        for n in range(40)
    )
    return f'"""Module {index}."""\n\nfrom .core import dispatch\n\n{funcs}'


def make_wheel(tmp_path: Path) -> Path:
    return build_wheel(
        tmp_path / "wheels",
        "demo",
        files={"demo/__init__.py": "X = 1\n", "demo/core.py": "def dispatch(*a, **k): ...\n"},
        data_files={"scripts/demo-run": "#!/bin/sh\necho hi\n", "purelib/demo_extra.py": "Y=2\n"},
    )


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def bundle_of(wheel: Path) -> Path:
    dest = wheel.parent / (wheel.name + BUNDLE_SUFFIX)
    write_bundle(wheel, dest)
    return dest


def read_everything(path: Path) -> None:
    for member in iter_bundle_members(path):
        b"".join(member.chunks())


def test_round_trip_unpacks_exactly_like_the_wheel(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    bundled = bundle_of(wheel)
    from_wheel = unpack_wheel(wheel, tmp_path / "a")
    from_bundle = unpack_wheel(bundled, tmp_path / "b")
    assert from_wheel == from_bundle
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert a == b
    assert a["demo-1.0.data/scripts/demo-run"][1] == 0o755
    assert a["demo/core.py"][1] == 0o644


def test_bundle_is_clearly_smaller_than_a_wheel_of_python_source(tmp_path: Path) -> None:
    files = {f"big/mod{i}.py": python_source(i) for i in range(60)}
    assert sum(len(text) for text in files.values()) > 500_000  # a realistic size, not a toy
    wheel = build_wheel(tmp_path, "big", files=files)
    # zip deflates each file alone; zstd over all of them finds what modules share (~0.26x).
    assert bundle_of(wheel).stat().st_size < 0.5 * wheel.stat().st_size


def test_header_names_the_original_wheel_and_its_sha256(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    header = read_bundle_header(bundle_of(wheel))
    assert header == BundleHeader(wheel.name, sha256_file(wheel), bundle.FORMAT_VERSION)


def test_detected_by_content_not_by_name(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    disguised = bundle_of(wheel).rename(tmp_path / "looks-like-a.whl")
    plain = tmp_path / ("plain.whl" + BUNDLE_SUFFIX)
    plain.write_bytes(wheel.read_bytes())
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert is_bundle(disguised)
    assert not is_bundle(plain)
    assert not is_bundle(empty)


def test_wheel_filename_is_recoverable_from_the_bundle_name() -> None:
    name = "demo-1.0-py3-none-any.whl"
    assert wheel_filename_of(bundle.bundle_filename(name)) == name
    assert wheel_filename_of(f".carton/bundled_wheels/ab12/{name}{BUNDLE_SUFFIX}") == name
    assert wheel_filename_of(name) == name  # a plain bundled .whl, as Carton writes it
    with pytest.raises(BundleError):
        wheel_filename_of("demo-1.0.tar.gz")


def test_write_is_deterministic(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    write_bundle(wheel, tmp_path / "one")
    write_bundle(wheel, tmp_path / "two")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()


def test_members_stream_with_record_first_and_modes(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    members = {
        m.name: (m.mode, b"".join(m.chunks())) for m in iter_bundle_members(bundle_of(wheel))
    }
    assert next(iter(members)) == f"{DIST_INFO}/RECORD"
    assert members["demo-1.0.data/scripts/demo-run"][0] == 0o100755
    assert members["demo/core.py"] == (0o100644, b"def dispatch(*a, **k): ...\n")
    with zipfile.ZipFile(wheel) as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == {n: d for n, (_, d) in members.items()}


def test_unread_members_are_skipped_and_late_reads_refused(tmp_path: Path) -> None:
    with open_bundle(bundle_of(make_wheel(tmp_path))) as reader:
        members = list(reader.iter_members())  # nobody read any bytes: all skipped
        assert len(members) == len(reader.entries)
        with pytest.raises(RuntimeError, match="after the next one"):
            next(members[0].chunks())


def test_wheel_with_a_member_missing_from_record_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w", "demo", extra_members=[("demo/sneaky.py", b"x = 1\n")])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BundleError, match=r"'demo/sneaky.py' is not listed in RECORD"):
        write_bundle(wheel, out_dir / "demo.whl.wcb.zst")
    assert list(out_dir.iterdir()) == []  # not even a temp file


def test_wheel_whose_record_hash_is_wrong_is_refused(tmp_path: Path) -> None:
    lines = [
        f"demo/__init__.py,{record_hash(b'something else')},6",
        f"{DIST_INFO}/METADATA,,",
        f"{DIST_INFO}/RECORD,,",
    ]
    wheel = build_wheel(
        tmp_path,
        "demo",
        files={"demo/__init__.py": "X = 1\n"},
        record=False,
        extra_members=[(f"{DIST_INFO}/RECORD", "\n".join(lines).encode())],
    )
    with pytest.raises(BundleError) as info:
        write_bundle(wheel, tmp_path / "out")
    message = str(info.value)
    assert "'demo/__init__.py' has sha256=" in message
    assert "METADATA" in message  # unhashed
    assert "WHEEL" in message  # not listed at all


def test_wheel_without_record_is_refused(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "demo", record=False)
    with pytest.raises(BundleError, match=re.escape("0 top-level .dist-info/RECORD")):
        write_bundle(wheel, tmp_path / "out")


def test_truncated_bundle_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = bundle_of(make_wheel(tmp_path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptBundle, match=r"truncated|checksum|decompressed"):
        read_everything(path)


def test_newer_format_version_is_refused_with_advice(tmp_path: Path) -> None:
    path = bundle_of(make_wheel(tmp_path))
    data = bytearray(path.read_bytes())
    data[24:26] = (bundle.FORMAT_VERSION + 1).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBundle, match="upgrade wheelcas"):
        read_bundle_header(path)


def test_a_non_bundle_has_no_header(tmp_path: Path) -> None:
    with pytest.raises(CorruptBundle, match="not a wheelcas bundle"):
        read_bundle_header(make_wheel(tmp_path))
