"""A loaded model: the entrypoint imported and called, and inference through its object.

``infer_with_tensors`` may return a dict, a coroutine of a dict, or an (async) generator of
dicts (streaming). ``infer`` returns the last dict a generator yields, as Carton does;
``infer_stream`` yields each one. numpy is never imported here: tensors pass through as given.
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader.errors import EntrypointError, ModelConfigError, ModelError
from loader.options import OptionValue, RunnerOptions

if TYPE_CHECKING:
    import asyncio


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    model_dir: Path
    runner_name: str
    required_framework_version: str
    runner_opts: Mapping[str, OptionValue]
    python_version: str
    sys_path_entries: tuple[str, ...] = field(default=())


def _import_entrypoint_module(code_dir: Path, package: str) -> Any:
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name and (package == exc.name or package.startswith(exc.name + ".")):
            relative = package.replace(".", "/")
            raise EntrypointError(
                f"entrypoint_package `{package}` not found in {code_dir}: expected "
                f"{relative}.py or {relative}/__init__.py there."
            ) from None
        raise ModelError(f"importing `{package}`", traceback.format_exc()) from exc
    except Exception as exc:
        raise ModelError(f"importing `{package}`", traceback.format_exc()) from exc
    origin = getattr(module, "__file__", None)
    if origin and not Path(origin).resolve().is_relative_to(code_dir.resolve()):
        raise EntrypointError(
            f"`{package}` was imported from {origin}, not from the model dir {code_dir}: a "
            "module of that name was already loaded in this process. Rename the model's "
            "module, or load the model in a process of its own."
        )
    return module


def instantiate(code_dir: Path, options: RunnerOptions) -> Any:
    """Import the entrypoint relative to ``code_dir`` and call it with the ``model.`` options."""
    module = _import_entrypoint_module(code_dir, options.entrypoint_package)
    function = getattr(module, options.entrypoint_fn, None)
    if not callable(function):
        raise EntrypointError(
            f"`{options.entrypoint_package}` has no function `{options.entrypoint_fn}`; set "
            "entrypoint_fn to the function that returns the model."
        )
    kwargs = dict(options.model_kwargs)
    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(f"model.{k}" for k in kwargs) or "none"
        raise ModelConfigError(
            f"`{options.entrypoint_package}.{options.entrypoint_fn}` cannot be called with the "
            f"given model options ({given}): {exc}. Pass each parameter as an option "
            "`model.NAME` (CLI: --opt model.NAME=VALUE)."
        ) from None
    try:
        model = function(**kwargs)
    except Exception as exc:
        raise ModelError(f"the entrypoint {options.entrypoint_fn}", traceback.format_exc()) from exc
    if not callable(getattr(model, "infer_with_tensors", None)):
        raise EntrypointError(
            f"`{options.entrypoint_fn}` returned {type(model).__name__}, which has no "
            "infer_with_tensors method; return an object that has one."
        )
    return model


def _check_outputs(outputs: object) -> dict[str, Any]:
    if not isinstance(outputs, Mapping):
        raise EntrypointError(
            f"infer_with_tensors returned {type(outputs).__name__}; it must return (or yield) "
            "a dict of tensors."
        )
    return dict(outputs)


class Model:
    """A model running in this process."""

    def __init__(self, instance: Any, info: ModelInfo) -> None:
        self._instance = instance
        self.info = info
        self._loop: asyncio.AbstractEventLoop | None = None

    def _run(self, awaitable: Any) -> Any:
        if self._loop is None:
            import asyncio  # ~30 ms, and ssl with it: only for models that are async

            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def infer_stream(self, tensors: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """Each dict the model yields; a non-streaming model yields its one result."""
        try:
            result = self._instance.infer_with_tensors(dict(tensors))
            if inspect.isawaitable(result):
                result = self._run(result)
            if inspect.isasyncgen(result):
                while True:
                    try:
                        item = self._run(result.__anext__())
                    except StopAsyncIteration:
                        return
                    yield _check_outputs(item)
            elif inspect.isgenerator(result):
                for item in result:
                    yield _check_outputs(item)
            else:
                yield _check_outputs(result)
        except (EntrypointError, GeneratorExit):
            raise
        except Exception as exc:
            raise ModelError("infer_with_tensors", traceback.format_exc()) from exc

    def infer(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The model's outputs; for a streaming model, the last dict it yields."""
        last: dict[str, Any] | None = None
        for last in self.infer_stream(tensors):  # noqa: B007 - only the last one is kept
            pass
        if last is None:
            raise EntrypointError("infer_with_tensors yielded nothing; yield at least one dict.")
        return last

    def close(self) -> None:
        """Release the event loop that drives async models (also done when collected)."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
