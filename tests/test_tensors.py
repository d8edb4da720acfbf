"""Tensors across the worker boundary: encoding, framing and shared memory, without a worker."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader import tensors as wire

DTYPES = [
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "longdouble", "complex64", "complex128", ">i4", ">f8",
    "datetime64[ns]", "timedelta64[s]",
]  # fmt: skip
SHAPES: list[tuple[int, ...]] = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 1, 1, 2)]


def round_trip(
    tensors: dict[str, Any], *, large_dir: Path | None = None, threshold: int = wire.SHM_THRESHOLD
) -> tuple[dict[str, Any], dict[str, Any]]:
    writer = None if large_dir is None else (lambda a: wire.write_shm(a, str(large_dir)))
    parts = wire.encode_message({"op": "x"}, tensors, write_large=writer, threshold=threshold)
    joined = b"".join(parts)
    body = bytearray(joined[8:])  # what read_frame returns: the bytes after the length
    return wire.decode_message(body)


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shm"
    path.mkdir()
    return path


def sample(dtype: str, shape: tuple[int, ...]) -> Any:
    count = int(np.prod(shape))
    return (np.arange(count) % 3).astype(dtype).reshape(shape)


def assert_same(got: Any, expected: Any) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_numeric_round_trips(dtype: str, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape)
    header, out = round_trip({"a": array})
    assert header == {"op": "x"}
    assert_same(out["a"], array)


@pytest.mark.parametrize(
    "array",
    [
        np.array(["", "a", "ünïcode ✓"]),
        np.array("zero-d"),
        np.array(""),
        np.array([], dtype=str),
        np.array([b"", b"\x00raw", b"bytes"]),
        np.array(b"x"),
        np.zeros((0, 2), dtype="S3"),
        np.array([["ab", "c"], ["d", "efg"]]),
    ],
    ids=["U", "U-0d", "U-empty-string", "U-empty", "S", "S-0d", "S-empty", "U-2d"],
)
def test_string_and_bytes_round_trips(array: Any) -> None:
    _, out = round_trip({"s": array})
    assert_same(out["s"], array)


def test_non_contiguous_inputs_arrive_contiguous() -> None:
    base = np.arange(24, dtype="int32").reshape(4, 6)
    views = {"t": base.T, "step": base[:, ::2], "neg": base[::-1]}
    _, out = round_trip(views)
    for name, view in views.items():
        assert_same(out[name], view)
        assert out[name].flags.c_contiguous


def test_several_tensors_keep_their_order_and_are_writable() -> None:
    tensors = {"b": np.ones(3), "a": np.zeros((2, 2), dtype="uint8"), "c": np.array(True)}
    _, out = round_trip(tensors)
    assert list(out) == ["b", "a", "c"]
    out["b"][0] = 7  # a model may write into its inputs
    assert out["b"][0] == 7


def test_lists_and_scalars_become_arrays() -> None:
    _, out = round_trip({"list": [1, 2, 3], "scalar": 2.5, "text": "hi"})
    assert_same(out["list"], np.array([1, 2, 3]))
    assert_same(out["scalar"], np.array(2.5))
    assert_same(out["text"], np.array("hi"))


@pytest.mark.parametrize(
    "value", [np.array([object()]), [1, "a", None], np.zeros(2, dtype=[("x", "i4"), ("y", "f4")])]
)
def test_object_and_structured_arrays_are_refused(value: Any) -> None:
    with pytest.raises(wire.TensorError, match="tensor 'bad' has dtype"):
        wire.encode_message({}, {"bad": value})


def test_large_tensors_go_through_shared_memory(shm_dir: Path) -> None:
    big = np.arange(300_000, dtype="float64").reshape(1000, 300)[:, ::2]  # non-contiguous
    small = np.arange(10)
    parts = wire.encode_message(
        {}, {"big": big, "small": small}, write_large=lambda a: wire.write_shm(a, str(shm_dir))
    )
    assert sum(len(p) for p in parts) < 4096  # the big one is not in the frame
    files = list(shm_dir.iterdir())
    assert len(files) == 1
    _, out = wire.decode_message(bytearray(b"".join(parts)[8:]))
    assert list(shm_dir.iterdir()) == []  # mapped, then unlinked at once
    assert_same(out["big"], big)
    assert_same(out["small"], small)
    out["big"][0, 0] = -1.0  # copy-on-write: writable
    assert out["big"][0, 0] == -1.0


@pytest.mark.parametrize("dtype", ["bool", "float16", "complex128", "<U7", "S5", "datetime64[ms]"])
def test_every_kind_through_shared_memory(shm_dir: Path, dtype: str) -> None:
    array = sample(dtype, (5, 4))
    _, out = round_trip({"a": array}, large_dir=shm_dir, threshold=1)
    assert_same(out["a"], array)
    assert list(shm_dir.iterdir()) == []


def test_empty_tensors_never_use_shared_memory(shm_dir: Path) -> None:
    _, out = round_trip({"e": np.zeros((0, 3))}, large_dir=shm_dir, threshold=0)
    assert out["e"].shape == (0, 3)


def test_frames_cross_a_socket_in_pieces() -> None:
    left, right = socket.socketpair()
    payload = {"x": np.arange(200_000, dtype="int32"), "s": np.array(["a", "bc"])}
    with left, right:
        sender = threading.Thread(
            target=lambda: wire.write_frame(left, wire.encode_message({"op": "y"}, payload))
        )
        sender.start()
        frame = wire.read_frame(right)
        sender.join()
        assert frame is not None
        header, out = wire.decode_message(frame)
        assert header == {"op": "y"}
        assert_same(out["x"], payload["x"])
        assert_same(out["s"], payload["s"])
        left.close()
        assert wire.read_frame(right) is None  # a clean end of the stream


def test_a_frame_cut_short_is_an_error() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"".join(wire.encode_message({"op": "z"}, {"x": np.arange(10)}))[:-3])
        left.close()
        with pytest.raises(ConnectionResetError):
            wire.read_frame(right)
