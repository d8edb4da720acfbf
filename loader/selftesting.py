"""Running a packed model's ``[[self_test]]`` entries: ``wheelcas selftest MODEL``.

Each self-test feeds its ``inputs`` to the model and compares the outputs it names in
``expected_out`` (outputs it does not name are not checked; a test without ``expected_out``
passes when inference does not fail). Shape and dtype must match exactly; values must be
equal, except floating-point (and complex) ones, which pass ``numpy.allclose`` with
``rtol=FLOAT_RTOL``, ``atol=FLOAT_ATOL`` and NaN equal to NaN.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.manifest import SelfTest
from lockgen.errors import WheelcasError

#: Relative and absolute tolerance for floating-point outputs (``numpy.allclose``).
FLOAT_RTOL = 1e-5
FLOAT_ATOL = 1e-8


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    """One self-test: ``problem`` is None when it passed, else why it failed."""

    name: str
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class SelfTestReport:
    model: str
    results: tuple[SelfTestResult, ...]

    @property
    def passed(self) -> bool:
        """Every self-test passed (and there is at least one)."""
        return bool(self.results) and all(r.passed for r in self.results)


def compare_outputs(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> str | None:
    """None when ``actual`` matches ``expected`` (see the module doc), else the first
    difference, naming the output (in ``expected``'s order)."""
    import numpy as np

    for name, want in expected.items():
        if name not in actual:
            return f"output {name!r} is missing (the model returned: {', '.join(actual) or '-'})"
        want_array = np.asarray(want)
        got = np.asarray(actual[name])
        if got.dtype != want_array.dtype:
            return f"output {name!r}: dtype {got.dtype}, expected {want_array.dtype}"
        if got.shape != want_array.shape:
            return f"output {name!r}: shape {got.shape}, expected {want_array.shape}"
        if want_array.dtype.kind in "fc":
            same = bool(
                np.allclose(got, want_array, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True)
            )
        else:
            same = bool(np.array_equal(got, want_array))
        if not same:
            return f"output {name!r}: values differ from the expected ones"
    return None


def run_self_tests(
    model: Any, tests: Iterable[SelfTest], tensor: Callable[[str], Any]
) -> tuple[SelfTestResult, ...]:
    """Run ``tests`` (``SelfTest`` values) on a loaded ``model``; ``tensor`` reads a reference."""
    results: list[SelfTestResult] = []
    for i, test in enumerate(tests):
        name = test.name or f"self_test[{i}]"
        try:
            inputs = {k: tensor(ref) for k, ref in test.inputs.items()}
            expected = {k: tensor(ref) for k, ref in (test.expected_out or {}).items()}
            outputs = model.infer(inputs)
        except (WheelcasError, TypeError, ValueError) as exc:
            results.append(SelfTestResult(name, f"inference failed: {exc}"))
            continue
        results.append(SelfTestResult(name, compare_outputs(expected, outputs)))
    return tuple(results)


def selftest(path: str | os.PathLike[str], **load_options: Any) -> SelfTestReport:
    """Load the packed model at ``path`` and run its self-tests; ``load_options`` go to
    :func:`loader.load` (e.g. ``isolated=False``). The model is loaded before the test
    tensors are read, so that an in-process model imports its own numpy first."""
    from loader.packing import get_model_info, load, load_tensor

    model_path = Path(path)
    info = get_model_info(model_path)
    tests = info.self_tests or ()
    if not tests:
        return SelfTestReport(str(model_path), ())
    model = load(model_path, **load_options)
    try:
        results = run_self_tests(model, tests, lambda ref: load_tensor(model_path, ref))
    finally:
        model.close()
    return SelfTestReport(str(model_path), results)


def print_report(report: SelfTestReport) -> int:
    """One line per self-test; the exit status: 0 all passed, 1 one failed, 2 none."""
    if not report.results:
        print(f"{report.model}: no self-tests ([[self_test]] in carton.toml)")
        return 2
    for result in report.results:
        print(f"{'pass' if result.passed else 'FAIL'} {result.name}", end="")
        print("" if result.passed else f": {result.problem}")
    failed = sum(not r.passed for r in report.results)
    print(f"{len(report.results) - failed} passed, {failed} failed")
    return 1 if failed else 0
