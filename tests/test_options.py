"""Runner options: validated once, with errors that name the option."""

from __future__ import annotations

import os

import pytest

from loader.errors import ModelConfigError
from loader.options import (
    normalize_runner_opts,
    parse_cli_option,
    parse_cli_value,
    parse_local_package_opts,
    parse_runner_opts,
)


def test_model_options_become_keyword_arguments_and_bools_stay_bools() -> None:
    opts = parse_runner_opts(
        {
            "entrypoint_package": "some.sub.module",
            "entrypoint_fn": "get_model",
            "model.flag": False,
            "model.scale": 2,
            "bundled_packages_dir": "packages",
        }
    )
    assert opts.entrypoint_package == "some.sub.module"
    assert opts.model_kwargs == {"flag": False, "scale": 2}
    assert opts.model_kwargs["flag"] is False
    assert opts.bundled_packages_dir == "packages"
    assert opts.other == {}


@pytest.mark.parametrize(
    ("opts", "complaint"),
    [
        ({"entrypoint_fn": "f"}, "`entrypoint_package` is missing"),
        ({"entrypoint_package": "m"}, "`entrypoint_fn` is missing"),
        ({"entrypoint_package": "m/x", "entrypoint_fn": "f"}, "dotted module path"),
        ({"entrypoint_package": "m", "entrypoint_fn": "f.g"}, "identifier"),
        ({"entrypoint_package": "m", "entrypoint_fn": "f", "model.x": [1]}, "type list"),
        ({"entrypoint_package": "m", "entrypoint_fn": "f", "model.x": None}, "type NoneType"),
        ({"entrypoint_package": "m", "entrypoint_fn": "f", "model.a-b": 1}, "not a Python"),
    ],
)
def test_bad_options_name_the_option(opts: dict[str, object], complaint: str) -> None:
    with pytest.raises(ModelConfigError, match="option") as info:
        parse_runner_opts(opts)
    assert complaint in str(info.value)


def test_cli_values() -> None:
    assert parse_cli_value("true") is True
    assert parse_cli_value("false") is False
    assert parse_cli_value("3") == 3
    assert parse_cli_value("2.5") == 2.5
    assert parse_cli_value('"3"') == "3"
    assert parse_cli_value("hello world") == "hello world"
    assert parse_cli_option("model.x=1") == ("model.x", 1)
    with pytest.raises(ModelConfigError, match="JSON list"):
        parse_cli_value("[1, 2]")
    with pytest.raises(ModelConfigError, match="NAME=VALUE"):
        parse_cli_option("model.x")


def test_local_package_options() -> None:
    base = {"entrypoint_package": "m", "entrypoint_fn": "f"}
    opts = parse_runner_opts(base)
    assert (opts.bundled_packages_dir, opts.external_package_dirs) == ("packages", ())
    assert not opts.scattered
    assert opts.keep_external_dir_names is False
    listed = parse_runner_opts({**base, "external_package_dirs": ["../a", "/abs/b"]})
    joined = parse_runner_opts({**base, "external_package_dirs": f"../a{os.pathsep}/abs/b"})
    assert listed.external_package_dirs == joined.external_package_dirs == ("../a", "/abs/b")
    assert listed.scattered
    assert normalize_runner_opts({**base, "external_package_dirs": ("x", "y")}) == {
        **base,
        "external_package_dirs": f"x{os.pathsep}y",
    }
    kept = parse_runner_opts({**base, "keep_external_dir_names": True, "bundled_packages_dir": "p"})
    assert (kept.keep_external_dir_names, kept.bundled_packages_dir, kept.other) == (True, "p", {})


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ({"external_package_dirs": ["a", ""]}, "a path or a list of paths"),
        ({"external_package_dirs": [1]}, "a path or a list of paths"),
        ({"external_package_dirs": 3}, "several separated by"),
        ({"keep_external_dir_names": "yes"}, "true or false"),
        ({"keep_external_dir_names": 1}, "true or false"),
        ({"bundled_packages_dir": " "}, "a dir name inside the model dir"),
        ({"bundled_packages_dir": 2}, "a dir name inside the model dir"),
    ],
)
def test_bad_local_package_options(extra: dict[str, object], complaint: str) -> None:
    with pytest.raises(ModelConfigError) as raised:
        parse_runner_opts({"entrypoint_package": "m", "entrypoint_fn": "f", **extra})
    assert complaint in str(raised.value)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("packages", "packages"),
        ("./packages", "packages"),
        ("packages/.", "packages"),
        ("packages/", "packages"),
        ("vendor//libs/./x", "vendor/libs/x"),
    ],
)
def test_the_bundled_dir_is_one_canonical_spelling(given: str, canonical: str) -> None:
    base = {"entrypoint_package": "m", "entrypoint_fn": "f"}
    assert parse_runner_opts({**base, "bundled_packages_dir": given}).bundled_packages_dir == (
        canonical
    )
    local = parse_local_package_opts({"bundled_packages_dir": given})
    assert local.bundled_packages_dir == canonical


@pytest.mark.parametrize("given", [".", "./", "", "  ", "/abs/packages", "../x", "a/../b", 3])
def test_a_bundled_dir_that_is_not_inside_the_model_dir_is_refused(given: object) -> None:
    with pytest.raises(ModelConfigError, match="bundled_packages_dir"):
        parse_local_package_opts({"bundled_packages_dir": given})
