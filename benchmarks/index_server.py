"""The R40 mirror served as a PEP 503 simple index on loopback, in a process of its own.

The server runs in a child process so that serving wheels never competes for this process's
GIL with whatever is being measured. The child uses the test suite's
``tests.support.index.PackageIndex`` when it exists (one index implementation for tests and
benchmarks) and :class:`SimpleIndex` below otherwise.

Protocol with the parent: the child prints one JSON line
(``{"simple_url", "file_urls", "implementation"}``), then serves until its stdin is closed.

Run by hand: ``python -m benchmarks.index_server DIR`` (add ``--own`` to skip PackageIndex).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import importlib
import inspect
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from packaging.utils import canonicalize_name, parse_wheel_filename

from benchmarks.procs import REPO_ROOT, isolated_env

_FILES_DIR = web.AppKey("files_dir", Path)
_PROJECTS = web.AppKey("projects", dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _projects(files_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Normalized project name -> [(wheel filename, sha256)]."""
    projects: dict[str, list[tuple[str, str]]] = {}
    for wheel in sorted(files_dir.glob("*.whl")):
        name = canonicalize_name(str(parse_wheel_filename(wheel.name)[0]))
        projects.setdefault(name, []).append((wheel.name, _sha256(wheel)))
    return projects


def _page(title: str, links: str) -> web.Response:
    body = (
        '<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
        f"<title>{html.escape(title)}</title></head><body>\n{links}</body></html>\n"
    )
    return web.Response(text=body, content_type="text/html")


async def _root(request: web.Request) -> web.Response:
    projects: dict[str, list[tuple[str, str]]] = request.app[_PROJECTS]
    links = "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(projects))
    return _page("Simple index", links)


async def _project(request: web.Request) -> web.StreamResponse:
    projects: dict[str, list[tuple[str, str]]] = request.app[_PROJECTS]
    wanted = canonicalize_name(request.match_info["project"])
    if wanted != request.match_info["project"]:
        raise web.HTTPMovedPermanently(f"/simple/{wanted}/")
    files = projects.get(wanted)
    if files is None:
        raise web.HTTPNotFound()
    links = "".join(
        f'<a href="/files/{html.escape(fn)}#sha256={sha}">{html.escape(fn)}</a>\n'
        for fn, sha in files
    )
    return _page(f"Links for {wanted}", links)


async def _file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["filename"]
    path = request.app[_FILES_DIR] / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path)


class SimpleIndex:
    """A minimal PEP 503 index over a folder of wheels, served by aiohttp on 127.0.0.1."""

    def __init__(self, files_dir: Path) -> None:
        self._files_dir = files_dir
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def simple_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/simple/"

    def file_url(self, filename: str) -> str:
        return f"http://127.0.0.1:{self._port}/files/{filename}"

    async def start(self) -> None:
        app = web.Application()
        app[_FILES_DIR] = self._files_dir
        app[_PROJECTS] = _projects(self._files_dir)
        app.router.add_get("/simple/", _root)
        app.router.add_get("/simple/{project}/", _project)
        app.router.add_get("/files/{filename}", _file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _load_shared_index() -> Callable[[Path], Any] | None:
    """``tests.support.index.PackageIndex`` when the test suite provides it."""
    try:
        module = importlib.import_module("tests.support.index")
    except ImportError:
        return None
    factory = getattr(module, "PackageIndex", None)
    return factory if callable(factory) else None


class _LoopThread:
    """An event loop in a daemon thread, for indexes whose start/stop are coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` on the loop's thread; await its result there if it is awaitable."""

        async def invoke() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def serve(files_dir: Path, *, own: bool) -> None:
    """Child process main: start an index, announce it on stdout, serve until stdin closes."""
    factory = None if own else _load_shared_index()
    index: Any = SimpleIndex(files_dir) if factory is None else factory(files_dir)
    module = type(index).__module__
    module = "benchmarks.index_server" if module == "__main__" else module
    implementation = f"{module}.{type(index).__qualname__}"
    loop = _LoopThread()
    try:
        # Both kinds of start() run on the loop thread, so an index that binds its site to
        # the running loop (aiohttp does) keeps serving from there.
        loop.call(index.start)
        names = sorted(p.name for p in files_dir.glob("*.whl"))
        announcement = {
            "simple_url": str(index.simple_url),
            "file_urls": {fn: str(index.file_url(fn)) for fn in names},
            "implementation": implementation,
        }
        sys.stdout.write(json.dumps(announcement) + "\n")
        sys.stdout.flush()
        sys.stdin.read()  # until the parent closes our stdin (or dies)
        loop.call(index.stop)
    finally:
        loop.close()


@dataclass(frozen=True, slots=True)
class IndexInfo:
    simple_url: str
    file_urls: Mapping[str, str]
    implementation: str


class IndexProcess:
    """Parent side: ``with IndexProcess(dir) as info:`` serves ``dir`` for the block's duration."""

    def __init__(self, files_dir: Path, *, own: bool = False) -> None:
        self._argv = [sys.executable, "-m", "benchmarks.index_server", str(files_dir)]
        if own:
            self._argv.append("--own")
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> IndexInfo:
        self._proc = subprocess.Popen(
            self._argv,
            cwd=REPO_ROOT,
            env=isolated_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise RuntimeError(f"the index server exited {self._proc.returncode} before serving")
        raw = json.loads(line)
        return IndexInfo(raw["simple_url"], raw["file_urls"], raw["implementation"])

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_server")
    parser.add_argument("files_dir", type=Path)
    parser.add_argument("--own", action="store_true", help="never use tests.support.index")
    args = parser.parse_args(argv)
    serve(args.files_dir.resolve(), own=args.own)
    return 0


if __name__ == "__main__":
    sys.exit(main())
