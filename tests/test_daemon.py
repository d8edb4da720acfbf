"""The daemon, for real: ``python -m cas_daemon`` in a subprocess on a unix socket, fed by a
loopback index, stopped with real signals (SIGTERM, and SIGKILL at awkward moments)."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cas_daemon import bundle_keys
from cas_daemon.bundle_keys import DigestCache
from cas_daemon.config import (
    SETTINGS,
    ConfigError,
    KnownInterpreters,
    NoInterpreter,
    defaults,
    load_config,
    parse_duration,
    parse_mode,
    parse_size,
)
from cas_daemon.errors import HashMismatch
from cas_daemon.layout import StoreLayout
from cas_daemon.metadata import Metadata
from cas_daemon.progress import ProgressEvent
from cas_daemon.protocol import BadRequest, HostNotAllowed, check_host, parse_resolve_request
from loader.client import DaemonError, DaemonUnavailable, ResolveResult
from lockgen.bundle import bundle_filename, read_bundle_header, write_bundle
from lockgen.errors import WheelcasError
from lockgen.lockfile import LockedDep, LockEntry, sha256_hex
from tests.daemon_support import (
    Daemon,
    bundled_dep,
    files_under,
    lock_model,
    running_daemon,
    start_daemon,
    url_dep,
)
from tests.support.bundles import write_forged_bundle
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel, sha256_file

TAG = sys.implementation.cache_tag


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def daemon(short_tmp: Path, store: Path) -> Iterator[Daemon]:
    with running_daemon(short_tmp, store) as running:
        yield running


def _wheels(wheel_dir: Path, *names: str) -> list[Path]:
    return [build_wheel(wheel_dir, n, files={f"{n}/__init__.py": f"NAME = {n!r}\n"}) for n in names]


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def _listdir(directory: Path) -> list[str]:
    # Not files_under(): polled every few ms while thousands of files are written there.
    try:
        return [entry.name for entry in directory.iterdir()]
    except FileNotFoundError:
        return []


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _import_from(entries: list[Path], module: str) -> str:
    path = [str(e) for e in entries]
    code = f"import sys; sys.path[:0] = {path!r}; import {module} as m; print(m.NAME)"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_health_and_status(daemon: Daemon, store: Path) -> None:
    client = daemon.client()
    assert client.health()["api"] == 1
    status = client.status()
    assert status["pid"] == daemon.process.pid
    assert status["store"]["root"] == str(store)
    assert status["interpreters"] == {TAG: sys.executable}
    assert status["counters"]["resolves"] == 0


def test_cold_then_warm_resolve_serves_one_view(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheels = _wheels(wheel_dir, "alpha", "beta")
    model = tmp_path / "model"
    entry = lock_model(model, [url_dep(package_index, w) for w in wheels])
    client = daemon.client()

    cold = client.resolve(model, entry)
    warm = client.resolve(model, entry)

    assert cold.view is not None
    assert cold.view == warm.view
    assert cold.view.is_relative_to(daemon.store)
    assert (cold.already_ready, warm.already_ready) == (0, 2)
    layout = StoreLayout(daemon.store)
    shas = [sha256_file(w) for w in wheels]
    assert cold.site_dirs == tuple(layout.site_dir(s) for s in shas)
    assert all(layout.pyc_marker(s, TAG).is_file() for s in shas)
    assert [package_index.downloads(w.name) for w in wheels] == [1, 1]
    assert _import_from(cold.package_dirs, "beta") == "beta"
    counters = client.status()["counters"]
    assert (counters["resolves"], counters["downloads"], counters["cache_hits"]) == (2, 2, 2)
    assert counters["trees_linked_ahead"] == 2  # the cold resolve staged its view tree by tree
    assert not [n for n in _listdir(daemon.tmp_dir) if n.startswith("view-")]  # no parts left


def test_prefetch_readies_without_view_or_lease(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "gamma")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    result = daemon.client().prefetch(tmp_path / "m", entry)
    assert (result.view, result.lease_id, result.wheels) == (None, None, 1)
    assert StoreLayout(daemon.store).pyc_marker(sha256_file(wheel), TAG).is_file()


def test_concurrent_cold_resolves_download_each_wheel_once(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheels = _wheels(wheel_dir, "delta", "epsilon")
    for wheel in wheels:
        package_index.delay(wheel.name, 0.5)
    entry = lock_model(tmp_path / "m", [url_dep(package_index, w) for w in wheels])
    runs = [_in_thread(lambda: daemon.client().resolve(tmp_path / "m", entry)) for _ in range(6)]
    for thread, _ in runs:
        thread.join(30)
    results: list[ResolveResult] = [out["value"] for _, out in runs]
    assert len({r.view for r in results}) == 1
    assert [package_index.downloads(w.name) for w in wheels] == [1, 1]


def test_trees_published_before_a_resolve_fails_are_recorded_in_the_index(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    good, bad = _wheels(wheel_dir, "good", "bad")
    package_index.corrupt(bad.name)
    package_index.delay(bad.name, 1.0)  # the good tree is ready before the bad one fails
    model = tmp_path / "m"
    entry = lock_model(model, [url_dep(package_index, w) for w in (good, bad)])

    with pytest.raises(HashMismatch):
        daemon.client().resolve(model, entry)

    layout = StoreLayout(daemon.store)
    assert layout.pyc_marker(sha256_file(good), TAG).is_file()
    meta = Metadata.open(layout)
    try:
        rows = {row.sha256: row for row in meta.wheels()}
    finally:
        meta.close()
    row = rows[sha256_file(good)]
    assert row.filename == good.name
    assert row.tree_bytes > 0
    assert TAG in row.cache_tags


def test_a_slow_download_does_not_block_other_requests(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    slow, fast = _wheels(wheel_dir, "slow", "fast")
    package_index.delay(slow.name, 2.0)
    slow_entry = lock_model(tmp_path / "a", [url_dep(package_index, slow)])
    fast_entry = lock_model(tmp_path / "b", [url_dep(package_index, fast)])
    thread, out = _in_thread(lambda: daemon.client().resolve(tmp_path / "a", slow_entry))
    _wait_for(lambda: package_index.downloads(slow.name) == 1)
    started = time.monotonic()
    daemon.client().resolve(tmp_path / "b", fast_entry)
    daemon.client().status()
    assert time.monotonic() - started < 1.5
    thread.join(30)
    assert isinstance(out["value"], ResolveResult)


def test_progress_streams_while_a_cold_resolve_works(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    wheels = _wheels(wheel_dir, "zeta", "eta")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, w) for w in wheels])
    events: list[ProgressEvent] = []
    daemon.client().resolve(tmp_path / "m", entry, progress=events.append)
    for wheel in wheels:
        kinds = [e.kind for e in events if e.name == wheel.name]
        assert (kinds[0], kinds[-1], "bytes" in kinds) == ("start", "ready", True), kinds
    fetched = sum(e.nbytes for e in events if e.kind == "bytes")
    assert fetched == sum(w.stat().st_size for w in wheels)


def test_kill_9_during_a_download_then_restart(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "theta")
    sha = sha256_file(wheel)
    package_index.delay(wheel.name, 60)
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    daemon = start_daemon(short_tmp, store)
    try:
        thread, out = _in_thread(lambda: daemon.client().resolve(tmp_path / "m", entry))
        _wait_for(lambda: any(n.endswith(".part") for n in _listdir(daemon.tmp_dir)))
        daemon.kill()
        thread.join(10)
        assert isinstance(out["error"], DaemonUnavailable)  # a clean error, not a socket one
        assert "went away" in str(out["error"]) or "not running" in str(out["error"])
        assert not StoreLayout(store).tree_dir(sha).exists()
        with pytest.raises(DaemonUnavailable, match="is not running"):
            daemon.client().status()

        daemon = start_daemon(short_tmp, store)
        assert files_under(daemon.tmp_dir) == []
        package_index.clear_faults()
        result = daemon.client().resolve(tmp_path / "m", entry)
        assert _import_from(result.package_dirs, "theta") == "theta"
    finally:
        daemon.kill()


def test_kill_9_while_unpacking_and_compiling_then_restart(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    files = {f"big/m{i:04d}.py": f"X = {i}\n" * 20 for i in range(1500)}
    wheel = build_wheel(wheel_dir, "big", files={**files, "big/__init__.py": "NAME = 'big'\n"})
    sha = sha256_file(wheel)
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    daemon = start_daemon(short_tmp, store)
    try:
        thread, _ = _in_thread(lambda: daemon.client().resolve(tmp_path / "m", entry))
        staging = re.compile(rf"{sha}\.[0-9a-f]+$")  # a tree being built, not a download
        _wait_for(lambda: any(staging.match(n) for n in _listdir(daemon.tmp_dir)), step=0.002)
        daemon.kill()
        thread.join(10)
        assert not StoreLayout(store).tree_dir(sha).exists()

        daemon = start_daemon(short_tmp, store)
        assert files_under(daemon.tmp_dir) == []
        result = daemon.client().resolve(tmp_path / "m", entry)
        assert _import_from(result.package_dirs, "big") == "big"
        assert package_index.downloads(wheel.name) == 1  # the blob survived the crash
    finally:
        daemon.kill()


def test_start_up_sweeps_leftovers_unless_their_lock_is_held(short_tmp: Path, store: Path) -> None:
    layout = StoreLayout(store)
    free, held = "a" * 64, "b" * 64
    tmp = layout.tmp_dir
    (tmp / f"{free}.1234abcd" / "site" / "pkg").mkdir(parents=True)
    (tmp / f"{free}.1234abcd" / "site" / "pkg").chmod(0o555)  # sealed, as a crash may leave it
    (tmp / f"{free}.x1.part").write_bytes(b"half")
    (tmp / f"view-{'c' * 64}.zz").mkdir()
    (tmp / "uploads" / free).mkdir(parents=True)
    (tmp / "uploads" / free / "x.whl").write_bytes(b"x")
    (tmp / f"{held}.y.part").write_bytes(b"busy")
    (tmp / "someone-elses-file").write_bytes(b"")
    layout.lock_path(held).parent.mkdir(parents=True, exist_ok=True)
    with layout.lock_path(held).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a live process working on that wheel
        with running_daemon(short_tmp, store):
            assert files_under(tmp) == [f"{held}.y.part", "someone-elses-file"]


def test_sigterm_lets_requests_in_flight_finish(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "iota")
    package_index.delay(wheel.name, 1.0)
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    daemon = start_daemon(short_tmp, store)
    thread, out = _in_thread(lambda: daemon.client().resolve(tmp_path / "m", entry))
    _wait_for(lambda: package_index.downloads(wheel.name) == 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    thread.join(10)
    assert isinstance(out.get("value"), ResolveResult), out
    assert not daemon.socket_path.exists()


def test_a_host_that_is_not_allowed_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    for url in ("https://evil.example.com/files/x-1.0-py3-none-any.whl", "file:///etc/passwd"):
        entry = lock_model(tmp_path / "m", [LockedDep(sha256=sha256_hex("1" * 64), url=url)])
        with pytest.raises(DaemonError) as caught:
            daemon.client().resolve(tmp_path / "m", entry)
        assert (caught.value.error_type, caught.value.status) == ("HostNotAllowed", 403)
        assert "fetch.allowed_hosts" in str(caught.value)
    assert "evil.example.com" in str(caught.value) or "file" in str(caught.value)


def test_bundled_wheels_are_uploaded_once_as_bytes(
    daemon: Daemon, wheel_dir: Path, tmp_path: Path
) -> None:
    plain, packed = _wheels(wheel_dir, "kappa", "lamda")
    model = tmp_path / "m"
    bundle = tmp_path / bundle_filename(packed.name)
    write_bundle(packed, bundle)
    entry = lock_model(
        model, [bundled_dep(model, plain), bundled_dep(model, bundle, sha256_file(packed))]
    )
    client = daemon.client()
    result = client.resolve(model, entry)
    assert _import_from(result.package_dirs, "lamda") == "lamda"
    assert client.status()["counters"]["uploads"] == 2
    assert files_under(daemon.tmp_dir / "uploads") == []
    client.resolve(model, entry)
    assert client.status()["counters"]["uploads"] == 2  # published: nothing to send again


def test_bundled_bytes_that_do_not_match_are_refused(
    daemon: Daemon, wheel_dir: Path, tmp_path: Path
) -> None:
    good, other = _wheels(wheel_dir, "mu", "nu")
    model = tmp_path / "m"
    dep = bundled_dep(model, other, sha256=sha256_file(good))
    entry = lock_model(model, [dep])
    with pytest.raises(HashMismatch) as caught:
        daemon.client().resolve(model, entry)
    assert caught.value.expected == sha256_file(good)
    assert str(model / str(dep.bundled_whl_path)) in str(caught.value)
    assert not StoreLayout(daemon.store).tree_dir(sha256_file(good)).exists()
    assert files_under(daemon.tmp_dir / "uploads") == []


def test_no_interpreter_for_the_clients_cache_tag(daemon: Daemon) -> None:
    body = {"deps": [], "python": {"cache_tag": "cpython-399", "version": "3.99.0"}}
    with pytest.raises(DaemonError) as caught:
        daemon.client()._call("POST", "/v1/resolve", body)
    assert (caught.value.error_type, caught.value.status) == ("NoInterpreter", 422)
    assert "python.interpreters" in str(caught.value)


def test_bad_requests_get_json_errors(daemon: Daemon) -> None:
    client = daemon.client()
    with pytest.raises(DaemonError) as caught:
        client._call("POST", "/v1/resolve", {"deps": "all of them"})
    assert (caught.value.error_type, caught.value.status) == ("BadRequest", 400)
    assert "`deps`" in str(caught.value)
    with pytest.raises(DaemonError) as caught:
        client._call("GET", "/v1/nothing-here")
    assert caught.value.status == 404


def test_leases_are_taken_with_a_resolve_and_released(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "xi")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    client = daemon.client()
    lease = client.resolve(tmp_path / "m", entry, lease=True).lease_id
    assert isinstance(lease, int)
    assert client.status()["leases"] == 1
    client.release_lease(lease)
    assert client.status()["leases"] == 0
    with pytest.raises(DaemonError) as caught:
        client.release_lease(lease)
    assert caught.value.status == 404


def test_a_lease_dies_with_its_process(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "omicron")
    lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    code = (
        "import sys; from pathlib import Path; from loader.client import DaemonClient; "
        "from lockgen.lockfile import read_lockfile; m = Path(sys.argv[2]); "
        "e = read_lockfile(m).entries[0]; "
        "print(DaemonClient(sys.argv[1]).resolve(m, e, lease=True).lease_id)"
    )
    argv = [sys.executable, "-c", code, str(daemon.socket_path), str(tmp_path / "m")]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert int(done.stdout) >= 1
    assert daemon.client().status()["leases"] == 0  # its process has exited


def test_metrics_are_prometheus_text(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "pi")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    client = daemon.client()
    client.resolve(tmp_path / "m", entry)
    values: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in client.metrics().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif not line.startswith("#"):
            match = re.fullmatch(r"([a-z_]+)(\{[a-z_]+=\"[^\"]*\"\})? ([0-9.e+-]+)", line)
            assert match, line
            values[match[1] + (match[2] or "")] = float(match[3])
    assert values["wheelcas_resolves_total"] == 1
    assert values["wheelcas_downloads_total"] == 1
    assert values["wheelcas_fetched_bytes_total"] == wheel.stat().st_size
    assert values["wheelcas_store_trees"] == 1
    assert values["wheelcas_store_views"] == 1
    assert values["wheelcas_view_trees_linked_ahead_total"] == 1
    assert types["wheelcas_cache_hits_total"] == "counter"
    assert types["wheelcas_leases"] == "gauge"
    assert types["wheelcas_store_bytes"] == "gauge"


@pytest.mark.parametrize(("mode", "expected"), [(None, 0o660), ("0600", 0o600)])
def test_socket_permissions(short_tmp: Path, store: Path, mode: str | None, expected: int) -> None:
    settings = {} if mode is None else {"socket": {"mode": mode}}
    with running_daemon(short_tmp, store, settings=settings) as daemon:
        assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == expected


def test_one_daemon_per_store_and_per_socket(
    daemon: Daemon, short_tmp: Path, tmp_path: Path
) -> None:
    same_store = start_daemon(short_tmp, daemon.store, name="other", wait=False)
    assert same_store.wait() == 2
    assert "already serves the store" in same_store.log()
    same_socket = start_daemon(short_tmp, tmp_path / "store2", name="d", wait=False)
    assert same_socket.wait() == 2
    assert "already listens" in same_socket.log()
    assert daemon.client().health()["ok"]


def test_gc_keeps_what_a_live_lease_holds(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    kept, dropped = _wheels(wheel_dir, "sigma", "tau")
    held = lock_model(tmp_path / "a", [url_dep(package_index, kept)])
    free = lock_model(tmp_path / "b", [url_dep(package_index, dropped)])
    layout = StoreLayout(store)
    with running_daemon(short_tmp, store, settings={"gc": {"max_bytes": 0}}) as daemon:
        client = daemon.client()
        client.resolve(tmp_path / "a", held, lease=True)
        client.resolve(tmp_path / "b", free)
        plan = client.gc(dry_run=True)
        assert plan["dry_run"] is True
        planned = {(r["kind"], r["label"]) for r in plan["plan"]["removals"]}
        assert ("tree", dropped.name) in planned
        assert ("tree", kept.name) not in planned
        assert layout.tree_dir(sha256_file(dropped)).exists()  # a dry run removes nothing

        client.gc(dry_run=False)
        assert not layout.tree_dir(sha256_file(dropped)).exists()
        assert layout.tree_dir(sha256_file(kept)).exists()
        client.resolve(tmp_path / "b", free)  # gone from the store, simply made ready again
        assert package_index.downloads(dropped.name) == 2


def test_gc_counts_age_from_the_last_resolve_even_right_after_it(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    """Uses are written after the answer (cas_daemon/uses.py); a GC asked for right after a
    resolve must still see that use, and count the age limit from it."""
    (wheel,) = _wheels(wheel_dir, "omega")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    tree = StoreLayout(store).tree_dir(sha256_file(wheel))
    settings = {"gc": {"max_age": "1s", "interval": "1h"}}
    with running_daemon(short_tmp, store, settings=settings) as daemon:
        client = daemon.client()
        client.resolve(tmp_path / "m", entry)
        time.sleep(1.3)  # published and last used longer ago than gc.max_age
        client.resolve(tmp_path / "m", entry)  # no lease: only its use protects it

        client.gc(dry_run=False)
        assert tree.is_dir()

        time.sleep(1.3)
        client.gc(dry_run=False)
        assert not tree.exists()


def test_gc_runs_on_its_interval(
    short_tmp: Path, store: Path, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "upsilon")
    entry = lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    settings = {"gc": {"max_bytes": 0, "interval": 0.3}}
    with running_daemon(short_tmp, store, settings=settings) as daemon:
        daemon.client().resolve(tmp_path / "m", entry)
        _wait_for(lambda: not StoreLayout(store).tree_dir(sha256_file(wheel)).exists())


def test_a_client_of_another_python_gets_its_own_bytecode(
    short_tmp: Path,
    store: Path,
    package_index: PackageIndex,
    wheel_dir: Path,
    tmp_path: Path,
    pyenv_python: Callable[[str], str],
) -> None:
    other = pyenv_python("3.12")
    (wheel,) = _wheels(wheel_dir, "phi")
    lock_model(tmp_path / "m", [url_dep(package_index, wheel)])
    code = (
        "import sys; from pathlib import Path; from loader.client import DaemonClient; "
        "from lockgen.lockfile import read_lockfile; m = Path(sys.argv[2]); "
        "r = DaemonClient(sys.argv[1]).resolve(m, read_lockfile(m).entries[0]); "
        "sys.path[:0] = [str(r.view)]; import phi; print(phi.__cached__)"
    )
    settings = {"python": {"interpreters": [other]}}
    with running_daemon(short_tmp, store, settings=settings) as daemon:
        done = subprocess.run(
            [other, "-c", code, str(daemon.socket_path), str(tmp_path / "m")],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(".cpython-312.pyc")
        assert "cpython-312" in daemon.client().status()["interpreters"]
    assert StoreLayout(store).pyc_marker(sha256_file(wheel), "cpython-312").is_file()


# --- pure parts: configuration, request checks ----------------------------------------------


def test_defaults_for_a_user_and_for_the_system(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}
    user = defaults(env, system=False)
    assert user.socket_path == Path("/run/user/1000/wheelcas.sock")
    assert user.store_dir == Path("/home/u/.cache/wheelcas")  # embedded mode's store
    assert (user.socket_mode, user.allowed_hosts) == (0o660, ("files.pythonhosted.org",))
    system = defaults({"CACHE_DIRECTORY": "/var/cache/wheelcas"}, system=True)
    assert system.socket_path == Path("/run/wheelcas/wheelcas.sock")
    assert system.store_dir == Path("/var/cache/wheelcas")


def test_a_configuration_file_and_the_flags(tmp_path: Path) -> None:
    file = tmp_path / "daemon.toml"
    file.write_text(
        '[socket]\nmode = "0600"\n[fetch]\nallowed_hosts = ["Pypi.Example:8443"]\n'
        '[gc]\nmax_bytes = "2GiB"\nmax_age = "30d"\ninterval = 90\n[views]\nlink_mode = "symlink"\n'
    )
    config = load_config(file, environ={"HOME": str(tmp_path)}, store_dir=tmp_path / "s")
    assert (config.socket_mode, config.allowed_hosts) == (0o600, ("pypi.example:8443",))
    assert (config.gc_max_bytes, config.gc_max_age, config.gc_interval) == (
        2 * 2**30,
        30 * 86400,
        90,
    )
    assert (config.view_link_mode, config.store_dir) == ("symlink", tmp_path / "s")
    assert (parse_duration("15m"), parse_size("500MB"), parse_mode(0o640)) == (
        900,
        5 * 10**8,
        0o640,
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[fetch]\nmax_parallel_download = 3\n", "fetch.max_parallel_download"),
        ("[gc]\nmax_age = 'a while'\n", "gc.max_age"),
        ("[socket]\nmode = '0999'\n", "socket.mode"),
        ("[views]\nlink_mode = 'copy'\n", "views.link_mode"),
        ("fetch = 3\n", "fetch"),
        ("[fetch\n", "(file)"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "daemon.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(file, environ={})
    assert caught.value.key == key
    assert "docs/daemon.md" in str(caught.value)


def test_every_setting_is_documented() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "daemon.md").read_text()
    for section, key in SETTINGS:
        part = doc.split(f"### `[{section}]`", 1)[1].split("\n### ", 1)[0]
        assert f"| `{key}` |" in part, f"{section}.{key}"


def test_only_http_urls_on_allowed_hosts_pass() -> None:
    allowed = ["files.pythonhosted.org", "127.0.0.1:8080"]
    check_host("https://files.pythonhosted.org/packages/x.whl", allowed)
    check_host("http://127.0.0.1:8080/files/x.whl", allowed)
    for url in (
        "http://127.0.0.1:9090/files/x.whl",
        "https://user:secret@evil.example/x.whl",
        "file:///etc/shadow",
        "ftp://files.pythonhosted.org/x.whl",
        "https://files.pythonhosted.org:notaport/x.whl",
    ):
        with pytest.raises(HostNotAllowed) as caught:
            check_host(url, allowed)
        assert "secret" not in str(caught.value)
    # URLs are parsed once and kept; the decision is made against each call's hosts.
    with pytest.raises(HostNotAllowed):
        check_host("https://files.pythonhosted.org/packages/x.whl", ["127.0.0.1:8080"])
    check_host("https://FILES.pythonhosted.org/packages/y.whl", allowed)


def test_resolve_requests_are_validated() -> None:
    good = {"sha256": "a" * 64, "url": "https://h/x-1.0-py3-none-any.whl"}
    request = parse_resolve_request({"deps": [good], "python": {"cache_tag": "cpython-311"}})
    assert request.deps[0].filename == "x-1.0-py3-none-any.whl"
    assert not request.lease
    bundle = {"sha256": "a" * 64, "bundled": True, "filename": "x.whl.wcb.zst"}
    keyed = parse_resolve_request(
        {"deps": [bundle, {**bundle, "bundle_sha256": "b" * 64}], "python": {"cache_tag": "t"}}
    )
    assert [(d.sha256, d.key) for d in keyed.deps] == [("a" * 64, "a" * 64), ("a" * 64, "b" * 64)]
    bad_deps = [
        ({"sha256": "A" * 64, "url": "u"}, "deps[0].sha256"),
        ({"sha256": "a" * 64, "bundled": True, "filename": "../x.whl"}, "deps[0].filename"),
        ({"sha256": "a" * 64}, "deps[0].url"),
        ({**bundle, "bundle_sha256": "b" * 63}, "deps[0].bundle_sha256"),
        ({**good, "bundle_sha256": "b" * 64}, "deps[0].bundle_sha256"),
    ]
    for dep, where in bad_deps:
        with pytest.raises(BadRequest) as caught:
            parse_resolve_request({"deps": [dep], "python": {"cache_tag": "t"}})
        assert caught.value.where == where
    with pytest.raises(BadRequest, match="`python`"):
        parse_resolve_request({"deps": []})


def test_no_interpreter_says_how_to_configure_one() -> None:
    known = KnownInterpreters([], discover=False)
    assert known.find(TAG) == sys.executable  # its own, without probing anything
    with pytest.raises(NoInterpreter, match=r"cpython-399.*python\.interpreters"):
        known.find("cpython-399", "3.99.0")


def test_a_bundle_that_does_not_unpack_is_not_kept(
    daemon: Daemon, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "chi")
    bundle = tmp_path / bundle_filename(wheel.name)
    write_bundle(wheel, bundle)
    data = bytearray(bundle.read_bytes())
    data[-20] ^= 0xFF  # in the compressed members: the header still names the right sha256
    bundle.write_bytes(bytes(data))
    model = tmp_path / "m"
    entry = lock_model(model, [bundled_dep(model, bundle, sha256_file(wheel))])
    with pytest.raises(WheelcasError, match=r"refusing to unpack|RECORD|corrupt"):
        daemon.client().resolve(model, entry)
    assert not StoreLayout(daemon.store).tree_dir(sha256_file(wheel)).exists()
    assert files_under(daemon.tmp_dir / "uploads") == []  # the next try uploads it afresh


def test_an_upload_over_the_limit_is_refused(
    short_tmp: Path, store: Path, wheel_dir: Path, tmp_path: Path
) -> None:
    (wheel,) = _wheels(wheel_dir, "psi")
    model = tmp_path / "m"
    entry = lock_model(model, [bundled_dep(model, wheel)])
    with running_daemon(short_tmp, store, settings={"uploads": {"max_bytes": 100}}) as daemon:
        with pytest.raises(DaemonError) as caught:
            daemon.client().resolve(model, entry)
        assert (caught.value.error_type, caught.value.status) == ("UploadRefused", 413)
        assert "uploads.max_bytes" in str(caught.value)


# --- a bundle cannot stand in for a wheel it merely claims to be ----------------------------


def _victim_and_forgery(wheel_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A wheel ``victim`` on the index, and a self-consistent bundle of an evil wheel of the
    same name whose header claims the real wheel's sha256."""
    (real,) = _wheels(wheel_dir, "victim")
    evil = build_wheel(tmp_path / "evil", "victim", files={"victim/__init__.py": "NAME = 'evil'\n"})
    forged = tmp_path / "forged" / bundle_filename(real.name)
    forged.parent.mkdir()
    write_forged_bundle(evil, forged, sha256_file(real))
    assert read_bundle_header(forged).wheel_sha256 == sha256_file(real)
    return real, forged


def _bundled_model(model: Path, bundle: Path, wheel_sha256: str) -> LockEntry:
    return lock_model(model, [bundled_dep(model, bundle, wheel_sha256)])


@pytest.mark.parametrize("victim", ["url", "plain whl"])
def test_a_forged_bundle_cannot_take_the_place_of_the_wheel_it_claims(
    daemon: Daemon, package_index: PackageIndex, wheel_dir: Path, tmp_path: Path, victim: str
) -> None:
    real, forged = _victim_and_forgery(wheel_dir, tmp_path)
    sha = sha256_file(real)
    layout = StoreLayout(daemon.store)
    client = daemon.client()

    # Uploading the forgery under the wheel's sha256 (what a victim's resolve would use):
    # refused, its bytes do not hash to it.
    headers = {"X-Wheelcas-Filename": forged.name}
    with forged.open("rb") as handle, pytest.raises(HashMismatch) as caught:
        client._call("PUT", f"/v1/bundles/{sha}", handle, headers=headers)
    assert (caught.value.expected, caught.value.actual) == (sha, sha256_file(forged))
    assert files_under(daemon.tmp_dir / "uploads") == []

    # Through a lock of the attacker's own: it gets its own bytes, under their own key.
    attacker = _bundled_model(tmp_path / "attacker", forged, sha)
    (evil_site,) = client.resolve(tmp_path / "attacker", attacker).site_dirs
    assert evil_site == layout.site_dir(sha256_file(forged))
    assert _import_from([evil_site], "victim") == "evil"
    assert not layout.tree_dir(sha).exists()

    model = tmp_path / "victim"
    if victim == "url":
        entry = lock_model(model, [url_dep(package_index, real)])
    else:
        entry = lock_model(model, [bundled_dep(model, real)])
    result = client.resolve(model, entry)
    assert result.site_dirs == (layout.site_dir(sha),)
    assert _import_from(result.package_dirs, "victim") == "victim"
    if victim == "url":
        assert package_index.downloads(real.name) == 1  # fetched, not taken from the forgery
    else:
        assert client.status()["counters"]["uploads"] == 2  # the forgery's, then the real one


def test_bundles_claiming_the_same_wheel_get_separate_trees(
    daemon: Daemon, wheel_dir: Path, tmp_path: Path
) -> None:
    real, forged = _victim_and_forgery(wheel_dir, tmp_path)
    sha = sha256_file(real)
    honest = tmp_path / "honest" / bundle_filename(real.name)
    honest.parent.mkdir()
    write_bundle(real, honest)
    client = daemon.client()

    mallory = client.resolve(tmp_path / "m1", _bundled_model(tmp_path / "m1", forged, sha))
    alice = client.resolve(tmp_path / "m2", _bundled_model(tmp_path / "m2", honest, sha))

    layout = StoreLayout(daemon.store)
    assert mallory.site_dirs == (layout.site_dir(sha256_file(forged)),)
    assert alice.site_dirs == (layout.site_dir(sha256_file(honest)),)
    assert mallory.view != alice.view
    assert _import_from(alice.package_dirs, "victim") == "victim"
    assert _import_from(mallory.package_dirs, "victim") == "evil"
    assert not layout.tree_dir(sha).exists()


def test_warm_resolves_do_not_hash_bundles_again(
    daemon: Daemon, wheel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, packed = _wheels(wheel_dir, "warm_plain", "warm_packed")
    bundle = tmp_path / bundle_filename(packed.name)
    write_bundle(packed, bundle)
    model = tmp_path / "m"
    entry = lock_model(
        model, [bundled_dep(model, plain), bundled_dep(model, bundle, sha256_file(packed))]
    )
    hashed: list[Path] = []
    real_hash = bundle_keys.sha256_file

    def counting_hash(path: Path) -> str:
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(bundle_keys, "sha256_file", counting_hash)

    cold = daemon.client().resolve(model, entry)
    warm = daemon.client().resolve(model, entry)
    # Another process: nothing in memory, the user's digest file read afresh.
    fresh = DigestCache(bundle_keys.default_cache_path())
    again = daemon.client(digests=fresh).resolve(model, entry)

    assert len(hashed) == 1  # the compressed bundle, once; a plain .whl is never hashed here
    assert cold.view == warm.view == again.view
    assert warm.already_ready == again.already_ready == 2

    copy = model / str(entry.locked_deps[1].bundled_whl_path)
    os.utime(copy, ns=(0, 0))  # touched: hashed again, the same key
    assert daemon.client(digests=fresh).resolve(model, entry).view == cold.view
    assert len(hashed) == 2
