"""Runner options of the python runner, validated once at the boundary.

Required: ``entrypoint_package`` (dotted, relative to the code dir) and ``entrypoint_fn``.
Options named ``model.<name>`` reach the entrypoint as keyword argument ``<name>``. Values are
int, float, str or bool only, and a bool stays a bool (``False`` is not ``0``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from loader.errors import ModelConfigError

OptionValue = int | float | str | bool
MODEL_PREFIX = "model."
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerOptions:
    entrypoint_package: str
    entrypoint_fn: str
    model_kwargs: Mapping[str, OptionValue] = field(default_factory=dict)
    other: Mapping[str, OptionValue] = field(default_factory=dict)


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


def parse_runner_opts(opts: Mapping[str, object] | None) -> RunnerOptions:
    """Validate every option; the error names the option and the accepted types."""
    opts = dict(opts or {})
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
        elif key not in ("entrypoint_package", "entrypoint_fn"):
            other[key] = value
    return RunnerOptions(
        entrypoint_package=package, entrypoint_fn=function, model_kwargs=model_kwargs, other=other
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
