"""``wheelcas selftest``: a packed model's ``[[self_test]]`` entries, run and compared."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from loader.manifest import SelfTest
from loader.options import OptionValue
from loader.packing import pack
from loader.selftesting import (
    SelfTestReport,
    SelfTestResult,
    compare_outputs,
    print_report,
    run_self_tests,
)
from tests.test_load import OPTS, run_cli
from tests.test_pack import model  # noqa: F401 - the fixture

X = np.array([1.0, 2.0, 3.0], dtype=np.float32)


def test_compare_outputs() -> None:
    assert compare_outputs({"a": X}, {"a": X * (1 + 1e-7), "extra": 1}) is None
    assert compare_outputs({"a": np.array([np.nan])}, {"a": [np.nan]}) is None
    assert "values differ" in str(compare_outputs({"a": X}, {"a": X + 0.01}))
    assert "'a': dtype float64" in str(compare_outputs({"a": X}, {"a": X.astype("float64")}))
    assert "shape (1, 3)" in str(compare_outputs({"a": X}, {"a": X.reshape(1, 3)}))
    assert "'b' is missing" in str(compare_outputs({"a": X, "b": X}, {"a": X}))
    ints = np.array([1, 2])
    assert compare_outputs({"i": ints}, {"i": ints}) is None
    assert "'i': values differ" in str(compare_outputs({"i": ints}, {"i": ints + 1}))
    words = np.array(["a", "b"])
    assert compare_outputs({"s": words}, {"s": np.array(["a", "b"])}) is None
    assert "'s'" in str(compare_outputs({"s": words}, {"s": np.array(["a", "c"])}))
    flags = np.array([True])
    assert "'f'" in str(compare_outputs({"f": flags}, {"f": ~flags}))


class Doubler:
    def infer(self, tensors: dict[str, Any]) -> dict[str, Any]:
        if "boom" in tensors:
            raise ValueError("bad input")
        return {"out": np.asarray(tensors["x"]) * 2}


def test_run_self_tests_names_each_and_catches_failures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensors = {"@tensor_data/x": X, "@tensor_data/y": X * 2, "@tensor_data/z": X * 3}
    tests = [
        SelfTest(
            name="good", inputs={"x": "@tensor_data/x"}, expected_out={"out": "@tensor_data/y"}
        ),
        SelfTest(inputs={"x": "@tensor_data/x"}, expected_out={"out": "@tensor_data/z"}),
        SelfTest(name="raises", inputs={"boom": "@tensor_data/x"}),
        SelfTest(name="no expectation", inputs={"x": "@tensor_data/x"}),
    ]
    results = run_self_tests(Doubler(), tests, tensors.__getitem__)
    assert [r.name for r in results] == ["good", "self_test[1]", "raises", "no expectation"]
    assert [r.passed for r in results] == [True, False, False, True]
    assert "bad input" in str(results[2].problem)
    assert print_report(SelfTestReport("m", results)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pass good"
    assert lines[1].startswith("FAIL self_test[1]: output 'out': values differ")
    assert lines[-1] == "2 passed, 2 failed"
    assert print_report(SelfTestReport("m", ())) == 2
    assert print_report(SelfTestReport("m", (SelfTestResult("a"),))) == 0


def _pack_with(model_dir: Path, output: Path, expected: Any, **extra: Any) -> Path:
    return pack(
        model_dir,
        "python",
        f"={sys.version_info[0]}.{sys.version_info[1]}",
        runner_opts=cast("dict[str, OptionValue]", OPTS),
        output=output,
        self_tests=[{"name": "double", "inputs": {"x": X}, "expected_out": {"out": expected}}],
        **extra,
    )


@pytest.mark.slow
def test_cli_selftest_of_packed_models(model: Path, tmp_path: Path) -> None:  # noqa: F811
    good = _pack_with(model, tmp_path / "good.carton", X * 2)
    done = run_cli("selftest", str(good), "--in-process")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "pass double"

    wrong = _pack_with(model, tmp_path / "wrong.carton", X * 3)
    done = run_cli("selftest", str(wrong), "--in-process")
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0].startswith("FAIL double: output 'out': values differ")

    none = pack(
        model,
        "python",
        f"={sys.version_info[0]}.{sys.version_info[1]}",
        runner_opts=cast("dict[str, OptionValue]", OPTS),
        output=tmp_path / "none.carton",
    )
    done = run_cli("selftest", str(none))
    assert done.returncode == 2
    assert "no self-tests" in done.stdout


def test_selftest_is_exported() -> None:
    import loader
    from loader import selftesting

    assert loader.selftest is selftesting.selftest
