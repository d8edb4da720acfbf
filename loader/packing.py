"""Packed models: ``pack`` a code dir into a ``.carton``, unpack one into the store, load it.

A packed model is unpacked once per store, into ``{store}/v1/models/<MANIFEST sha256>/``:
every member is checked against its ``MANIFEST`` line while it is written, the tree is built
in ``tmp/``, sealed read-only and renamed into place under a per-model ``flock``. A later load
of the same file reads only the zip's central directory and ``MANIFEST`` and finds the dir.

A model in the store is read-only and was locked when it was packed, so loading it never
locks: it needs a lockfile entry for the loading environment (else a clear error says to
lock for that Python and pack again).

A scattered model (``external_package_dirs``) is gathered first (:mod:`loader.gathering`, into
the content cache) and the gathered dir is packed with the options it loads with, so a packed
model never depends on dirs outside it. The files packed are those gathering takes (the same
ignore list and ``.wheelcasignore``); a ``.carton`` holds no symlinks, so every symlink is
packed as its target's contents, with a warning for one that points outside the model dir.

See docs/packed-format.md for the format and its decisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cas_daemon.layout import StoreLayout, default_store_root
from loader.errors import EntrypointError, ModelConfigError
from loader.manifest import (
    CARTON_TOML,
    LINKS_NAME,
    MANIFEST_NAME,
    MISC_REF_PREFIX,
    TENSOR_INDEX,
    TENSOR_REF_PREFIX,
    CartonManifest,
    Example,
    RunnerInfo,
    SelfTest,
    StoredTensor,
    TensorSpec,
    check_member_path,
    dump_carton_toml,
    dump_tensor_index,
    format_manifest,
    manifest_hash,
    parse_carton_toml,
    parse_manifest,
    parse_tensor_index,
    validate,
)
from loader.options import (
    EXTERNAL_PACKAGE_DIRS,
    OptionInput,
    OptionValue,
    normalize_runner_opts,
    parse_runner_opts,
)
from loader.packed import METHOD_STORED, MemberSource, ZipReader, ZipWriter
from lockgen.errors import WheelcasError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    import numpy as np

    from loader.model import Model

log = logging.getLogger("wheelcas.pack")

CARTON_SUFFIX = ".carton"


class TamperedModelError(WheelcasError):
    """A packed model whose contents do not match its ``MANIFEST``."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"{path}: {problem}; refusing to load it. The file was changed or damaged after it "
            "was packed: get it again from its source, or pack it again."
        )


# --- pure helpers -------------------------------------------------------------------------


def check_members(where: str, names: Sequence[str], hashes: Mapping[str, str]) -> None:
    """Every member is listed in ``MANIFEST`` and every listed file is a member."""
    files = {n for n in names if not n.endswith("/")} - {MANIFEST_NAME}
    for name in sorted(files):
        check_member_path(name)
    if LINKS_NAME in files:
        raise ModelConfigError(
            f"{where}: has a LINKS file (files fetched from URLs), which wheelcas does not "
            "support yet; pack the model with all its files inside."
        )
    extra = sorted(files - hashes.keys())
    missing = sorted(hashes.keys() - files)
    if extra:
        raise TamperedModelError(where, f"member {extra[0]} is not listed in MANIFEST")
    if missing:
        raise TamperedModelError(where, f"MANIFEST lists {missing[0]}, which is not in the file")


def entrypoint_candidates(package: str) -> tuple[str, str]:
    """The two files (relative to the code dir) that can hold ``entrypoint_package``."""
    relative = package.replace(".", "/")
    return f"{relative}.py", f"{relative}/__init__.py"


def _field(obj: object, key: str) -> Any:
    """``obj[key]`` for a mapping, else ``obj.key``; None when absent (Carton passes objects)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _to_spec(obj: object) -> TensorSpec:
    if isinstance(obj, TensorSpec):
        return obj
    name, dtype, shape = _field(obj, "name"), _field(obj, "dtype"), _field(obj, "shape")
    if not isinstance(name, str) or not isinstance(dtype, str) or shape is None:
        raise ModelConfigError(f"tensor spec {obj!r}: needs name, dtype and shape.")
    if not isinstance(shape, str):
        shape = tuple(shape)
    return TensorSpec(
        name=name,
        dtype=dtype,
        shape=shape,
        description=_field(obj, "description"),
        internal_name=_field(obj, "internal_name"),
    )


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


# --- tensors (numpy is imported only when a model has self-tests or examples) ------------


def encode_tensor(value: Any) -> tuple[StoredTensor, bytes]:
    """A tensor as Carton stores it: numeric ``.bin`` (little-endian, C order) or string
    ``.toml``; named by its content, so equal tensors are stored once."""
    import numpy as np
    import tomli_w

    array = np.asarray(value)
    if array.dtype.kind == "U":
        dtype = "string"
        data = tomli_w.dumps({"data": [str(v) for v in array.reshape(-1).tolist()]}).encode()
        suffix = ".toml"
    elif array.dtype.kind in "biuf" and array.dtype.name in _NUMERIC:
        dtype = array.dtype.name
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = np.ascontiguousarray(little).tobytes(order="C")
        suffix = ".bin"
    else:
        raise ModelConfigError(
            f"a tensor of dtype {array.dtype} cannot be stored in tensor_data/; use a numeric "
            "dtype, bool or a str (numpy 'U') array."
        )
    shape = tuple(int(d) for d in array.shape)
    key = hashlib.sha256(f"{dtype}{shape}".encode() + b"\0" + data).hexdigest()[:32]
    name = f"t_{key}"
    return StoredTensor(name=name, dtype=dtype, shape=shape, file=name + suffix), data


_NUMERIC = frozenset(
    {"bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64"}
    | {"uint8", "uint16", "uint32", "uint64"}
)


def decode_tensor(entry: StoredTensor, data: bytes) -> np.ndarray[Any, Any]:
    import numpy as np

    if entry.dtype == "string":
        values = tomllib.loads(data.decode("utf-8")).get("data", [])
        return np.array(values, dtype=str).reshape(entry.shape)
    dtype = np.dtype(entry.dtype).newbyteorder("<")
    return np.frombuffer(data, dtype=dtype).reshape(entry.shape).astype(entry.dtype)


class _TensorCollector:
    """Turns the tensors of self-tests and examples into references, keeping their data."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[StoredTensor, bytes]] = {}

    def refs(self, values: object, where: str, *, allow_misc: bool) -> dict[str, str] | None:
        if values is None:
            return None
        if not isinstance(values, Mapping):
            raise ModelConfigError(f"{where}: expected a dict of tensor name to tensor.")
        result: dict[str, str] = {}
        for name, value in values.items():
            if isinstance(value, str):
                if not value.startswith(
                    (TENSOR_REF_PREFIX, MISC_REF_PREFIX) if allow_misc else TENSOR_REF_PREFIX
                ):
                    raise ModelConfigError(
                        f"{where}.{name}: a str is a reference ('@misc/NAME' in examples); pass "
                        "a string tensor as a numpy array, e.g. np.array(['text'])."
                    )
                result[str(name)] = value
                continue
            entry, data = encode_tensor(value)
            self.stored[entry.name] = (entry, data)
            result[str(name)] = TENSOR_REF_PREFIX + entry.name
        return result

    def members(self) -> list[MemberSource]:
        if not self.stored:
            return []
        entries = [entry for entry, _ in self.stored.values()]
        members = [MemberSource(TENSOR_INDEX, dump_tensor_index(entries).encode("utf-8"))]
        members += [MemberSource(f"tensor_data/{e.file}", d) for e, d in self.stored.values()]
        return members


# --- files --------------------------------------------------------------------------------


def model_files(model_dir: Path, *, skip: frozenset[Path] = frozenset()) -> list[tuple[str, Path]]:
    """``(path relative to the code dir, file)`` for every file packed from ``model_dir``.

    The walk of gathering (:func:`loader.gather_walk.walk`): ignored dirs pruned while
    walking, ``.wheelcasignore`` applied. A ``.carton`` cannot hold a symlink, so each one is
    packed as its target's contents (a dir's files under the link's path); one pointing
    outside the model dir is logged as a warning, a dangling one or a loop is an error.
    """
    from loader.gather_walk import walk

    found = walk(model_dir, keep_links=False, skip=frozenset(os.path.realpath(p) for p in skip))
    for line in found.warnings:
        log.warning("%s", line)
    return [
        (f.relpath, Path(f.path))
        for f in found.files
        if not (f.relpath.rpartition("/")[2].startswith(".") and f.relpath.endswith(".packing"))
    ]


def _is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o111)


def _check_entrypoint(model_dir: Path, package: str) -> None:
    if not any((model_dir / c).is_file() for c in entrypoint_candidates(package)):
        first, second = entrypoint_candidates(package)
        raise EntrypointError(
            f"entrypoint_package `{package}` not found in {model_dir}: expected {first} or "
            f"{second} there."
        )


# --- pack ---------------------------------------------------------------------------------


def pack(
    path: str | os.PathLike[str],
    runner_name: str,
    required_framework_version: str,
    runner_compat_version: int | None = None,
    runner_opts: Mapping[str, OptionInput] | None = None,
    model_name: str | None = None,
    short_description: str | None = None,
    model_description: str | None = None,
    license: str | None = None,  # Carton's argument name, shadowing the builtin
    repository: str | None = None,
    homepage: str | None = None,
    required_platforms: Sequence[str] | None = None,
    inputs: Sequence[Any] | None = None,
    outputs: Sequence[Any] | None = None,
    self_tests: Sequence[Any] | None = None,
    examples: Sequence[Any] | None = None,
    misc_files: Mapping[str, str | os.PathLike[str]] | None = None,
    linked_files: Mapping[str, Sequence[str]] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    lock_pythons: Sequence[str] = (),
    pip_args: Sequence[str] = (),
) -> Path:
    """Lock the code dir, then write it as a ``.carton`` file; returns the file's path.

    The lockfile gets an entry for this interpreter and one for each of ``lock_pythons``
    (``"3.12"``, a command or a path): a packed model loads only where it has an entry.
    ``output`` defaults to ``DIR.carton`` beside the code dir. Self-test and example tensors
    are numpy arrays (or array-likes); in examples a str ``"@misc/NAME"`` refers to a misc
    file. A scattered model (``external_package_dirs`` in ``runner_opts``) is gathered after
    locking and packed from the gathered dir; its packed options drop the external dirs.
    """
    from loader.semver import parse_requirement
    from lockgen import lock

    model_dir = Path(path).absolute()
    if not model_dir.is_dir():
        raise ModelConfigError(f"{model_dir} is not a directory; pass the model's code dir.")
    if runner_name != "python":
        raise ModelConfigError(
            f"runner_name {runner_name!r} is not supported; wheelcas packs 'python' models."
        )
    if linked_files:
        raise ModelConfigError(
            "linked_files (LINKS: files fetched from URLs at load time) is not supported yet; "
            "pack the files into the model dir or pass them as misc_files."
        )
    parse_requirement(required_framework_version)
    options = parse_runner_opts(runner_opts)
    _check_entrypoint(model_dir, options.entrypoint_package)
    packed_opts = _packed_runner_opts(runner_opts, scattered=options.scattered)
    destination = (
        Path(output) if output is not None else model_dir.parent / (model_dir.name + CARTON_SUFFIX)
    )
    destination = destination.absolute()

    tensors = _TensorCollector()
    tests = None
    if self_tests is not None:
        tests = tuple(
            SelfTest(
                name=_field(t, "name"),
                description=_field(t, "description"),
                inputs=tensors.refs(
                    _field(t, "inputs"), f"self_tests[{i}].inputs", allow_misc=False
                )
                or {},
                expected_out=tensors.refs(
                    _field(t, "expected_out"), f"self_tests[{i}].expected_out", allow_misc=False
                ),
            )
            for i, t in enumerate(self_tests)
        )
    shown = None
    if examples is not None:
        shown = tuple(
            Example(
                name=_field(e, "name"),
                description=_field(e, "description"),
                inputs=tensors.refs(_field(e, "inputs"), f"examples[{i}].inputs", allow_misc=True)
                or {},
                sample_out=tensors.refs(
                    _field(e, "sample_out"), f"examples[{i}].sample_out", allow_misc=True
                ),
            )
            for i, e in enumerate(examples)
        )
    manifest = validate(
        CartonManifest(
            runner=RunnerInfo(
                runner_name=runner_name,
                required_framework_version=required_framework_version,
                runner_compat_version=runner_compat_version,
                opts=packed_opts,
            ),
            model_name=model_name,
            short_description=short_description,
            model_description=model_description,
            license=license,
            repository=repository,
            homepage=homepage,
            required_platforms=None if required_platforms is None else tuple(required_platforms),
            inputs=None if inputs is None else tuple(_to_spec(s) for s in inputs),
            outputs=None if outputs is None else tuple(_to_spec(s) for s in outputs),
            self_tests=tests,
            examples=shown,
        )
    )
    misc: list[MemberSource] = []
    for name, local in sorted((misc_files or {}).items()):
        member = check_member_path(f"misc/{name}")
        source = Path(local)
        if not source.is_file():
            raise ModelConfigError(f"misc file {name!r}: {source} is not a file.")
        misc.append(MemberSource(member, path=source, executable=_is_executable(source)))
    missing_misc = sorted(manifest.misc_refs() - {m.name[len("misc/") :] for m in misc})
    if missing_misc:
        raise ModelConfigError(
            f"an example refers to @misc/{missing_misc[0]}, which is not in misc_files."
        )

    lock(model_dir, pip_args=pip_args)
    for python in lock_pythons:
        lock(model_dir, python=python, pip_args=pip_args)
    code_dir = model_dir
    if options.scattered:
        # After locking: the gathered dir holds the fresh lockfile, and is never locked itself
        # (it is a shared, content-keyed cache entry).
        from loader.gathering import gather

        # The .carton may be written inside the model (or an external) dir: an older one
        # there is not part of the model, as packing skips it below.
        gathered = gather(model_dir, runner_opts=runner_opts, exclude=[destination])
        log.info(
            "gathered the scattered model into %s (%d files, %d copied); packing that",
            gathered.path,
            gathered.files,
            gathered.copied,
        )
        code_dir = gathered.path

    members = [MemberSource(CARTON_TOML, dump_carton_toml(manifest).encode("utf-8"))]
    members += misc
    members += [
        MemberSource(f"model/{rel}", path=file, executable=_is_executable(file))
        for rel, file in model_files(code_dir, skip=frozenset({destination}))
    ]
    members += tensors.members()
    members.sort(key=lambda m: m.name.encode("utf-8"))
    _write_carton(destination, members)
    return destination


def _packed_runner_opts(
    runner_opts: Mapping[str, OptionInput] | None, *, scattered: bool
) -> dict[str, OptionValue]:
    """The options written to ``carton.toml``: a scattered model's as gathered (without
    ``external_package_dirs``: the packed model holds them), else as given."""
    if scattered:
        from loader.gather_plan import gather_options

        return dict(gather_options(runner_opts).gathered_runner_opts)
    normalized = normalize_runner_opts(runner_opts)
    return {k: v for k, v in normalized.items() if isinstance(v, bool | int | float | str)}


def _write_carton(destination: Path, members: list[MemberSource]) -> None:
    """Write the zip beside ``destination`` and rename it into place: all or nothing."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".packing", dir=destination.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            writer = ZipWriter(handle)
            hashes: dict[str, str] = {}
            for member in members:
                written = writer.add(member)
                hashes[written.name] = written.sha256
            writer.add(MemberSource(MANIFEST_NAME, format_manifest(hashes), method=METHOD_STORED))
            writer.finish()
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        tmp.replace(destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the store ----------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _extract_verified(reader: ZipReader, name: str, expected: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with target.open("xb") as handle:
        for chunk in reader.iter_member(name):
            digest.update(chunk)
            handle.write(chunk)
    if digest.hexdigest() != expected:
        raise TamperedModelError(
            str(reader.path),
            f"member {name} has sha256 {digest.hexdigest()}, but MANIFEST says {expected}",
        )
    if reader.entries[name].executable:
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def unpack_into_store(
    carton_path: str | os.PathLike[str], *, layout: StoreLayout | None = None
) -> Path:
    """The model's dir in the store (``v1/models/<MANIFEST sha256>/``), unpacked if needed.

    Verified while unpacked: every member's sha256 equals its MANIFEST line, no member is
    missing or extra, every path stays inside. Reused as is when already there.
    """
    from loader.packed import PackedFormatError

    path = Path(carton_path)
    layout = layout or StoreLayout(default_store_root())
    where = str(path)
    if not path.is_file():
        raise ModelConfigError(f"{path} is not a file; pass a packed model (.carton).")
    with ZipReader(path) as reader:
        if MANIFEST_NAME not in reader.entries:
            raise PackedFormatError(where, "no MANIFEST member: not a packed model")
        manifest_bytes = reader.read(MANIFEST_NAME)
        digest = manifest_hash(manifest_bytes)
        final = layout.model_dir(digest)
        if final.is_dir():
            return final
        hashes = parse_manifest(manifest_bytes)
        check_members(where, list(reader.entries), hashes)
        with _flock(layout.model_lock_path(digest)):
            if final.is_dir():  # another process unpacked it while this one waited
                return final
            from cas_daemon.precompile import remove_sealed, seal_read_only

            layout.tmp_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"model-{digest}.", dir=layout.tmp_dir))
            try:
                for name, expected in sorted(hashes.items()):
                    _extract_verified(reader, name, expected, staging / name)
                (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
                parse_carton_toml((staging / CARTON_TOML).read_text(encoding="utf-8"))
                seal_read_only(staging)
                final.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(final)
            except BaseException:
                remove_sealed(staging)
                raise
    return final


# --- info ---------------------------------------------------------------------------------


def _read_member(path: Path, name: str) -> bytes:
    """A member of a packed file, or a file of an unpacked model dir."""
    if path.is_dir():
        try:
            return (path / check_member_path(name)).read_bytes()
        except FileNotFoundError:
            raise ModelConfigError(f"{path} has no {name}.") from None
    with ZipReader(path) as reader:
        if name not in reader.entries:
            raise ModelConfigError(f"{path} has no member {name}.")
        return reader.read(name)


def get_model_info(path: str | os.PathLike[str]) -> CartonManifest:
    """The manifest fields of a packed model (only ``carton.toml`` and ``MANIFEST`` are read)
    or of an unpacked one (a dir holding ``carton.toml``, as in the store)."""
    model = Path(path)
    if _is_url(str(path)):
        raise ModelConfigError("get_model_info of a URL is not supported yet; download it first.")
    if not model.exists():
        raise ModelConfigError(f"{model} does not exist.")
    if model.is_dir() and not (model / CARTON_TOML).is_file():
        raise ModelConfigError(
            f"{model} has no carton.toml: a plain code dir has no packed metadata (its runner "
            "fields are the arguments given to load_unpacked). Pack it with `wheelcas pack`."
        )
    toml_bytes = _read_member(model, CARTON_TOML)
    identity = None
    if model.is_file() or (model / MANIFEST_NAME).is_file():
        manifest_bytes = _read_member(model, MANIFEST_NAME)
        identity = manifest_hash(manifest_bytes)
        listed = parse_manifest(manifest_bytes).get(CARTON_TOML)
        if listed != hashlib.sha256(toml_bytes).hexdigest():
            raise TamperedModelError(str(model), f"member {CARTON_TOML} does not match MANIFEST")
    try:
        text = toml_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelConfigError(f"{model}: carton.toml is not UTF-8 text.") from None
    return replace(parse_carton_toml(text), manifest_sha256=identity)


def load_tensor(path: str | os.PathLike[str], ref: str) -> np.ndarray[Any, Any]:
    """The tensor a self-test or example refers to (``@tensor_data/NAME``)."""
    model = Path(path)
    if not ref.startswith(TENSOR_REF_PREFIX):
        raise ModelConfigError(f"{ref!r} is not a tensor reference (@tensor_data/NAME).")
    index = parse_tensor_index(_read_member(model, TENSOR_INDEX).decode("utf-8"))
    entry = index.get(ref[len(TENSOR_REF_PREFIX) :])
    if entry is None:
        raise ModelConfigError(f"{model}: no tensor named {ref!r} in {TENSOR_INDEX}.")
    return decode_tensor(entry, _read_member(model, f"tensor_data/{entry.file}"))


# --- load ---------------------------------------------------------------------------------


def _require_lock_entry(
    code_dir: Path, source: str, required_framework_version: str, *, isolated: bool
) -> None:
    """A packed model is read-only: it must already have an entry for the environment of
    the interpreter that will run it (in a worker: the one ``load_unpacked`` chooses for the
    range; in process: this one)."""
    from lockgen.interpreters import interpreter_environment
    from lockgen.lockfile import read_lockfile, requirements_hash

    python = sys.executable
    if isolated:
        from loader.interpreters import choose
        from loader.semver import parse_requirement

        python = choose(parse_requirement(required_framework_version)).path
    environment = interpreter_environment(python)
    lockfile = read_lockfile(code_dir)
    try:
        current = lockfile is not None and lockfile.orig_deps_hash == requirements_hash(code_dir)
    except FileNotFoundError:
        raise ModelConfigError(f"{source} has no requirements.txt in model/.") from None
    if current and lockfile is not None and lockfile.find_entry(environment) is not None:
        return
    entries = lockfile.entries if lockfile is not None and current else ()
    have = ", ".join(describe_environment(e.markers) for e in entries) or "none"
    raise ModelConfigError(
        f"the packed model {source} has no lock entry for the environment that would run it "
        f"({describe_environment(environment)}; it has: {have}). A packed model is read-only "
        "and is not re-locked at load time: pack it again with an entry for this Python "
        f"(`wheelcas pack DIR ... --lock-python {environment.get('python_version', '?')}`)."
    )


def check_self_contained(packed_opts: Mapping[str, object], source: str) -> None:
    """Refuse a packed model whose ``carton.toml`` names ``external_package_dirs``.

    A packed model is whole: its MANIFEST lists every file it may run, and ``wheelcas pack``
    gathers a scattered model first and drops the option. One that still names such dirs (made
    by hand, or by an older wheelcas) would import whatever the host has at those paths, code
    that no MANIFEST checks. (An ``override_runner_opts`` given to the load is the caller's
    own choice, and is not refused.)"""
    dirs = packed_opts.get(EXTERNAL_PACKAGE_DIRS)
    if dirs in (None, "", [], ()):
        return
    raise ModelConfigError(
        f"the packed model {source} names dirs outside itself in its runner option "
        f"`{EXTERNAL_PACKAGE_DIRS}` ({dirs!r}): their code is not in the packed model, so it "
        "is not loaded. Gather the model and pack it again (`wheelcas pack DIR` gathers a "
        "scattered model; `wheelcas gather DIR -o OUT` makes a self-contained copy)."
    )


def describe_environment(markers: Mapping[str, str]) -> str:
    return (
        f"Python {markers.get('python_version', '?')} on {markers.get('sys_platform', '?')}"
        f"/{markers.get('platform_machine', '?')}"
    )


def _download(url: str, layout: StoreLayout) -> Path:
    """Stream ``url`` into the store's ``tmp/``; the caller deletes the file."""
    import shutil
    import urllib.request

    layout.tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="download.", suffix=CARTON_SUFFIX, dir=layout.tmp_dir)
    try:
        with os.fdopen(fd, "wb") as handle, urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - http(s) only, checked by the caller
            shutil.copyfileobj(response, handle, 1 << 20)
    except OSError as exc:
        Path(name).unlink(missing_ok=True)
        raise ModelConfigError(f"cannot download {url}: {exc}") from None
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def load(
    path_or_url: str | os.PathLike[str],
    visible_device: str | int | None = None,
    override_runner_name: str | None = None,
    override_required_framework_version: str | None = None,
    override_runner_opts: Mapping[str, OptionValue] | None = None,
    **load_unpacked_options: Any,
) -> Model:
    """Unpack a packed model into the store (once) and load it from there.

    The runner fields come from its ``carton.toml``; each override wins over its field, and
    ``override_runner_opts`` is merged over the packed options key by key. An http(s) URL is
    downloaded into the store's ``tmp/`` first (and the download deleted after unpacking).
    ``load_unpacked_options`` (wheelcas's own, e.g. ``isolated``, ``daemon``) are passed on
    to :func:`loader.api.load_unpacked`.
    """
    from loader.api import load_unpacked

    layout = StoreLayout(default_store_root())
    source = str(path_or_url)
    if _is_url(source):
        downloaded = _download(source, layout)
        try:
            root = unpack_into_store(downloaded, layout=layout)
        finally:
            downloaded.unlink(missing_ok=True)
    else:
        root = unpack_into_store(path_or_url, layout=layout)
    manifest = parse_carton_toml((root / CARTON_TOML).read_text(encoding="utf-8"))
    runner = manifest.runner
    check_self_contained(runner.opts, source)
    code_dir = root / "model"
    framework = override_required_framework_version or runner.required_framework_version
    isolated = bool(load_unpacked_options.get("isolated", True))
    _require_lock_entry(code_dir, source, framework, isolated=isolated)
    opts = {**runner.opts, **(override_runner_opts or {})}
    return load_unpacked(
        code_dir,
        runner_name=override_runner_name or runner.runner_name,
        required_framework_version=framework,
        runner_compat_version=runner.runner_compat_version,
        runner_opts=opts,
        visible_device=visible_device,
        **load_unpacked_options,
    )
