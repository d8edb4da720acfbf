"""Packing a locked model, unpacking it into the store once, loading it from there.

Models are locked against the loopback index (``package_index``); loads that change
``sys.path`` run in a fresh interpreter, as in tests/test_load.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from loader.cli import main
from loader.errors import EntrypointError, ModelConfigError
from loader.manifest import MANIFEST_NAME, TensorSpec, parse_manifest
from loader.options import OptionValue
from loader.packed import (
    METHOD_STORED,
    METHOD_ZSTD,
    MemberSource,
    PackedFormatError,
    ZipReader,
    write_zip,
)
from loader.packing import (
    TamperedModelError,
    get_model_info,
    load,
    load_tensor,
    pack,
    unpack_into_store,
)
from lockgen import lock
from tests.support.index import PackageIndex
from tests.test_load import ENTRY, OPTS, build_dependencies, run_python
from tests.test_packed import _local_methods

PY_RANGE = f"={sys.version_info[0]}.{sys.version_info[1]}"
X = np.array([1.0, 2.0, 3.0], dtype=np.float32)
DOUBLED = X * 2


def _code_dir(root: Path) -> Path:
    model_dir = root / "model"
    (model_dir / "pkg").mkdir(parents=True)
    (model_dir / "pkg" / "__init__.py").write_text("")
    (model_dir / "pkg" / "entry.py").write_text(ENTRY)
    (model_dir / "requirements.txt").write_text("alpha\npthdep\n")
    (model_dir / "__pycache__").mkdir()
    (model_dir / "__pycache__" / "junk.pyc").write_bytes(b"x")
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "HEAD").write_text("ref\n")
    return model_dir


@pytest.fixture
def model(tmp_path: Path, wheel_dir: Path, package_index: PackageIndex) -> Path:
    build_dependencies(wheel_dir)
    model_dir = _code_dir(tmp_path)
    lock(model_dir, pip_args=package_index.pip_args())
    return model_dir


def _pack(model: Path, output: Path, **extra: Any) -> Path:
    misc = model.parent / "cat.png"
    misc.write_bytes(b"\x89PNG fake")
    return pack(
        model,
        "python",
        PY_RANGE,
        runner_opts=cast("dict[str, OptionValue]", OPTS),
        model_name="doubler",
        short_description="Doubles x.",
        model_description="Longer text.\n",
        license="MIT",
        repository="https://example.com/r",
        homepage="https://example.com",
        required_platforms=["x86_64-unknown-linux-gnu"],
        inputs=[TensorSpec(name="x", dtype="float32", shape=("n",))],
        outputs=[{"name": "out", "dtype": "float32", "shape": ["n"], "description": "2x"}],
        self_tests=[{"name": "double", "inputs": {"x": X}, "expected_out": {"out": DOUBLED}}],
        examples=[
            {
                "inputs": {"x": X, "picture": "@misc/cat.png"},
                "sample_out": {"label": np.array(["two"])},
            }
        ],
        misc_files={"cat.png": misc},
        output=output,
        **extra,
    )


@pytest.fixture
def carton(model: Path, tmp_path: Path) -> Path:
    return _pack(model, tmp_path / "out" / "doubler.carton")


pytestmark = pytest.mark.slow


def test_pack_writes_the_format(carton: Path) -> None:
    with ZipReader(carton) as reader:
        names = list(reader.entries)
        hashes = parse_manifest(reader.read(MANIFEST_NAME))
    assert names[-1] == MANIFEST_NAME
    assert sorted(hashes) == sorted(names[:-1])
    assert "carton.toml" in hashes
    assert "misc/cat.png" in hashes
    assert "model/.carton/carton.lock" in hashes
    assert "model/pkg/entry.py" in hashes
    assert "tensor_data/index.toml" in hashes
    assert not any("__pycache__" in n or ".git/" in n for n in names)
    methods = _local_methods(carton.read_bytes())
    assert methods.pop(MANIFEST_NAME) == METHOD_STORED
    assert set(methods.values()) == {METHOD_ZSTD}


def test_manifest_fields_round_trip(carton: Path) -> None:
    info = get_model_info(carton)
    assert info.model_name == "doubler"
    assert info.short_description == "Doubles x."
    assert info.license == "MIT"
    assert info.required_platforms == ("x86_64-unknown-linux-gnu",)
    assert info.inputs == (TensorSpec(name="x", dtype="float32", shape=("n",)),)
    assert info.outputs == (
        TensorSpec(name="out", dtype="float32", shape=("n",), description="2x"),
    )
    assert info.runner.required_framework_version == PY_RANGE
    assert dict(info.runner.opts) == OPTS
    assert info.self_tests is not None
    assert info.examples is not None
    test = info.self_tests[0]
    assert test.name == "double"
    np.testing.assert_array_equal(load_tensor(carton, test.inputs["x"]), X)
    assert test.expected_out is not None
    np.testing.assert_array_equal(load_tensor(carton, test.expected_out["out"]), DOUBLED)
    example = info.examples[0]
    assert example.inputs["picture"] == "@misc/cat.png"
    assert example.inputs["x"] == test.inputs["x"]  # one tensor, stored once
    assert example.sample_out is not None
    assert load_tensor(carton, example.sample_out["label"]).tolist() == ["two"]
    with ZipReader(carton) as reader:
        identity = __import__("hashlib").sha256(reader.read(MANIFEST_NAME)).hexdigest()
    assert info.manifest_sha256 == identity
    unpacked = unpack_into_store(carton)
    assert get_model_info(unpacked) == info  # the store dir reads the same
    assert (unpacked / "misc" / "cat.png").read_bytes() == b"\x89PNG fake"


def test_pack_is_deterministic(model: Path, tmp_path: Path) -> None:
    first = _pack(model, tmp_path / "a.carton")
    second = _pack(model, tmp_path / "b.carton")
    assert first.read_bytes() == second.read_bytes()


def test_load_unpacks_once_and_runs_the_model(carton: Path) -> None:
    unpacked = unpack_into_store(carton)
    store = Path(os.environ["WHEELCAS_HOME"])
    assert unpacked.parent == store / "v1" / "models"
    assert unpacked.name == get_model_info(carton).manifest_sha256
    inode = unpacked.stat().st_ino
    assert not os.access(unpacked / "model" / "pkg" / "entry.py", os.W_OK) or os.geteuid() == 0
    assert (unpacked / "model" / "pkg" / "entry.py").stat().st_mode & 0o222 == 0
    done = run_python(
        f"""
        import json
        import numpy as np
        from loader import load
        m = load({str(carton)!r}, isolated=False)
        out = m.infer({{"x": np.array([1, 2, 3])}})
        print(json.dumps({{"out": np.asarray(out["out"]).tolist(),
                          "dir": str(m.info.model_dir)}}))
        """
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["out"] == [2, 4, 6]
    assert result["dir"] == str(unpacked / "model")
    assert unpack_into_store(carton).stat().st_ino == inode  # reused, not copied again
    assert list((store / "v1" / "tmp").glob("model-*")) == []


def test_cli_pack_info_and_infer(model: Path, tmp_path: Path) -> None:
    from tests.test_load import run_cli

    misc = tmp_path / "readme.txt"
    misc.write_text("hi\n")
    output = tmp_path / "cli.carton"
    done = run_cli(
        "pack", str(model), "-o", str(output), "--python", PY_RANGE,
        "--entrypoint", "pkg.entry:get_model", "--opt", "model.scale=3", "--name", "tripler",
        "--misc", f"readme.txt={misc}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"packed {output}" in done.stdout
    done = run_cli("info", str(output))
    assert done.returncode == 0, done.stderr
    assert "model_name: tripler" in done.stdout
    assert f"runner.required_framework_version: {PY_RANGE}" in done.stdout
    fields = json.loads(run_cli("info", str(output), "--json").stdout)
    assert fields["runner"]["opts"]["model.scale"] == 3
    assert len(fields["manifest_sha256"]) == 64


class _FakeModel:
    def infer(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"out": tensors["x"] * 2}


def test_cli_infer_loads_a_carton_file(
    carton: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wiring only (a file goes to ``loader.packing.load`` with the overrides); the
    load itself is tested above."""
    import loader.packing

    calls: list[tuple[Path, dict[str, Any]]] = []

    def fake_load(path: Path, **kwargs: Any) -> _FakeModel:
        calls.append((path, kwargs))
        return _FakeModel()

    monkeypatch.setattr(loader.packing, "load", fake_load)
    assert main(["infer", str(carton), "--input", "x=[1, 2]", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": [2, 4]}
    assert calls[-1] == (
        carton,
        {"override_required_framework_version": None, "override_runner_opts": None},
    )
    argv = ["infer", str(carton), "--python", ">=3.10", "--opt", "model.scale=5", "--input", "x=1"]
    assert main(argv) == 0
    assert calls[-1][1] == {
        "override_required_framework_version": ">=3.10",
        "override_runner_opts": {"model.scale": 5},
    }
    assert main(["infer", str(carton.parent), "--input", "x=1"]) == 2
    assert "--entrypoint and --python required for a model dir" in capsys.readouterr().err


def test_info_cli_in_process(carton: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(carton)]) == 0
    out = capsys.readouterr().out
    assert "model_name: doubler" in out
    assert "short_description: Doubles x." in out
    assert "runner.runner_name: python" in out


# --- refused ------------------------------------------------------------------------------


def _rewrite(carton: Path, target: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of ``carton`` with members changed by ``change(name, data)`` (valid zip, CRCs
    recomputed): only the MANIFEST check can catch it."""
    with ZipReader(carton) as reader:
        members = [
            MemberSource(
                name,
                change(name, reader.read(name)),
                method=entry.method,
                executable=entry.executable,
            )
            for name, entry in reader.entries.items()
        ]
    with target.open("wb") as handle:
        write_zip(handle, members)
    return target


def _store_is_clean() -> bool:
    base = Path(os.environ["WHEELCAS_HOME"]) / "v1"
    models = base / "models"
    return (not models.exists() or not any(models.iterdir())) and not list(
        (base / "tmp").glob("model-*")
    )


def test_a_changed_member_is_refused(carton: Path, tmp_path: Path) -> None:
    def change(name: str, data: bytes) -> bytes:
        return data + b"\n# injected\n" if name == "model/pkg/entry.py" else data

    bad = _rewrite(carton, tmp_path / "bad.carton", change)
    with pytest.raises(TamperedModelError, match=r"member model/pkg/entry\.py has sha256"):
        unpack_into_store(bad)
    assert _store_is_clean()


def test_a_flipped_byte_is_refused(carton: Path, tmp_path: Path) -> None:
    data = bytearray(carton.read_bytes())
    with ZipReader(carton) as reader:
        entry = reader.entries["model/pkg/entry.py"]
    data[entry.header_offset + 30 + len(entry.name) + entry.compressed_size // 2] ^= 0x55
    bad = tmp_path / "flipped.carton"
    bad.write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match=r"model/pkg/entry\.py"):
        unpack_into_store(bad)
    assert _store_is_clean()


def test_an_edited_manifest_is_refused(carton: Path, tmp_path: Path) -> None:
    def edit_hash(name: str, data: bytes) -> bytes:
        if name != MANIFEST_NAME:
            return data
        lines = data.decode().splitlines(keepends=True)
        lines = [
            line.split("=")[0] + "=" + "0" * 64 + "\n" if line.startswith("model/pkg/") else line
            for line in lines
        ]
        return "".join(lines).encode()

    def drop_line(name: str, data: bytes) -> bytes:
        if name != MANIFEST_NAME:
            return data
        lines = data.decode().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("misc/")).encode()

    edited = _rewrite(carton, tmp_path / "edited.carton", edit_hash)
    with pytest.raises(TamperedModelError, match="MANIFEST says 0000"):
        unpack_into_store(edited)
    dropped = _rewrite(carton, tmp_path / "dropped.carton", drop_line)
    with pytest.raises(TamperedModelError, match=r"misc/cat\.png is not listed in MANIFEST"):
        unpack_into_store(dropped)
    assert _store_is_clean()


def test_no_lock_entry_for_the_loading_python(
    carton: Path, pyenv_python: Callable[[str], str]
) -> None:
    pyenv_python("3.12")
    with pytest.raises(ModelConfigError, match="no lock entry for the environment") as caught:
        load(carton, override_required_framework_version="=3.12")
    assert "--lock-python 3.12" in str(caught.value)


# --- refused at pack time (no locking needed) ---------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"runner_opts": {"entrypoint_fn": "get_model"}}, ModelConfigError,
         "`entrypoint_package` is missing"),
        ({"runner_opts": {"entrypoint_package": "pkg.entry"}}, ModelConfigError,
         "`entrypoint_fn` is missing"),
        ({"runner_opts": {**OPTS, "entrypoint_package": "pkg.nothere"}}, EntrypointError,
         "expected pkg/nothere.py or pkg/nothere/__init__.py"),
        ({"runner_opts": OPTS, "short_description": "x" * 101}, ModelConfigError,
         "at most 100"),
        ({"runner_opts": OPTS, "linked_files": {"a": ["https://x"]}}, ModelConfigError,
         "linked_files"),
        ({"runner_opts": OPTS, "runner_name": "torchscript"}, ModelConfigError,
         "'python' models"),
        ({"runner_opts": OPTS, "examples": [{"inputs": {"x": "@misc/none.png"}}]},
         ModelConfigError, "not in misc_files"),
    ],
)  # fmt: skip
def test_pack_refuses(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model_dir = _code_dir(tmp_path)
    args: dict[str, Any] = {"runner_name": "python", "required_framework_version": ">=3.10"}
    with pytest.raises(error, match=message.replace("(", r"\(")):
        pack(model_dir, **{**args, **kwargs}, output=tmp_path / "x.carton")
    assert not (tmp_path / "x.carton").exists()


def test_cli_pack_without_an_entrypoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["pack", str(_code_dir(tmp_path)), "--python", ">=3.10"])
    assert exited.value.code == 2
    assert "--entrypoint" in capsys.readouterr().err
    assert main(["pack", str(tmp_path / "model"), "--python", ">=3.10", "--entrypoint", "x"]) == 2
    assert "expected PACKAGE:FUNCTION" in capsys.readouterr().err


def test_a_file_that_is_not_a_carton(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.carton"
    path.write_bytes(b"junk")
    assert main(["info", str(path)]) == 2
    assert "no zip end of central directory record" in capsys.readouterr().err
    with pytest.raises(PackedFormatError):
        unpack_into_store(path)


def test_a_url_is_downloaded_into_the_store_tmp(carton: Path) -> None:
    import functools
    import http.server
    import threading

    from cas_daemon.layout import StoreLayout, default_store_root
    from loader.packing import _download

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=carton.parent)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            layout = StoreLayout(default_store_root())
            url = f"http://127.0.0.1:{server.server_address[1]}/{carton.name}"
            downloaded = _download(url, layout)
            assert downloaded.parent == layout.tmp_dir
            assert downloaded.read_bytes() == carton.read_bytes()
            with pytest.raises(ModelConfigError, match="cannot download"):
                _download(url + ".missing", layout)
        finally:
            server.shutdown()
            thread.join()


# --- a scattered model --------------------------------------------------------------------

SCATTERED_ENTRY = """
import alpha
import shared_util
from helpers import scale

class Model:
    def infer_with_tensors(self, tensors):
        return {"out": [scale(v) for v in tensors["x"]], "shared": shared_util.__file__}

def get_model():
    return Model()
"""


def _scattered_model(tmp_path: Path, wheel_dir: Path) -> Path:
    """``model/`` (SCATTERED_ENTRY, requiring alpha) importing from ``shared/`` and
    ``libs/`` beside it."""
    build_dependencies(wheel_dir)
    model_dir = tmp_path / "model"
    (model_dir / "pkg").mkdir(parents=True)
    (model_dir / "pkg" / "__init__.py").write_text("")
    (model_dir / "pkg" / "entry.py").write_text(SCATTERED_ENTRY)
    (model_dir / "requirements.txt").write_text("alpha\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "shared_util.py").write_text("")
    (tmp_path / "libs" / "helpers").mkdir(parents=True)
    (tmp_path / "libs" / "helpers" / "__init__.py").write_text("def scale(v):\n    return 3 * v\n")
    return model_dir


def test_a_packed_scattered_model_loads_after_its_external_dirs_are_gone(
    tmp_path: Path, wheel_dir: Path, package_index: PackageIndex
) -> None:
    """``pack`` gathers first: the .carton holds the external dirs' contents in the bundled
    packages dir, and its options no longer name dirs outside it."""
    from tests.test_load import run_cli

    model_dir = _scattered_model(tmp_path, wheel_dir)
    external = os.pathsep.join(["../shared", str(tmp_path / "libs")])
    output = tmp_path / "scattered.carton"
    done = run_cli(
        "pack", str(model_dir), "-o", str(output), "--python", PY_RANGE,
        "--entrypoint", "pkg.entry:get_model", "--opt", f"external_package_dirs={external}",
        "--index-url", package_index.simple_url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "gathered the scattered model" in done.stderr
    opts = dict(get_model_info(output).runner.opts)
    assert opts == {"entrypoint_package": "pkg.entry", "entrypoint_fn": "get_model"}
    with ZipReader(output) as reader:
        assert {"model/packages/shared_util.py", "model/packages/helpers/__init__.py"} <= set(
            reader.entries
        )
        assert "model/.carton/carton.lock" in reader.entries

    shutil.rmtree(tmp_path / "shared")
    shutil.rmtree(tmp_path / "libs")
    done = run_python(
        f"""
        import json
        from loader import load
        m = load({str(output)!r}, isolated=False)
        print(json.dumps(m.infer({{"x": [1, 2]}})))
        """
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["out"] == [3, 6]
    store = Path(os.environ["WHEELCAS_HOME"]) / "v1" / "models"
    assert result["shared"].startswith(str(store))
    assert result["shared"].endswith("/model/packages/shared_util.py")


def test_packing_a_scattered_model_into_its_own_dir_leaves_the_older_carton_out(
    tmp_path: Path, wheel_dir: Path, package_index: PackageIndex
) -> None:
    """Packing gathers first; the gather must skip the ``.carton`` being written, or the
    first package would be packed into the second (it is not part of the model)."""
    model_dir = _scattered_model(tmp_path, wheel_dir)
    output = model_dir / "model.carton"
    opts: dict[str, OptionValue] = {
        "entrypoint_package": "pkg.entry",
        "entrypoint_fn": "get_model",
        "external_package_dirs": os.pathsep.join(["../shared", "../libs"]),
    }
    for _ in range(2):
        pack(model_dir, "python", PY_RANGE, runner_opts=opts, output=output,
             pip_args=package_index.pip_args())  # fmt: skip
    with ZipReader(output) as reader:
        names = set(reader.entries)
    assert {"model/packages/shared_util.py", "model/pkg/entry.py"} <= names
    assert not [n for n in names if n.endswith(".carton")]
    assert not [n for n in names if n.endswith(".packing")]


def test_a_packed_model_naming_external_dirs_is_refused_at_load(tmp_path: Path) -> None:
    """A hand-made (or old) carton whose options still name dirs outside it: loading it
    would import host code that its MANIFEST does not cover."""
    from loader.manifest import CartonManifest, RunnerInfo, dump_carton_toml
    from loader.packing import _write_carton, load

    host = tmp_path / "host_dir"
    host.mkdir()
    (host / "evil.py").write_text("X = 1\n")
    opts = {**cast("dict[str, OptionValue]", OPTS), "external_package_dirs": str(host)}
    toml = dump_carton_toml(
        CartonManifest(
            runner=RunnerInfo(runner_name="python", required_framework_version=">=3.8", opts=opts)
        )
    )
    members = [
        MemberSource("carton.toml", toml.encode()),
        MemberSource("model/pkg/__init__.py", b""),
        MemberSource("model/pkg/entry.py", b"def get_model():\n    return None\n"),
        MemberSource("model/requirements.txt", b""),
    ]
    carton = tmp_path / "hand.carton"
    _write_carton(carton, sorted(members, key=lambda m: m.name.encode()))
    with pytest.raises(ModelConfigError, match=r"names dirs outside itself") as raised:
        load(carton)
    assert "wheelcas pack DIR" in str(raised.value)
    assert str(host) in str(raised.value)
