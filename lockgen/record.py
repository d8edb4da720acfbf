"""A wheel's RECORD: parse it and check members against it as they stream past. Pure: no I/O.

Both the bundle writer (lock time, ``lockgen.bundle``) and the unpacker (load time,
``cas_daemon.unpack``) hold members to the same rules, so the rules live once, here, in the
bottom layer. RECORD is the only integrity data a bundle has: its lock sha256 is that of the
original ``.whl``, which cannot be recomputed from the members.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
from dataclasses import dataclass
from typing import Protocol

# Hash names RECORD may use: sha256 or stronger (the wheel spec refuses md5 and sha1).
_STRONG = frozenset({"sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512"})
# Files of the .dist-info dir that cannot hash themselves.
_UNHASHED = frozenset({"RECORD", "RECORD.jws", "RECORD.p7s"})


def record_path_of(dist_info: str) -> str:
    return f"{dist_info}/RECORD"


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RecordEntry:
    algorithm: str  # "" when the line carries no hash
    digest: str  # urlsafe base64 without padding, as RECORD writes it
    size: int | None


class RecordVerifier:
    """Checks members against a wheel's RECORD as they stream past. Pure: no I/O.

    Rules: every member but RECORD (and its signatures) is listed with a sha256-or-stronger
    hash and matches it and its size; every hashed line names a member that was seen.
    Problems are collected as ``(member, problem)`` so a caller can report them all at once.
    """

    def __init__(self, record: bytes, record_path: str) -> None:
        self._dist_info = record_path.rsplit("/", 1)[0]
        self.entries: dict[str, RecordEntry] = {}
        self.problems: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problems.append((record_path, f"is not UTF-8 ({exc})"))
            text = record.decode("utf-8", "replace")
        rows = csv.reader(io.StringIO(text))
        for number, row in enumerate(rows, start=1):
            problem = self._add(row) if row else None
            if problem:
                self.problems.append((record_path, f"line {number} {problem}"))

    def _add(self, row: list[str]) -> str | None:
        if len(row) != 3:
            return f"has {len(row)} fields instead of path,hash,size"
        path, hash_field, size_field = row
        algorithm, _, digest = hash_field.partition("=")
        if hash_field and not digest:
            return f"has a hash without '=': {hash_field!r}"
        if size_field and not size_field.isdigit():
            return f"has a size that is not a number: {size_field!r}"
        entry = RecordEntry(algorithm, digest.rstrip("="), int(size_field) if size_field else None)
        if self.entries.setdefault(path, entry) != entry:
            return f"lists {path!r} a second time, differently"
        return None

    def _exempt(self, member: str) -> bool:
        head, _, base = member.rpartition("/")
        return head == self._dist_info and base in _UNHASHED

    def hasher(self, member: str) -> Hasher | None:
        """A fresh hash object of the algorithm RECORD names for ``member``, if acceptable."""
        entry = self.entries.get(member)
        return hashlib.new(entry.algorithm) if entry and entry.algorithm in _STRONG else None

    def check(self, member: str, hasher: Hasher | None, size: int) -> None:
        """Record what ``member`` turned out to be: ``hasher`` fed its bytes, ``size`` of them."""
        self._seen.add(member)
        if not self._exempt(member):
            problem = self._problem(self.entries.get(member), hasher, size)
            if problem:
                self.problems.append((member, problem))

    @staticmethod
    def _problem(entry: RecordEntry | None, hasher: Hasher | None, size: int) -> str | None:
        if entry is None:
            return "is not listed in RECORD"
        algorithm = entry.algorithm
        if not algorithm:
            return "has no hash in RECORD"
        if hasher is None:
            return f"has a {algorithm!r} hash in RECORD; only sha256 or stronger is accepted"
        digest = hasher.digest()
        actual = _b64(digest)
        # The spec says base64; some real wheels (gmsh) write hex. Either names the same hash.
        if entry.digest not in (actual, digest.hex()):
            return f"has {algorithm}={actual} but RECORD says {algorithm}={entry.digest}"
        if entry.size is not None and entry.size != size:
            return f"is {size} bytes but RECORD says {entry.size}"
        return None

    def finish(self) -> list[tuple[str, str]]:
        """All problems, with the hashed RECORD lines no member answered."""
        missing = [
            (path, "is listed in RECORD but missing from the wheel")
            for path, entry in self.entries.items()
            if entry.algorithm and path not in self._seen and not self._exempt(path)
        ]
        return self.problems + missing


def summarize_problems(problems: list[tuple[str, str]], shown: int = 3) -> tuple[str, str]:
    """``(first member, text)``: the first problem, then a few more named, then a count."""
    (member, first), rest = problems[0], problems[1:]
    text = first
    if rest:
        named = "; ".join(f"{m!r} {p}" for m, p in rest[: shown - 1])
        more = len(rest) - (shown - 1)
        text += f" (also: {named}" + (f"; and {more} more)" if more > 0 else ")")
    return member, text


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
