"""The loader's daemon client: finding a daemon, its HTTP over AF_UNIX, errors, imports."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import loader.client as client_module
from cas_daemon.errors import HashMismatch
from loader.client import (
    DaemonClient,
    DaemonError,
    DaemonUnavailable,
    find_daemon,
    raise_error,
)
from loader.transport import Response
from lockgen.bundle import bundle_filename, write_bundle
from lockgen.errors import LockfileError
from tests.daemon_support import bundled_dep, lock_model, running_daemon, url_dep
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file


@pytest.fixture(autouse=True)
def _no_system_daemon(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon of this host's own must not answer for the tests."""
    monkeypatch.setattr(client_module, "SYSTEM_SOCKET", short_tmp / "system.sock")


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[socket.socket]:
    """A unix socket that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(short_tmp / "mute.sock"))
        sock.listen(8)
        yield sock


def test_find_daemon_is_none_without_a_socket(short_tmp: Path) -> None:
    assert find_daemon({"XDG_RUNTIME_DIR": str(short_tmp)}) is None


def test_find_daemon_is_none_quickly_for_a_stale_or_mute_socket(
    short_tmp: Path, listener: socket.socket
) -> None:
    stale = short_tmp / "wheelcas.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # the file stays behind, as after a crash; nobody listens
    started = time.monotonic()
    assert find_daemon({"XDG_RUNTIME_DIR": str(short_tmp)}) is None
    assert time.monotonic() - started < 0.2
    env = {"WHEELCAS_SOCKET": listener.getsockname()}
    started = time.monotonic()
    assert find_daemon(env, timeout=0.3) is None
    assert time.monotonic() - started < 1.0


def test_find_daemon_finds_a_running_daemon(short_tmp: Path, tmp_path: Path) -> None:
    with running_daemon(short_tmp, tmp_path / "store") as daemon:
        found = find_daemon({"WHEELCAS_SOCKET": str(daemon.socket_path)})
        assert found is not None
        assert found.socket_path == daemon.socket_path
        assert find_daemon({"WHEELCAS_SOCKET": "off"}) is None


def test_a_warm_resolve_imports_nothing_heavy(
    short_tmp: Path, tmp_path: Path, package_index: PackageIndex, wheel_dir: Path
) -> None:
    wheel = build_wheel(wheel_dir, "rho", files={"rho/__init__.py": "NAME = 'rho'\n"})
    model = tmp_path / "m"
    entry = lock_model(model, [url_dep(package_index, wheel)])
    code = """
import json, sys
from pathlib import Path
from loader.client import find_daemon
from lockgen.lockfile import read_lockfile
client = find_daemon()
result = client.resolve(Path(sys.argv[1]), read_lockfile(Path(sys.argv[1])).entries[0])
heavy = ("aiohttp", "asyncio", "numpy", "zstandard", "ssl", "http.client", "urllib.request")
print(json.dumps({"view": str(result.view), "heavy": [m for m in heavy if m in sys.modules]}))
"""
    with running_daemon(short_tmp, tmp_path / "store") as daemon:
        warm = daemon.client().resolve(model, entry)
        env = {"WHEELCAS_SOCKET": str(daemon.socket_path)}
        done = subprocess.run(
            [sys.executable, "-c", code, str(model)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=False,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"view": str(warm.view), "heavy": []}


def test_a_warm_resolve_neither_hashes_nor_opens_bundles(
    short_tmp: Path, tmp_path: Path, wheel_dir: Path
) -> None:
    wheel = build_wheel(wheel_dir, "tau", files={"tau/__init__.py": "NAME = 'tau'\n"})
    bundle = tmp_path / bundle_filename(wheel.name)
    write_bundle(wheel, bundle)
    model = tmp_path / "m"
    entry = lock_model(model, [bundled_dep(model, bundle, sha256_file(wheel))])
    code = """
import json, sys
from pathlib import Path
from cas_daemon import bundle_keys
from loader.client import find_daemon
from lockgen.lockfile import read_lockfile
hashed = []
bundle_keys.sha256_file = lambda path: hashed.append(str(path))
client = find_daemon()
result = client.resolve(Path(sys.argv[1]), read_lockfile(Path(sys.argv[1])).entries[0])
loaded = [m for m in ("zipfile", "lockgen.bundle", "zstandard") if m in sys.modules]
print(json.dumps({"view": str(result.view), "hashed": hashed, "loaded": loaded}))
"""
    with running_daemon(short_tmp, tmp_path / "store") as daemon:
        cold = daemon.client().resolve(model, entry)  # hashes the bundle once, remembers it
        env = {"WHEELCAS_SOCKET": str(daemon.socket_path)}
        done = subprocess.run(
            [sys.executable, "-c", code, str(model)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"view": str(cold.view), "hashed": [], "loaded": []}


def test_errors_come_back_as_their_own_class() -> None:
    mismatch = HashMismatch("https://x/a.whl", "a" * 64, "b" * 64)
    body = {
        "error": {
            "type": "HashMismatch",
            "module": "cas_daemon.errors",
            "message": str(mismatch),
            "fields": {"url": mismatch.url, "expected": "a" * 64, "actual": "b" * 64},
        }
    }
    with pytest.raises(HashMismatch) as caught:
        raise_error(body, 422)
    assert str(caught.value) == str(mismatch)
    assert (caught.value.expected, caught.value.actual) == ("a" * 64, "b" * 64)

    body = {"error": {"type": "LockfileError", "message": "x.lock: broken"}}
    with pytest.raises(LockfileError, match=r"^x\.lock: broken$"):
        raise_error(body, 400)

    body = {"error": {"type": "HostNotAllowed", "message": "refused"}}
    with pytest.raises(DaemonError) as generic:
        raise_error(body, 403)
    assert (generic.value.error_type, generic.value.status, str(generic.value)) == (
        "HostNotAllowed",
        403,
        "refused",
    )
    with pytest.raises(DaemonError, match="without an error body"):
        raise_error({"unexpected": True}, 500)


def _response(raw: bytes) -> Response:
    return Response(io.BytesIO(raw))


def test_responses_chunked_sized_and_cut_short() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'6\r\n{"a":1\r\n'
        b'9\r\n}\n{"b":2}\r\n'
        b"1\r\n\n\r\n"
        b"0\r\n\r\n"
    )
    assert [json.loads(line) for line in _response(chunked).lines()] == [{"a": 1}, {"b": 2}]
    sized = _response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
    assert (sized.status, sized.read()) == (404, b"{}")
    with pytest.raises(ConnectionError):
        _response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}").read()
    with pytest.raises(ConnectionError):
        list(_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n{}").lines())
    with pytest.raises(ConnectionError):
        _response(b"")


def test_a_daemon_that_dies_mid_stream_is_a_clean_error(short_tmp: Path) -> None:
    path = short_tmp / "dying.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve_half() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            event = b'{"event": {"kind": "start", "sha256": "x", "name": "x", "nbytes": 0}}\n'
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")

    thread = threading.Thread(target=serve_half, daemon=True)
    thread.start()
    entry = lock_model(short_tmp / "m", [])
    with pytest.raises(DaemonUnavailable, match="went away mid-request"):
        DaemonClient(path).resolve(short_tmp / "m", entry)
    thread.join(5)
    server.close()


def test_a_daemon_that_does_not_answer_times_out(listener: socket.socket) -> None:
    client = DaemonClient(listener.getsockname(), timeout=0.3)
    with pytest.raises(DaemonUnavailable, match="did not answer in time"):
        client.status()
