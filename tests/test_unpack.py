"""Safe unpacking: path rules, zip bombs, RECORD checks, .data remapping, both source kinds."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from cas_daemon import unpack
from cas_daemon.errors import RecordMismatch, UnsafeWheelError, WheelTooLarge
from cas_daemon.unpack import (
    MemberSpec,
    UnpackLimits,
    UnpackResult,
    data_scheme_dest,
    member_name_problem,
    plan_unpack,
    unpack_wheel,
    zip_member_spec,
)
from lockgen import bundle
from lockgen.bundle import iter_bundle_members, read_bundle_header, write_bundle
from lockgen.record import RecordVerifier
from tests.support.wheels import FIXED_DATE_TIME, build_wheel, record_hash

DIST_INFO = "demo-1.0.dist-info"
RECORD = f"{DIST_INFO}/RECORD"


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def make_bundle(path: Path, members: Sequence[tuple[str, bytes, int]], wheel: str) -> Path:
    """A bundle written by hand from the documented layout, to say things write_bundle won't."""
    header = json.dumps({"wheel_filename": wheel, "wheel_sha256": "0" * 64}).encode()
    payload = bundle.MAGIC + struct.pack("<H", bundle.FORMAT_VERSION) + header
    manifest = json.dumps([[n, len(d), m] for n, d, m in members]).encode()
    content = struct.pack("<I", len(manifest)) + manifest + b"".join(d for _, d, _ in members)
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(content)
    path.write_bytes(struct.pack("<II", 0x184D2A5B, len(payload)) + payload + frame)
    return path


def read_members(path: Path) -> list[tuple[str, bytes, int]]:
    return [(m.name, b"".join(m.chunks()), m.mode) for m in iter_bundle_members(path)]


def zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=FIXED_DATE_TIME)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


# --- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("pkg/mod.py", None),
        ("pkg/", None),
        ("", "has an empty name"),
        ("../evil.py", "has a '..' segment"),
        ("a/../../b.py", "has a '..' segment"),
        ("/abs.py", "is an absolute path"),
        ("pkg\\mod.py", "contains a backslash"),
        ("C:evil.py", "starts with a drive letter"),
        ("a//b.py", "has an empty or '.' segment"),
        ("./a.py", "has an empty or '.' segment"),
        ("a\x00.py", "contains a NUL byte"),
    ],
)
def test_member_name_rules(name: str, problem: str | None) -> None:
    assert member_name_problem(name) == problem


def test_purelib_and_platlib_land_at_the_root_other_schemes_stay() -> None:
    data = "demo-1.0.data"
    assert data_scheme_dest(f"{data}/purelib/demo/x.py", data) == "demo/x.py"
    assert data_scheme_dest(f"{data}/platlib/demo/_c.so", data) == "demo/_c.so"
    assert data_scheme_dest(f"{data}/scripts/demo", data) == f"{data}/scripts/demo"
    assert data_scheme_dest("other-1.0.data/purelib/x.py", data) == "other-1.0.data/purelib/x.py"


def test_zip_member_kinds_come_from_the_unix_mode() -> None:
    assert zip_member_spec(zip_info("a", 0o120777)).kind == "symlink"
    assert zip_member_spec(zip_info("a", 0o010644)).kind == "other"  # a fifo
    assert zip_member_spec(zip_info("a", 0)).kind == "file"  # made where modes don't exist
    assert zip_member_spec(zip_info("a", 0o100755)).executable


def test_plan_puts_record_first_and_refuses_clashes() -> None:
    def spec(name: str) -> MemberSpec:
        return MemberSpec(name, 1, "file", False)

    plan = plan_unpack([spec("demo/a.py"), spec(RECORD)], UnpackLimits(), "w.whl")
    assert [f.name for f in plan.files] == [RECORD, "demo/a.py"]
    clash = [spec(RECORD), spec("demo/a.py"), spec("demo-1.0.data/purelib/demo/a.py")]
    with pytest.raises(UnsafeWheelError, match=re.escape("lands on the same path as 'demo/a.py'")):
        plan_unpack(clash, UnpackLimits(), "w.whl")
    with pytest.raises(UnsafeWheelError, match="both a file and a directory"):
        plan_unpack([spec(RECORD), spec("demo"), spec("demo/a.py")], UnpackLimits(), "w.whl")


def test_record_verifier_collects_every_kind_of_problem() -> None:
    text = "\n".join(
        [
            f"a.py,{record_hash(b'a')},1",
            f"b.py,{record_hash(b'b')},1",
            "c.py,md5=abc,1",
            f"gone.py,{record_hash(b'g')},1",
            f"hex.py,sha256={hashlib.sha256(b'h').hexdigest()},1",  # as some real wheels write it
            f"{RECORD},,",
            "broken line",
        ]
    )
    verifier = RecordVerifier(text.encode(), RECORD)
    for name, data in [
        ("a.py", b"a"),
        ("b.py", b"B"),
        ("c.py", b"c"),
        ("hex.py", b"h"),
        ("new.py", b"n"),
        (RECORD, b""),
    ]:
        hasher = verifier.hasher(name)
        if hasher:
            hasher.update(data)
        verifier.check(name, hasher, len(data))
    problems = dict(verifier.finish())
    assert set(problems) == {RECORD, "b.py", "c.py", "gone.py", "new.py"}
    assert problems[RECORD].startswith("line 7 has 1 fields")
    assert "only sha256 or stronger" in problems["c.py"]
    assert problems["gone.py"] == "is listed in RECORD but missing from the wheel"
    assert problems["new.py"] == "is not listed in RECORD"


# --- unpacking wheels --------------------------------------------------------------------


@pytest.fixture(params=["zlib-ng", "zlib"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each deflate test runs with zlib-ng (the default where it has wheels) and the stdlib's
    zlib (the fallback)."""
    if request.param == "zlib":
        monkeypatch.setattr(unpack, "_inflate_lib", zlib)
    else:
        zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
        monkeypatch.setattr(unpack, "_inflate_lib", zlib_ng)
    return str(request.param)


def test_zlib_ng_is_installed_where_the_project_asks_for_it() -> None:
    if platform.machine() not in ("x86_64", "aarch64", "AMD64", "arm64"):
        pytest.skip("zlib-ng is only a dependency where it has wheels")
    assert unpack.INFLATE_LIBRARY == "zlib_ng.zlib_ng"


@pytest.mark.usefixtures("inflater")
def test_unpacks_files_with_modes_and_reports_counts(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "demo", data_files={"scripts/run": "#!/bin/sh\n"})
    result = unpack_wheel(wheel, tmp_path / "site")
    site = tmp_path / "site"
    assert result == UnpackResult(5, result.bytes, DIST_INFO)
    assert result.bytes == sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    assert stat.S_IMODE((site / "demo-1.0.data/scripts/run").stat().st_mode) == 0o755
    assert stat.S_IMODE((site / "demo/__init__.py").stat().st_mode) == 0o644


@pytest.mark.parametrize("verify", [True, False])
def test_digests_are_the_sha256_of_what_was_written_from_the_minimum_size(
    tmp_path: Path, verify: bool
) -> None:
    files: dict[str, bytes | str] = {
        "demo/__init__.py": "",
        "demo/small.py": "S = 1\n",
        "demo/big.py": "B = 1\n" * 400,
        "demo/exactly.txt": b"x" * 1024,
    }
    data = {"purelib/remapped.py": "R = 2\n" * 300}
    wheel = build_wheel(tmp_path, "demo", files=files, data_files=data)
    site = tmp_path / "site"
    result = unpack_wheel(wheel, site, verify_record=verify, digest_min_size=1024)

    expected = {
        rel: hashlib.sha256((site / rel).read_bytes()).hexdigest()
        for rel in files_under(site)
        if (site / rel).stat().st_size >= 1024
    }
    assert {"demo/big.py", "demo/exactly.txt", "remapped.py"} <= set(expected)
    assert result.digests == expected


def test_no_digests_unless_asked_and_none_for_empty_files(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "demo", files={"demo/__init__.py": "", "demo/a.py": "A = 1\n"})
    assert unpack_wheel(wheel, tmp_path / "a").digests == {}
    digests = unpack_wheel(wheel, tmp_path / "b", digest_min_size=0).digests
    assert "demo/a.py" in digests
    assert "demo/__init__.py" not in digests  # an empty file is never worth sharing


def test_a_bundle_gives_digests_too(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w", "demo", files={"demo/big.py": "B = 1\n" * 400})
    packed = tmp_path / "demo.whl.wcb.zst"
    write_bundle(wheel, packed)
    result = unpack_wheel(packed, tmp_path / "site", digest_min_size=1024)
    big = (tmp_path / "site/demo/big.py").read_bytes()
    assert result.digests["demo/big.py"] == hashlib.sha256(big).hexdigest()


def test_purelib_and_platlib_are_remapped_to_the_root(tmp_path: Path) -> None:
    data = {
        "purelib/pure_mod.py": "P = 1\n",
        "platlib/plat_mod.py": "Q = 2\n",
        "headers/demo.h": "int x;\n",
    }
    wheel = build_wheel(tmp_path, "demo", data_files=data)
    unpack_wheel(wheel, tmp_path / "site")
    names = files_under(tmp_path / "site")
    assert {"pure_mod.py", "plat_mod.py", "demo-1.0.data/headers/demo.h"} <= set(names)
    assert not any("purelib" in n or "platlib" in n for n in names)


def test_carton_style_plain_wheel_bundle_unpacks_with_record_checked(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "model/.carton/bundled_wheels/ab12", "demo")
    result = unpack_wheel(wheel, tmp_path / "site", verify_record=True)
    assert result.dist_info == DIST_INFO
    assert "demo/__init__.py" in files_under(tmp_path / "site")


def test_target_must_not_exist(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "demo")
    (tmp_path / "site").mkdir()
    with pytest.raises(FileExistsError):
        unpack_wheel(wheel, tmp_path / "site")


def test_wheel_with_bad_record_is_refused_only_when_verifying(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w", "demo", extra_members=[("demo/extra.py", b"E = 1\n")])
    with pytest.raises(RecordMismatch) as info:
        unpack_wheel(wheel, tmp_path / "a", display_name="https://example.invalid/demo.whl")
    assert info.value.member == "demo/extra.py"
    assert str(info.value).startswith("https://example.invalid/demo.whl:")
    assert not (tmp_path / "a").exists()
    unpack_wheel(wheel, tmp_path / "b", verify_record=False)
    assert "demo/extra.py" in files_under(tmp_path / "b")


def test_missing_record_is_refused_when_verifying(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "demo", record=False)
    with pytest.raises(RecordMismatch, match="RECORD' is missing"):
        unpack_wheel(wheel, tmp_path / "site")


# --- hostile wheels: every refusal names the member and leaves nothing behind -------------


def refuse(tmp_path: Path, extra: tuple[zipfile.ZipInfo | str, bytes]) -> UnsafeWheelError:
    wheel = build_wheel(tmp_path / "w", "demo", extra_members=[extra])
    before = list(tmp_path.rglob("*"))
    with pytest.raises(UnsafeWheelError) as info:
        unpack_wheel(wheel, tmp_path / "stage" / "site")
    assert sorted(tmp_path.rglob("*")) == sorted([*before, tmp_path / "stage"])
    return info.value


def test_refuses_parent_traversal_member(tmp_path: Path) -> None:
    error = refuse(tmp_path, ("../evil.py", b"boom"))
    assert (error.member, error.reason) == ("../evil.py", "has a '..' segment")


def test_refuses_absolute_member(tmp_path: Path) -> None:
    error = refuse(tmp_path, ("/abs.py", b"boom"))
    assert (error.member, error.reason) == ("/abs.py", "is an absolute path")


def test_refuses_nested_traversal_member(tmp_path: Path) -> None:
    error = refuse(tmp_path, ("a/../../b.py", b"boom"))
    assert (error.member, error.reason) == ("a/../../b.py", "has a '..' segment")


def test_refuses_backslash_member(tmp_path: Path) -> None:
    error = refuse(tmp_path, ("..\\evil.py", b"boom"))
    assert error.member == "..\\evil.py"


def test_refuses_symlink_member(tmp_path: Path) -> None:
    error = refuse(tmp_path, (zip_info("demo/link", 0o120777), b"/etc/passwd"))
    assert (error.member, error.reason) == ("demo/link", "is a symbolic link")


def test_refuses_duplicate_members(tmp_path: Path) -> None:
    error = refuse(tmp_path, ("demo/__init__.py", b"import os; os.system('boom')"))
    assert error.member == "demo/__init__.py"


def test_refuses_declared_sizes_over_the_limits(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w", "demo", files={"demo/big.py": "#" * 5000})
    with pytest.raises(WheelTooLarge, match="the unpacked size"):
        unpack_wheel(wheel, tmp_path / "a", limits=UnpackLimits(max_total_bytes=4000))
    with pytest.raises(WheelTooLarge, match=re.escape("'demo/big.py'")):
        unpack_wheel(wheel, tmp_path / "b", limits=UnpackLimits(max_member_bytes=4000))
    with pytest.raises(WheelTooLarge, match="member count"):
        unpack_wheel(wheel, tmp_path / "c", limits=UnpackLimits(max_members=2))
    assert files_under(tmp_path) == ["w/demo-1.0-py3-none-any.whl"]


@pytest.mark.usefixtures("inflater")
def test_refuses_a_member_that_inflates_past_its_declared_size(tmp_path: Path) -> None:
    """A central directory that lies (file_size 10) about 8 MiB of zeros: stopped early."""
    wheel = build_wheel(tmp_path / "w", "demo", files={"demo/bomb.bin": b"\0" * (8 << 20)})
    data = bytearray(wheel.read_bytes())
    name = b"demo/bomb.bin"
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46 : entry + 46 + len(name)] != name:  # find its central header
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = struct.pack("<I", 10)  # uncompressed size
    wheel.write_bytes(bytes(data))
    with pytest.raises(WheelTooLarge, match="inflating past its declared size") as info:
        unpack_wheel(wheel, tmp_path / "site")
    assert info.value.limit == 10
    assert not (tmp_path / "site").exists()


@pytest.mark.usefixtures("inflater")
def test_refuses_a_corrupt_deflate_stream(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "w", "demo", files={"demo/x.py": "x = 1\n" * 1000})
    data = bytearray(wheel.read_bytes())
    start = data.index(b"demo/x.py") + len(b"demo/x.py")  # first local header's data
    data[start : start + 8] = b"\xff" * 8
    wheel.write_bytes(bytes(data))
    with pytest.raises(UnsafeWheelError, match=re.escape("'demo/x.py' is corrupt")):
        unpack_wheel(wheel, tmp_path / "site")


# --- bundles -----------------------------------------------------------------------------


def bundled(tmp_path: Path) -> tuple[Path, list[tuple[str, bytes, int]]]:
    wheel = build_wheel(tmp_path / "w", "demo", files={"demo/__init__.py": "X = 1\n"})
    path = tmp_path / "demo.whl.wcb.zst"
    write_bundle(wheel, path)
    return path, read_members(path)


def test_tampered_bundle_member_is_refused_by_record(tmp_path: Path) -> None:
    path, members = bundled(tmp_path)
    tampered = [(n, b"X = 2\n" if n == "demo/__init__.py" else d, m) for n, d, m in members]
    make_bundle(path, tampered, read_bundle_header(path).wheel_filename)
    with pytest.raises(RecordMismatch) as info:
        unpack_wheel(path, tmp_path / "site", verify_record=False)  # forced on for bundles
    assert info.value.member == "demo/__init__.py"
    assert not (tmp_path / "site").exists()


def test_bundle_member_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    path, members = bundled(tmp_path)
    make_bundle(path, [*members, ("demo/link", b"/etc/passwd", 0o120777)], "demo.whl")
    with pytest.raises(UnsafeWheelError) as info:
        unpack_wheel(path, tmp_path / "site")
    assert (info.value.member, info.value.reason) == ("demo/link", "is a symbolic link")


def test_bundle_traversal_member_is_refused_before_writing(tmp_path: Path) -> None:
    path, members = bundled(tmp_path)
    make_bundle(path, [*members, ("../evil.py", b"boom", 0o100644)], "demo.whl")
    with pytest.raises(UnsafeWheelError, match=re.escape("'../evil.py' has a '..' segment")):
        unpack_wheel(path, tmp_path / "stage" / "site")
    assert not (tmp_path / "evil.py").exists()
    assert list((tmp_path / "stage").iterdir()) == []


def test_bundle_whose_record_is_not_first_is_refused(tmp_path: Path) -> None:
    path, members = bundled(tmp_path)
    make_bundle(path, [*members[1:], members[0]], "demo.whl")
    with pytest.raises(RecordMismatch, match="not the bundle's first member"):
        unpack_wheel(path, tmp_path / "site")


def test_truncated_bundle_is_refused(tmp_path: Path) -> None:
    path, _ = bundled(tmp_path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(UnsafeWheelError) as info:
        unpack_wheel(path, tmp_path / "site", display_name="model/.carton/bundled_wheels/x")
    assert info.value.source == "model/.carton/bundled_wheels/x"
    assert not (tmp_path / "site").exists()
