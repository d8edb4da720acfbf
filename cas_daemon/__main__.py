"""``python -m cas_daemon``: start the store daemon (``wheelcas daemon`` calls :func:`main`).

Start-up, in order: take the sockets systemd passed (if any); read the configuration; claim
the store (one daemon per store, by ``flock``); sweep what crashed processes left in
``tmp/``; bind the socket unless systemd gave one; serve until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import re
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from cas_daemon import systemd
from cas_daemon.config import ConfigError, DaemonConfig, load_config
from cas_daemon.errors import StoreError
from cas_daemon.flock import try_flock
from cas_daemon.layout import StoreLayout
from cas_daemon.precompile import remove_sealed
from lockgen.errors import WheelcasError

log = logging.getLogger("wheelcas.daemon")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VIEW_PREFIX = "view-"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wheelcas daemon",
        description="Serve the wheelcas store to every process of this host over a unix socket.",
    )
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--socket", type=Path, metavar="PATH", help="unix socket to listen on")
    parser.add_argument("--store", type=Path, metavar="DIR", help="the store's root directory")
    parser.add_argument(
        "--system", action="store_true", help="use the system service's defaults (docs/daemon.md)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def claim_store(layout: StoreLayout) -> int:
    """Hold the store's daemon lock for the life of the process; its descriptor.

    One daemon per store: the uploads dir is the daemon's alone and start-up empties it.
    """
    layout.base.mkdir(parents=True, exist_ok=True)
    path = layout.base / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"another wheelcas daemon already serves the store at {layout.root} (it holds "
            f"{path}). Stop it first, or give this one another store with --store."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a human wondering who holds it
    return fd


def sweep_tmp(layout: StoreLayout) -> list[str]:
    """Remove what crashed processes left in ``tmp/``; the names removed.

    ``{sha256}.*`` (downloads, staged trees) and ``view-{key}.*`` (staged views) are only
    touched under their wheel's or view's lock, so each group goes only if its lock is free
    right now: a held lock means a live process (an embedded loader) is still using it.
    Uploads are the daemon's own: all of them go.
    """
    tmp = layout.tmp_dir
    if not tmp.is_dir():
        return []
    removed = []
    groups: dict[Path, list[Path]] = {}
    for entry in tmp.iterdir():
        head, dot, _ = entry.name.partition(".")
        if entry.name == "uploads":
            if _remove_leftover(entry):
                removed.append(entry.name)
        elif dot and _SHA256.fullmatch(head):
            groups.setdefault(layout.lock_path(head), []).append(entry)
        elif dot and head.startswith(_VIEW_PREFIX) and _SHA256.fullmatch(head[len(_VIEW_PREFIX) :]):
            groups.setdefault(layout.view_lock_path(head[len(_VIEW_PREFIX) :]), []).append(entry)
    for lock, entries in groups.items():
        with try_flock(lock) as held:
            if held:
                for entry in entries:
                    if _remove_leftover(entry):
                        removed.append(entry.name)
    return removed


def _remove_leftover(entry: Path) -> bool:
    """Remove one leftover; a failure is logged, not fatal: serving matters more than tidying,
    and the next start-up (or ``wheelcas fsck``) tries again."""
    try:
        remove_sealed(entry)
    except OSError as exc:
        log.warning("could not remove the leftover %s (%s); will try at the next start", entry, exc)
        return False
    return True


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def bind_socket(config: DaemonConfig) -> socket.socket:
    """A unix socket bound at ``socket.path`` with ``socket.mode`` (and group), not listening.

    The mode is set before ``listen`` (asyncio calls it), so no client can connect while the
    socket still has the umask's permissions. A stale socket file (nobody answers) is
    replaced; a live one means another daemon: refused.
    """
    path = config.socket_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(str(path), "socket.path", "exists and is not a socket")
        if _answers(path):
            raise StoreError(f"another process already listens on {path}; is a daemon running?")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        path.chmod(config.socket_mode)
        if config.socket_group is not None:
            group = config.socket_group
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
            os.chown(path, -1, gid)
    except (OSError, KeyError) as exc:
        sock.close()
        raise ConfigError(str(path), "socket", f"cannot be set up: {exc}") from None
    return sock


def _remove_socket(path: Path, inode: int) -> None:
    """Unlink our socket file, unless another daemon has replaced it since."""
    with contextlib.suppress(OSError):
        if path.lstat().st_ino == inode:
            path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    # First: the variables must not leak to anything this process starts.
    inherited = systemd.listen_sockets()
    notifier = systemd.Notifier()
    systemd.scrub()
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="wheelcas daemon: %(message)s",
        stream=sys.stderr,
    )
    lock_fd = -1
    owned: tuple[Path, int] | None = None
    try:
        config = load_config(ns.config, system=ns.system, socket_path=ns.socket, store_dir=ns.store)
        layout = StoreLayout(config.store_dir)
        lock_fd = claim_store(layout)
        removed = sweep_tmp(layout)
        if removed:
            log.info(
                "removed %d leftover(s) of crashed processes from %s", len(removed), layout.tmp_dir
            )
        if inherited:
            sock = inherited[0]
        else:
            sock = bind_socket(config)
            owned = (config.socket_path, config.socket_path.lstat().st_ino)
        from cas_daemon.server import serve  # aiohttp: only once start-up checks passed

        asyncio.run(serve(config, sock, notifier, access_log=ns.verbose))
    except WheelcasError as exc:
        print(f"wheelcas daemon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if owned is not None:
            _remove_socket(*owned)
        if lock_fd >= 0:
            os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
