"""``required_framework_version``: a Cargo-style semver range over the Python version.

Cargo's rules (``semver`` crate), over ``major.minor.patch``:

- a comma-separated list of comparators, all of which must hold;
- ``=I.J.K`` exact; a partial ``=I.J`` / ``=I`` matches every version with that prefix;
- ``>``, ``>=``, ``<``, ``<=`` with partial versions meaning the whole prefix range
  (``>3.9`` is ``>=3.10.0``, ``<=3.11`` is ``<3.12.0``);
- ``~I.J.K`` is ``>=I.J.K, <I.(J+1).0``; ``~I`` is ``>=I.0.0, <(I+1).0.0``;
- ``^`` (and a bare version, which means caret) allows changes that keep the leftmost non-zero
  component: ``^3.10`` is ``>=3.10.0, <4.0.0``, ``^0.2.3`` is ``>=0.2.3, <0.3.0``;
- ``*``, ``3.*``, ``3.10.*`` (also ``x``/``X``) are wildcards.

Pre-release tags of an interpreter (``3.13.0rc1``) are ignored: it counts as ``3.13.0``.
Pure: stdlib only, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loader.errors import ModelConfigError

Version = tuple[int, int, int]
_COMPARATOR = re.compile(
    r"^\s*(?P<op>=|>=|<=|>|<|~|\^)?\s*"
    r"(?P<major>\d+|[*xX])(?:\.(?P<minor>\d+|[*xX]))?(?:\.(?P<patch>\d+|[*xX]))?\s*$"
)
_INFINITY: Version = (1 << 31, 0, 0)


@dataclass(frozen=True, slots=True)
class VersionRange:
    """A half-open interval ``[low, high)`` of versions; every comparator reduces to one."""

    low: Version
    high: Version

    def contains(self, version: Version) -> bool:
        return self.low <= version < self.high


@dataclass(frozen=True, slots=True)
class VersionReq:
    text: str
    ranges: tuple[VersionRange, ...]

    def matches(self, version: Version | str) -> bool:
        parsed = parse_version(version) if isinstance(version, str) else version
        return all(r.contains(parsed) for r in self.ranges)


def parse_version(text: str) -> Version:
    """``3.11.7`` (pre-release and local suffixes dropped) as a tuple of three ints."""
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not match:
        raise ModelConfigError(f"{text!r} is not a version like 3.11.7.")
    major, minor, patch = (int(g) if g else 0 for g in match.groups())
    return (major, minor, patch)


def _bump(parts: list[int]) -> Version:
    """The first version past every version that starts with ``parts``."""
    return _pad([*parts[:-1], parts[-1] + 1])


def _pad(parts: list[int]) -> Version:
    padded = [*parts, 0, 0, 0]
    return (padded[0], padded[1], padded[2])


def _caret_high(parts: list[int]) -> Version:
    for index, value in enumerate(parts):
        if value != 0:
            return _bump(parts[: index + 1])
    return _bump(parts)  # ^0, ^0.0, ^0.0.0: bump the last given component


def _comparator(op: str, parts: list[int]) -> VersionRange:
    low, prefix_end = _pad(parts), _bump(parts) if parts else _INFINITY
    zero: Version = (0, 0, 0)
    if op == "=":
        return VersionRange(low, prefix_end)
    if op == ">":
        return VersionRange(prefix_end, _INFINITY)
    if op == ">=":
        return VersionRange(low, _INFINITY)
    if op == "<":
        return VersionRange(zero, low)
    if op == "<=":
        return VersionRange(zero, prefix_end)
    if op == "~":
        return VersionRange(low, _bump(parts[:2]) if len(parts) >= 2 else prefix_end)
    return VersionRange(low, _caret_high(parts))  # "^" and a bare version


def parse_requirement(text: str) -> VersionReq:
    """Parse a range; an invalid one raises :class:`ModelConfigError` naming the bad part."""
    if not text.strip():
        raise ModelConfigError("required_framework_version is empty; use e.g. '=3.11' or '*'.")
    ranges: list[VersionRange] = []
    for piece in text.split(","):
        match = _COMPARATOR.match(piece)
        if match is None:
            raise ModelConfigError(
                f"required_framework_version {text!r}: cannot read {piece.strip()!r}. Use "
                "Cargo-style ranges such as '=3.10', '>=3.9, <3.12', '^3.11' or '*'."
            )
        op = match["op"] or "^"
        parts: list[int] = []
        wildcard = False
        for group in (match["major"], match["minor"], match["patch"]):
            if group is None:
                break
            if group in "*xX":
                wildcard = True
                break
            parts.append(int(group))
        if wildcard:
            if match["op"] not in (None, "="):
                raise ModelConfigError(
                    f"required_framework_version {text!r}: a wildcard cannot follow "
                    f"{match['op']!r}."
                )
            op = "="
        ranges.append(_comparator(op, parts) if parts else VersionRange((0, 0, 0), _INFINITY))
    return VersionReq(text, tuple(ranges))
