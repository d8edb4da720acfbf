"""One compile worker process: the program it runs, the messages it exchanges, its life.

A worker is ``python -I -S -c WORKER_SOURCE`` run by the interpreter the ``.pyc`` are for:
syntax and stdlib of Python 3.8, stdlib only (``-S``: no site-packages, no ``.pth`` code).
Protocol, one JSON line each way (ASCII): it first says ``[cache_tag, pid]``; then for each
``[[source, display], ...]`` it receives it answers ``[[index, kind, message, errno], ...]``
for the files it could not compile. Paths travel as their bytes read as latin-1
(:func:`wire_path`), so any file name survives whatever the worker's filesystem encoding. Its
real stdout is kept for the protocol, fd 1 goes to stderr so that nothing printed by accident
can corrupt it. SIGINT is the parent's to handle: a worker ends when its stdin does, so it
never outlives the parent for long.

It compiles as ``py_compile.compile`` does (same messages, same invalidation mode, a temp file
renamed into place), but checks that its parent still lives after compiling and before
creating a dir or writing: a worker of a daemon killed with -9 holds batches of a staging
tree that the next daemon's start-up sweep removes, and py_compile's makedirs would create
those dirs again behind it.

:mod:`cas_daemon.compile_pool` schedules batches over many of these; this module only knows
one process and its pipes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

#: One module to compile: (absolute source path, path to show in tracebacks or None, size).
Source = tuple[str, str | None, int]
#: A file the worker could not compile: (its index in the batch, ``"compile"`` or ``"os"``,
#: the message, the errno or 0).
Failure = tuple[int, str, str, int]

# How long a worker may take to exit after its stdin is closed before it is killed.
EXIT_GRACE: Final = 5.0
# How much of a dead worker's stderr an error quotes.
STDERR_TAIL: Final = 2000

WORKER_SOURCE: Final = """\
import json, os, signal, sys, warnings, py_compile
import importlib.machinery, importlib.util
from importlib import _bootstrap_external as external

PARENT = os.getppid()
MODE = py_compile._get_default_invalidation_mode()

def compile_one(source, display):
    loader = importlib.machinery.SourceFileLoader("<py_compile>", source)
    data = loader.get_data(source)
    try:
        code = loader.source_to_code(data, display or source)
    except Exception as exc:
        raise py_compile.PyCompileError(exc.__class__, exc, display or source)
    if os.getppid() != PARENT:
        os._exit(0)  # orphaned: what was asked of it is no one's any more
    cfile = importlib.util.cache_from_source(source)
    if MODE == py_compile.PycInvalidationMode.TIMESTAMP:
        stats = loader.path_stats(source)
        pyc = external._code_to_timestamp_pyc(code, stats["mtime"], stats["size"])
    else:
        checked = MODE == py_compile.PycInvalidationMode.CHECKED_HASH
        pyc = external._code_to_hash_pyc(code, importlib.util.source_hash(data), checked)
    os.makedirs(os.path.dirname(cfile), exist_ok=True)
    external._write_atomic(cfile, pyc, external._calc_mode(source))

def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def say(value):
        out.write(json.dumps(value).encode("ascii") + b"\\n")
        out.flush()

    def path(wire):
        return None if wire is None else os.fsdecode(wire.encode("latin-1"))

    say([sys.implementation.cache_tag, os.getpid()])
    for line in sys.stdin.buffer:
        failed = []
        for index, (source, display) in enumerate(json.loads(line.decode("ascii"))):
            try:
                compile_one(path(source), path(display))
            except py_compile.PyCompileError as exc:
                failed.append([index, "compile", exc.msg[-1000:], 0])
            except OSError as exc:
                failed.append([index, "os", str(exc)[-1000:], exc.errno or 0])
            except Exception as exc:
                failed.append([index, "compile", repr(exc)[-1000:], 0])
        say(failed)

main()
"""


class ProtocolError(Exception):
    """The worker's pipes broke or it answered nonsense."""


def wire_path(path: str) -> str:
    """``path`` as it travels to a worker: its bytes read as latin-1 (any name survives)."""
    return os.fsencode(path).decode("latin-1")


def encode_batch(sources: Sequence[Source]) -> bytes:
    """The line that asks a worker to compile ``sources``."""
    wire = [
        [wire_path(path), None if shown is None else wire_path(shown)] for path, shown, _ in sources
    ]
    return json.dumps(wire).encode("ascii") + b"\n"


def parse_failures(answer: object, batch_size: int) -> list[Failure]:
    """A worker's answer to a batch of ``batch_size`` files, checked whole.

    Raises :class:`ProtocolError` for anything but a list of ``[index, kind, message,
    errno]`` whose indexes name files of the batch.
    """
    if not isinstance(answer, list):
        raise ProtocolError(f"not a list: {answer!r:.200}")
    try:
        failures = [(int(i), str(kind), str(msg), int(code)) for i, kind, msg, code in answer]
    except (TypeError, ValueError):
        raise ProtocolError(f"not a list of failures: {answer!r:.200}") from None
    if not all(0 <= failure[0] < batch_size for failure in failures):
        raise ProtocolError(f"an index outside the batch of {batch_size}: {answer!r:.200}")
    return failures


def is_partial_write(name: str) -> bool:
    """Whether a ``__pycache__`` entry is a write a killed worker left half done.

    ``py_compile`` writes ``x.pyc.{number}`` and renames it to ``x.pyc``; a worker killed in
    between leaves the first behind.
    """
    stem, dot, suffix = name.rpartition(".")
    return bool(dot) and stem.endswith(".pyc") and suffix.isdigit()


def remove_partial_writes(site_dir: Path) -> None:
    """Delete every half-done write under ``site_dir`` (:func:`is_partial_write`): its file
    was compiled again by another worker."""
    for root, _dirs, files in os.walk(site_dir):
        if Path(root).name == "__pycache__":
            for name in files:
                if is_partial_write(name):
                    Path(root, name).unlink(missing_ok=True)


class WorkerProcess:
    """One worker process and its pipes; only one thread may talk to it at a time."""

    __slots__ = ("proc", "started", "stderr", "stdin", "stdout")

    def __init__(self, proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise TypeError("a worker needs pipes to and from it")
        self.proc = proc
        self.stdin: IO[bytes] = proc.stdin
        self.stdout: IO[bytes] = proc.stdout
        self.stderr = stderr  # an unlinked temp file: a pipe could fill up and block it
        self.started = False  # has said hello: the interpreter runs

    @classmethod
    def start(cls, python: str) -> WorkerProcess:
        """Run a worker of ``python``; OSError if it cannot be started."""
        stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed when the worker is reaped)
        try:
            proc = subprocess.Popen(
                [python, "-I", "-S", "-c", WORKER_SOURCE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        except BaseException:
            stderr.close()
            raise
        return cls(proc, stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, payload: bytes) -> None:
        try:
            self.stdin.write(payload)
            self.stdin.flush()
        except (OSError, ValueError):
            raise ProtocolError("its stdin is closed") from None

    def read_answer(self) -> list[object]:
        """The worker's next line: its hello first (the caller then sets ``started``), then
        one answer per batch, in the order sent. Raises :class:`ProtocolError` at EOF or for
        nonsense."""
        try:
            line = self.stdout.readline()
            answer = json.loads(line) if line else None
        except (OSError, ValueError):
            raise ProtocolError("its stdout broke or held no JSON") from None
        if not isinstance(answer, list):
            raise ProtocolError("it ended, or said something other than a list")
        return answer

    def kill(self) -> None:
        """SIGKILL, whatever it is doing; :meth:`reap` still has to follow."""
        self.proc.kill()

    def read_hello_of_dead(self) -> None:
        """Did this worker start before it died? A worker that never got work is not asked.

        Its stdin is closed and it is killed first, so the read ends at once: its hello, or
        EOF if it never ran (or, for a wrapper script that runs Python as its child rather
        than exec'ing it, when that child has seen EOF too).
        """
        with contextlib.suppress(OSError):
            self.stdin.close()
        self.proc.kill()
        with contextlib.suppress(OSError, ValueError):
            line = self.stdout.readline()
            self.started = isinstance(json.loads(line), list) if line else False

    def reap(self, *, graceful: bool) -> tuple[str, str]:
        """Stop the process and release its pipes: (how it ended, its stderr tail)."""
        proc = self.proc
        with contextlib.suppress(OSError):
            self.stdin.close()  # a graceful worker ends at EOF
        if not graceful:
            proc.kill()  # whatever state it is in, it is of no more use
        try:
            proc.wait(EXIT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.stdout.close()
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - STDERR_TAIL))
            said = self.stderr.read().decode("utf-8", "replace").strip()
        except OSError:
            said = ""
        finally:
            self.stderr.close()
        code = proc.returncode
        if code is not None and code < 0:
            try:
                status = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                status = f"killed by signal {-code}"
        else:
            status = f"exit status {code}"
        return status, said

    def forget_in_fork_child(self) -> None:
        """Close this process's copies of the pipes in a forked child, touching nothing else:
        the worker ends when its stdin does, which needs every copy of the write end closed."""
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError, ValueError):
                os.close(stream.fileno())
