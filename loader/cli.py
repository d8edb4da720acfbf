"""The ``wheelcas`` command. ``main(argv) -> int`` so that tests run it in-process.

Every expected failure is a :class:`~lockgen.errors.WheelcasError`: printed as
``wheelcas: error: ...`` with its exit code (2 for bad input), never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loader.errors import ModelConfigError
from lockgen.errors import WheelcasError

_INPUT_HELP = "NAME=JSON (e.g. x=[1,2,3]) or NAME=@file.npy; repeatable"


def _add_pip_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pip index options (added to the user's pip configuration)")
    group.add_argument("-i", "--index-url", help="base URL of the package index")
    group.add_argument("--extra-index-url", action="append", default=[], metavar="URL")
    group.add_argument("-f", "--find-links", action="append", default=[], metavar="URL|DIR")
    group.add_argument("--no-index", action="store_true", help="ignore package indexes")
    group.add_argument("--trusted-host", action="append", default=[], metavar="HOST")


def _pip_args(ns: argparse.Namespace) -> list[str]:
    args: list[str] = []
    if ns.index_url:
        args += ["--index-url", ns.index_url]
    for url in ns.extra_index_url:
        args += ["--extra-index-url", url]
    for link in ns.find_links:
        args += ["--find-links", link]
    if ns.no_index:
        args.append("--no-index")
    for host in ns.trusted_host:
        args += ["--trusted-host", host]
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wheelcas",
        description="Lock, store once and load Python models with their dependencies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    parser.add_argument(
        "--no-daemon",
        action="store_true",
        help="never ask a daemon: use the store from this process (sets WHEELCAS_SOCKET=off)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lock", help="resolve requirements.txt into .carton/carton.lock")
    p.add_argument("model_dir", type=Path, metavar="DIR")
    p.add_argument("--python", metavar="INTERPRETER", help="path, command or version (3.12)")
    p.add_argument(
        "--bundle-format",
        choices=["zst", "whl"],
        default="zst",
        help="zst: compressed bundles (default); whl: plain wheels, as Carton writes them",
    )
    _add_pip_options(p)

    p = sub.add_parser("prefetch", help="make every wheel of a model or lockfile ready")
    p.add_argument("targets", type=Path, nargs="+", metavar="DIR|LOCKFILE")
    p.add_argument("--python", metavar="INTERPRETER", help="compile .pyc for this interpreter")

    p = sub.add_parser("infer", help="load a model and run one inference")
    p.add_argument("model_dir", type=Path, metavar="DIR|FILE.carton")
    # Required for a code dir (checked in _cmd_infer); for a .carton they override its fields.
    p.add_argument("--entrypoint", metavar="PACKAGE:FUNCTION")
    p.add_argument("--python", metavar="RANGE", help="e.g. '>=3.10' or '=3.11'")
    p.add_argument("--opt", action="append", default=[], metavar="model.NAME=VALUE")
    p.add_argument("--input", action="append", default=[], metavar="NAME=VALUE", help=_INPUT_HELP)
    p.add_argument("--json", action="store_true", help="print the outputs as one JSON object")

    p = sub.add_parser("pack", help="lock a model dir and write it as a .carton file")
    p.add_argument("model_dir", type=Path, metavar="DIR")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: DIR.carton")
    p.add_argument("--python", required=True, metavar="RANGE", help="e.g. '>=3.10' or '=3.11'")
    p.add_argument("--entrypoint", required=True, metavar="PACKAGE:FUNCTION")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--name", help="model_name")
    p.add_argument("--short-description", help="at most 100 characters")
    p.add_argument("--description", help="model_description (markdown)")
    p.add_argument("--license", help="an SPDX license expression")
    p.add_argument("--repository", metavar="URL")
    p.add_argument("--homepage", metavar="URL")
    p.add_argument("--misc", action="append", default=[], metavar="NAME=PATH")
    p.add_argument(
        "--lock-python",
        action="append",
        default=[],
        metavar="INTERPRETER",
        help="also lock for this interpreter (3.12, a command or a path); repeatable",
    )
    _add_pip_options(p)

    p = sub.add_parser(
        "gather", help="copy a scattered model and its external package dirs into one dir"
    )
    p.add_argument("model_dir", type=Path, metavar="DIR")
    p.add_argument(
        "-o", "--output", type=Path, metavar="OUT", help="default: the store's gather cache"
    )
    p.add_argument(
        "--external-package-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a dir whose contents join the bundled packages dir (relative to the current "
        "dir); repeatable, added to --opt external_package_dirs",
    )
    p.add_argument("--bundled-packages-dir", metavar="NAME", help="default: packages")
    p.add_argument(
        "--keep-dir-names",
        action="store_true",
        default=None,
        help="put each external dir in the bundled dir under its own name",
    )
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE")

    p = sub.add_parser("info", help="print a packed model's manifest fields")
    p.add_argument("model", type=Path, metavar="MODEL", help="a .carton file or unpacked dir")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("selftest", help="run a packed model's self-tests; exit 1 if one fails")
    p.add_argument("model", type=Path, metavar="FILE.carton")
    p.add_argument("--python", metavar="RANGE", help="override required_framework_version")
    p.add_argument(
        "--in-process", action="store_true", help="load the model in this process, not a worker"
    )

    p = sub.add_parser("path", help="print the model's PYTHONPATH (locking if needed)")
    p.add_argument("model_dir", type=Path, metavar="DIR")
    p.add_argument("--lines", action="store_true", help="one entry per line")
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="runner option; only bundled_packages_dir, external_package_dirs and "
        "keep_external_dir_names change the path (others are accepted and ignored)",
    )

    # Its own options are the daemon's parser's: main() hands them over unparsed.
    sub.add_parser("daemon", help="run the store daemon (same as `python -m cas_daemon`)")

    sub.add_parser("status", help="the daemon's status, or the local store's statistics")

    p = sub.add_parser(
        "watch", help="have the daemon re-lock and prefetch model dirs when requirements change"
    )
    p.add_argument("model_dirs", type=Path, nargs="+", metavar="DIR")
    p.add_argument(
        "--python", metavar="VERSION", help="also lock for this Python version, e.g. 3.12"
    )

    p = sub.add_parser("unwatch", help="stop the daemon watching model dirs")
    p.add_argument("model_dirs", type=Path, nargs="+", metavar="DIR")

    p = sub.add_parser("gc", help="remove what the store no longer needs")
    p.add_argument("--dry-run", action="store_true", help="only print what would go, and why")
    p.add_argument("--max-bytes", help="without a daemon: size limit, e.g. 20G")
    p.add_argument("--max-age", help="without a daemon: age limit, e.g. 30d")

    p = sub.add_parser("fsck", help="check the store; --repair rebuilds its index from disk")
    p.add_argument("--repair", action="store_true")
    return parser


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the block (in the main thread only).

    The daemon stops a re-lock it no longer wants with SIGTERM (cas_daemon/relock.py): the
    lock then unwinds as on Ctrl-C, removing its staging dir and keeping the old lockfile.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_lock(ns: argparse.Namespace) -> int:
    from lockgen.lock import lock

    with _sigterm_interrupts():
        result = lock(
            ns.model_dir, python=ns.python, pip_args=_pip_args(ns), bundle_format=ns.bundle_format
        )
    bundled = sum(d.bundled_whl_path is not None for d in result.entry.locked_deps)
    print(
        f"{result.action}: {result.path} ({len(result.entry.locked_deps)} wheels, "
        f"{bundled} bundled; Python {result.entry.markers.get('python_version', '?')})"
    )
    return 0


def _cmd_prefetch(ns: argparse.Namespace) -> int:
    from cas_daemon.prefetch import collect_refs, prefetch
    from cas_daemon.progress import make_renderer
    from lockgen.interpreters import resolve_interpreter

    if ns.python is None:
        from loader.client import find_daemon

        client = find_daemon()
        if client is not None:
            return _prefetch_with_daemon(client, ns.targets)
    python = resolve_interpreter(ns.python)
    total = len(collect_refs(ns.targets, python))
    with make_renderer(sys.stderr, total) as progress:
        report = prefetch(ns.targets, python=python, progress=progress)
    print(
        f"{report.wheels} wheels ready ({report.readied} made ready now, "
        f"{report.already_ready} already ready)"
    )
    return 0


def _prefetch_with_daemon(client: Any, targets: Sequence[Path]) -> int:
    from cas_daemon.prefetch import (
        NoMatchingEntryError,
        locate_lockfile,
        read_lockfile_at,
        target_environment,
    )
    from cas_daemon.progress import make_renderer

    environment = target_environment(sys.executable)
    wheels = ready_before = 0
    for target in targets:
        path, model_dir = locate_lockfile(target)
        lockfile = read_lockfile_at(path)
        entry = lockfile.find_entry(environment)
        if entry is None:
            raise NoMatchingEntryError(
                path, environment, [e.markers for e in lockfile.entries], sys.executable
            )
        with make_renderer(sys.stderr, len(entry.locked_deps)) as progress:
            result = client.prefetch(model_dir, entry, progress=progress)
        wheels += result.wheels
        ready_before += result.already_ready
    print(
        f"{wheels} wheels ready in the daemon's store ({wheels - ready_before} made ready now, "
        f"{ready_before} already ready)"
    )
    return 0


def _parse_input(assignment: str) -> tuple[str, Any]:
    import numpy as np

    name, sep, raw = assignment.partition("=")
    if not sep or not name:
        raise ModelConfigError(f"--input {assignment!r}: expected {_INPUT_HELP}.")
    if raw.startswith("@"):
        try:
            return name, np.load(raw[1:], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"--input {name}: cannot read {raw[1:]}: {exc}") from None
    try:
        return name, np.asarray(json.loads(raw))
    except ValueError as exc:
        raise ModelConfigError(f"--input {name}: {raw!r} is not JSON ({exc}).") from None


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars as plain JSON values (``tolist`` covers both)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"output of type {type(value).__name__} cannot be printed as JSON")


def _cmd_infer(ns: argparse.Namespace) -> int:
    from loader.api import load_unpacked
    from loader.options import parse_cli_option

    packed = ns.model_dir.is_file()
    if not packed:
        missing = [
            o for o, v in (("--entrypoint", ns.entrypoint), ("--python", ns.python)) if not v
        ]
        if missing:
            raise ModelConfigError(
                f"{' and '.join(missing)} required for a model dir (a .carton file has them)."
            )
    opts: dict[str, Any] = {}
    if ns.entrypoint is not None:
        package, sep, function = ns.entrypoint.partition(":")
        if not sep:
            raise ModelConfigError(f"--entrypoint {ns.entrypoint!r}: expected PACKAGE:FUNCTION.")
        opts = {"entrypoint_package": package, "entrypoint_fn": function}
    opts.update(parse_cli_option(a) for a in ns.opt)
    for assignment in ns.input:  # fail on a malformed --input before the slow part
        if "=" not in assignment.lstrip("="):
            raise ModelConfigError(f"--input {assignment!r}: expected {_INPUT_HELP}.")
    if packed:
        from loader.packing import load

        model = load(
            ns.model_dir,
            override_required_framework_version=ns.python,
            override_runner_opts=opts or None,
        )
    else:
        # In this process: --input values are parsed with the model's own numpy (see below).
        model = load_unpacked(
            ns.model_dir, required_framework_version=ns.python, runner_opts=opts, isolated=False
        )
    # numpy is imported only now, from the model's own sys.path, never the host's first.
    inputs = dict(_parse_input(a) for a in ns.input)
    outputs = model.infer(inputs)
    if ns.json:
        print(json.dumps(outputs, default=_jsonable))
    else:
        for name, value in outputs.items():
            print(f"{name} = {value}")
    return 0


def _cmd_pack(ns: argparse.Namespace) -> int:
    from loader.options import parse_cli_option
    from loader.packing import get_model_info, pack

    package, sep, function = ns.entrypoint.partition(":")
    if not sep:
        raise ModelConfigError(f"--entrypoint {ns.entrypoint!r}: expected PACKAGE:FUNCTION.")
    opts: dict[str, Any] = {"entrypoint_package": package, "entrypoint_fn": function}
    opts.update(parse_cli_option(a) for a in ns.opt)
    misc: dict[str, str] = {}
    for assignment in ns.misc:
        name, sep, local = assignment.partition("=")
        if not sep or not name or not local:
            raise ModelConfigError(f"--misc {assignment!r}: expected NAME=PATH.")
        misc[name] = local
    path = pack(
        ns.model_dir,
        runner_name="python",
        required_framework_version=ns.python,
        runner_opts=opts,
        model_name=ns.name,
        short_description=ns.short_description,
        model_description=ns.description,
        license=ns.license,
        repository=ns.repository,
        homepage=ns.homepage,
        misc_files=misc or None,
        output=ns.output,
        lock_pythons=ns.lock_python,
        pip_args=_pip_args(ns),
    )
    print(f"packed {path} (manifest sha256 {get_model_info(path).manifest_sha256})")
    return 0


def _cmd_gather(ns: argparse.Namespace) -> int:
    from loader.gathering import describe, gather
    from loader.options import BUNDLED_PACKAGES_DIR, EXTERNAL_PACKAGE_DIRS, parse_cli_option

    opts: dict[str, Any] = dict(parse_cli_option(a) for a in ns.opt)
    if ns.external_package_dir:
        given = str(opts.get(EXTERNAL_PACKAGE_DIRS, ""))
        added = [str(d.absolute()) for d in map(Path, ns.external_package_dir)]
        opts[EXTERNAL_PACKAGE_DIRS] = os.pathsep.join([*filter(None, [given]), *added])
    if ns.bundled_packages_dir is not None:
        opts[BUNDLED_PACKAGES_DIR] = ns.bundled_packages_dir
    result = gather(ns.model_dir, ns.output, runner_opts=opts, keep_dir_names=ns.keep_dir_names)
    print("\n".join(describe(result)))
    return 0


def _info_fields(info: Any) -> dict[str, Any]:
    """The manifest as plain JSON values (dataclasses and tuples flattened)."""
    import dataclasses

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    fields: dict[str, Any] = plain(info)
    return fields


def _cmd_info(ns: argparse.Namespace) -> int:
    from loader.packing import get_model_info

    fields = _info_fields(get_model_info(ns.model))
    if ns.json:
        print(json.dumps(fields, sort_keys=True))
        return 0
    runner = fields.pop("runner")
    for key, value in fields.items():
        if value is not None:
            print(f"{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    for key, value in runner.items():
        if value is not None:
            print(f"runner.{key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def _cmd_selftest(ns: argparse.Namespace) -> int:
    from loader.selftesting import print_report, selftest

    options: dict[str, Any] = {"isolated": not ns.in_process}
    if ns.python:
        options["override_required_framework_version"] = ns.python
    return print_report(selftest(ns.model, **options))


def _cmd_path(ns: argparse.Namespace) -> int:
    from loader import embedded
    from loader.localpkgs import local_package_dirs
    from loader.options import parse_cli_option, parse_local_package_opts
    from loader.packages import ready_package_dirs

    model_dir = ns.model_dir.absolute()
    # The same local dirs as a load, in its order (the bundled `packages/` when it exists,
    # then the external dirs); a missing external dir fails before locking.
    opts = dict(parse_cli_option(a) for a in ns.opt)
    local = local_package_dirs(model_dir, parse_local_package_opts(opts))
    # No lease: this process exits right away; the shell that uses the paths is not known.
    dirs = ready_package_dirs(model_dir, lease=False)
    plan = embedded.plan_for(model_dir, dirs, local)
    print(("\n" if ns.lines else os.pathsep).join(plan.entries))
    return 0


def _cmd_daemon(ns: argparse.Namespace) -> int:
    from cas_daemon.__main__ import main as daemon_main

    return daemon_main(ns.daemon_args)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _cmd_status(ns: argparse.Namespace) -> int:
    from loader.client import find_daemon

    client = find_daemon()
    if client is not None:
        _print_json({"daemon": str(client.socket_path), **client.status()})
        return 0
    from cas_daemon.store import Store

    store = Store.open_default()
    stats = store.stats()
    _print_json(
        {
            "daemon": None,
            "store": str(store.layout.root),
            "blobs": stats.blobs,
            "blob_bytes": stats.blob_bytes,
            "trees": stats.trees,
            "tree_bytes": stats.tree_bytes,
        }
    )
    return 0


def _watching_daemon() -> Any:
    from loader.client import DISABLED, SOCKET_ENV, find_daemon

    if os.environ.get(SOCKET_ENV, "").lower() in DISABLED:
        raise ModelConfigError(
            f"watching model dirs needs the daemon, and --no-daemon (or {SOCKET_ENV}=off) "
            "forbids asking one: drop --no-daemon, or unset or point "
            f"{SOCKET_ENV} at the daemon's socket."
        )
    client = find_daemon()
    if client is None:
        raise ModelConfigError(
            "watching model dirs is the daemon's work, and no daemon answers. Start one "
            "(`wheelcas daemon`, or `systemctl --user start wheelcas`), or list the dirs in "
            "its configuration (watch.model_dirs, docs/daemon.md)."
        )
    return client


def _absolute(path: Path) -> Path:
    """What the daemon takes: an absolute, normalized path (symlinks are kept)."""
    return Path(os.path.normpath(path.absolute()))


def _cmd_watch(ns: argparse.Namespace) -> int:
    client = _watching_daemon()
    for model_dir in ns.model_dirs:
        state = client.watch(_absolute(model_dir), python=ns.python)
        pythons = ", ".join(state.get("pythons", [])) or "the daemon's Python"
        print(f"watching {state['model_dir']} ({state['state']}; locks for {pythons})")
    return 0


def _cmd_unwatch(ns: argparse.Namespace) -> int:
    client = _watching_daemon()
    for model_dir in ns.model_dirs:
        reply = client.unwatch(_absolute(model_dir))
        done = "stopped watching" if reply.get("was_watched") else "was not watching"
        note = " (the configuration lists it: watched again at restart)"
        print(f"{done} {reply['model_dir']}{note if reply.get('configured') else ''}")
    return 0


def _cmd_gc(ns: argparse.Namespace) -> int:
    from loader.client import find_daemon

    client = find_daemon()
    if client is not None:
        if ns.max_bytes or ns.max_age:
            raise ModelConfigError(
                "--max-bytes/--max-age apply without a daemon; the daemon uses the limits "
                "of its configuration (gc.max_bytes, gc.max_age)."
            )
        report = client.gc(dry_run=ns.dry_run)
        report["lines"] = [*report.get("lines", []), *_gather_gc_beside_daemon(report, ns)]
    else:
        report = _local_gc(ns)
    for line in report.get("lines", []):
        print(line)
    print(report.get("summary", ""))
    return 0


def _gather_gc_beside_daemon(report: dict[str, Any], ns: argparse.Namespace) -> list[str]:
    """The gather cache is the loader's (cas_daemon cannot import it), so this process
    collects it, with the daemon's age limit, when the daemon's store is this one's."""
    import time

    from cas_daemon.layout import default_store_root
    from loader.gather_gc import collect_gather_cache
    from loader.gathering import gather_home

    root, limits = report.get("store_root"), report.get("limits")
    if not isinstance(root, str) or not isinstance(limits, dict):
        return [
            "gather cache not collected: this daemon does not report its store root and "
            "limits (an older wheelcas); run `wheelcas --no-daemon gc --max-age 30d`"
        ]
    if os.path.realpath(root) != os.path.realpath(default_store_root()):
        return [
            f"gather cache not collected: the daemon's store {root} is not this "
            f"process's ({default_store_root()}, WHEELCAS_HOME)"
        ]
    max_age = limits.get("max_age_seconds")
    home = gather_home()
    done = collect_gather_cache(
        home,
        max_age=float(max_age) if isinstance(max_age, int | float) else None,
        now=time.time(),
        dry_run=ns.dry_run,
    )
    if done is None:
        return []
    plan, result = done
    return plan.lines(home) + ([] if result is None else result.lines())


def _local_gc(ns: argparse.Namespace) -> dict[str, Any]:
    import time

    from cas_daemon.config import parse_duration, parse_size
    from cas_daemon.gc import collect
    from cas_daemon.gc_plan import GcLimits, human_bytes
    from cas_daemon.layout import StoreLayout, default_store_root
    from cas_daemon.metadata import Metadata

    if not (ns.max_bytes or ns.max_age):
        raise ModelConfigError("without a daemon, give a limit: --max-bytes 20G or --max-age 30d.")
    limits = GcLimits(
        parse_size(ns.max_bytes) if ns.max_bytes else None,
        parse_duration(ns.max_age) if ns.max_age else None,
    )
    layout = StoreLayout(default_store_root())
    metadata = Metadata.open(layout)
    now = time.time()
    try:
        plan, result = collect(layout, metadata, limits, dry_run=ns.dry_run, now=now)
    finally:
        metadata.close()
    report: dict[str, Any] = {"lines": plan.lines()}
    if result is not None:
        report["summary"] = (
            f"removed {len(result.removed)} items, freed {human_bytes(result.bytes_freed)}; "
            f"{len(result.skipped)} skipped"
        )
    # The gather cache under the same root: its trees by the same age limit (none: no tree
    # goes by age), its unlinked pool objects, leftovers and orphaned stat caches always.
    from loader.gather_gc import collect_gather_cache
    from loader.gathering import gather_home

    home = gather_home()
    gathered = collect_gather_cache(
        home, max_age=limits.max_age_seconds, now=now, dry_run=ns.dry_run
    )
    if gathered is not None:
        gather_plan, gather_result = gathered
        report["lines"] += gather_plan.lines(home)
        if gather_result is not None:
            report["lines"] += gather_result.lines()
    return report


def _cmd_fsck(ns: argparse.Namespace) -> int:
    from cas_daemon.fsck import fsck
    from cas_daemon.layout import StoreLayout, default_store_root

    report = fsck(StoreLayout(default_store_root()), repair=ns.repair)
    for line in report.lines():
        print(line)
    return 0 if report.ok or ns.repair else 1


_COMMANDS = {
    "lock": _cmd_lock,
    "prefetch": _cmd_prefetch,
    "infer": _cmd_infer,
    "pack": _cmd_pack,
    "gather": _cmd_gather,
    "info": _cmd_info,
    "selftest": _cmd_selftest,
    "path": _cmd_path,
    "daemon": _cmd_daemon,
    "status": _cmd_status,
    "watch": _cmd_watch,
    "unwatch": _cmd_unwatch,
    "gc": _cmd_gc,
    "fsck": _cmd_fsck,
}


_GLOBAL_FLAGS = frozenset({"-v", "--verbose", "-q", "--quiet", "--no-daemon"})


def split_daemon_args(argv: Sequence[str]) -> tuple[list[str], list[str] | None]:
    """``argv`` up to the ``daemon`` command, and the daemon's own arguments after it (None
    for any other command). argparse cannot pass options such as ``--socket PATH`` through a
    subcommand untouched (``REMAINDER`` swallows neither a leading option nor its value), so
    they never reach it."""
    for index, arg in enumerate(argv):
        if arg in _GLOBAL_FLAGS:
            continue
        if arg == "daemon":
            return list(argv[: index + 1]), list(argv[index + 1 :])
        break
    return list(argv), None


def main(argv: Sequence[str] | None = None) -> int:
    head, daemon_args = split_daemon_args(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(head)
    ns.daemon_args = daemon_args or []
    if ns.no_daemon:
        os.environ["WHEELCAS_SOCKET"] = "off"  # children (the store fill) inherit it
    level = logging.WARNING if ns.quiet else logging.DEBUG if ns.verbose else logging.INFO
    logging.basicConfig(level=level, format="wheelcas: %(message)s", stream=sys.stderr)
    try:
        return _COMMANDS[ns.command](ns)
    except WheelcasError as exc:
        print(f"wheelcas: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wheelcas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
