"""Downloading one blob: stream, hash while writing, rename into place only if it is right.

This is the only module that owns an ``aiohttp.ClientSession`` (see :func:`open_session`).
Disk writes run in worker threads so a slow disk never stalls the event loop; the hash is
updated in the same thread, on the same bytes, so there is no second pass over the file.

Whatever goes wrong — an HTTP status, a cut connection, a wrong hash, a cancelled task — the
temp file is removed and ``dest`` is left as it was. Credentials in URLs never reach a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO

import aiohttp

from cas_daemon.errors import FetchError, HashMismatch
from lockgen.classify import strip_credentials

CHUNK_BYTES = 1 << 20
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_READ_TIMEOUT = 120.0


@contextlib.asynccontextmanager
async def open_session(
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> AsyncIterator[aiohttp.ClientSession]:
    """The one session downloads go through; closed when the block ends.

    No total timeout: a large wheel on a slow link may take long, but a stalled socket
    (``sock_read``) or an unreachable host (``connect``) fails fast. ``trust_env`` makes the
    usual proxy variables and ``.netrc`` apply, as they do for pip.
    """
    timeout = aiohttp.ClientTimeout(
        total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
    )
    async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:
        yield session


class Downloader:
    """Downloads bounded to ``max_parallel`` at a time, through one lazily opened session.

    The session opens with the first download and closes in :meth:`aclose`, called by
    whoever knows the last user is done; never in ``__init__``. Create it inside the loop
    that uses it.
    """

    def __init__(self, max_parallel: int) -> None:
        self._slots = asyncio.Semaphore(max_parallel)
        self._opening = asyncio.Lock()
        self._stack = contextlib.AsyncExitStack()
        self._session: aiohttp.ClientSession | None = None

    async def fetch(
        self,
        url: str,
        expected_sha256: str,
        dest: Path,
        tmp_dir: Path,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        """:func:`fetch_blob` once a download slot is free."""
        async with self._slots:
            async with self._opening:
                if self._session is None:
                    self._session = await self._stack.enter_async_context(open_session())
            return await fetch_blob(
                self._session, url, expected_sha256, dest, tmp_dir, on_bytes=on_bytes
            )

    async def aclose(self) -> None:
        self._session = None
        await self._stack.aclose()


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced, fit for messages and logs."""
    stripped = strip_credentials(url)
    if stripped == url:
        return url
    parts = urllib.parse.urlsplit(stripped)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{parts.netloc}"))


def _scrub(text: str, url: str) -> str:
    """``text`` (an exception message) without the credentials ``url`` carries."""
    parts = urllib.parse.urlsplit(url)
    text = text.replace(url, redact_url(url))
    for secret in (parts.password, parts.username):
        if secret:
            text = text.replace(secret, "***")
    return text


class _StagedFile:
    """A temp file that hashes what is written to it; safe to abandon from any thread.

    ``write`` and ``commit`` run in worker threads; ``discard`` runs on the event loop when the
    download fails or is cancelled. A cancelled ``asyncio.to_thread`` does not stop its thread,
    so the mutex makes ``discard`` wait for an in-flight write instead of closing the file
    under it (at most one chunk, a few milliseconds).
    """

    def __init__(self, tmp_dir: Path, prefix: str) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=tmp_dir)
        self.path = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._mutex = threading.Lock()
        self.size = 0

    def write(self, data: bytes | bytearray) -> None:
        with self._mutex:
            if self._file is None:
                return  # discarded while this write waited for a thread
            self._file.write(data)
            self._hash.update(data)
            self.size += len(data)

    def commit(self, expected: str, dest: Path) -> str:
        """fsync, then move to ``dest`` if the digest is ``expected``; returns the digest."""
        with self._mutex:
            if self._file is None:
                raise RuntimeError("commit after discard")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            actual = self._hash.hexdigest()
            if actual == expected:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.path.replace(dest)
            return actual

    def discard(self) -> None:
        with self._mutex:
            if self._file is not None:
                self._file.close()
                self._file = None
            self.path.unlink(missing_ok=True)


async def fetch_blob(
    session: aiohttp.ClientSession,
    url: str,
    expected_sha256: str,
    dest: Path,
    tmp_dir: Path,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Download ``url`` to ``dest`` if its sha256 is ``expected_sha256``; returns its size.

    Raises :class:`HashMismatch` for wrong bytes and :class:`FetchError` for everything that
    kept the bytes from arriving whole. ``file://`` URLs are copied with the same checks.
    """
    shown = redact_url(url)
    # Created on the loop thread (a metadata operation, no data written) so that no
    # cancellation can fall between creating the file and owning its cleanup.
    staged = _StagedFile(tmp_dir, f"{expected_sha256}.")
    try:
        if urllib.parse.urlsplit(url).scheme == "file":
            await _copy_local(url, staged, on_bytes)
        else:
            await _download(session, url, staged, on_bytes)
        actual = await asyncio.to_thread(staged.commit, expected_sha256, dest)
        if actual != expected_sha256:
            raise HashMismatch(shown, expected_sha256, actual)
        return staged.size
    finally:
        # After a successful commit the temp name is gone and this only unlinks nothing.
        staged.discard()


async def _download(
    session: aiohttp.ClientSession,
    url: str,
    staged: _StagedFile,
    on_bytes: Callable[[int], None] | None,
) -> None:
    shown = redact_url(url)
    # identity: Content-Length must count the bytes we hash, not a compressed transfer.
    headers = {"Accept-Encoding": "identity"}
    try:
        async with session.get(url, headers=headers, raise_for_status=False) as response:
            if response.status >= 400:
                raise FetchError(shown, f"HTTP {response.status} {response.reason or ''}".strip())
            expected_length = response.content_length
            # Network chunks are often a few kB: batch them so that each thread hop (and
            # each progress event) carries about a megabyte.
            pending = bytearray()
            async for chunk in response.content.iter_any():
                pending += chunk
                if len(pending) >= CHUNK_BYTES:
                    data, pending = pending, bytearray()
                    await _write(staged, data, on_bytes)
            if pending:
                await _write(staged, pending, on_bytes)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        reason = _scrub(f"{type(exc).__name__}: {exc}", url)
        # `from None`: the original exception's text may still carry the credentials.
        raise FetchError(shown, reason) from None
    if expected_length is not None and staged.size < expected_length:
        raise FetchError(
            shown, f"the transfer ended after {staged.size} of {expected_length} bytes"
        )


async def _copy_local(
    url: str, staged: _StagedFile, on_bytes: Callable[[int], None] | None
) -> None:
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    try:
        source = await asyncio.to_thread(path.open, "rb")
    except OSError as exc:
        raise FetchError(redact_url(url), f"cannot read {path}: {exc.strerror}") from None
    try:
        while True:
            chunk = await asyncio.to_thread(source.read, CHUNK_BYTES)
            if not chunk:
                return
            await _write(staged, chunk, on_bytes)
    finally:
        source.close()


async def _write(
    staged: _StagedFile, data: bytes | bytearray, on_bytes: Callable[[int], None] | None
) -> None:
    await asyncio.to_thread(staged.write, data)
    if on_bytes is not None:
        on_bytes(len(data))
