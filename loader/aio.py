"""The async API, shaped like Carton's binding: ``import loader.aio as carton``.

Each function takes the same arguments as its twin in :mod:`loader` and runs it in a thread
(``asyncio.to_thread``): loading and the worker protocol block. A loaded :class:`AsyncModel`
runs every call of its model in one thread of its own, one call at a time: concurrent
``await model.infer(...)`` calls queue up (a model in a worker has one channel to it, and a
model in this process need not be thread-safe). A stream holds the model until it ends or
is closed (``aclose``, or leaving an ``async for`` with ``break`` inside ``async with
contextlib.aclosing(...)``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from loader import api, packing

if TYPE_CHECKING:
    from loader.model import Model, ModelInfo

__all__ = ["AsyncModel", "get_model_info", "load", "load_unpacked", "pack"]

P = ParamSpec("P")
R = TypeVar("R")
_DONE = object()


class AsyncModel:
    """A loaded model with ``async`` calls; ``info`` is the sync model's."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.info: ModelInfo = model.info
        self._lock = asyncio.Lock()
        # One thread: a stream's steps all run where it started (its generator may care).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wheelcas-model")

    @property
    def model(self) -> Model:
        """The synchronous model underneath."""
        return self._model

    async def _call(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def infer(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The model's outputs; for a streaming model, the last dict it yields."""
        async with self._lock:
            return await self._call(self._model.infer, tensors)

    async def infer_stream(
        self, tensors: Mapping[str, Any]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Each dict the model yields; a non-streaming model yields its one result."""
        async with self._lock:
            stream: Iterator[dict[str, Any]] = iter(self._model.infer_stream(tensors))
            try:
                while True:
                    item = await self._call(next, stream, _DONE)
                    if item is _DONE:
                        return
                    yield item
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    await self._call(close)

    async def close(self) -> None:
        """Close the model (a worker is stopped) once the calls in progress are done."""
        async with self._lock:
            await self._call(self._model.close)
        self._thread.shutdown(wait=False)

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _in_thread(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    return run


def _loading(fn: Callable[P, Model]) -> Callable[P, Coroutine[Any, Any, AsyncModel]]:
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> AsyncModel:
        return AsyncModel(await asyncio.to_thread(fn, *args, **kwargs))

    return run


load = _loading(packing.load)
load_unpacked = _loading(api.load_unpacked)
pack = _in_thread(packing.pack)
get_model_info = _in_thread(packing.get_model_info)
