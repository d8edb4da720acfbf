"""The parent's side of a model worker: spawn it, talk to it, and the handle users hold.

A worker is ``python -I -S loader/_bootstrap.py FD`` in the interpreter the model asked for,
connected by a unix socketpair (framing and tensors: :mod:`loader.tensors`). Its first
message from the parent is the plan: ``sys.path`` entries, ``.pth`` import lines, the
entrypoint and its keyword arguments. Then each ``infer`` is one request and a stream of
``item`` replies ended by ``done`` or ``error``.

No worker outlives its handle: closing the handle closes the socket, and the worker exits
when it reads end-of-file; it is killed if it does not within a grace period, and an
``atexit`` hook closes every live handle. A worker whose parent is killed outright exits at
its next read (its socket then reads end-of-file). ``PR_SET_PDEATHSIG`` is not used: it fires
when the *thread* that spawned the worker ends, which would kill workers loaded from a
short-lived thread.

The worker runs in its own session so that a Ctrl-C at the terminal reaches the parent,
which then closes its workers, rather than killing models mid-call with a traceback.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from loader import tensors as wire
from loader.errors import EntrypointError, ModelConfigError, ModelError
from loader.model import Model, ModelInfo
from loader.options import RunnerOptions
from loader.syspath import SysPathPlan
from lockgen.errors import WheelcasError

BOOTSTRAP = Path(__file__).with_name("_bootstrap.py")
STDERR_LINES = 40  # how much of a dead worker's stderr its error shows
CLOSE_GRACE_S = 5.0
#: PYTHON* variables a worker keeps: they change no import path.
_KEPT_PYTHON_VARS = frozenset(
    {"PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS"}
)


class WorkerDiedError(WheelcasError):
    """The model's worker process ended while the parent waited for it."""

    def __init__(self, message: str, *, returncode: int | None, stderr_tail: str) -> None:
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        super().__init__(message)


# --- pure ----------------------------------------------------------------------------------


def worker_environment(
    base: Mapping[str, str], entries: Sequence[str], cuda_visible_devices: str | None
) -> dict[str, str]:
    """The worker's environment: ``base`` without import-path variables, plus its own.

    ``PYTHONPATH`` holds the model's entries so that its child processes (``subprocess``,
    multiprocessing) import the same packages; the worker itself ignores it (``-I``).
    """
    env = {
        key: value
        for key, value in base.items()
        if not key.startswith("PYTHON") or key in _KEPT_PYTHON_VARS
    }
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["PYTHONNOUSERSITE"] = "1"
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


def describe_exit(returncode: int | None) -> str:
    """``exited with status 3``, ``was killed by signal SIGKILL (9)``."""
    if returncode is None:
        return "closed its connection but is still running (it was killed)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        hint = " (SIGKILL: often the out-of-memory killer)" if -returncode == signal.SIGKILL else ""
        return f"was killed by signal {name} ({-returncode}){hint}"
    return f"exited with status {returncode}"


def error_from_reply(reply: Mapping[str, Any]) -> WheelcasError:
    """The exception a worker's ``error`` reply stands for."""
    kind, message = reply.get("kind"), str(reply.get("message", ""))
    if kind == "model":
        return ModelError(str(reply.get("what", "the model")), str(reply.get("tb", "")))
    if kind == "config":
        return ModelConfigError(message)
    if kind == "entrypoint":
        return EntrypointError(message)
    return WheelcasError(f"the model's worker answered something unexpected: {message}")


def init_message(code_dir: Path, plan: SysPathPlan, options: RunnerOptions) -> dict[str, Any]:
    return {
        "op": "init",
        "code_dir": str(code_dir),
        "entries": list(plan.entries),
        "pth_imports": [list(pair) for pair in plan.pth_imports],
        "package": options.entrypoint_package,
        "function": options.entrypoint_fn,
        "kwargs": dict(options.model_kwargs),
    }


# --- the process ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything needed to start (and restart) a model's worker."""

    python: str
    code_dir: Path
    plan: SysPathPlan
    options: RunnerOptions
    env: Mapping[str, str] = field(default_factory=dict)


class _StderrTail:
    """Passes the worker's stderr through to ours and keeps its last lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, name="wheelcas-worker-stderr")
        self._thread.daemon = True
        self._thread.start()

    def _pump(self) -> None:
        with self._stream:
            for raw in self._stream:
                line = raw.decode("utf-8", "replace")
                self.lines.append(line.rstrip("\n"))
                with contextlib.suppress(Exception):  # our stderr may be gone at exit
                    sys.stderr.write(line)
                    sys.stderr.flush()

    def text(self, timeout: float = 2.0) -> str:
        self._thread.join(timeout)  # the last lines arrive when the worker's stderr closes
        return "\n".join(self.lines)


_live: weakref.WeakSet[Worker] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for worker in list(_live):
        worker.close(grace=0.5)


class Worker:
    """One running worker process and its socket."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        parent, child = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [spec.python, "-I", "-S", str(BOOTSTRAP), str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=dict(spec.env),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # else the parent would never read end-of-file when the worker dies
        assert self.process.stderr is not None  # noqa: S101 - stderr=PIPE above
        self._stderr = _StderrTail(self.process.stderr)
        self._sock: socket.socket | None = parent
        self._shm = wire.shm_available()
        self.version = ""
        _live.add(self)
        try:
            reply, _ = self.exchange_one(init_message(spec.code_dir, spec.plan, spec.options))
            if reply.get("op") == "error":
                raise error_from_reply(reply)
            self.version = str(reply.get("version", "")).split()[0]
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self._sock is not None

    def exchange_one(self, header: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        for reply in self.exchange(header, None):
            return reply
        raise self._died()  # pragma: no cover - exchange raises when nothing comes

    def exchange(
        self, header: Mapping[str, Any], tensors: Mapping[str, Any] | None
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Send one request; each reply until (and including) ``done``, ``error`` or ``ready``.

        Raises :class:`WorkerDiedError` if the worker ends first.
        """
        if self._sock is None:
            raise self._gone()
        sent: list[str] = []

        def write_large(array: Any) -> str:
            path = wire.write_shm(array)
            sent.append(path)
            return path

        try:
            parts = wire.encode_message(
                header, tensors, write_large=write_large if self._shm else None
            )
            try:
                wire.write_frame(self._sock, parts)
            except OSError:
                raise self._died() from None
            while True:
                try:
                    frame = wire.read_frame(self._sock)
                except OSError:
                    frame = None
                if frame is None:
                    raise self._died()
                reply = wire.decode_message(frame)
                yield reply
                if reply[0].get("op") != "item":
                    return
        finally:
            for path in sent:  # the worker unlinks what it maps; this is for when it did not
                wire.unlink_quietly(path)

    def _died(self) -> WorkerDiedError:
        """Reap the worker after its connection ended; the error that tells why."""
        self._close_socket()
        try:
            returncode: int | None = self.process.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            returncode = None
        self._remove_files()
        tail = self._stderr.text()
        shown = "\n".join(f"  | {line}" for line in tail.splitlines()) or "  (nothing)"
        return WorkerDiedError(
            f"the model's worker (pid {self.pid}, {self.spec.python}) {describe_exit(returncode)}."
            f" The last lines of its stderr:\n{shown}\nReload the model (model.reload()) or load "
            "it again.",
            returncode=returncode,
            stderr_tail=tail,
        )

    def _gone(self) -> WorkerDiedError:
        status = describe_exit(self.process.returncode)
        return WorkerDiedError(
            f"the model's worker (pid {self.pid}) is no longer running (it {status}); reload "
            "the model (model.reload()) or load it again.",
            returncode=self.process.returncode,
            stderr_tail="\n".join(self._stderr.lines),
        )

    def _remove_files(self) -> None:
        """Shared-memory files a dead worker wrote and nobody read."""
        if not self._shm:
            return
        prefix = f"{wire.SHM_PREFIX}{self.pid}-"
        with contextlib.suppress(OSError):
            for name in os.listdir(wire.SHM_DIR):  # noqa: PTH208 - names, not paths
                if name.startswith(prefix):
                    wire.unlink_quietly(os.path.join(wire.SHM_DIR, name))  # noqa: PTH118

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def close(self, grace: float = CLOSE_GRACE_S) -> None:
        """Close the connection; the worker exits on end-of-file, or is killed after ``grace``."""
        self._close_socket()
        if self.process.returncode is None:
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._remove_files()
        self._stderr.text(timeout=1.0)
        _live.discard(self)


# --- the handle ----------------------------------------------------------------------------


class IsolatedModel(Model):
    """A model running in a worker process; the same calls as :class:`loader.model.Model`.

    A subclass so that ``load_unpacked`` keeps returning a ``Model`` whichever way it runs.

    Not for concurrent use from several threads at once: calls are serialized by a lock, and
    a call made while a stream of the same thread is still open is refused.
    """

    def __init__(self, spec: WorkerSpec, info: ModelInfo) -> None:
        super().__init__(None, info)
        self._spec = spec
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._worker: Worker | None = Worker(spec)
        self.info = replace(info, python_version=self._worker.version or info.python_version)

    @property
    def pid(self) -> int | None:
        """The worker's process id; None after :meth:`close`."""
        return None if self._worker is None else self._worker.pid

    def reload(self) -> None:
        """Start a fresh worker (after a crash, say); the old one is closed first."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
            self._worker = None
            self._worker = Worker(self._spec)

    def infer_stream(self, tensors: Mapping[str, Any]) -> Generator[dict[str, Any], None, None]:
        """Each dict the model yields, as the worker sends it."""
        if self._owner == threading.get_ident():
            raise WheelcasError(
                "this model is still streaming results to this thread; finish (or close) "
                "that stream before the next call."
            )
        with self._lock:
            self._owner = threading.get_ident()
            try:
                if self._worker is None:
                    raise WheelcasError("the model is closed; load it again.")
                replies = self._worker.exchange({"op": "infer"}, tensors)
                try:
                    for header, outputs in replies:
                        op = header.get("op")
                        if op == "item":
                            yield outputs
                        elif op == "error":
                            raise error_from_reply(header)
                finally:
                    # A stream abandoned early: read the rest so the next call starts clean.
                    for _ in replies:
                        pass
            finally:
                self._owner = None

    def infer(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The model's outputs; for a streaming model, the last dict it yields."""
        last: dict[str, Any] | None = None
        for last in self.infer_stream(tensors):  # noqa: B007 - only the last one is kept
            pass
        if last is None:
            raise EntrypointError("infer_with_tensors yielded nothing; yield at least one dict.")
        return last

    def close(self) -> None:
        """Stop the worker and wait for it to exit."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def __enter__(self) -> IsolatedModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
