"""One compile worker process and its protocol, without the pools: the wire format, the checks
of its answers, half-done writes, batching, and a real worker of this interpreter."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from cas_daemon.compile_sources import BATCH_BYTES, BATCH_FILES, cut_batches, find_sources
from cas_daemon.compile_worker import (
    ProtocolError,
    Source,
    WorkerProcess,
    encode_batch,
    is_partial_write,
    parse_failures,
    remove_partial_writes,
    wire_path,
)


def test_a_path_that_is_not_utf8_survives_the_wire() -> None:
    path = os.fsdecode(b"/store/caf\xe9/mod.py")  # latin-1 bytes: surrogate-escaped here

    line = encode_batch([(path, None, 10), ("/a/b.py", "/shown/b.py", 3)])

    assert line.endswith(b"\n")
    assert line.isascii()
    wire = json.loads(line)
    # What the worker does with each path (WORKER_SOURCE's path()).
    assert os.fsencode(os.fsdecode(wire[0][0].encode("latin-1"))) == b"/store/caf\xe9/mod.py"
    assert wire[0][1] is None
    assert wire[1] == [wire_path("/a/b.py"), "/shown/b.py"]


def test_an_answer_is_checked_whole() -> None:
    assert parse_failures([], 3) == []
    assert parse_failures([[2, "compile", "bad syntax", 0], [0, "os", "full", 28]], 3) == [
        (2, "compile", "bad syntax", 0),
        (0, "os", "full", 28),
    ]
    nonsense: list[object] = [
        None,
        {"0": 1},
        [[0, "compile", "x"]],  # three fields
        [["a", "compile", "x", 0]],  # not an index
        [[3, "os", "x", 0]],  # past the batch
        [[-1, "os", "x", 0]],
    ]
    for answer in nonsense:
        with pytest.raises(ProtocolError):
            parse_failures(answer, 3)


@pytest.mark.parametrize(
    ("name", "partial"),
    [
        ("mod.cpython-311.pyc.140234", True),
        ("mod.cpython-311.pyc", False),
        ("mod.cpython-311.pyc.tmp", False),
        ("notes.txt.123", False),
        ("123", False),
    ],
)
def test_a_half_done_write_is_told_apart_by_its_name(name: str, partial: bool) -> None:
    assert is_partial_write(name) is partial


def test_half_done_writes_are_removed_from_pycache_dirs_only(tmp_path: Path) -> None:
    cache = tmp_path / "pkg" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "m.cpython-311.pyc").write_bytes(b"done")
    (cache / "m.cpython-311.pyc.4242").write_bytes(b"half")
    (tmp_path / "pkg" / "data.pyc.7").write_bytes(b"not bytecode of ours")

    remove_partial_writes(tmp_path)

    assert sorted(p.name for p in cache.iterdir()) == ["m.cpython-311.pyc"]
    assert (tmp_path / "pkg" / "data.pyc.7").exists()


def _sources(*sizes: int) -> list[Source]:
    return [(f"/t/m{i}.py", None, size) for i, size in enumerate(sizes)]


def test_batches_are_cut_by_bytes_or_by_files_in_order() -> None:
    big, small = BATCH_BYTES, 10
    sources = _sources(big, small, small, *[small] * BATCH_FILES)

    batches = cut_batches(sources)

    assert [len(b) for b in batches] == [1, BATCH_FILES, 2]
    assert [s for b in batches for s in b] == sources
    assert cut_batches([]) == [[]]  # still sent: an interpreter that cannot run is found out


def test_sources_are_split_into_now_and_test_dirs_largest_first(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * 100)
    (tmp_path / "pkg" / "__pycache__" / "stale.py").write_text("")
    (tmp_path / "pkg" / "tests" / "test_a.py").write_text("")
    (tmp_path / "pkg" / "notes.txt").write_text("")

    now, later = find_sources(tmp_path, Path("/final"))

    assert [(Path(p).name, shown, size) for p, shown, size in now] == [
        ("big.py", "/final/pkg/big.py", 600),
        ("__init__.py", "/final/pkg/__init__.py", 0),
    ]
    assert [shown for _p, shown, _s in later] == ["/final/pkg/tests/test_a.py"]


def test_a_real_worker_says_hello_compiles_and_reports_what_it_could_not(
    tmp_path: Path,
) -> None:
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("VALUE = 1\n")
    bad.write_text("print 'python 2'\n")
    worker = WorkerProcess.start(sys.executable)
    try:
        hello = worker.read_answer()
        assert hello == [sys.implementation.cache_tag, worker.pid]

        worker.send(encode_batch([(str(good), "/shown/good.py", 10), (str(bad), None, 17)]))
        failures = parse_failures(worker.read_answer(), 2)
    finally:
        status, said = worker.reap(graceful=True)

    assert [(index, kind) for index, kind, _message, _errno in failures] == [(1, "compile")]
    assert "bad.py" in failures[0][2]
    pyc = tmp_path / "__pycache__" / f"good.{sys.implementation.cache_tag}.pyc"
    assert pyc.is_file()
    assert not (tmp_path / "__pycache__" / f"bad.{sys.implementation.cache_tag}.pyc").exists()
    assert status == "exit status 0"
    assert said == ""


def test_an_interpreter_that_does_not_run_is_told_apart_from_a_dead_worker(
    tmp_path: Path,
) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no such runtime' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    worker = WorkerProcess.start(str(fake))

    with pytest.raises(ProtocolError):
        worker.read_answer()
    worker.read_hello_of_dead()
    status, said = worker.reap(graceful=False)

    assert worker.started is False
    assert status == "exit status 3"
    assert said == "no such runtime"
