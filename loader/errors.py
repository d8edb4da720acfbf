"""Errors raised while loading or running a model."""

from __future__ import annotations

from lockgen.errors import WheelcasError


class ModelConfigError(WheelcasError):
    """Runner options or arguments that are missing, unknown or of the wrong type."""


class EntrypointError(WheelcasError):
    """The entrypoint module or function cannot be found, or returns no usable model."""


class MissingBundleError(WheelcasError):
    """A wheel the lockfile says is bundled is not in the model dir."""


class ModelError(WheelcasError):
    """An exception raised by the model's own code; carries its traceback text."""

    exit_code = 1

    def __init__(self, what: str, traceback_text: str) -> None:
        self.what = what
        self.traceback_text = traceback_text
        super().__init__(f"{what} raised an exception:\n{traceback_text.rstrip()}")
