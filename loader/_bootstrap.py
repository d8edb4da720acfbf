"""The worker's side: run as ``python -I -S .../loader/_bootstrap.py FD``, never imported.

It runs in the interpreter the model asked for, isolated: ``-I`` drops ``PYTHONPATH``, the
user site and the current dir; ``-S`` drops the interpreter's own site-packages. So its
``sys.path`` is only the entries the parent sends (code dir, then the lock's package dirs),
then the interpreter's stdlib. It imports no module named ``loader``, ``lockgen`` or
``cas_daemon`` (a model may have its own), only the standard library, ``loader/tensors.py``
loaded by path under a private name, and numpy from the model's own packages.

The small pieces of ``loader.syspath`` (``.pth`` import lines) and ``loader.model`` (the
entrypoint checks) are repeated here for that reason. Errors go back to the parent as
``{"op": "error", "kind": "model" | "entrypoint" | "config", ...}``; the parent raises its
own exception classes.

Every module imported here is imported before the model's code dir is on ``sys.path``, so a
model module of the same name (``json``, ``socket``) cannot be imported by the model; those
imports are therefore kept few, and the heavier ones (``inspect``, ``traceback``,
``asyncio``) are taken only when needed. Keeps to Python 3.8 syntax (see tensors.py).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # noqa: PTH100, PTH120 - no pathlib import
# Before 3.11, -I still puts the script's dir first; loader/'s modules must not shadow the
# model's (an `errors` or `options` module of its own, say).
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:  # noqa: PTH100
    del sys.path[0]

import importlib  # noqa: E402 - after the sys.path fix above
import importlib.util  # noqa: E402
import socket  # noqa: E402
from typing import Any  # noqa: E402


class _Failure(Exception):
    def __init__(self, kind: str, message: str = "", what: str = "", tb: str = "") -> None:
        super().__init__(message)
        self.reply = {"op": "error", "kind": kind, "message": message, "what": what, "tb": tb}


def _traceback() -> str:
    import traceback

    return traceback.format_exc()


def _load_wire() -> Any:
    """``loader/tensors.py``, under a name no model uses."""
    spec = importlib.util.spec_from_file_location(
        "_wheelcas_tensors",
        os.path.join(_HERE, "tensors.py"),  # noqa: PTH118
    )
    if spec is None or spec.loader is None:
        raise ImportError("cannot load the worker's tensor code")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _apply_plan(entries: list[str], pth_imports: list[list[str]]) -> None:
    for entry in entries:
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path[0:0] = entries
    for pth, line in pth_imports:
        try:
            exec(line, {"__name__": "__wheelcas_pth__", "__file__": pth})  # noqa: S102 - .pth
        except Exception as exc:  # site.py reports and goes on; so do we
            print(f"wheelcas: error in {pth}: {line!r}: {exc!r}", file=sys.stderr)


def _instantiate(code_dir: str, package: str, function_name: str, kwargs: dict[str, Any]) -> Any:
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name and (package == exc.name or package.startswith(exc.name + ".")):
            relative = package.replace(".", "/")
            raise _Failure(
                "entrypoint",
                f"entrypoint_package `{package}` not found in {code_dir}: expected "
                f"{relative}.py or {relative}/__init__.py there.",
            ) from None
        raise _Failure("model", what=f"importing `{package}`", tb=_traceback()) from None
    except Exception:
        raise _Failure("model", what=f"importing `{package}`", tb=_traceback()) from None
    origin = getattr(module, "__file__", None) or ""
    real_code_dir = os.path.realpath(code_dir)
    if origin and not os.path.realpath(origin).startswith(real_code_dir + os.sep):
        raise _Failure(
            "entrypoint",
            f"`{package}` was imported from {origin}, not from the model dir {code_dir}: the "
            "model's worker had already imported a standard module of that name. Rename the "
            "model's module.",
        )
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _Failure(
            "entrypoint",
            f"`{package}` has no function `{function_name}`; set entrypoint_fn to the function "
            "that returns the model.",
        )
    import inspect

    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as exc:
        given = ", ".join(f"model.{k}" for k in kwargs) or "none"
        raise _Failure(
            "config",
            f"`{package}.{function_name}` cannot be called with the given model options "
            f"({given}): {exc}. Pass each parameter as an option `model.NAME` (CLI: --opt "
            "model.NAME=VALUE).",
        ) from None
    except ValueError:  # no signature (a builtin): let the call decide
        pass
    try:
        model = function(**kwargs)
    except Exception:
        raise _Failure("model", what=f"the entrypoint {function_name}", tb=_traceback()) from None
    if not callable(getattr(model, "infer_with_tensors", None)):
        raise _Failure(
            "entrypoint",
            f"`{function_name}` returned {type(model).__name__}, which has no "
            "infer_with_tensors method; return an object that has one.",
        )
    return model


class _Worker:
    def __init__(self, sock: socket.socket, wire: Any) -> None:
        self.sock = sock
        self.wire = wire
        self.shm = wire.shm_available()
        self.created: list[str] = []  # our shared-memory files the parent may not have read
        self.loop: Any = None

    def send(self, header: dict[str, Any], tensors: Any = None) -> None:
        writer = self._write_large if self.shm else None
        try:
            parts = self.wire.encode_message(header, tensors, write_large=writer)
        except self.wire.TensorError as exc:
            raise _Failure("entrypoint", f"the model's outputs: {exc}") from None
        self.wire.write_frame(self.sock, parts)

    def _write_large(self, array: Any) -> str:
        path: str = self.wire.write_shm(array)
        self.created.append(path)
        return path

    def forget_files(self) -> None:
        """Unlink the files of earlier replies: the parent has read (and unlinked) them."""
        for path in self.created:
            self.wire.unlink_quietly(path)
        del self.created[:]

    def run(self, awaitable: Any) -> Any:
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(awaitable)

    def send_item(self, item: Any) -> None:
        if not isinstance(item, dict):
            raise _Failure(
                "entrypoint",
                f"infer_with_tensors returned {type(item).__name__}; it must return (or "
                "yield) a dict of tensors.",
            )
        self.send({"op": "item"}, item)

    def infer(self, instance: Any, tensors: dict[str, Any]) -> None:
        import inspect

        try:
            result = instance.infer_with_tensors(tensors)
            if inspect.isawaitable(result):
                result = self.run(result)
            if inspect.isasyncgen(result):
                while True:
                    try:
                        item = self.run(result.__anext__())
                    except StopAsyncIteration:
                        break
                    self.send_item(item)
            elif inspect.isgenerator(result):
                for item in result:
                    self.send_item(item)
            else:
                self.send_item(result)
        except _Failure as failure:
            self.send(failure.reply)
            return
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:
            self.send(
                {"op": "error", "kind": "model", "what": "infer_with_tensors", "tb": _traceback()}
            )
            return
        self.send({"op": "done"})

    def serve(self, instance: Any) -> None:
        while True:
            frame = self.wire.read_frame(self.sock)
            if frame is None:  # the parent closed its end, or exited
                return
            self.forget_files()
            try:
                header, tensors = self.wire.decode_message(frame)
            except self.wire.TensorError as exc:
                self.send({"op": "error", "kind": "entrypoint", "message": str(exc)})
                continue
            if header.get("op") == "infer":
                self.infer(instance, tensors)
            else:
                self.send({"op": "error", "kind": "protocol", "message": f"unknown {header!r}"})


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    wire = _load_wire()
    worker = _Worker(sock, wire)
    try:
        frame = wire.read_frame(sock)
        if frame is None:
            return 0
        init, _ = wire.decode_message(frame)
        _apply_plan(init["entries"], init["pth_imports"])
        try:
            instance = _instantiate(
                init["code_dir"], init["package"], init["function"], init["kwargs"]
            )
        except _Failure as failure:
            worker.send(failure.reply)
            return 0
        worker.send({"op": "ready", "version": sys.version, "executable": sys.executable})
        worker.serve(instance)
    except (BrokenPipeError, ConnectionResetError):  # the parent went away: nothing to answer
        pass
    finally:
        worker.forget_files()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
