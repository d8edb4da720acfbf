"""Models in worker processes, end to end: the interpreter, isolation, tensors, crashes.

Models are locked against the loopback index by the load itself (``PIP_INDEX_URL`` points
there), for the worker's interpreter. The test wheels are py3-none-any, so any Python takes
them; numpy exists offline only as cp311 wheels, so the tensor tests ask for ``=3.11``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader import load_unpacked, worker
from loader.errors import EntrypointError, ModelConfigError, ModelError
from loader.interpreters import NoInterpreterError
from loader.worker import IsolatedModel, WorkerDiedError, describe_exit, worker_environment
from tests.support.index import PackageIndex
from tests.support.wheels import build_wheel

ENTRY = """
import json, os, signal, subprocess, sys
import alpha
import loader as own_loader      # the model's own loader.py, not wheelcas's
import lockgen as own_lockgen    # and its own lockgen/ package

class Model:
    def __init__(self, report):
        self.report = report

    def infer_with_tensors(self, tensors):
        mode_file = self.report + ".mode"
        mode = open(mode_file).read() if os.path.exists(mode_file) else ""
        print("model stderr line: mode=" + mode, file=sys.stderr, flush=True)
        if mode == "exit":
            os._exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "raise":
            raise ValueError("the model failed on purpose")
        child = subprocess.run(
            [sys.executable, "-c", "import alpha, hidden_mod; print(alpha.__file__)"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        import hidden_mod
        facts = {
            "version": sys.version, "executable": sys.executable, "path": sys.path,
            "alpha": alpha.__file__, "child_alpha": child, "hidden": hidden_mod.__file__,
            "pth_ran": os.environ.get("WHEELCAS_TEST_PTH_RAN"),
            "loader": own_loader.__file__, "lockgen": own_lockgen.__file__,
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "numpy": "numpy" in sys.modules,
        }
        with open(self.report, "w") as f:
            json.dump(facts, f)
        return {}

def get_model(report):
    return Model(report)
"""

TENSOR_ENTRY = """
import numpy as np

class Echo:
    def infer_with_tensors(self, tensors):
        out = dict(tensors)
        out["numpy"] = np.array(np.__file__)
        return out

class Stream:
    async def infer_with_tensors(self, tensors):
        for i in range(3):
            yield {"i": np.array(i), "x": tensors["x"] * i}

def get_model(kind):
    return Echo() if kind == "echo" else Stream()
"""


@pytest.fixture
def index_env(package_index: PackageIndex, monkeypatch: pytest.MonkeyPatch) -> PackageIndex:
    """Locks made by a load (in this process or a child) resolve on the loopback index."""
    monkeypatch.setenv("PIP_INDEX_URL", package_index.simple_url)
    monkeypatch.setenv("WHEELCAS_SOCKET", "off")
    return package_index


@pytest.fixture
def model(tmp_path: Path, wheel_dir: Path, index_env: PackageIndex) -> Path:
    build_wheel(wheel_dir, "alpha", "1.0")
    build_wheel(
        wheel_dir,
        "pthdep",
        "1.0",
        files={
            "pthdep/__init__.py": "",
            "pthdep_extra/hidden_mod.py": "X = 1\n",
            "pthdep.pth": "pthdep_extra\nimport os; os.environ['WHEELCAS_TEST_PTH_RAN'] = '1'\n",
        },
    )
    model_dir = tmp_path / "model"
    (model_dir / "pkg").mkdir(parents=True)
    (model_dir / "pkg" / "__init__.py").write_text("")
    (model_dir / "pkg" / "entry.py").write_text(ENTRY)
    (model_dir / "loader.py").write_text("MINE = True\n")
    (model_dir / "lockgen").mkdir()
    (model_dir / "lockgen" / "__init__.py").write_text("MINE = True\n")
    (model_dir / "requirements.txt").write_text("alpha\npthdep\n")
    return model_dir


@pytest.fixture
def python312(pyenv_python: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> str:
    python = pyenv_python("3.12")
    monkeypatch.setenv("WHEELCAS_PYTHONS", python)
    return python


def load(model_dir: Path, report: Path, **kwargs: Any) -> IsolatedModel:
    m = load_unpacked(
        model_dir,
        required_framework_version=kwargs.pop("required_framework_version", "=3.12"),
        runner_opts={
            "entrypoint_package": "pkg.entry",
            "entrypoint_fn": "get_model",
            "model.report": str(report),
            **kwargs.pop("runner_opts", {}),
        },
        **kwargs,
    )
    assert isinstance(m, IsolatedModel)
    return m


def pid_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def loaded(model: Path, python312: str, tmp_path: Path) -> Iterator[tuple[IsolatedModel, Path]]:
    report = tmp_path / "report.json"
    m = load(model, report, visible_device="cpu")
    try:
        yield m, report
    finally:
        m.close()


# --- pure ----------------------------------------------------------------------------------


def test_worker_environment_drops_import_paths_and_sets_its_own() -> None:
    base = {"PATH": "/bin", "PYTHONPATH": "/evil", "PYTHONHOME": "/x", "PYTHONSTARTUP": "s",
            "PYTHONUNBUFFERED": "1", "HOME": "/root"}  # fmt: skip
    env = worker_environment(base, ["/code", "/pkg"], "")
    assert env["PYTHONPATH"] == os.pathsep.join(["/code", "/pkg"])
    assert "PYTHONHOME" not in env
    assert "PYTHONSTARTUP" not in env
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONNOUSERSITE"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PATH"] == "/bin"
    assert "CUDA_VISIBLE_DEVICES" not in worker_environment(base, [], None)


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9).startswith("was killed by signal SIGKILL (9)")
    assert "SIGSEGV" in describe_exit(-11)


def test_no_interpreter_in_the_range_lists_the_candidates(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(NoInterpreterError) as raised:
        load_unpacked(
            model_dir,
            required_framework_version="=3.99",
            runner_opts={"entrypoint_package": "x", "entrypoint_fn": "f"},
        )
    message = str(raised.value)
    assert "'=3.99'" in message
    assert f"{sys.executable} (current): {'.'.join(map(str, sys.version_info[:3]))}" in message


# --- real workers --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_runs_isolated_in_the_python_it_asks_for(
    loaded: tuple[IsolatedModel, Path], model: Path, python312: str
) -> None:
    m, report = loaded
    before = list(sys.path)
    assert m.infer({}) == {}
    facts = json.loads(report.read_text())
    assert facts["version"].startswith("3.12.")
    assert facts["executable"] == python312
    assert m.info.python_version.startswith("3.12.")
    path = facts["path"]
    assert path[: len(m.info.sys_path_entries)] == list(m.info.sys_path_entries)
    assert path[0] == str(model)
    store = os.environ["WHEELCAS_HOME"]
    assert facts["alpha"].startswith(store)
    assert facts["child_alpha"] == facts["alpha"]  # a child process sees the same packages
    assert facts["hidden"].startswith(store)  # the .pth file's dir line
    assert facts["pth_ran"] == "1"  # and its import line
    assert facts["loader"] == str(model / "loader.py")  # the model's, not wheelcas's
    assert facts["lockgen"] == str(model / "lockgen" / "__init__.py")
    assert not [p for p in path if "site-packages" in p]  # no site, no user site
    assert str(Path(worker.__file__).parent) not in path
    assert facts["cuda"] == ""  # visible_device="cpu"
    assert facts["numpy"] is False
    assert sys.path == before  # the loading process is untouched


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "status"),
    [("exit", "exited with status 3"), ("kill", "killed by signal SIGKILL (9)")],
)
def test_a_dying_worker_is_a_clear_error_and_the_model_reloads(
    loaded: tuple[IsolatedModel, Path], mode: str, status: str
) -> None:
    m, report = loaded
    Path(f"{report}.mode").write_text(mode)
    first_pid = m.pid
    with pytest.raises(WorkerDiedError) as raised:
        m.infer({})
    message = str(raised.value)
    assert status in message
    assert f"model stderr line: mode={mode}" in message  # the tail of its stderr
    assert "reload" in message
    with pytest.raises(WorkerDiedError, match="no longer running"):
        m.infer({})
    Path(f"{report}.mode").unlink()
    m.reload()
    assert m.pid != first_pid
    assert m.infer({}) == {}


@pytest.mark.slow
def test_an_exception_in_the_model_carries_its_traceback(
    loaded: tuple[IsolatedModel, Path],
) -> None:
    m, report = loaded
    Path(f"{report}.mode").write_text("raise")
    with pytest.raises(ModelError) as raised:
        m.infer({})
    assert "ValueError: the model failed on purpose" in raised.value.traceback_text
    assert "entry.py" in raised.value.traceback_text
    Path(f"{report}.mode").unlink()
    assert m.infer({}) == {}  # the worker lives on


@pytest.mark.slow
def test_closing_leaves_no_worker(loaded: tuple[IsolatedModel, Path]) -> None:
    m, _ = loaded
    pid = m.pid
    assert pid is not None
    m.close()
    assert m.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_a_parent_that_exits_leaves_no_worker(model: Path, python312: str, tmp_path: Path) -> None:
    code = f"""
        from loader import load_unpacked
        m = load_unpacked({str(model)!r}, required_framework_version="=3.12",
                          runner_opts={{"entrypoint_package": "pkg.entry",
                                        "entrypoint_fn": "get_model",
                                        "model.report": {str(tmp_path / "r.json")!r}}})
        print(m.pid, flush=True)
    """  # exits without closing the model
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert pid_gone(int(done.stdout.split()[-1]))


@pytest.mark.slow
def test_entrypoint_errors_come_back_as_ours(model: Path, python312: str, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    with pytest.raises(EntrypointError, match="has no function `nothere`"):
        load(model, report, runner_opts={"entrypoint_fn": "nothere"})
    with pytest.raises(EntrypointError, match=r"`pkg\.nothere` not found"):
        load(model, report, runner_opts={"entrypoint_package": "pkg.nothere"})
    with pytest.raises(ModelConfigError, match=r"model\.NAME"):
        load(model, report, runner_opts={"model.unknown": 1})


# --- tensors through a real worker ---------------------------------------------------------


@pytest.fixture
def tensor_model(tmp_path: Path, wheel_dir: Path, index_env: PackageIndex) -> Path:
    wheels = sorted(Path("/opt/pypi/files").glob("numpy-2*-cp311-cp311-manylinux*x86_64.whl"))
    if not wheels or sys.version_info[:2] != (3, 11):
        pytest.skip("needs an offline numpy wheel for CPython 3.11 and a 3.11 test process")
    shutil.copy(wheels[-1], wheel_dir)
    model_dir = tmp_path / "tensors"
    model_dir.mkdir()
    (model_dir / "entry.py").write_text(TENSOR_ENTRY)
    (model_dir / "requirements.txt").write_text("numpy\n")
    return model_dir


def load_tensor_model(model_dir: Path, kind: str) -> IsolatedModel:
    m = load_unpacked(
        model_dir,
        required_framework_version="=3.11",
        runner_opts={"entrypoint_package": "entry", "entrypoint_fn": "get_model",
                     "model.kind": kind},
    )  # fmt: skip
    assert isinstance(m, IsolatedModel)
    return m


@pytest.mark.slow
def test_every_dtype_through_a_worker_and_streaming(tensor_model: Path) -> None:
    inputs: dict[str, Any] = {
        dtype.replace(">", "be-"): (np.arange(6) % 3).astype(dtype).reshape(2, 3)
        for dtype in ["bool", "int8", "uint16", "int64", "float16", "float32", "float64",
                      "complex64", "complex128", ">i4", "datetime64[ns]"]
    }  # fmt: skip
    inputs |= {
        "zero_d": np.array(3.5),
        "empty": np.zeros((0, 4), dtype="int32"),
        "strings": np.array(["", "a", "ünï ✓"]),
        "string_0d": np.array("x"),
        "no_strings": np.array([], dtype=str),
        "bytes": np.array([b"", b"\x00b"]),
        "non_contiguous": np.arange(20).reshape(4, 5)[:, ::2],
        "large": np.arange(600_000, dtype="float64").reshape(1000, 600)[:, ::2],  # shm
    }
    with load_tensor_model(tensor_model, "echo") as echo:
        out = echo.infer(inputs)
        assert str(out.pop("numpy")).startswith(os.environ["WHEELCAS_HOME"])  # the locked one
        assert list(out) == list(inputs)
        for name, expected in inputs.items():
            assert out[name].dtype == expected.dtype, name
            assert out[name].shape == expected.shape, name
            np.testing.assert_array_equal(out[name], expected)
        with pytest.raises(TypeError, match="dtype object"):
            echo.infer({"bad": np.array([object()])})
        assert not list(Path("/dev/shm").glob(f"wheelcas-{os.getpid()}-*"))
        assert not list(Path("/dev/shm").glob(f"wheelcas-{echo.pid}-*"))
    with load_tensor_model(tensor_model, "stream") as stream:
        x = np.array([1.0, 2.0])
        items = list(stream.infer_stream({"x": x}))
        assert [int(item["i"]) for item in items] == [0, 1, 2]
        np.testing.assert_array_equal(items[2]["x"], x * 2)
        np.testing.assert_array_equal(stream.infer({"x": x})["x"], x * 2)  # the last one
        partial = stream.infer_stream({"x": x})
        assert int(next(partial)["i"]) == 0
        partial.close()  # abandoned early: the rest is drained, the next call starts clean
        assert int(stream.infer({"x": x})["i"]) == 2


@pytest.mark.slow
def test_a_model_pinning_another_numpy_than_the_hosts_gets_its_own(
    tmp_path: Path, wheel_dir: Path, index_env: PackageIndex
) -> None:
    old = sorted(Path("/opt/pypi/files").glob("numpy-1.*-cp311-cp311-manylinux*x86_64.whl"))
    if not old or sys.version_info[:2] != (3, 11):
        pytest.skip("needs an offline numpy 1.x wheel for CPython 3.11 and a 3.11 test process")
    pinned = old[-1].name.split("-")[1]
    assert pinned != np.__version__  # the host runs numpy 2
    shutil.copy(old[-1], wheel_dir)
    model_dir = tmp_path / "old-numpy"
    model_dir.mkdir()
    (model_dir / "entry.py").write_text(
        "import numpy as np\n"
        "class M:\n"
        "    def infer_with_tensors(self, tensors):\n"
        "        return {'version': np.array(np.__version__), 'y': tensors['x'] * 2}\n"
        "def get_model():\n"
        "    return M()\n"
    )
    (model_dir / "requirements.txt").write_text(f"numpy=={pinned}\n")
    model = load_unpacked(
        model_dir,
        required_framework_version="=3.11",
        runner_opts={"entrypoint_package": "entry", "entrypoint_fn": "get_model"},
    )
    try:
        out = model.infer({"x": np.arange(3, dtype=np.int64)})
    finally:
        model.close()
    assert str(out["version"]) == pinned
    assert out["y"].tolist() == [0, 2, 4]
