"""The daemon's settings: defaults, the TOML file, command-line overrides (every setting is
documented in docs/daemon.md); and what ``[python]`` resolves to on this host, the
interpreters the daemon may compile with (:class:`KnownInterpreters`).

A user daemon and the system service differ only in their defaults: the system one (run as
root, with ``--system``, or under systemd's ``CACHE_DIRECTORY``) listens on
``/run/wheelcas/wheelcas.sock`` and keeps its store in ``/var/cache/wheelcas``; a user's listens
on ``$XDG_RUNTIME_DIR/wheelcas.sock`` and shares the store embedded mode uses.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cas_daemon.layout import default_store_root
from lockgen.errors import WheelcasError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SOCKET_NAME = "wheelcas.sock"
SYSTEM_SOCKET = Path("/run/wheelcas") / SOCKET_NAME
SYSTEM_STORE = Path("/var/cache/wheelcas")
SYSTEM_CONFIG = Path("/etc/wheelcas/daemon.toml")
DEFAULT_ALLOWED_HOSTS = ("files.pythonhosted.org",)
#: What ``views.link_mode`` may say (see cas_daemon/views.py; hard links measured faster).
VIEW_LINK_MODES = ("hardlink", "symlink")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZES |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


class ConfigError(WheelcasError):
    """A configuration file or option the daemon cannot use; names the key at fault."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: `{key}` {problem}. See docs/daemon.md for every setting.")


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    """Every setting, validated. Durations are seconds, sizes bytes."""

    socket_path: Path
    socket_mode: int = 0o660
    socket_group: str | None = None
    store_dir: Path
    defer_test_bytecode: bool = True
    max_parallel_downloads: int = 8
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    interpreters: tuple[Path, ...] = ()
    discover_interpreters: bool = True
    gc_max_bytes: int | None = None
    gc_max_age: float | None = None
    gc_interval: float = 3600.0
    view_link_mode: str = "hardlink"
    watch_model_dirs: tuple[Path, ...] = ()
    watch_settle: float = 0.5
    watch_pip_args: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    upload_max_bytes: int = 4 * 2**30
    system: bool = False


def is_system_mode(environ: Mapping[str, str], *, force: bool = False) -> bool:
    """Whether system defaults apply: ``--system``, root, or systemd's CACHE_DIRECTORY."""
    return force or os.geteuid() == 0 or bool(environ.get("CACHE_DIRECTORY"))


def default_socket_path(environ: Mapping[str, str], *, system: bool) -> Path:
    if system or not environ.get("XDG_RUNTIME_DIR"):
        return SYSTEM_SOCKET
    return Path(environ["XDG_RUNTIME_DIR"]) / SOCKET_NAME


def default_config_path(environ: Mapping[str, str], *, system: bool) -> Path:
    if system:
        return SYSTEM_CONFIG
    home = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(home).expanduser() / "wheelcas" / "daemon.toml"


def defaults(environ: Mapping[str, str], *, system: bool) -> DaemonConfig:
    if system:
        # systemd's CacheDirectory= says where the cache really is; $WHEELCAS_HOME still wins.
        cache = environ.get("CACHE_DIRECTORY", "").split(":")[0]
        store = Path(environ["WHEELCAS_HOME"]) if environ.get("WHEELCAS_HOME") else None
        store = store or (Path(cache) if cache else SYSTEM_STORE)
    else:
        store = default_store_root(environ)
    return DaemonConfig(
        socket_path=default_socket_path(environ, system=system), store_dir=store, system=system
    )


def parse_duration(value: object) -> float:
    """Seconds from a number or ``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"``."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and (m := _QUANTITY.fullmatch(value)):
        unit = m.group(2).lower() or "s"
        if unit in _UNITS:
            return float(m.group(1)) * _UNITS[unit]
    raise ValueError("must be seconds or a duration such as '90s', '15m', '12h', '30d'")


def parse_size(value: object) -> int:
    """Bytes from a number or ``"500MB"``, ``"20GiB"`` (decimal and binary units)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _QUANTITY.fullmatch(value)):
        unit = m.group(2).lower()
        if unit in _SIZES:
            return int(float(m.group(1)) * _SIZES[unit])
    raise ValueError("must be bytes or a size such as '500MB', '20GiB'")


def parse_mode(value: object) -> int:
    """A file mode from ``0o660`` (TOML integer) or ``"0660"`` / ``"660"`` (octal string)."""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError('must be an octal mode such as "0660" or 0o660')


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("must be a list of strings")


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError("must be an integer of at least 1")


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def _text(value: object) -> str:
    if isinstance(value, str) and value:
        return value
    raise ValueError("must be a non-empty string")


def _paths(value: object) -> tuple[Path, ...]:
    return tuple(Path(v).expanduser() for v in _strings(value))


def _model_dirs(value: object) -> tuple[Path, ...]:
    """Absolute, normalized paths: the daemon's cwd says nothing about where models are."""
    dirs = []
    for raw in _strings(value):
        path = os.path.expanduser(raw)  # noqa: PTH111 - normpath below is os.path's too
        if not os.path.isabs(path):  # noqa: PTH117
            raise ValueError(f"has {raw!r}, which is not an absolute path")
        dirs.append(Path(os.path.normpath(path)))
    return tuple(dirs)


#: The pip options of `wheelcas lock` (loader/cli.py), the only ones a re-lock can pass on.
LOCK_PIP_OPTIONS = (
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--no-index",
    "--trusted-host",
)


def _lock_pip_args(value: object) -> tuple[str, ...]:
    args = _strings(value)
    for arg in args:
        if arg.startswith("-") and arg.split("=", 1)[0] not in LOCK_PIP_OPTIONS:
            raise ValueError(
                f"has {arg!r}; `wheelcas lock` takes only {', '.join(LOCK_PIP_OPTIONS)} (pip's "
                "other settings come from the daemon user's pip configuration)"
            )
    return args


def _settle(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > 60:
        raise ValueError("must be at most a minute (the writes of one save settle in far less)")
    return seconds


def _link_mode(value: object) -> str:
    if value in VIEW_LINK_MODES:
        return str(value)
    raise ValueError(f"must be one of {', '.join(VIEW_LINK_MODES)}")


def _host(value: str) -> str:
    if not value or "/" in value or "@" in value:
        raise ValueError(f"has {value!r}, which is not a host name (or host:port)")
    return value.lower()


def _hosts(value: object) -> tuple[str, ...]:
    return tuple(_host(v) for v in _strings(value))


# (section, key) -> (field, parser). One table, so docs/daemon.md can be checked against it.
SETTINGS: dict[tuple[str, str], tuple[str, Any]] = {
    ("socket", "path"): ("socket_path", lambda v: Path(_text(v)).expanduser()),
    ("socket", "mode"): ("socket_mode", parse_mode),
    ("socket", "group"): ("socket_group", _text),
    ("store", "dir"): ("store_dir", lambda v: Path(_text(v)).expanduser()),
    ("store", "defer_test_bytecode"): ("defer_test_bytecode", _boolean),
    ("fetch", "max_parallel_downloads"): ("max_parallel_downloads", _positive_int),
    ("fetch", "allowed_hosts"): ("allowed_hosts", _hosts),
    ("python", "interpreters"): ("interpreters", _paths),
    ("python", "discover"): ("discover_interpreters", _boolean),
    ("gc", "max_bytes"): ("gc_max_bytes", parse_size),
    ("gc", "max_age"): ("gc_max_age", parse_duration),
    ("gc", "interval"): ("gc_interval", parse_duration),
    ("views", "link_mode"): ("view_link_mode", _link_mode),
    ("watch", "model_dirs"): ("watch_model_dirs", _model_dirs),
    ("watch", "settle"): ("watch_settle", _settle),
    ("watch", "pip_args"): ("watch_pip_args", _lock_pip_args),
    ("server", "shutdown_timeout"): ("shutdown_timeout", parse_duration),
    ("uploads", "max_bytes"): ("upload_max_bytes", parse_size),
}


def apply_settings(base: DaemonConfig, data: Mapping[str, Any], source: str) -> DaemonConfig:
    """``base`` with the settings of a parsed TOML document; unknown keys are errors."""
    changes: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(source, section, "must be a table ([section])")
        for key, value in table.items():
            setting = SETTINGS.get((section, key))
            if setting is None:
                raise ConfigError(source, f"{section}.{key}", "is not a known setting")
            field_name, parse = setting
            try:
                changes[field_name] = parse(value)
            except ValueError as exc:
                raise ConfigError(source, f"{section}.{key}", str(exc)) from None
    return replace(base, **changes)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    system: bool = False,
    socket_path: Path | None = None,
    store_dir: Path | None = None,
) -> DaemonConfig:
    """Defaults, then the file (``path``, else the default one if it exists), then the flags."""
    env = os.environ if environ is None else environ
    system = is_system_mode(env, force=system)
    config = defaults(env, system=system)
    file = path if path is not None else default_config_path(env, system=system)
    if path is not None or file.is_file():
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(str(file), "(file)", f"cannot be read: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(file), "(file)", f"is not valid TOML ({exc})") from None
        config = apply_settings(config, data, str(file))
    if socket_path is not None:
        config = replace(config, socket_path=socket_path)
    if store_dir is not None:
        config = replace(config, store_dir=store_dir)
    return config


class NoInterpreter(WheelcasError):
    """No interpreter the daemon knows has the cache tag a client needs ``.pyc`` for."""

    def __init__(self, cache_tag: str, version: str, known: Mapping[str, str]) -> None:
        self.cache_tag = cache_tag
        self.version = version
        listed = ", ".join(f"{tag} ({path})" for tag, path in sorted(known.items())) or "none"
        super().__init__(
            f"the wheelcas daemon knows no Python interpreter with cache tag {cache_tag!r} "
            f"(Python {version or '?'}) to precompile with; it knows: {listed}. Install that "
            "Python on the daemon's host and add its path to `python.interpreters` in the "
            "daemon's configuration (docs/daemon.md), then restart the daemon."
        )


class KnownInterpreters:
    """The interpreters the daemon may run, by cache tag: its own, configured, discovered.

    Only the daemon's own interpreter, the configured paths and the host's own discovery
    (pyenv's versions, ``python3.X`` on ``PATH``) are ever run; a client only names a cache
    tag. Other candidates are probed lazily, once each (a short subprocess), the first time a
    client asks for a tag the daemon has not seen. Blocking: call it in a worker thread.
    """

    _RESCAN_AFTER_S = 60.0

    def __init__(self, configured: Sequence[Path], discover: bool) -> None:
        self._configured = [str(p) for p in configured]
        self._discover = discover
        own = sys.implementation.cache_tag
        self._by_tag: dict[str, str] = {own: sys.executable} if own else {}
        self._probed: set[str] = {sys.executable}
        self._scanned_at: float | None = None
        self._lock = threading.Lock()

    def known(self) -> dict[str, str]:
        with self._lock:
            return dict(self._by_tag)

    def find(self, cache_tag: str, version: str = "") -> str:
        """The interpreter to compile for ``cache_tag`` with; :class:`NoInterpreter` if none."""
        with self._lock:
            if cache_tag not in self._by_tag:
                now = time.monotonic()
                stale = self._scanned_at is None or now - self._scanned_at > self._RESCAN_AFTER_S
                if stale:
                    self._scanned_at = now
                    for path in self._candidates():
                        if path not in self._probed:
                            self._probe(path)
                            if cache_tag in self._by_tag:
                                break
            found = self._by_tag.get(cache_tag)
            if found is None:
                raise NoInterpreter(cache_tag, version, self._by_tag)
            return found

    def _probe(self, path: str) -> None:
        from lockgen.interpreters import interpreter_facts

        self._probed.add(path)
        try:
            tag = interpreter_facts(path).get("cache_tag", "")
        except (WheelcasError, OSError, ValueError):
            return  # not a working interpreter: ignored, as if absent
        if tag and tag != "None":
            self._by_tag.setdefault(tag, path)

    def _candidates(self) -> Iterator[str]:
        yield from self._configured
        if not self._discover:
            return
        root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
        for binary in sorted((root / "versions").glob("*/bin/python3.*"), reverse=True):
            if re.fullmatch(r"python3\.\d+", binary.name) and os.access(binary, os.X_OK):
                yield str(binary)
        for minor in range(20, 5, -1):
            found = shutil.which(f"python3.{minor}")
            # pyenv's shims only run the versions pyenv selected: its real binaries are above
            if found and f"{os.sep}shims{os.sep}" not in found:
                yield found
