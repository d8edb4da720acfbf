"""Small, real, reproducible wheels and sdists for tests.

Everything here is written byte for byte from its inputs: fixed timestamps, fixed permissions,
fixed member order and a gzip header without a time, so the same call gives the same sha256 on
every run. That is what lets tests pin hashes in lockfiles and compare stores across runs.

Sdists (and :func:`make_source_dir` trees) carry their own stdlib-only PEP 517 backend
(``wheelcas_test_backend.py``, loaded through ``backend-path``), so ``pip wheel`` builds them
with build isolation on and no index at all. The backend source must stay Python 3.8 syntax:
tests build with old interpreters too.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import tarfile
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from packaging.tags import parse_tag
from packaging.utils import canonicalize_name

__all__ = [
    "BACKEND_MODULE",
    "FIXED_DATE_TIME",
    "build_sdist",
    "build_wheel",
    "dist_name",
    "make_source_dir",
    "metadata_text",
    "module_name",
    "record_hash",
    "sha256_file",
    "wheel_filename",
]

#: Every zip member gets this timestamp (the zip format cannot go below 1980).
FIXED_DATE_TIME = (2020, 1, 1, 0, 0, 0)
#: Every tar member gets this mtime (the same instant as FIXED_DATE_TIME, in UTC).
_FIXED_MTIME = 1577836800
#: Module name of the in-tree build backend shipped in sdists and source dirs.
BACKEND_MODULE = "wheelcas_test_backend"

_FILE_MODE = 0o644
_EXEC_MODE = 0o755


def dist_name(name: str) -> str:
    """The distribution name as it appears in file names: canonical, with ``_`` for ``-``."""
    return canonicalize_name(name).replace("-", "_")


def module_name(name: str) -> str:
    """The default top-level module of a test project: ``My-Pkg.x`` -> ``my_pkg_x``."""
    return name.lower().replace("-", "_").replace(".", "_")


def wheel_filename(name: str, version: str = "1.0", tag: str = "py3-none-any") -> str:
    """``{dist}-{version}-{tag}.whl``, the name :func:`build_wheel` writes."""
    return f"{dist_name(name)}-{version}-{tag}.whl"


def record_hash(data: bytes) -> str:
    """The hash field of a RECORD line: ``sha256=`` and the urlsafe base64 digest, unpadded."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_text(
    name: str, version: str, requires: Sequence[str] = (), requires_python: str | None = None
) -> str:
    """Core metadata 2.1 (the body of ``METADATA`` and ``PKG-INFO``)."""
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if requires_python is not None:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {req}" for req in requires)
    return "\n".join(lines) + "\n"


def _default_files(name: str, version: str) -> dict[str, bytes | str]:
    return {f"{module_name(name)}/__init__.py": f'VERSION = "{version}"\n'}


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def _zip_info(arcname: str, mode: int = _FILE_MODE) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=FIXED_DATE_TIME)
    info.external_attr = (0o100000 | mode) << 16  # a regular file with these permissions
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # Unix, so that external_attr is read as a mode everywhere
    return info


def _wheel_text(tag: str) -> str:
    # A compressed tag set ("py2.py3-none-any") is listed expanded, one Tag line each.
    tags = sorted(str(t) for t in parse_tag(tag))
    lines = ["Wheel-Version: 1.0", "Generator: wheelcas-tests", "Root-Is-Purelib: true"]
    lines.extend(f"Tag: {t}" for t in tags)
    return "\n".join(lines) + "\n"


def build_wheel(
    dest_dir: Path,
    name: str,
    version: str = "1.0",
    *,
    files: Mapping[str, bytes | str] | None = None,
    requires: Sequence[str] = (),
    tag: str = "py3-none-any",
    data_files: Mapping[str, bytes | str] | None = None,
    extra_members: Sequence[tuple[zipfile.ZipInfo | str, bytes]] = (),
    record: bool = True,
    requires_python: str | None = None,
) -> Path:
    """Write ``{dist}-{version}-{tag}.whl`` into ``dest_dir`` and return its path.

    ``files`` are the archive members at the wheel root (default: ``{module}/__init__.py``
    holding ``VERSION = "{version}"``). A key under ``{dist}-{version}.dist-info/`` adds a
    dist-info file; giving ``METADATA`` or ``WHEEL`` there replaces the generated one.
    ``data_files`` land under ``{dist}-{version}.data/`` (``purelib/x.py``, ``scripts/x``).
    ``extra_members`` are written raw after everything else and are not in RECORD: a str is
    a plain file name, a ZipInfo is used as given (symlinks, absolute or ``..`` names,
    duplicates). ``record=False`` leaves RECORD out entirely.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    dist = dist_name(name)
    dist_info = f"{dist}-{version}.dist-info"
    data_dir = f"{dist}-{version}.data"

    members: dict[str, tuple[bytes, int]] = {}
    for arcname, data in (_default_files(name, version) if files is None else files).items():
        members[arcname] = (_as_bytes(data), _FILE_MODE)
    for arcname, data in (data_files or {}).items():
        mode = _EXEC_MODE if arcname.startswith("scripts/") else _FILE_MODE
        members[f"{data_dir}/{arcname}"] = (_as_bytes(data), mode)
    generated = {
        f"{dist_info}/METADATA": metadata_text(name, version, requires, requires_python),
        f"{dist_info}/WHEEL": _wheel_text(tag),
    }
    for arcname, text in generated.items():
        members.setdefault(arcname, (text.encode("utf-8"), _FILE_MODE))

    # dist-info last, the way wheel builders order it (and RECORD is the very last of those).
    order = sorted(members, key=lambda n: n.startswith(f"{dist_info}/"))
    record_path = f"{dist_info}/RECORD"
    path = dest_dir / wheel_filename(name, version, tag)
    with zipfile.ZipFile(path, "w") as zf:
        rows: list[list[str]] = []
        for arcname in order:
            data, mode = members[arcname]
            zf.writestr(_zip_info(arcname, mode), data)
            rows.append([arcname, record_hash(data), str(len(data))])
        if record:
            rows.append([record_path, "", ""])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            zf.writestr(_zip_info(record_path), buf.getvalue().encode("utf-8"))
        with warnings.catch_warnings():
            # Duplicate names are a legitimate way to build a hostile wheel here.
            warnings.simplefilter("ignore", UserWarning)
            for member, data in extra_members:
                info = _zip_info(member) if isinstance(member, str) else member
                zf.writestr(info, data)
    return path


# The in-tree build backend. Python 3.8 syntax and stdlib only: it runs in pip's isolated
# build environment with whatever interpreter pip runs on. It reads everything it needs from
# PKG-INFO next to it, so the same source serves every test project.
_BACKEND_SOURCE = '''\
"""PEP 517 backend of a wheelcas test project: stdlib only, reproducible output."""

import base64
import csv
import email.parser
import gzip
import hashlib
import io
import os
import re
import tarfile
import zipfile

_DATE_TIME = (2020, 1, 1, 0, 0, 0)
_MTIME = 1577836800
_NOT_PACKAGED = {"PKG-INFO", "pyproject.toml", "wheelcas_test_backend.py"}
_SKIP_DIRS = {"__pycache__", "build", "dist"}


def _root():
    # PEP 517 runs hooks with the source tree as the working directory.
    return os.getcwd()


def _metadata():
    with open(os.path.join(_root(), "PKG-INFO"), "rb") as f:
        raw = f.read()
    msg = email.parser.BytesParser().parsebytes(raw)
    name = str(msg["Name"])
    version = str(msg["Version"])
    dist = re.sub(r"[-_.]+", "_", name).lower()
    return raw, dist, version


def _wheel_file():
    return (
        b"Wheel-Version: 1.0\\n"
        b"Generator: wheelcas-test-backend\\n"
        b"Root-Is-Purelib: true\\n"
        b"Tag: py3-none-any\\n"
    )


def _sources(include_meta):
    root = _root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info")
        )
        rel_dir = os.path.relpath(dirpath, root)
        for fn in sorted(filenames):
            if fn.endswith((".pyc", ".pyo")) or fn.startswith("."):
                continue
            rel = fn if rel_dir == "." else os.path.join(rel_dir, fn).replace(os.sep, "/")
            if rel in _NOT_PACKAGED and not include_meta:
                continue
            found.append(rel)
    return found


def _read(rel):
    with open(os.path.join(_root(), rel), "rb") as f:
        return f.read()


def _hash(data):
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _zip_info(arcname):
    info = zipfile.ZipInfo(arcname, date_time=_DATE_TIME)
    info.external_attr = 0o100644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3
    return info


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    raw, dist, version = _metadata()
    name = "%s-%s.dist-info" % (dist, version)
    target = os.path.join(metadata_directory, name)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "METADATA"), "wb") as f:
        f.write(raw)
    with open(os.path.join(target, "WHEEL"), "wb") as f:
        f.write(_wheel_file())
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raw, dist, version = _metadata()
    dist_info = "%s-%s.dist-info" % (dist, version)
    members = [(rel, _read(rel)) for rel in _sources(include_meta=False)]
    members.append((dist_info + "/METADATA", raw))
    members.append((dist_info + "/WHEEL", _wheel_file()))
    filename = "%s-%s-py3-none-any.whl" % (dist, version)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\\n")
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w") as zf:
        for arcname, data in members:
            zf.writestr(_zip_info(arcname), data)
            writer.writerow([arcname, _hash(data), str(len(data))])
        writer.writerow([dist_info + "/RECORD", "", ""])
        zf.writestr(_zip_info(dist_info + "/RECORD"), buf.getvalue().encode("utf-8"))
    return filename


def build_sdist(sdist_directory, config_settings=None):
    raw, dist, version = _metadata()
    base = "%s-%s" % (dist, version)
    filename = base + ".tar.gz"
    with open(os.path.join(sdist_directory, filename), "wb") as out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in _sources(include_meta=True):
                    data = _read(rel)
                    info = tarfile.TarInfo(base + "/" + rel)
                    info.size = len(data)
                    info.mtime = _MTIME
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
    return filename
'''


def _pyproject_text(name: str, version: str) -> str:
    return (
        "[build-system]\n"
        "requires = []\n"
        f'build-backend = "{BACKEND_MODULE}"\n'
        'backend-path = ["."]\n'
        "\n"
        "# The real metadata is PKG-INFO; this table is for humans reading the project.\n"
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{version}"\n'
    )


def _project_members(
    name: str,
    version: str,
    files: Mapping[str, bytes | str] | None,
    requires: Sequence[str],
    requires_python: str | None,
) -> dict[str, bytes]:
    """Relative path -> bytes of a buildable source tree, sorted for reproducible archives."""
    members: dict[str, bytes] = {
        "PKG-INFO": metadata_text(name, version, requires, requires_python).encode("utf-8"),
        "pyproject.toml": _pyproject_text(name, version).encode("utf-8"),
        f"{BACKEND_MODULE}.py": _BACKEND_SOURCE.encode("utf-8"),
    }
    for rel, data in (_default_files(name, version) if files is None else files).items():
        members[rel] = _as_bytes(data)
    return dict(sorted(members.items()))


def build_sdist(
    dest_dir: Path,
    name: str,
    version: str = "1.0",
    *,
    files: Mapping[str, bytes | str] | None = None,
    requires: Sequence[str] = (),
    requires_python: str | None = None,
) -> Path:
    """Write ``{dist}-{version}.tar.gz`` (PEP 625 name) into ``dest_dir`` and return its path.

    The archive holds ``{dist}-{version}/`` with ``PKG-INFO``, ``pyproject.toml``, the in-tree
    backend and ``files`` (default as in :func:`build_wheel`). Building it gives a
    ``py3-none-any`` wheel whose METADATA is PKG-INFO (so ``requires`` become Requires-Dist).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    base = f"{dist_name(name)}-{version}"
    path = dest_dir / f"{base}.tar.gz"
    members = _project_members(name, version, files, requires, requires_python)
    with (
        open(path, "wb") as out,
        gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, data in members.items():
            info = tarfile.TarInfo(f"{base}/{rel}")
            info.size = len(data)
            info.mode = _FILE_MODE
            info.mtime = _FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


def make_source_dir(
    dest: Path,
    name: str,
    version: str = "1.0",
    *,
    files: Mapping[str, bytes | str] | None = None,
    requires: Sequence[str] = (),
    requires_python: str | None = None,
) -> Path:
    """Write the project of :func:`build_sdist` as a plain directory ``dest``; return ``dest``.

    ``dest`` itself is the project root (created if missing), ready for a ``./dest``
    requirement or ``pip wheel dest``.
    """
    for rel, data in _project_members(name, version, files, requires, requires_python).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest
