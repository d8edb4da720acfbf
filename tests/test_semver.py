"""Cargo's semver range semantics, over Python versions, as a table."""

from __future__ import annotations

import pytest

from loader.errors import ModelConfigError
from loader.semver import parse_requirement, parse_version

CASES = [
    # (range, version, matches)
    ("=3.10", "3.10.0", True),
    ("=3.10", "3.10.13", True),
    ("=3.10", "3.11.0", False),
    ("=3.10", "3.9.18", False),
    ("=3.10.2", "3.10.2", True),
    ("=3.10.2", "3.10.3", False),
    ("=3", "3.13.0", True),
    ("3.10", "3.10.0", True),  # bare = caret
    ("3.10", "3.13.0", True),
    ("3.10", "3.9.9", False),
    ("3.10", "4.0.0", False),
    ("^3.11", "3.11.0", True),
    ("^3.11", "3.12.1", True),
    ("^3.11", "3.10.13", False),
    ("^0.2.3", "0.2.9", True),
    ("^0.2.3", "0.3.0", False),
    ("^0.0.3", "0.0.3", True),
    ("^0.0.3", "0.0.4", False),
    ("^0.0", "0.0.9", True),
    ("^0.0", "0.1.0", False),
    ("^0", "0.9.9", True),
    ("^0", "1.0.0", False),
    ("~3.10", "3.10.5", True),
    ("~3.10", "3.11.0", False),
    ("~3.10.2", "3.10.1", False),
    ("~3.10.2", "3.10.2", True),
    ("~3", "3.99.0", True),
    ("~3", "4.0.0", False),
    (">=3.9, <3.12", "3.9.0", True),
    (">=3.9, <3.12", "3.11.7", True),
    (">=3.9, <3.12", "3.12.0", False),
    (">=3.9,<3.12", "3.8.18", False),
    (">3.9", "3.9.18", False),  # a partial > excludes the whole 3.9 series
    (">3.9", "3.10.0", True),
    (">3.9.1", "3.9.2", True),
    ("<=3.11", "3.11.9", True),
    ("<=3.11", "3.12.0", False),
    ("<3.11", "3.10.13", True),
    ("<3.11", "3.11.0", False),
    ("*", "3.8.18", True),
    ("3.*", "3.12.1", True),
    ("3.*", "4.0.0", False),
    ("3.10.*", "3.10.4", True),
    ("3.10.*", "3.11.0", False),
    ("3.x", "3.13.0", True),
    ("=3.13", "3.13.0rc1", True),  # pre-release tags ignored
    (" >= 3.8 ,  < 3.9 ", "3.8.18", True),
]


@pytest.mark.parametrize(("text", "version", "expected"), CASES)
def test_cargo_semantics(text: str, version: str, expected: bool) -> None:
    assert parse_requirement(text).matches(version) is expected


@pytest.mark.parametrize(
    "text", ["", "   ", "python3.10", ">=3.9 <3.12", "^*", "3.10 || 3.11", "=="]
)
def test_invalid_ranges_say_what_to_write(text: str) -> None:
    with pytest.raises(ModelConfigError, match=r"required_framework_version|version"):
        parse_requirement(text)


def test_parse_version() -> None:
    assert parse_version("3.11.7") == (3, 11, 7)
    assert parse_version("3.12") == (3, 12, 0)
    assert parse_version("3.13.0rc1") == (3, 13, 0)
