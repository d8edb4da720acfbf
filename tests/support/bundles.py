"""Hostile compressed bundles, for the tests of how the store keys bundled wheels.

A forged bundle is what anyone can make: the members of a wheel of their own, consistent with
its RECORD (so it unpacks without complaint), behind a header that claims the sha256 of some
other, popular wheel. Nothing in a bundle can prove that claim false, which is why the store
names a bundle's tree by the bundle file's own sha256 (cas_daemon/bundle_keys.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lockgen.bundle import MAGIC, write_bundle

_FRAME = struct.Struct("<II")  # the skippable frame's magic and payload length
_VERSION = struct.Struct("<H")


def write_forged_bundle(wheel: Path, dest: Path, claimed_sha256: str) -> Path:
    """A bundle of ``wheel`` at ``dest`` whose header claims ``claimed_sha256``; ``dest``."""
    write_bundle(wheel, dest)
    data = dest.read_bytes()
    magic, length = _FRAME.unpack_from(data)
    payload = data[_FRAME.size : _FRAME.size + length]
    fixed = len(MAGIC) + _VERSION.size  # the magic and the format version stay as they are
    header = json.loads(payload[fixed:])
    header["wheel_sha256"] = claimed_sha256
    forged = payload[:fixed] + json.dumps(header).encode()
    rest = data[_FRAME.size + length :]  # the compressed members, untouched
    dest.write_bytes(_FRAME.pack(magic, len(forged)) + forged + rest)
    return dest
