"""A minimal HTTP/1.1 client over a unix socket: one request per connection, stdlib only.

Not ``http.client``: that module imports ``ssl`` and the ``email`` parser, about 30 ms, more
than the whole warm load of a model through the daemon. What the daemon speaks is
small: a request line, a few headers, a ``Content-Length`` body (bytes or a file, streamed),
``Connection: close``; a response with a ``Content-Length`` or chunked body.

Errors are the socket's own (``OSError`` and its subclasses); a response cut short or garbled
is a :class:`ConnectionError`, so that callers treat it like any other broken connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TypeVar

T = TypeVar("T")
#: What a request may carry: nothing, bytes, or an open file (sent as it is read).
Body = bytes | IO[bytes] | None
CHUNK = 1 << 20
_MAX_HEADER_LINES = 100


class Response:
    """One HTTP/1.1 response read from a socket: status, headers, then the body.

    Raises :class:`ConnectionError` for a response cut short or garbled, so that callers
    handle it like any other broken connection.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        parts = stream.readline().split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError("no HTTP status line")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        for _ in range(_MAX_HEADER_LINES):
            line = stream.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("the headers were cut short")
            name, _sep, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        else:
            raise ConnectionError("too many header lines")

    def _exactly(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) < size:
            raise ConnectionError("the body was cut short")
        return data

    def chunks(self) -> Iterator[bytes]:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._stream.readline()
                try:
                    size = int(size_line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ConnectionError("the chunked body was cut short") from None
                if size == 0:
                    return
                yield self._exactly(size)
                self._exactly(2)  # the CRLF after each chunk
        elif "content-length" in self.headers:
            yield self._exactly(int(self.headers["content-length"]))
        else:
            yield self._stream.read()

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self.chunks():
            *complete, pending = (pending + chunk).split(b"\n")
            yield from (line for line in complete if line.strip())
        if pending.strip():
            yield pending


def exchange(
    socket_path: str | os.PathLike[str],
    method: str,
    path: str,
    body: Body,
    headers: Mapping[str, str],
    handle: Callable[[Response], T],
    *,
    timeout: float,
    connect_timeout: float,
) -> T:
    """Connect to ``socket_path``, send one request, and let ``handle`` read the response."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(connect_timeout, timeout))
        sock.connect(os.fspath(socket_path))
        sock.settimeout(timeout)
        # A failed send may still have an answer to read: an early refusal (a too large
        # upload) is answered before the daemon stops reading.
        with contextlib.suppress(OSError):
            send_request(sock, method, path, body, headers)
        with sock.makefile("rb") as stream:
            return handle(Response(stream))
    finally:
        sock.close()


def send_request(
    sock: socket.socket,
    method: str,
    path: str,
    body: Body,
    headers: Mapping[str, str],
) -> None:
    if body is None:
        length = 0
    elif isinstance(body, bytes):
        length = len(body)
    else:
        length = os.fstat(body.fileno()).st_size
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if body is None or isinstance(body, bytes):
        sock.sendall(head + (body or b""))
        return
    sock.sendall(head)
    while chunk := body.read(CHUNK):
        sock.sendall(chunk)
