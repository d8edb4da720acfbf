"""The test support itself: real dists, a real index, real pip, a hermetic environment."""

from __future__ import annotations

import csv
import email.parser
import hashlib
import http.client
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import pytest

from tests.support import (
    PackageIndex,
    build_sdist,
    build_wheel,
    index_pip_args,
    make_source_dir,
    record_hash,
    sha256_file,
)

PIP_TIMEOUT_S = 120


def verify_record(wheel: Path) -> dict[str, str]:
    """Check every RECORD line against the archive; return path -> hash field."""
    with zipfile.ZipFile(wheel) as zf:
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(zf.read(record_name).decode("utf-8"))))
        hashes: dict[str, str] = {}
        for path, hash_field, size in rows:
            if path == record_name:
                assert (hash_field, size) == ("", "")
                continue
            data = zf.read(path)
            assert hash_field == record_hash(data), path
            assert int(size) == len(data), path
            hashes[path] = hash_field
        return hashes


def read_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.BytesParser().parsebytes(zf.read(name))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        data: bytes = resp.read()
        return data


def run_pip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT_S,
        cwd=cwd,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


# -- wheels ----------------------------------------------------------------------------------


def test_wheel_layout_metadata_and_record(tmp_path: Path) -> None:
    wheel = build_wheel(
        tmp_path,
        "My.Pkg-Name",
        "2.1",
        requires=["dep>=1", 'extra; python_version < "3"'],
        requires_python=">=3.8",
        data_files={"purelib/pure.py": "P = 1\n", "scripts/tool": "#!python\n"},
    )
    assert wheel.name == "my_pkg_name-2.1-py3-none-any.whl"
    hashes = verify_record(wheel)
    assert set(hashes) == {
        "my_pkg_name/__init__.py",
        "my_pkg_name-2.1.data/purelib/pure.py",
        "my_pkg_name-2.1.data/scripts/tool",
        "my_pkg_name-2.1.dist-info/METADATA",
        "my_pkg_name-2.1.dist-info/WHEEL",
    }
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("my_pkg_name/__init__.py") == b'VERSION = "2.1"\n'
        assert zf.namelist()[-1] == "my_pkg_name-2.1.dist-info/RECORD"
        wheel_file = zf.read("my_pkg_name-2.1.dist-info/WHEEL").decode()
    assert "Root-Is-Purelib: true" in wheel_file
    assert "Tag: py3-none-any" in wheel_file
    meta = read_metadata(wheel)
    assert meta["Metadata-Version"] == "2.1"
    assert (meta["Name"], meta["Version"], meta["Requires-Python"]) == (
        "My.Pkg-Name",
        "2.1",
        ">=3.8",
    )
    assert meta.get_all("Requires-Dist") == ["dep>=1", 'extra; python_version < "3"']


def test_wheel_compressed_tag_is_listed_expanded(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "tagged", tag="py2.py3-none-any")
    assert wheel.name == "tagged-1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("tagged-1.0.dist-info/WHEEL").decode()
    assert "Tag: py2-none-any\nTag: py3-none-any\n" in text


def test_builds_are_reproducible(tmp_path: Path) -> None:
    def build_all(dest: Path) -> list[str]:
        return [
            sha256_file(build_wheel(dest, "repro", files={"repro.py": "X = 1\n"}, requires=["a"])),
            sha256_file(build_sdist(dest, "repro", requires=["a"])),
        ]

    first = build_all(tmp_path / "one")
    time.sleep(0.01)  # a different wall clock must not matter
    assert build_all(tmp_path / "two") == first
    wheel = (tmp_path / "two" / "repro-1.0-py3-none-any.whl").read_bytes()
    assert hashlib.sha256(wheel).hexdigest() == first[0]


def test_hostile_members_are_raw_and_unrecorded(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("evil/link", date_time=(2020, 1, 1, 0, 0, 0))
    link.external_attr = 0o120777 << 16
    wheel = build_wheel(
        tmp_path,
        "evil",
        extra_members=[("../evil.py", b"x"), ("/abs.py", b"y"), (link, b"/etc/passwd")],
    )
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert names[-3:] == ["../evil.py", "/abs.py", "evil/link"]
        assert zf.getinfo("evil/link").external_attr >> 16 == 0o120777
    assert not {"../evil.py", "/abs.py", "evil/link"} & set(verify_record(wheel))


def test_wheel_without_record(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "norecord", record=False)
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.endswith("RECORD")]


def test_sdist_layout(tmp_path: Path) -> None:
    sdist = build_sdist(tmp_path, "Src-Pkg", "0.3", requires=["dep"])
    assert sdist.name == "src_pkg-0.3.tar.gz"
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
        pyproject = tf.extractfile("src_pkg-0.3/pyproject.toml")
        assert pyproject is not None
        text = pyproject.read().decode()
    assert {
        "src_pkg-0.3/PKG-INFO",
        "src_pkg-0.3/wheelcas_test_backend.py",
        "src_pkg-0.3/src_pkg/__init__.py",
    } <= names
    assert 'build-backend = "wheelcas_test_backend"' in text
    assert 'backend-path = ["."]' in text


# -- index -----------------------------------------------------------------------------------


def test_index_pages(package_index: PackageIndex, wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "My_Pkg", requires_python=">=3.8,<4")
    sdist = build_sdist(wheel_dir, "foo-bar-baz", "1.0.post1")
    assert package_index.simple_url == f"{package_index.url}/simple/"
    assert index_pip_args(package_index) == ["--index-url", package_index.simple_url]

    root = fetch(package_index.simple_url).decode()
    assert 'href="/simple/my-pkg/"' in root
    assert 'href="/simple/foo-bar-baz/"' in root

    page = fetch(f"{package_index.simple_url}MY.pkg/").decode()  # any spelling of the name
    assert f'href="/files/{wheel.name}#sha256={sha256_file(wheel)}"' in page
    assert 'data-requires-python="&gt;=3.8,&lt;4"' in page

    page = fetch(f"{package_index.simple_url}foo-bar-baz").decode()  # redirected to the slash
    assert f"/files/{sdist.name}#sha256={sha256_file(sdist)}" in page
    assert "data-requires-python" not in page

    with pytest.raises(urllib.error.HTTPError) as not_found:
        fetch(f"{package_index.simple_url}late/")
    assert not_found.value.code == 404
    not_found.value.close()
    late = build_wheel(wheel_dir, "late")  # files added after start are served
    assert late.name in fetch(f"{package_index.simple_url}late/").decode()
    assert fetch(package_index.file_url(late.name)) == late.read_bytes()


def test_download_counts_and_log(package_index: PackageIndex, wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "counted")
    assert package_index.downloads(wheel.name) == 0
    for _ in range(2):
        with urllib.request.urlopen(package_index.file_url(wheel.name), timeout=10) as resp:
            assert resp.headers["Content-Length"] == str(wheel.stat().st_size)
            assert resp.read() == wheel.read_bytes()
    head = urllib.request.Request(package_index.file_url(wheel.name), method="HEAD")
    urllib.request.urlopen(head, timeout=10).close()
    assert package_index.downloads(wheel.name) == 2
    assert package_index.download_counts[wheel.name] == 2
    assert package_index.requests_log == [f"/files/{wheel.name}"] * 3
    package_index.reset_counters()
    assert package_index.downloads(wheel.name) == 0
    assert package_index.requests_log == []


def test_truncate_fault(package_index: PackageIndex, wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "cut")
    package_index.truncate(wheel.name, 100)
    with urllib.request.urlopen(package_index.file_url(wheel.name), timeout=10) as resp:
        assert resp.headers["Content-Length"] == str(wheel.stat().st_size)
        with pytest.raises(http.client.IncompleteRead) as short:
            resp.read()
    assert short.value.partial == wheel.read_bytes()[:100]
    package_index.clear_faults()
    assert fetch(package_index.file_url(wheel.name)) == wheel.read_bytes()
    assert package_index.downloads(wheel.name) == 2


def test_corrupt_fault(package_index: PackageIndex, wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "bad")
    package_index.corrupt(wheel.name)
    served = fetch(package_index.file_url(wheel.name))
    assert len(served) == wheel.stat().st_size
    assert served != wheel.read_bytes()
    page = fetch(f"{package_index.simple_url}bad/").decode()
    assert f"#sha256={sha256_file(wheel)}" in page  # the page still advertises the real hash


def test_delay_fault(package_index: PackageIndex, wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "slow")
    package_index.delay(wheel.name, 0.3)
    start = time.monotonic()
    assert fetch(package_index.file_url(wheel.name)) == wheel.read_bytes()
    assert time.monotonic() - start >= 0.3


def test_stop_does_not_wait_for_stalled_download(wheel_dir: Path) -> None:
    wheel = build_wheel(wheel_dir, "stalled")
    index = PackageIndex(wheel_dir).start()
    index.delay(wheel.name, 30)
    with (
        urllib.request.urlopen(index.file_url(wheel.name), timeout=0.2) as resp,
        pytest.raises(TimeoutError),
    ):
        resp.read()
    start = time.monotonic()
    index.stop()
    assert time.monotonic() - start < 5
    index.stop()  # idempotent


# -- environment -----------------------------------------------------------------------------


def test_environment_is_hermetic(tmp_path: Path, short_tmp: Path) -> None:
    pip_vars = {k for k in os.environ if k.startswith("PIP_")}
    assert pip_vars == {
        "PIP_CONFIG_FILE",
        "PIP_DISABLE_PIP_VERSION_CHECK",
        "PIP_NO_INPUT",
        "PIP_CACHE_DIR",
    }
    assert os.environ["PIP_CONFIG_FILE"] == os.devnull
    assert "PYTHONPATH" not in os.environ
    assert "WHEELCAS_SOCKET" not in os.environ
    home = Path(os.environ["WHEELCAS_HOME"])
    assert home.is_dir()
    assert home.is_relative_to(tmp_path)
    runtime = Path(os.environ["XDG_RUNTIME_DIR"])
    assert runtime.is_dir()
    for short in (runtime, short_tmp):
        assert short.is_dir()
        assert len(str(short / "wheelcas" / "daemon.sock")) < 60


def test_pyenv_python(pyenv_python: Callable[[str], str]) -> None:
    current = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = pyenv_python(current)
    out = subprocess.run(
        [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == current
    with pytest.raises(pytest.skip.Exception, match=r"no Python 2\.99"):
        pyenv_python("2.99")


# -- real pip --------------------------------------------------------------------------------


@pytest.mark.slow
def test_pip_resolves_through_the_index(package_index: PackageIndex, wheel_dir: Path) -> None:
    app = build_wheel(wheel_dir, "app", requires=["dep>=1", "src-dep"])
    build_wheel(wheel_dir, "dep", "1.0")
    dep2 = build_wheel(wheel_dir, "dep", "2.0")
    too_new = build_wheel(wheel_dir, "dep", "3.0", requires_python="<3")
    src = build_sdist(wheel_dir, "src-dep", "0.5")
    result = run_pip(
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        "-",
        *index_pip_args(package_index),
        "app",
    )
    report = json.loads(result.stdout)
    resolved = {
        item["metadata"]["name"]: (item["metadata"]["version"], item["download_info"]["url"])
        for item in report["install"]
    }
    assert resolved == {
        "app": ("1.0", package_index.file_url(app.name)),
        "dep": ("2.0", package_index.file_url(dep2.name)),
        "src-dep": ("0.5", package_index.file_url(src.name)),
    }
    assert package_index.downloads(too_new.name) == 0  # skipped by data-requires-python
    assert package_index.downloads(app.name) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sdist", "source_dir"])
def test_pip_builds_offline(tmp_path: Path, kind: str) -> None:
    files = {"built/__init__.py": "from built.core import VALUE\n", "built/core.py": "VALUE = 42\n"}
    if kind == "sdist":
        target = build_sdist(tmp_path / "src", "built", "0.2", files=files, requires=["dep>=1"])
    else:
        target = make_source_dir(
            tmp_path / "built", "built", "0.2", files=files, requires=["dep>=1"]
        )
    out = tmp_path / "out"
    run_pip("wheel", "--no-deps", "--no-index", "--wheel-dir", str(out), str(target))
    wheel = out / "built-0.2-py3-none-any.whl"
    assert set(verify_record(wheel)) == {
        "built/__init__.py",
        "built/core.py",
        "built-0.2.dist-info/METADATA",
        "built-0.2.dist-info/WHEEL",
    }
    assert read_metadata(wheel).get_all("Requires-Dist") == ["dep>=1"]
    code = "import sys; sys.path.insert(0, sys.argv[1]); import built; print(built.VALUE)"
    imported = subprocess.run(
        [sys.executable, "-c", code, str(wheel)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert imported.stdout.strip() == "42"


@pytest.mark.slow
def test_backend_runs_on_python_3_8(tmp_path: Path, pyenv_python: Callable[[str], str]) -> None:
    python = pyenv_python("3.8")
    sdist = build_sdist(tmp_path, "old-py", "1.0", requires=["dep"])
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    tree = tmp_path / "x" / "old_py-1.0"
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import sys\n"
        "sys.path.insert(0, '.')\n"
        "import wheelcas_test_backend as b\n"
        "assert b.get_requires_for_build_wheel() == []\n"
        "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))\n"
        "print(b.build_wheel(sys.argv[1]))\n"
        "print(b.build_sdist(sys.argv[1]))\n"
    )
    result = subprocess.run(
        [python, "-c", script, str(out)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "old_py-1.0.dist-info",
        "old_py-1.0-py3-none-any.whl",
        "old_py-1.0.tar.gz",
    ]
    wheel = out / "old_py-1.0-py3-none-any.whl"
    assert "old_py/__init__.py" in verify_record(wheel)
    assert read_metadata(wheel).get_all("Requires-Dist") == ["dep"]
    assert (out / "old_py-1.0.dist-info" / "METADATA").read_bytes() == (
        tree / "PKG-INFO"
    ).read_bytes()
