"""Runner options of the python runner, validated once at the boundary.

Required: ``entrypoint_package`` (dotted, relative to the code dir) and ``entrypoint_fn``.
Options named ``model.<name>`` reach the entrypoint as keyword argument ``<name>``. Values are
int, float, str or bool only, and a bool stays a bool (``False`` is not ``0``): those are the
types Carton's ``runner_opts`` can hold, so a packed model keeps them as they are.

Local package dirs (see :mod:`loader.localpkgs`): ``bundled_packages_dir`` (default
``packages``, inside the model dir), ``external_package_dirs`` (one or more dirs, relative to
the model dir or absolute; several are separated by ``os.pathsep`` as in ``PYTHONPATH``, and
the Python API also takes a list) and ``keep_external_dir_names`` (bool: each external dir is
importable under its own name instead of its contents being top-level).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from loader.errors import ModelConfigError

OptionValue = int | float | str | bool
#: What callers may pass: a list of paths is accepted for ``external_package_dirs``.
OptionInput = OptionValue | Sequence[str]
MODEL_PREFIX = "model."
DEFAULT_BUNDLED_PACKAGES_DIR = "packages"
BUNDLED_PACKAGES_DIR = "bundled_packages_dir"
EXTERNAL_PACKAGE_DIRS = "external_package_dirs"
KEEP_EXTERNAL_DIR_NAMES = "keep_external_dir_names"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerOptions:
    entrypoint_package: str
    entrypoint_fn: str
    model_kwargs: Mapping[str, OptionValue] = field(default_factory=dict)
    bundled_packages_dir: str = DEFAULT_BUNDLED_PACKAGES_DIR
    external_package_dirs: tuple[str, ...] = ()
    keep_external_dir_names: bool = False
    other: Mapping[str, OptionValue] = field(default_factory=dict)

    @property
    def scattered(self) -> bool:
        """Whether the model imports code from dirs outside it (Truss's word for it)."""
        return bool(self.external_package_dirs)


def _required_name(
    opts: Mapping[str, object], key: str, pattern: re.Pattern[str], kind: str
) -> str:
    value = opts.get(key)
    if value is None:
        raise ModelConfigError(
            f"runner option `{key}` is missing; set it (e.g. --entrypoint PACKAGE:FUNCTION, or "
            f"runner_opts={{'{key}': ...}})."
        )
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ModelConfigError(f"runner option `{key}` must be a Python {kind}, got {value!r}.")
    return value


def normalize_runner_opts(opts: Mapping[str, object] | None) -> dict[str, object]:
    """``opts`` with a list of ``external_package_dirs`` joined by ``os.pathsep``, so that
    every value is one Carton can store."""
    normalized = dict(opts or {})
    dirs = normalized.get(EXTERNAL_PACKAGE_DIRS)
    if isinstance(dirs, list | tuple):
        if not all(isinstance(d, str) and d for d in dirs):
            raise ModelConfigError(
                f"runner option `{EXTERNAL_PACKAGE_DIRS}` must be a path or a list of paths, "
                f"got {dirs!r}."
            )
        normalized[EXTERNAL_PACKAGE_DIRS] = os.pathsep.join(dirs)
    return normalized


def canonical_bundled_dir(value: object) -> str:
    """``bundled_packages_dir`` as one canonical relative path (``./packages``,
    ``packages/.`` and ``packages/`` are all ``packages``).

    Normalised once here, so that everything after (the load's ``sys.path``, a gather's
    destination paths and its digest) sees one spelling: the same dir spelt two ways would
    otherwise give two digests, or collide with itself while a gather builds its output.
    Refused: anything but a non-empty string, the model dir itself (``.``), an absolute path
    and any ``..`` (dirs outside the model go in ``external_package_dirs``).
    """
    if not isinstance(value, str) or not value.strip():
        raise ModelConfigError(
            f"runner option `{BUNDLED_PACKAGES_DIR}` must be a dir name inside the model dir "
            f"(e.g. 'packages'), got {value!r}."
        )
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == ".":
        raise ModelConfigError(
            f"runner option `{BUNDLED_PACKAGES_DIR}` is {value!r}: it must name a dir inside "
            "the model dir, other than the model dir itself (e.g. 'packages'). Dirs outside "
            f"the model go in `{EXTERNAL_PACKAGE_DIRS}`."
        )
    return str(path)


def _local_package_options(opts: Mapping[str, object]) -> tuple[str, tuple[str, ...], bool]:
    bundled = canonical_bundled_dir(opts.get(BUNDLED_PACKAGES_DIR, DEFAULT_BUNDLED_PACKAGES_DIR))
    raw = opts.get(EXTERNAL_PACKAGE_DIRS, "")
    if not isinstance(raw, str):
        raise ModelConfigError(
            f"runner option `{EXTERNAL_PACKAGE_DIRS}` must be a path, or several separated by "
            f"{os.pathsep!r}, got {raw!r}."
        )
    external = tuple(d for d in raw.split(os.pathsep) if d)
    keep = opts.get(KEEP_EXTERNAL_DIR_NAMES, False)
    if not isinstance(keep, bool):
        raise ModelConfigError(
            f"runner option `{KEEP_EXTERNAL_DIR_NAMES}` must be true or false, got {keep!r}."
        )
    return bundled, external, keep


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalPackageOptions:
    """The local-package options alone, for what needs no entrypoint (``wheelcas path``):
    :func:`loader.localpkgs.local_package_dirs` takes these as it takes
    :class:`RunnerOptions`."""

    bundled_packages_dir: str = DEFAULT_BUNDLED_PACKAGES_DIR
    external_package_dirs: tuple[str, ...] = ()
    keep_external_dir_names: bool = False


def parse_local_package_opts(opts: Mapping[str, object] | None) -> LocalPackageOptions:
    """Validate only ``bundled_packages_dir``, ``external_package_dirs`` and
    ``keep_external_dir_names`` (as :func:`parse_runner_opts` does); other options are not
    looked at, so no entrypoint is required."""
    bundled, external, keep = _local_package_options(normalize_runner_opts(opts))
    return LocalPackageOptions(
        bundled_packages_dir=bundled, external_package_dirs=external, keep_external_dir_names=keep
    )


def parse_runner_opts(opts: Mapping[str, object] | None) -> RunnerOptions:
    """Validate every option; the error names the option and the accepted types."""
    opts = normalize_runner_opts(opts)
    for key, value in opts.items():
        if not isinstance(key, str):
            raise ModelConfigError(f"runner option names must be strings, got {key!r}.")
        if isinstance(value, bool | int | float | str):
            continue
        raise ModelConfigError(
            f"runner option `{key}` has a value of type {type(value).__name__}; options are "
            "int, float, str or bool only."
        )
    package = _required_name(opts, "entrypoint_package", _DOTTED, "dotted module path")
    function = _required_name(opts, "entrypoint_fn", _IDENTIFIER, "identifier")
    model_kwargs: dict[str, OptionValue] = {}
    other: dict[str, OptionValue] = {}
    for key, value in opts.items():
        if not isinstance(value, bool | int | float | str):  # checked above; narrows the type
            continue
        if key.startswith(MODEL_PREFIX):
            name = key[len(MODEL_PREFIX) :]
            if not _IDENTIFIER.fullmatch(name):
                raise ModelConfigError(
                    f"runner option `{key}`: `{name}` is not a Python identifier, so it cannot "
                    "be passed to the entrypoint as a keyword argument."
                )
            model_kwargs[name] = value
        elif key not in _TYPED_OPTIONS:
            other[key] = value
    bundled, external, keep = _local_package_options(opts)
    return RunnerOptions(
        entrypoint_package=package,
        entrypoint_fn=function,
        model_kwargs=model_kwargs,
        bundled_packages_dir=bundled,
        external_package_dirs=external,
        keep_external_dir_names=keep,
        other=other,
    )


_TYPED_OPTIONS = frozenset(
    {
        "entrypoint_package",
        "entrypoint_fn",
        BUNDLED_PACKAGES_DIR,
        EXTERNAL_PACKAGE_DIRS,
        KEEP_EXTERNAL_DIR_NAMES,
    }
)


def parse_cli_value(text: str) -> OptionValue:
    """``true``/``false``, numbers and JSON strings as such; anything else as a plain string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool | int | float | str):
        return value
    raise ModelConfigError(
        f"option value {text!r} is a JSON {type(value).__name__}; options are int, float, str "
        "or bool only."
    )


def parse_cli_option(assignment: str) -> tuple[str, OptionValue]:
    """``NAME=VALUE`` from the command line."""
    name, sep, raw = assignment.partition("=")
    if not sep or not name:
        raise ModelConfigError(f"--opt {assignment!r}: expected NAME=VALUE, e.g. model.scale=2.")
    return name, parse_cli_value(raw)
