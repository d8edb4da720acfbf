"""Choosing a worker's interpreter: discovery, the range, the highest version, the error."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from loader import interpreters
from loader.interpreters import Candidate, Interpreter, NoInterpreterError, select
from loader.semver import parse_requirement


def fake_probe(versions: dict[str, str], calls: list[str]) -> Callable[[str], Interpreter | None]:
    def probe(path: str) -> Interpreter | None:
        calls.append(path)
        text = versions.get(path)
        if text is None:
            return None
        major, minor, micro = (int(p) for p in text.split("."))
        return Interpreter(path, (major, minor, micro), f"cpython-{major}{minor}")

    return probe


def candidates(*paths: str) -> list[Candidate]:
    return [Candidate(p, "test", interpreters.minor_from_name(p)) for p in paths]


VERSIONS = {
    "/a/python3.10": "3.10.13",
    "/a/python3.11": "3.11.2",
    "/b/python3.11": "3.11.7",
    "/b/python3.12": "3.12.1",
    "/b/python3.13": "3.13.0",
    "/b/python3.7": "3.7.16",
}
ALL = candidates(*VERSIONS)


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        ("=3.12", "/b/python3.12"),
        (">=3.8", "/b/python3.13"),
        ("=3.11", "/b/python3.11"),  # the highest patch release
        ("=3.11.2", "/a/python3.11"),
        (">=3.9, <3.12", "/b/python3.11"),
        ("^3.10", "/b/python3.13"),
        ("~3.10", "/a/python3.10"),
        ("*", "/b/python3.13"),
    ],
)
def test_the_highest_satisfying_version_wins(requirement: str, expected: str) -> None:
    chosen = select(parse_requirement(requirement), ALL, fake_probe(VERSIONS, []))
    assert chosen.path == expected


def test_only_plausible_minor_versions_are_probed() -> None:
    calls: list[str] = []
    select(parse_requirement(">=3.9"), ALL, fake_probe(VERSIONS, calls))
    assert calls == ["/b/python3.13"]  # 3.13 satisfies: nothing lower can beat it
    calls.clear()
    select(parse_requirement("=3.11"), ALL, fake_probe(VERSIONS, calls))
    assert sorted(calls) == ["/a/python3.11", "/b/python3.11"]


def test_unnamed_candidates_are_always_probed() -> None:
    versions = {**VERSIONS, "/opt/custom/bin/python": "3.14.0"}
    calls: list[str] = []
    found = candidates("/opt/custom/bin/python", *VERSIONS)
    chosen = select(parse_requirement(">=3.9"), found, fake_probe(versions, calls))
    assert chosen.path == "/opt/custom/bin/python"


def test_equal_versions_prefer_the_earlier_candidate() -> None:
    versions = {"/first/python3.12": "3.12.1", "/second/python3.12": "3.12.1"}
    found = candidates("/first/python3.12", "/second/python3.12")
    assert select(parse_requirement("=3.12"), found, fake_probe(versions, [])).path == (
        "/first/python3.12"
    )


def test_a_name_that_lies_is_judged_by_its_probe() -> None:
    versions = {"/x/python3.12": "3.11.0"}
    with pytest.raises(NoInterpreterError):
        select(parse_requirement("=3.12"), candidates("/x/python3.12"), fake_probe(versions, []))


def test_no_satisfying_interpreter_lists_every_candidate() -> None:
    with pytest.raises(NoInterpreterError) as raised:
        select(parse_requirement("=3.99"), [*ALL, *candidates("/broken/python3.9")],
               fake_probe(VERSIONS, []))  # fmt: skip
    message = str(raised.value)
    assert "'=3.99'" in message
    for path, version in VERSIONS.items():
        assert f"{path} (test): {version}" in message
    assert "/broken/python3.9 (test): does not run" in message
    assert "WHEELCAS_PYTHONS" in message


def test_interpreters_older_than_the_worker_supports_are_refused() -> None:
    with pytest.raises(NoInterpreterError, match=r"3\.8 or newer"):
        select(parse_requirement("=3.7"), ALL, fake_probe(VERSIONS, []))


@pytest.mark.parametrize(
    ("requirement", "minor", "expected"),
    [
        ("=3.11", (3, 11), True),
        ("=3.11", (3, 12), False),
        (">3.11", (3, 11), False),  # Cargo: >3.11 is >=3.12.0
        (">=3.11.5", (3, 11), True),
        ("<3.11.1", (3, 11), True),
        ("<3.11", (3, 11), False),
        (">=3.9, <3.12", (3, 12), False),
        ("^3.10", (4, 0), False),
    ],
)
def test_minor_may_match(requirement: str, minor: tuple[int, int], expected: bool) -> None:
    assert interpreters.minor_may_match(parse_requirement(requirement), minor) is expected


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_discover_order_and_sources(tmp_path: Path) -> None:
    configured = _executable(tmp_path / "custom" / "python")
    on_path = _executable(tmp_path / "bin" / "python3.12")
    _executable(tmp_path / "bin" / "python3")  # not python3.X: not a candidate
    _executable(tmp_path / "bin" / "python3.12-config")
    shim = _executable(tmp_path / "pyenv" / "shims" / "python3.11")
    pyenv = _executable(tmp_path / "pyenv" / "versions" / "3.11.7" / "bin" / "python3.11")
    (tmp_path / "bin" / "python3.99").symlink_to(on_path)  # the same binary: listed once
    (tmp_path / "bin" / "python3.13").write_text("")  # not executable
    env = {
        "WHEELCAS_PYTHONS": os.pathsep.join([str(configured), str(tmp_path / "missing")]),
        "PATH": os.pathsep.join([str(shim.parent), str(tmp_path / "bin")]),
        "PYENV_ROOT": str(tmp_path / "pyenv"),
    }
    found = interpreters.discover(env, current="/nonexistent/python")
    assert [(c.path, c.source, c.minor) for c in found] == [
        (str(configured), "WHEELCAS_PYTHONS", None),
        (str(on_path), "PATH", (3, 12)),
        (str(pyenv), "pyenv", (3, 11)),
    ]


def test_probe_runs_an_interpreter_once(
    pyenv_python: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    python = pyenv_python("3.12")
    found = interpreters.probe(python)
    assert found is not None
    assert found.version[:2] == (3, 12)
    assert found.cache_tag == "cpython-312"

    def fail(path: str) -> None:
        raise AssertionError("probed twice")

    monkeypatch.setattr(interpreters, "_run_probe", fail)
    assert interpreters.probe(python) == found  # cached by path, mtime and size


def test_probe_of_the_running_interpreter_needs_no_subprocess() -> None:
    found = interpreters.probe(sys.executable)
    assert found is not None
    assert found.version == sys.version_info[:3]


def test_probe_of_something_that_is_not_python(tmp_path: Path) -> None:
    script = tmp_path / "python3.12"
    script.write_text("#!/bin/sh\necho nonsense\n")
    script.chmod(0o755)
    assert interpreters.probe(str(script)) is None
    assert interpreters.probe(str(tmp_path / "missing")) is None


def test_discover_reads_the_daemon_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # user mode even when run as root
    from_env = _executable(tmp_path / "env" / "python")
    from_file = _executable(tmp_path / "file" / "python3.12")
    config = tmp_path / "config" / "wheelcas" / "daemon.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[python]\ninterpreters = ["{from_file}", "{tmp_path / "missing"}"]\n')
    env = {
        "WHEELCAS_PYTHONS": str(from_env),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PATH": "",
        "PYENV_ROOT": str(tmp_path / "no-pyenv"),
    }
    found = interpreters.discover(env, current="/nonexistent/python")
    assert [(c.path, c.source) for c in found] == [
        (str(from_env), "WHEELCAS_PYTHONS"),
        (str(from_file), "python.interpreters"),
    ]
    assert found[1].minor == (3, 12)
    config.unlink()
    assert [c.path for c in interpreters.discover(env, current=None)] == [str(from_env)]
