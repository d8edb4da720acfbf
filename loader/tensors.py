"""Tensors and messages across the boundary between a loading process and its model worker.

A message is one frame: a 12-byte prefix (``<QI``: the length of what follows, the length of
the JSON header), the UTF-8 JSON header, then the raw bytes of the inline tensors. The header
describes every tensor as ``[name, dtype.str, shape, place]``; ``place`` is
``["inline", offset, nbytes]`` (into the bytes after the header) or ``["shm", path, nbytes]``.

Small tensors travel inline: one ``tobytes`` copy on the way out, none on the way in (the
decoded array is a view of the received frame). Tensors of :data:`SHM_THRESHOLD` bytes or more
travel through a file in ``/dev/shm``: the sender copies the array into the mapped file (the
only copy, which also makes a non-contiguous array contiguous), the receiver maps it
copy-on-write and unlinks it at once, so its array costs no copy and leaves no file behind.

This file is also run *inside the worker* (``loader/_bootstrap.py`` loads it by path under
another name), in whatever interpreter the model asked for: it imports only the standard
library at module level and numpy lazily, and keeps to syntax and runtime features of
Python 3.8 (no ``X | Y`` at runtime, no ``match``, no ``removeprefix``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # subscripting collections.abc.Callable at runtime needs Python 3.9
    LargeWriter = Callable[[Any], str]  # array -> the path of the file that now holds it
    LargeReader = Callable[[str, Any, int], Any]  # path, dtype, count -> array

#: Tensors this large or larger go through shared memory. Measured (one uint8 tensor, parent
#: to a thread over a socketpair, best of 15): inline vs shm 34 vs 123 us at 64 KiB, 527 vs
#: 513 us at 512 KiB, 975 vs 887 us at 1 MiB, 20 vs 12 ms at 16 MiB, 156 vs 55 ms at 64 MiB.
SHM_THRESHOLD = 1 << 20
SHM_DIR = "/dev/shm"  # noqa: S108 - a tmpfs that exists for exactly this
SHM_PREFIX = "wheelcas-"
#: dtype kinds that cross the boundary as raw bytes: bool, ints, floats, complex, bytes (S),
#: str (U), timedelta and datetime. Object and structured arrays have no byte representation.
ALLOWED_KINDS = "biufcSUmM"

_PREFIX = struct.Struct("<QI")
_counter = itertools.count()

Frame = bytearray


class TensorError(TypeError):
    """A value that cannot cross the process boundary as a tensor (object arrays and such)."""


def _numpy() -> Any:
    try:
        import numpy  # lazily: a worker imports it only from the model's own packages
    except ImportError as exc:
        raise TensorError(
            f"tensors cross to and from a model's worker as numpy arrays, but numpy cannot be "
            f"imported by {sys.executable} ({exc}). A worker imports only the model's locked "
            "packages: add numpy to the model's requirements.txt."
        ) from None
    return numpy


def as_tensor(name: str, value: Any) -> Any:
    """``value`` as an ndarray of a supported dtype, or :class:`TensorError` naming it."""
    np = _numpy()
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    kind = array.dtype.kind
    if kind not in ALLOWED_KINDS or array.dtype.fields is not None:
        what = "object" if kind == "O" else str(array.dtype)
        raise TensorError(
            f"tensor {name!r} has dtype {what}, which cannot be sent to or from a model worker; "
            "use a numeric, bool, bytes (S) or str (U) array."
        )
    return array


def encode_message(
    header: Mapping[str, Any],
    tensors: Mapping[str, Any] | None = None,
    *,
    write_large: LargeWriter | None = None,
    threshold: int = SHM_THRESHOLD,
) -> list[bytes]:
    """The parts of one frame (join them, or write them in order).

    ``write_large`` puts an array of ``threshold`` bytes or more somewhere the receiver can
    map it (:func:`write_shm`); without one, every tensor is inline.
    """
    specs: list[list[Any]] = []
    payload: list[bytes] = []
    offset = 0
    for name, value in (tensors or {}).items():
        array = as_tensor(name, value)
        dtype, shape, nbytes = array.dtype.str, list(array.shape), int(array.nbytes)
        if write_large is not None and nbytes >= threshold and nbytes > 0:
            specs.append([name, dtype, shape, ["shm", write_large(array), nbytes]])
            continue
        data = array.tobytes()  # C order; a non-contiguous array is made contiguous here
        specs.append([name, dtype, shape, ["inline", offset, nbytes]])
        payload.append(data)
        offset += nbytes
    body = dict(header)
    body["tensors"] = specs
    head = json.dumps(body, separators=(",", ":")).encode()
    return [_PREFIX.pack(len(head) + offset, len(head)), head, *payload]


def decode_message(
    frame: Frame, *, read_large: LargeReader | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and the tensors of a frame's body (the bytes after the 12-byte prefix).

    Inline arrays are views of ``frame``; ``read_large(path, dtype, count)`` maps a shared
    memory tensor (default :func:`read_shm`).
    """
    (head_len,) = struct.unpack_from("<I", frame, 0)
    header = json.loads(bytes(frame[4 : 4 + head_len]))
    if not isinstance(header, dict):
        raise ValueError("a worker message's header is not a JSON object")
    specs = header.pop("tensors", [])
    tensors: dict[str, Any] = {}
    if not specs:
        return header, tensors
    np = _numpy()
    base = 4 + head_len
    for name, dtype_str, shape, place in specs:
        dtype = np.dtype(dtype_str)
        count = 1
        for extent in shape:
            count *= extent
        if count == 0 or dtype.itemsize == 0:
            array = np.zeros(shape, dtype=dtype)
        elif place[0] == "inline":
            array = np.frombuffer(frame, dtype=dtype, count=count, offset=base + place[1])
        else:
            array = (read_large or read_shm)(place[1], dtype, count)
        tensors[name] = array.reshape(shape)
    return header, tensors


# --- I/O: shared memory files and frames on a socket -----------------------------------------


def shm_available(directory: str = SHM_DIR) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)  # noqa: PTH112


def shm_path(directory: str = SHM_DIR) -> str:
    """A fresh name; the pid in it lets the parent clean up after a worker that died."""
    token = os.urandom(4).hex()
    return os.path.join(directory, f"{SHM_PREFIX}{os.getpid()}-{next(_counter)}-{token}")  # noqa: PTH118


def write_shm(array: Any, directory: str = SHM_DIR) -> str:
    """Copy ``array`` into a new file under ``directory``; its path."""
    np = _numpy()
    path = shm_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, array.nbytes)
        with mmap.mmap(fd, array.nbytes) as mapped:
            target = np.frombuffer(mapped, dtype=array.dtype, count=array.size)
            np.copyto(target.reshape(array.shape), array)
            del target  # the mapping cannot close while a view of it exists
    except BaseException:
        os.unlink(path)  # noqa: PTH108
        raise
    finally:
        os.close(fd)
    return path


def read_shm(path: str, dtype: Any, count: int) -> Any:
    """Map ``path`` copy-on-write (writable, no copy) and unlink it; the array."""
    np = _numpy()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = count * dtype.itemsize
        mapped = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
        unlink_quietly(path)
    return np.frombuffer(mapped, dtype=dtype, count=count)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # noqa: PTH108


def write_frame(sock: socket.socket, parts: Iterable[bytes]) -> None:
    sock.sendall(b"".join(parts))


def read_frame(sock: socket.socket) -> Frame | None:
    """The body of the next frame; None at a clean end of the stream."""
    prefix = _read_exactly(sock, _PREFIX.size)
    if prefix is None:
        return None
    total, head_len = _PREFIX.unpack(prefix)
    body = bytearray(4 + total)
    struct.pack_into("<I", body, 0, head_len)
    view = memoryview(body)[4:]
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionResetError("the other side closed the connection mid-message")
        view = view[got:]
    return body


def _read_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        got = sock.recv_into(view)
        if got == 0:
            if len(view) == size:
                return None
            raise ConnectionResetError("the other side closed the connection mid-message")
        view = view[got:]
    return buffer
