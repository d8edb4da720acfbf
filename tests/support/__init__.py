"""Shared test support: real wheels and sdists, and a real package index on loopback."""

from tests.support.index import PackageIndex, index_pip_args
from tests.support.wheels import (
    BACKEND_MODULE,
    build_sdist,
    build_wheel,
    dist_name,
    make_source_dir,
    metadata_text,
    module_name,
    record_hash,
    sha256_file,
    wheel_filename,
)

__all__ = [
    "BACKEND_MODULE",
    "PackageIndex",
    "build_sdist",
    "build_wheel",
    "dist_name",
    "index_pip_args",
    "make_source_dir",
    "metadata_text",
    "module_name",
    "record_hash",
    "sha256_file",
    "wheel_filename",
]
