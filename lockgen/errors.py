"""The error hierarchy every wheelcas package raises from.

Each error says what is wrong *and* what to do about it; the CLI prints ``str(error)`` on one
line and exits with ``exit_code``. The base lives here because lockgen is the bottom layer:
``cas_daemon`` and ``loader`` both depend on it, never the other way round.
"""

from __future__ import annotations


class WheelcasError(Exception):
    """Base class: an expected failure with a message fit for the user."""

    exit_code: int = 2


class LockfileError(WheelcasError):
    """A lockfile that does not parse or does not follow Carton's format."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"{path}: {problem}. Fix the file, or delete it and run `wheelcas lock` to "
            "regenerate it."
        )


class RequirementsError(WheelcasError):
    """The model dir has no usable requirements.txt."""


class PipError(WheelcasError):
    """pip failed while resolving or building; carries pip's own error output."""

    def __init__(self, action: str, returncode: int, output: str) -> None:
        self.action = action
        self.returncode = returncode
        self.output = output
        tail = output.strip() or "(pip printed nothing)"
        super().__init__(
            f"{action} failed (pip exit status {returncode}); the previous lockfile was kept. "
            f"pip said:\n{tail}"
        )


class PipReportError(WheelcasError):
    """pip's installation report is not one we understand."""


class BundleError(WheelcasError):
    """A bundled wheel that is missing, unreadable or does not match its lock entry."""


class InterpreterError(WheelcasError):
    """A Python interpreter that cannot be run or does not satisfy a model's range."""
