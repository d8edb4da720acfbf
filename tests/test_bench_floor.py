"""The cold floor's worker does the whole job it stands for: every member written as the wheel
holds it, a valid ``.pyc`` for every module the daemon compiles before it answers, none for
test dirs; otherwise its figure would be a bound on less work than the daemon does."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
import zipfile
from importlib.util import MAGIC_NUMBER, cache_from_source
from pathlib import Path

import pytest

from benchmarks import floor_worker
from tests.support.wheels import build_wheel

REPO_ROOT = Path(__file__).resolve().parents[1]


def _stored(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(
        wheels,
        "alpha",
        files={
            "alpha/__init__.py": "VALUE = 41 + 1\n",
            "alpha/sub/__init__.py": "",
            "alpha/sub/big.py": "".join(f"x{i} = {i}\n" for i in range(12_000)),
            "alpha/tests/__init__.py": "",
            "alpha/tests/test_it.py": "def test_it():\n    pass\n",
            "alpha/test/helper.py": "HELP = 1\n",
            "alpha/py2only.py": "print 'python 2'\n",
            "alpha/table.bin": bytes(range(256)) * 64,
        },
        extra_members=[(_stored("alpha/stored.py"), b"STORED = True\n")],
    )
    build_wheel(wheels, "beta", files={"beta.py": "NAME = 'beta'\n"})
    return wheels


def _load_pyc(source: Path) -> dict[str, object]:
    """Run ``source``'s ``.pyc`` after the checks an import makes of its header."""
    data = Path(cache_from_source(str(source))).read_bytes()
    stat = source.stat()
    assert data[:4] == MAGIC_NUMBER
    assert int.from_bytes(data[4:8], "little") == 0  # timestamp-checked, py_compile's default
    assert int.from_bytes(data[8:12], "little") == int(stat.st_mtime) & 0xFFFFFFFF
    assert int.from_bytes(data[12:16], "little") == stat.st_size
    namespace: dict[str, object] = {}
    exec(marshal.loads(data[16:]), namespace)  # noqa: S102, S302 - bytecode this test just made
    return namespace


def test_every_member_is_written_and_every_module_outside_test_dirs_compiled(
    wheels: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    counts = floor_worker.run(wheels, out, jobs=2)

    alpha_whl, beta_whl = sorted(wheels.glob("*.whl"))
    for wheel in (alpha_whl, beta_whl):
        with zipfile.ZipFile(wheel) as raw:
            members = [i for i in raw.infolist() if not i.is_dir()]
            for info in members:
                assert (out / wheel.name / info.filename).read_bytes() == raw.read(info)
    alpha = out / alpha_whl.name / "alpha"
    assert _load_pyc(alpha / "__init__.py")["VALUE"] == 42
    assert _load_pyc(alpha / "stored.py")["STORED"] is True
    assert _load_pyc(alpha / "sub" / "big.py")["x11999"] == 11999
    assert _load_pyc(out / beta_whl.name / "beta.py")["NAME"] == "beta"
    assert not (alpha / "tests" / "__pycache__").exists()
    assert not (alpha / "test" / "__pycache__").exists()
    assert not Path(cache_from_source(str(alpha / "py2only.py"))).exists()
    written = sum(len(f) for _r, _d, f in os.walk(out))
    pycs = sum(1 for _ in out.rglob("*.pyc"))
    assert counts == {
        "wheels": 2,
        "files": written - pycs,
        "modules": 5,  # alpha, alpha.sub, alpha.sub.big, alpha.stored, beta
        "skipped": 1,  # py2only
    }
    assert pycs == 5


def test_batches_hold_about_64_kib_of_source_largest_first() -> None:
    modules = [("small-a", 10_000), ("huge", 200_000), ("mid", 40_000), ("small-b", 30_000)]

    assert floor_worker.batches(modules) == [["huge"], ["mid", "small-b"], ["small-a"]]
    assert floor_worker.batches([]) == []


def test_the_command_prints_its_counts_and_time(wheels: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor_worker", str(wheels), str(tmp_path / "o"), "1"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )

    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["wheels"] == 2
    assert answer["modules"] == 5
    assert answer["jobs"] == 1
    assert 0 < answer["seconds"] < 60


def test_the_command_says_how_to_call_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor_worker", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 2
    assert "WHEELS_DIR OUT_DIR" in done.stderr
