"""The packed format's pure parts and its zip container: no pip, no store, no subprocess."""

from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader.errors import ModelConfigError
from loader.manifest import (
    CartonManifest,
    Example,
    ManifestError,
    RunnerInfo,
    SelfTest,
    StoredTensor,
    TensorSpec,
    check_member_path,
    dump_carton_toml,
    dump_tensor_index,
    format_manifest,
    parse_carton_toml,
    parse_manifest,
    parse_tensor_index,
    validate,
)
from loader.packed import (
    METHOD_STORED,
    METHOD_ZSTD,
    MemberSource,
    PackedFormatError,
    ZipEntry,
    ZipReader,
    decode_central_directory,
    decode_zip64_end,
    encode_central_header,
    encode_end_records,
    find_end_records,
    write_zip,
)
from loader.packing import TamperedModelError, check_members, decode_tensor, encode_tensor

SHA_A = "a" * 64
SHA_B = "b" * 64
RUNNER = RunnerInfo(
    runner_name="python",
    required_framework_version=">=3.10",
    runner_compat_version=1,
    opts={"entrypoint_package": "pkg.entry", "entrypoint_fn": "get_model", "model.flag": False},
)


# --- the zip container --------------------------------------------------------------------


def _zip_bytes(members: list[MemberSource], **kwargs: int) -> bytes:
    out = io.BytesIO()
    write_zip(out, members, **kwargs)
    return out.getvalue()


def _local_methods(data: bytes) -> dict[str, int]:
    """Member name -> compression method, read from the local headers themselves."""
    methods: dict[str, int] = {}
    pos = 0
    while data[pos : pos + 4] == b"PK\x03\x04":
        _, _, _, method, _, _, _, csize, _, nlen, xlen = struct.unpack_from(
            "<IHHHHHIIIHH", data, pos
        )
        name = data[pos + 30 : pos + 30 + nlen].decode()
        if csize == 0xFFFFFFFF:  # zip64: the sizes are in the extra field
            csize = struct.unpack_from("<Q", data, pos + 30 + nlen + 12)[0]
        methods[name] = method
        pos += 30 + nlen + xlen + csize
    return methods


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    big = bytes(range(256)) * 5000
    data = _zip_bytes(
        [
            MemberSource("a.txt", b"hello"),
            MemberSource("dir/big.bin", big),
            MemberSource("run.sh", b"#!/bin/sh\n", executable=True),
            MemberSource("MANIFEST", b"x", method=METHOD_STORED),
        ]
    )
    assert _local_methods(data) == {
        "a.txt": METHOD_ZSTD,
        "dir/big.bin": METHOD_ZSTD,
        "run.sh": METHOD_ZSTD,
        "MANIFEST": METHOD_STORED,
    }
    path = tmp_path / "x.zip"
    path.write_bytes(data)
    with ZipReader(path) as reader:
        assert list(reader.entries) == ["a.txt", "dir/big.bin", "run.sh", "MANIFEST"]
        assert reader.read("dir/big.bin") == big
        assert reader.read("MANIFEST") == b"x"
        assert reader.entries["run.sh"].executable
        assert not reader.entries["a.txt"].executable
        assert reader.entries["dir/big.bin"].compressed_size < len(big) // 10


def test_streamed_from_a_file_and_deterministic(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 3_000_000)
    members = [MemberSource("model/weights.bin", path=source)]
    assert _zip_bytes(members) == _zip_bytes(members)


def test_zip64_records_are_read_by_python_zipfile_and_by_us(tmp_path: Path) -> None:
    members = [MemberSource("x", b"abc", method=METHOD_STORED), MemberSource("y", b"de")]
    data = _zip_bytes(members, zip64_threshold=0)
    stored_only = _zip_bytes([members[0]], zip64_threshold=0)
    with zipfile.ZipFile(io.BytesIO(stored_only)) as archive:
        assert archive.read("x") == b"abc"
    path = tmp_path / "z.zip"
    path.write_bytes(data)
    with ZipReader(path) as reader:
        assert reader.read("x") == b"abc"
        assert reader.read("y") == b"de"


def test_reads_what_python_zipfile_writes(tmp_path: Path) -> None:
    path = tmp_path / "deflated.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("q", b"z" * 100_000)
        archive.writestr("r", b"abc")
    with ZipReader(path) as reader:
        assert reader.read("q") == b"z" * 100_000
        assert reader.read("r") == b"abc"


def test_central_records_past_32_bits_round_trip() -> None:
    entry = ZipEntry(
        name="model/huge.bin",
        method=METHOD_ZSTD,
        crc32=123,
        compressed_size=5 << 30,
        file_size=6 << 30,
        header_offset=7 << 30,
    )
    assert decode_central_directory(encode_central_header(entry), 1, "t") == [entry]
    ends = encode_end_records(70_000, 8 << 30, 1 << 20)
    count, _, _, zip64_offset = find_end_records(ends, "t")
    assert count == 0xFFFF
    assert zip64_offset == (8 << 30) + (1 << 20)
    assert decode_zip64_end(ends, "t") == (70_000, 8 << 30, 1 << 20)


def test_damaged_data_is_refused(tmp_path: Path) -> None:
    data = bytearray(_zip_bytes([MemberSource("a", b"hello world", method=METHOD_STORED)]))
    data[30 + 1 + 2] ^= 0xFF  # a byte of the stored data
    path = tmp_path / "bad.zip"
    path.write_bytes(bytes(data))
    with ZipReader(path) as reader, pytest.raises(PackedFormatError, match="CRC"):
        reader.read("a")


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "plain.carton"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(PackedFormatError, match="end of central directory"):
        ZipReader(path)


# --- MANIFEST ------------------------------------------------------------------------------


def test_manifest_is_sorted_and_round_trips() -> None:
    text = format_manifest({"model/b.py": SHA_B, "carton.toml": SHA_A, "model/a.py": SHA_A})
    assert text.decode().splitlines() == [
        f"carton.toml={SHA_A}",
        f"model/a.py={SHA_A}",
        f"model/b.py={SHA_B}",
    ]
    assert parse_manifest(text) == {"carton.toml": SHA_A, "model/a.py": SHA_A, "model/b.py": SHA_B}


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "model/../../x", "model//x", "./x", "C:/x", "a\\b", ""]
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ManifestError):
        check_member_path(path)
    with pytest.raises(ManifestError):
        parse_manifest(f"{path}={SHA_A}\n".encode())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"a={SHA_A}\na={SHA_B}\n", "listed twice"),
        ("a=notahash\n", "PATH=SHA256"),
        (f"MANIFEST={SHA_A}\n", "must not list"),
    ],
)
def test_bad_manifests(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text.encode())


def test_members_must_match_the_manifest() -> None:
    hashes = {"carton.toml": SHA_A, "model/x.py": SHA_B}
    check_members("m.carton", ["carton.toml", "model/", "model/x.py", "MANIFEST"], hashes)
    with pytest.raises(TamperedModelError, match=re.escape("model/extra.py is not listed")):
        check_members("m.carton", [*hashes, "model/extra.py", "MANIFEST"], hashes)
    with pytest.raises(TamperedModelError, match=re.escape("lists model/x.py")):
        check_members("m.carton", ["carton.toml", "MANIFEST"], hashes)
    with pytest.raises(ManifestError):
        check_members("m.carton", ["../evil", "MANIFEST"], {"../evil": SHA_A})


# --- carton.toml ---------------------------------------------------------------------------


def _full_manifest() -> CartonManifest:
    return CartonManifest(
        runner=RUNNER,
        model_name="doubler",
        short_description="Doubles its input.",
        model_description="# Doubler\n\nMultiline *markdown*.\n",
        license="Apache-2.0",
        repository="https://example.com/repo",
        homepage="https://example.com",
        required_platforms=("x86_64-unknown-linux-gnu",),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 3), description="in"),),
        outputs=(
            TensorSpec(name="out", dtype="float32", shape="*"),
            TensorSpec(name="label", dtype="string", shape=(), internal_name="y:0"),
        ),
        self_tests=(
            SelfTest(
                name="t",
                inputs={"x": "@tensor_data/t_1"},
                expected_out={"out": "@tensor_data/t_2"},
            ),
        ),
        examples=(
            Example(
                description="an image",
                inputs={"x": "@tensor_data/t_1", "img": "@misc/cat.png"},
                sample_out={"out": "@misc/out.txt"},
            ),
        ),
    )


def test_carton_toml_round_trips_every_field() -> None:
    manifest = _full_manifest()
    text = dump_carton_toml(manifest)
    assert text.startswith("spec_version = 1\n")
    assert parse_carton_toml(text) == manifest
    assert manifest.tensor_refs() == {"t_1", "t_2"}
    assert manifest.misc_refs() == {"cat.png", "out.txt"}


def test_minimal_carton_toml_and_unknown_fields() -> None:
    text = (
        'spec_version = 1\nfuture_field = "x"\n[runner]\nrunner_name = "python"\n'
        'required_framework_version = "=3.11"\nnew_runner_field = 3\n'
    )
    manifest = parse_carton_toml(text)
    assert manifest.model_name is None
    assert manifest.inputs is None
    assert manifest.runner.required_framework_version == "=3.11"
    assert manifest.runner.opts == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec_version = 2\n[runner]\nrunner_name='p'\nrequired_framework_version='*'", "spec_v"),
        ("spec_version = 1\n", "[runner] table is missing"),
        ("spec_version = 1\n[runner]\nrunner_name = 'python'\n", "required_framework_version"),
        ("model_name = 3\n", "spec_version"),
        (
            "spec_version = 1\nmodel_name = 3\n[runner]\nrunner_name='p'\n"
            "required_framework_version='*'",
            "model_name",
        ),
        ("spec_version = [", "not valid TOML"),
    ],
)
def test_bad_carton_toml(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        parse_carton_toml(text)


def test_short_description_is_limited_to_100_characters() -> None:
    validate(CartonManifest(runner=RUNNER, short_description="x" * 100))
    with pytest.raises(ModelConfigError, match="101 characters; at most 100"):
        validate(CartonManifest(runner=RUNNER, short_description="x" * 101))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (CartonManifest(runner=RUNNER, inputs=(TensorSpec(name="x", dtype="c64", shape="*"),)),
         "dtype 'c64'"),
        (CartonManifest(runner=RUNNER, self_tests=(SelfTest(inputs={"x": "@misc/a"}),)),
         "is not a reference"),
        (CartonManifest(runner=RUNNER, examples=(Example(inputs={"x": "plain"}),)),
         "is not a reference"),
        (CartonManifest(runner=RUNNER, examples=(Example(inputs={"x": "@misc/../a"}),)),
         "not a safe relative path"),
    ],
)  # fmt: skip
def test_invalid_manifests(manifest: CartonManifest, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        validate(manifest)


# --- tensors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([1, 2, 3], dtype=">i4"),  # big-endian in, little-endian stored
        np.array([True, False]),
        np.array([1.5, -2], dtype=np.float16),
        np.array(7, dtype=np.uint64),
        np.array([["a", "bé"], ["", "ccc"]]),
        np.array([], dtype=str),
    ],
)
def test_tensors_round_trip(value: np.ndarray[Any, Any]) -> None:
    entry, data = encode_tensor(value)
    back = decode_tensor(entry, data)
    assert back.shape == value.shape
    np.testing.assert_array_equal(back, value)
    if value.dtype.kind != "U":
        assert back.dtype == value.dtype.newbyteorder("=")
    again, _ = encode_tensor(value.copy())
    assert again == entry  # named by content


def test_unsupported_tensor_dtypes_are_refused() -> None:
    with pytest.raises(ModelConfigError, match="cannot be stored"):
        encode_tensor(np.array([b"x"]))
    with pytest.raises(ModelConfigError, match="cannot be stored"):
        encode_tensor(np.array([1 + 2j]))


def test_tensor_index_round_trips() -> None:
    tensors = [
        StoredTensor(name="t_b", dtype="string", shape=(2,), file="t_b.toml"),
        StoredTensor(name="t_a", dtype="float32", shape=(1, 2), file="t_a.bin"),
    ]
    parsed = parse_tensor_index(dump_tensor_index(tensors))
    assert parsed == {t.name: t for t in tensors}
    with pytest.raises(ManifestError, match="nested tensors"):
        parse_tensor_index('[[tensor]]\nname = "n"\ndtype = "nested"\ninner = ["a"]\n')
