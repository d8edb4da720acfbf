"""Errors of the store: each carries the fields a caller needs and says what to do next."""

from __future__ import annotations

from lockgen.errors import WheelcasError


class StoreError(WheelcasError):
    """The store cannot do what was asked (permissions, disk, a broken entry)."""


class FetchError(StoreError):
    """A download that failed: connection, HTTP status, or a transfer cut short."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"could not download {url}: {reason}. Nothing was stored; check the network or "
            "the index, then retry."
        )


class HashMismatch(StoreError):
    """Bytes whose sha256 is not the one the lockfile promises."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.url = url
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"sha256 mismatch for {url}: the lockfile expects {expected}, the bytes have "
            f"{actual}. Nothing was stored. If the file changed on purpose, re-lock the model "
            "(`wheelcas lock DIR`); otherwise the source is corrupt or tampered with."
        )


class UnsafeWheelError(StoreError):
    """A wheel member that would escape the target directory or is not a plain file."""

    def __init__(self, source: str, member: str, reason: str) -> None:
        self.source = source
        self.member = member
        self.reason = reason
        super().__init__(
            f"refusing to unpack {source}: member {member!r} {reason}. The wheel is malformed "
            "or malicious; rebuild it or remove it from the requirements."
        )


class WheelTooLarge(StoreError):
    """An archive that unpacks past the configured limits (zip bomb protection)."""

    def __init__(self, source: str, what: str, limit: int) -> None:
        self.source = source
        self.what = what
        self.limit = limit
        super().__init__(
            f"refusing to unpack {source}: {what} exceeds the limit of {limit}. Raise the "
            "limit in the configuration if this wheel is legitimate."
        )


class RecordMismatch(StoreError):
    """A member whose content does not match the wheel's RECORD, or a member RECORD lacks."""

    def __init__(self, source: str, member: str, problem: str) -> None:
        self.source = source
        self.member = member
        self.problem = problem
        super().__init__(
            f"{source}: member {member!r} {problem} (checked against the wheel's RECORD). "
            "The bundle is corrupt or was altered; re-lock the model to rebuild it."
        )
