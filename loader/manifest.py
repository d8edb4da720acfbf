"""The values of a packed model: ``carton.toml``, ``MANIFEST`` and ``tensor_data/index.toml``.

Pure: text in, values out (and back). No file I/O and no numpy here; :mod:`loader.pack` does
both. The formats follow Carton's v1 specification (see docs/packed-format.md):

- ``carton.toml``: ``spec_version = 1``, optional metadata, ``[[input]]``/``[[output]]``
  tensor specs, ``[[self_test]]``/``[[example]]`` whose tensors are *references*
  (``@tensor_data/NAME`` or, for examples, ``@misc/PATH``), and ``[runner]``. Unknown fields
  are ignored when reading, as Carton ignores them.
- ``MANIFEST``: one ``{path}={sha256}`` line per file, sorted; its own sha256 is the model's
  identity.
- ``tensor_data/index.toml``: ``[[tensor]]`` tables naming each stored tensor's dtype, shape
  and file.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loader.errors import ModelConfigError
from loader.options import OptionValue

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SPEC_VERSION = 1
SHORT_DESCRIPTION_MAX = 100
CARTON_TOML = "carton.toml"
MANIFEST_NAME = "MANIFEST"
LINKS_NAME = "LINKS"
TENSOR_INDEX = "tensor_data/index.toml"
TENSOR_REF_PREFIX = "@tensor_data/"
MISC_REF_PREFIX = "@misc/"

#: Carton's dtypes, plus ``bool`` and ``float16`` (wheelcas supports them; Carton does not).
DTYPES: frozenset[str] = frozenset(
    {
        "float16",
        "float32",
        "float64",
        "string",
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
    }
)

Shape = str | tuple[int | str, ...]  # "*" or a symbol for the whole shape, or one per dim
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ManifestError(ModelConfigError):
    """A ``carton.toml``, ``MANIFEST`` or tensor index that does not follow the format."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """One ``[[input]]`` or ``[[output]]``."""

    name: str
    dtype: str
    shape: Shape
    description: str | None = None
    internal_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SelfTest:
    """A runnable check: ``inputs`` and ``expected_out`` map tensor names to references."""

    inputs: Mapping[str, str]
    name: str | None = None
    description: str | None = None
    expected_out: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Example:
    """An illustration; its references may point into ``tensor_data/`` or ``misc/``."""

    inputs: Mapping[str, str]
    name: str | None = None
    description: str | None = None
    sample_out: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerInfo:
    runner_name: str
    required_framework_version: str
    runner_compat_version: int | None = None
    opts: Mapping[str, OptionValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CartonManifest:
    """Everything ``carton.toml`` says; what ``get_model_info`` returns.

    ``manifest_sha256`` is not written to ``carton.toml``: it is the identity of the packed
    model it was read from (the sha256 of its ``MANIFEST``), None for a model read from a dir
    without one.
    """

    runner: RunnerInfo
    spec_version: int = SPEC_VERSION
    model_name: str | None = None
    short_description: str | None = None
    model_description: str | None = None
    license: str | None = None
    repository: str | None = None
    homepage: str | None = None
    required_platforms: tuple[str, ...] | None = None
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    self_tests: tuple[SelfTest, ...] | None = None
    examples: tuple[Example, ...] | None = None
    manifest_sha256: str | None = None

    def tensor_refs(self) -> set[str]:
        """Every ``@tensor_data/`` name the self-tests and examples reference."""
        names: set[str] = set()
        maps: list[Mapping[str, str] | None] = []
        for test in self.self_tests or ():
            maps += [test.inputs, test.expected_out]
        for example in self.examples or ():
            maps += [example.inputs, example.sample_out]
        for refs in maps:
            for ref in (refs or {}).values():
                if ref.startswith(TENSOR_REF_PREFIX):
                    names.add(ref[len(TENSOR_REF_PREFIX) :])
        return names

    def misc_refs(self) -> set[str]:
        """Every ``@misc/`` path the examples reference."""
        paths: set[str] = set()
        for example in self.examples or ():
            for refs in (example.inputs, example.sample_out or {}):
                for ref in refs.values():
                    if ref.startswith(MISC_REF_PREFIX):
                        paths.add(ref[len(MISC_REF_PREFIX) :])
        return paths


# --- paths --------------------------------------------------------------------------------


def check_member_path(name: str) -> str:
    """A path inside a packed model that cannot escape the dir it is unpacked into."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or (len(parts[0]) >= 2 and parts[0][1] == ":")  # a Windows drive
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ManifestError(name or "(empty name)", "not a safe relative path inside the model")
    return name


# --- validation ---------------------------------------------------------------------------


def validate(manifest: CartonManifest) -> CartonManifest:
    """Check what the format requires beyond types; returns ``manifest`` unchanged."""
    where = CARTON_TOML
    if manifest.spec_version != SPEC_VERSION:
        raise ManifestError(
            where,
            f"spec_version {manifest.spec_version} is not supported (only {SPEC_VERSION}); "
            "this model was packed by a newer tool",
        )
    if manifest.short_description is not None and (
        len(manifest.short_description) > SHORT_DESCRIPTION_MAX
    ):
        raise ManifestError(
            where,
            f"short_description is {len(manifest.short_description)} characters; at most "
            f"{SHORT_DESCRIPTION_MAX} are allowed (put the rest in model_description)",
        )
    if not manifest.runner.runner_name:
        raise ManifestError(where, "runner.runner_name is empty")
    if not manifest.runner.required_framework_version:
        raise ManifestError(where, "runner.required_framework_version is empty")
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        seen: set[str] = set()
        for spec in specs or ():
            if spec.name in seen:
                raise ManifestError(where, f"two [[{kind}]] tensors are named {spec.name!r}")
            seen.add(spec.name)
            if spec.dtype not in DTYPES:
                raise ManifestError(
                    where,
                    f"[[{kind}]] {spec.name!r}: dtype {spec.dtype!r} is not one of "
                    f"{', '.join(sorted(DTYPES))}",
                )
    for i, test in enumerate(manifest.self_tests or ()):
        if not test.inputs:
            raise ManifestError(where, f"self_test[{i}] has no inputs")
        for ref in [*test.inputs.values(), *(test.expected_out or {}).values()]:
            _check_ref(ref, f"self_test[{i}]", allow_misc=False)
    for i, example in enumerate(manifest.examples or ()):
        if not example.inputs:
            raise ManifestError(where, f"example[{i}] has no inputs")
        for ref in [*example.inputs.values(), *(example.sample_out or {}).values()]:
            _check_ref(ref, f"example[{i}]", allow_misc=True)
    return manifest


def _check_ref(ref: str, where: str, *, allow_misc: bool) -> None:
    if ref.startswith(TENSOR_REF_PREFIX):
        name = ref[len(TENSOR_REF_PREFIX) :]
        if not _TENSOR_NAME.fullmatch(name):
            raise ManifestError(CARTON_TOML, f"{where}: bad tensor reference {ref!r}")
        return
    if allow_misc and ref.startswith(MISC_REF_PREFIX):
        check_member_path(ref[1:])
        return
    allowed = "'@tensor_data/NAME' or '@misc/PATH'" if allow_misc else "'@tensor_data/NAME'"
    raise ManifestError(CARTON_TOML, f"{where}: {ref!r} is not a reference; expected {allowed}")


# --- carton.toml: parsing -----------------------------------------------------------------


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(CARTON_TOML, f"`{where}{key}` has the wrong type: {value!r}")
    return value


def _str_map(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ManifestError(CARTON_TOML, f"`{where}` must be a table of strings")
    return dict(raw)


def _parse_shape(raw: object, where: str) -> Shape:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(
        isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
        for d in raw
    ):
        return tuple(raw)
    raise ManifestError(
        CARTON_TOML, f"`{where}.shape` must be a string or a list of sizes and symbols"
    )


def _parse_specs(raw: object, kind: str) -> tuple[TensorSpec, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ManifestError(CARTON_TOML, f"`{kind}` must be an array of tables ([[{kind}]])")
    specs: list[TensorSpec] = []
    for i, table in enumerate(raw):
        where = f"{kind}[{i}]."
        if not isinstance(table, dict):
            raise ManifestError(CARTON_TOML, f"`{kind}[{i}]` must be a table")
        name = _get(table, "name", str, where)
        dtype = _get(table, "dtype", str, where)
        if name is None or dtype is None or "shape" not in table:
            raise ManifestError(CARTON_TOML, f"`{kind}[{i}]` needs name, dtype and shape")
        specs.append(
            TensorSpec(
                name=name,
                dtype=dtype,
                shape=_parse_shape(table["shape"], f"{kind}[{i}]"),
                description=_get(table, "description", str, where),
                internal_name=_get(table, "internal_name", str, where),
            )
        )
    return tuple(specs)


def _tables(data: Mapping[str, Any], key: str) -> list[dict[str, Any]] | None:
    raw = data.get(key)
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ManifestError(CARTON_TOML, f"`{key}` must be an array of tables ([[{key}]])")
    return raw


def _optional_map(table: Mapping[str, Any], key: str, where: str) -> dict[str, str] | None:
    return None if table.get(key) is None else _str_map(table[key], f"{where}.{key}")


def parse_carton_toml(text: str) -> CartonManifest:
    """Parse and validate; every problem names its key. Unknown keys are ignored."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(CARTON_TOML, f"not valid TOML ({exc})") from None
    spec_version = _get(data, "spec_version", int, "")
    if spec_version is None:
        raise ManifestError(CARTON_TOML, "`spec_version` is missing")
    runner_table = data.get("runner")
    if not isinstance(runner_table, dict):
        raise ManifestError(CARTON_TOML, "the [runner] table is missing")
    runner_name = _get(runner_table, "runner_name", str, "runner.")
    framework = _get(runner_table, "required_framework_version", str, "runner.")
    if runner_name is None or framework is None:
        raise ManifestError(
            CARTON_TOML, "[runner] needs runner_name and required_framework_version"
        )
    opts = runner_table.get("opts", {})
    if not isinstance(opts, dict) or not all(
        isinstance(v, bool | int | float | str) for v in opts.values()
    ):
        raise ManifestError(CARTON_TOML, "`runner.opts` values must be int, float, str or bool")
    runner = RunnerInfo(
        runner_name=runner_name,
        required_framework_version=framework,
        runner_compat_version=_get(runner_table, "runner_compat_version", int, "runner."),
        opts=dict(opts),
    )
    platforms = _get(data, "required_platforms", list, "")
    if platforms is not None and not all(isinstance(p, str) for p in platforms):
        raise ManifestError(CARTON_TOML, "`required_platforms` must be a list of target triples")
    self_tests = _tables(data, "self_test")
    examples = _tables(data, "example")
    manifest = CartonManifest(
        runner=runner,
        spec_version=spec_version,
        model_name=_get(data, "model_name", str, ""),
        short_description=_get(data, "short_description", str, ""),
        model_description=_get(data, "model_description", str, ""),
        license=_get(data, "license", str, ""),
        repository=_get(data, "repository", str, ""),
        homepage=_get(data, "homepage", str, ""),
        required_platforms=None if platforms is None else tuple(platforms),
        inputs=_parse_specs(data.get("input"), "input"),
        outputs=_parse_specs(data.get("output"), "output"),
        self_tests=None
        if self_tests is None
        else tuple(
            SelfTest(
                name=_get(t, "name", str, f"self_test[{i}]."),
                description=_get(t, "description", str, f"self_test[{i}]."),
                inputs=_str_map(t.get("inputs"), f"self_test[{i}].inputs"),
                expected_out=_optional_map(t, "expected_out", f"self_test[{i}]"),
            )
            for i, t in enumerate(self_tests)
        ),
        examples=None
        if examples is None
        else tuple(
            Example(
                name=_get(t, "name", str, f"example[{i}]."),
                description=_get(t, "description", str, f"example[{i}]."),
                inputs=_str_map(t.get("inputs"), f"example[{i}].inputs"),
                sample_out=_optional_map(t, "sample_out", f"example[{i}]"),
            )
            for i, t in enumerate(examples)
        ),
    )
    return validate(manifest)


# --- carton.toml: writing -----------------------------------------------------------------


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if v is not None}


def _spec_table(spec: TensorSpec) -> dict[str, Any]:
    shape = spec.shape if isinstance(spec.shape, str) else list(spec.shape)
    return _without_none(
        {
            "name": spec.name,
            "dtype": spec.dtype,
            "shape": shape,
            "description": spec.description,
            "internal_name": spec.internal_name,
        }
    )


def _sorted_map(refs: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if refs is None else dict(sorted(refs.items()))


def dump_carton_toml(manifest: CartonManifest) -> str:
    """Serialize (after validating): fixed key order, so the same values give the same bytes."""
    import tomli_w  # only writers pay for it

    validate(manifest)
    runner = manifest.runner
    document = _without_none(
        {
            "spec_version": manifest.spec_version,
            "model_name": manifest.model_name,
            "short_description": manifest.short_description,
            "model_description": manifest.model_description,
            "license": manifest.license,
            "repository": manifest.repository,
            "homepage": manifest.homepage,
            "required_platforms": None
            if manifest.required_platforms is None
            else list(manifest.required_platforms),
            "input": None if manifest.inputs is None else [_spec_table(s) for s in manifest.inputs],
            "output": None
            if manifest.outputs is None
            else [_spec_table(s) for s in manifest.outputs],
            "self_test": None
            if manifest.self_tests is None
            else [
                _without_none(
                    {
                        "name": t.name,
                        "description": t.description,
                        "inputs": _sorted_map(t.inputs),
                        "expected_out": _sorted_map(t.expected_out),
                    }
                )
                for t in manifest.self_tests
            ],
            "example": None
            if manifest.examples is None
            else [
                _without_none(
                    {
                        "name": e.name,
                        "description": e.description,
                        "inputs": _sorted_map(e.inputs),
                        "sample_out": _sorted_map(e.sample_out),
                    }
                )
                for e in manifest.examples
            ],
            "runner": _without_none(
                {
                    "runner_name": runner.runner_name,
                    "required_framework_version": runner.required_framework_version,
                    "runner_compat_version": runner.runner_compat_version,
                    "opts": dict(sorted(runner.opts.items())),
                }
            ),
        }
    )
    return tomli_w.dumps(document)


# --- MANIFEST -----------------------------------------------------------------------------


def format_manifest(hashes: Mapping[str, str]) -> bytes:
    """``{path}={sha256}`` lines sorted by path (byte order of the UTF-8 names), each ending
    in a newline. ``MANIFEST`` and ``LINKS`` are never listed."""
    lines: list[str] = []
    for path in sorted(hashes, key=lambda p: p.encode("utf-8")):
        if path in (MANIFEST_NAME, LINKS_NAME):
            raise ManifestError(MANIFEST_NAME, f"{path} must not list itself")
        digest = hashes[path]
        if not _SHA256.fullmatch(digest):
            raise ManifestError(MANIFEST_NAME, f"{path}: not a sha256 hex digest: {digest!r}")
        lines.append(f"{check_member_path(path)}={digest}\n")
    return "".join(lines).encode("utf-8")


def parse_manifest(data: bytes) -> dict[str, str]:
    """The path -> sha256 map of a ``MANIFEST``; refuses unsafe paths and duplicates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(MANIFEST_NAME, "is not UTF-8 text") from None
    hashes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        path, sep, digest = line.rpartition("=")
        if not sep or not _SHA256.fullmatch(digest):
            raise ManifestError(MANIFEST_NAME, f"line {number} is not PATH=SHA256: {line!r}")
        check_member_path(path)
        if path in hashes:
            raise ManifestError(MANIFEST_NAME, f"{path} is listed twice")
        if path in (MANIFEST_NAME, LINKS_NAME):
            raise ManifestError(MANIFEST_NAME, f"must not list {path}")
        hashes[path] = digest
    return hashes


def manifest_hash(data: bytes) -> str:
    """The model's identity: the sha256 of its ``MANIFEST`` bytes."""
    return hashlib.sha256(data).hexdigest()


# --- tensor_data/index.toml ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredTensor:
    """One ``[[tensor]]`` of the index: numeric data in ``.bin`` files (little-endian,
    C order), string data in ``.toml`` files (``data = [...]``, flattened)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str


def dump_tensor_index(tensors: list[StoredTensor]) -> str:
    import tomli_w

    return tomli_w.dumps(
        {
            "tensor": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "file": t.file}
                for t in sorted(tensors, key=lambda t: t.name)
            ]
        }
    )


def parse_tensor_index(text: str) -> dict[str, StoredTensor]:
    where = TENSOR_INDEX
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(where, f"not valid TOML ({exc})") from None
    result: dict[str, StoredTensor] = {}
    for i, table in enumerate(data.get("tensor", [])):
        if not isinstance(table, dict):
            raise ManifestError(where, f"tensor[{i}] must be a table")
        name, dtype, file = table.get("name"), table.get("dtype"), table.get("file")
        shape = table.get("shape")
        if dtype == "nested":
            raise ManifestError(where, f"tensor {name!r}: nested tensors are not supported yet")
        if not (
            isinstance(name, str)
            and isinstance(dtype, str)
            and dtype in DTYPES
            and isinstance(file, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ManifestError(where, f"tensor[{i}] needs name, a known dtype, shape and file")
        check_member_path(file)
        result[name] = StoredTensor(name=name, dtype=dtype, shape=tuple(shape), file=file)
    return result
