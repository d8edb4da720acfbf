"""The lockfile format: Carton's files read as is, ours written as Carton writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockgen.errors import LockfileError
from lockgen.lockfile import (
    LockedDep,
    LockEntry,
    LockFile,
    current_environment,
    dump_lockfile,
    entry_markers,
    parse_lockfile,
    read_lockfile,
    requirements_hash,
    sha256_hex,
    write_lockfile,
)

GOLDEN = Path(__file__).parent / "golden"
LINUX_311 = {
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "platform_system": "Linux",
}


def test_reads_a_lockfile_written_by_carton() -> None:
    lockfile = parse_lockfile((GOLDEN / "carton_written.lock").read_text())
    assert lockfile.orig_deps_hash.startswith("8d4c4c2b")
    first, second = lockfile.entries
    assert first.markers["python_version"] == "3.11"
    assert [d.url is not None for d in first.locked_deps] == [True, False]
    assert first.locked_deps[1].filename == "lit-16.0.6-py3-none-any.whl"
    # Carton matches on markers beyond the five it writes; so do we.
    assert second.markers == {"python_version": "3.10", "platform_system": "Linux"}


def test_first_matching_entry_wins_and_unset_markers_match_anything() -> None:
    lockfile = parse_lockfile((GOLDEN / "carton_written.lock").read_text())
    assert lockfile.find_entry(LINUX_311) is lockfile.entries[0]
    assert lockfile.find_entry({**LINUX_311, "python_version": "3.10"}) is lockfile.entries[1]
    assert lockfile.find_entry({**LINUX_311, "python_version": "3.12"}) is None


def test_writes_the_golden_file_byte_for_byte() -> None:
    carton = parse_lockfile((GOLDEN / "carton_written.lock").read_text())
    ours = LockFile(orig_deps_hash=carton.orig_deps_hash, entries=carton.entries[:1])
    assert dump_lockfile(ours) == (GOLDEN / "wheelcas_written.lock").read_text()


def test_round_trip_keeps_every_value() -> None:
    carton = parse_lockfile((GOLDEN / "carton_written.lock").read_text())
    assert parse_lockfile(dump_lockfile(carton)) == carton


def test_entry_markers_are_the_five_carton_writes() -> None:
    markers = entry_markers(current_environment())
    assert list(markers) == [
        "os_name",
        "sys_platform",
        "platform_machine",
        "platform_python_implementation",
        "python_version",
    ]


def test_current_environment_equals_packaging_default_environment() -> None:
    from packaging.markers import default_environment

    expected = {str(k): str(v) for k, v in default_environment().items()}
    assert {k: expected[k] for k in current_environment()} == current_environment()


def test_write_is_atomic_and_readable(tmp_path: Path) -> None:
    dep = LockedDep(sha256=sha256_hex("a" * 64), url="https://files.pythonhosted.org/x.whl")
    lockfile = LockFile(
        orig_deps_hash="b" * 64,
        entries=(LockEntry(markers=entry_markers(current_environment()), locked_deps=(dep,)),),
    )
    path = write_lockfile(tmp_path, lockfile)
    assert read_lockfile(tmp_path) == lockfile
    assert [p.name for p in path.parent.iterdir()] == ["carton.lock"]  # no temp left behind


def test_requirements_hash_reads_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_bytes(b"numpy\n")
    (tmp_path / "requirements.txt").symlink_to("real.txt")
    import hashlib

    assert requirements_hash(tmp_path) == hashlib.sha256(b"numpy\n").hexdigest()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("orig_deps_hash = ", "not valid TOML"),
        ("[[lockfile]]\n", "`orig_deps_hash` must be a str"),
        ('orig_deps_hash = "x"\nlockfile = 3\n', "`lockfile` must be a list"),
        (
            'orig_deps_hash = "x"\n[[lockfile]]\n[[lockfile.locked_deps]]\n'
            'sha256 = "zz"\nurl = "u"\n',
            "`lockfile[0].locked_deps[0].sha256` is not a sha256",
        ),
        (
            'orig_deps_hash = "x"\n[[lockfile]]\n[[lockfile.locked_deps]]\n'
            f'sha256 = "{"a" * 64}"\n',
            "needs exactly one of `url` and `bundled_whl_path`",
        ),
        (
            'orig_deps_hash = "x"\n[[lockfile]]\n[[lockfile.locked_deps]]\n'
            f'sha256 = "{"a" * 64}"\nbundled_whl_path = "../../etc/passwd"\n',
            "must stay inside the model dir",
        ),
        ('orig_deps_hash = "x"\n[[lockfile]]\npython_version = 3.11\n', "must be a str"),
    ],
)
def test_bad_lockfiles_name_the_problem(text: str, complaint: str) -> None:
    with pytest.raises(LockfileError, match=r"carton\.lock") as info:
        parse_lockfile(text, "m/.carton/carton.lock")
    assert complaint in str(info.value)
    assert "wheelcas lock" in str(info.value)  # says what to do
