"""Bundled wheels a client uploads as bytes (``PUT /v1/bundles/{sha256}``), until published.

The daemon never opens a path a client names: a model dir's bundled wheels reach it only as
bytes, written to its own ``tmp/uploads/`` and verified on arrival against the store key
they are uploaded under, which is always the sha256 of the bytes themselves: a plain
``.whl``'s is the lock's sha256, a compressed bundle's is its own (see
:mod:`cas_daemon.bundle_keys`). So no upload can put bytes under a key they do not have, and a
tree published from an upload is the same whoever uploaded it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
from collections.abc import AsyncIterable, Sequence
from pathlib import Path
from typing import IO, Any

from cas_daemon.errors import HashMismatch
from cas_daemon.layout import StoreLayout
from cas_daemon.protocol import DepSpec, UploadRefused, check_filename
from cas_daemon.store import WheelRef
from lockgen.lockfile import Sha256


class Uploads:
    """Bundled wheels received as bytes, in ``tmp/uploads/{key}/{name}`` until published.

    The bytes must hash to their key (see the module docstring); the store checks them again,
    and a compressed bundle's members against RECORD, when it unpacks them. The directory is
    the daemon's alone (it holds the store's daemon lock), so start-up empties it; its name is
    not a sha256, so the store's own leftover sweeps never touch it.
    """

    def __init__(self, layout: StoreLayout, *, max_bytes: int) -> None:
        self.layout = layout
        self.root = layout.tmp_dir / "uploads"
        self.max_bytes = max_bytes

    def ref(self, dep: DepSpec) -> WheelRef:
        """The store's ref of a bundled dep: by its key, its bytes from the uploads.

        The key is the sha256 of the bytes (a compressed bundle's own, never the wheel's it
        claims to be), checked on upload and again before unpacking: whoever sent them, the
        tree under a key is what the bytes with that sha256 unpack to.
        """
        key = dep.key
        locked = None if key == dep.sha256 else dep.sha256
        path = self.path_for(key, dep.filename)
        return WheelRef(key, dep.filename, bundle_path=path, locked_sha256=locked)

    def missing(self, refs: Sequence[WheelRef]) -> list[str]:
        """The keys of the bundled refs with neither a published tree nor an upload."""
        return sorted(
            {
                ref.sha256
                for ref in refs
                if ref.bundle_path is not None
                and not self.layout.tree_dir(ref.sha256).exists()
                and not ref.bundle_path.is_file()
            }
        )

    def path_for(self, sha: str, filename: str) -> Path:
        """Where the upload under key ``sha`` is (whatever name it came with), or would be."""
        directory = self.root / sha
        try:
            return min(directory.iterdir())
        except (FileNotFoundError, ValueError):
            return directory / filename

    async def receive(self, sha: Sha256, filename: str, body: AsyncIterable[bytes]) -> int:
        """Keep the upload under key ``sha`` if its bytes hash to it; its size."""
        check_filename(filename, "X-Wheelcas-Filename")
        self.root.mkdir(parents=True, exist_ok=True)
        part = self.root / f"{sha}.{secrets.token_hex(8)}.part"
        handle = await asyncio.to_thread(part.open, "xb")
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in body:
                size += len(chunk)
                if size > self.max_bytes:
                    raise UploadRefused(
                        f"the upload of {filename} exceeds {self.max_bytes} bytes "
                        "(`uploads.max_bytes` in the daemon's configuration)"
                    )
                await asyncio.to_thread(_write, handle, digest, chunk)
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(self._keep, part, sha, filename, digest.hexdigest())
        finally:
            handle.close()
            part.unlink(missing_ok=True)
        return size

    def _keep(self, part: Path, sha: str, filename: str, digest: str) -> None:
        if digest != sha:
            raise HashMismatch(f"the uploaded bundled wheel {filename}", sha, digest)
        (self.root / sha).mkdir(exist_ok=True)
        part.replace(self.root / sha / filename)

    def about(self, exc: BaseException) -> str | None:
        """The key of the upload an error is about (a bundle that did not unpack), if any.

        Such bytes are dropped: a compressed bundle can hash to its key and still not unpack
        (members that do not match RECORD), and the next try may upload other bytes.
        """
        root = f"{self.root}{os.sep}"
        for name in ("source", "url", "path"):
            value = getattr(exc, name, None)
            if isinstance(value, str) and value.startswith(root):
                return value[len(root) :].split(os.sep, 1)[0]
        return None

    def forget(self, shas: Sequence[str]) -> None:
        for sha in shas:
            shutil.rmtree(self.root / sha, ignore_errors=True)

    async def forget_used(self, refs: Sequence[WheelRef]) -> None:
        """Drop the uploads of refs whose trees are now published: not needed again."""
        used = [
            ref.sha256
            for ref in refs
            if ref.bundle_path is not None and (self.root / ref.sha256).exists()
        ]
        if used:
            await asyncio.to_thread(self.forget, used)

    async def forget_failed(self, exc: BaseException) -> None:
        """Drop the upload ``exc`` is about, if any: the next try uploads it afresh.

        Shielded, so that it is done even while the request is being cancelled.
        """
        bad = self.about(exc)
        if bad is not None:
            await asyncio.shield(asyncio.to_thread(self.forget, [bad]))


def _write(handle: IO[bytes], digest: Any, chunk: bytes) -> None:
    handle.write(chunk)
    digest.update(chunk)
