"""The async API (``loader.aio``): the sync calls in a thread, one model call at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import loader
from loader import aio
from loader.model import Model, ModelInfo
from loader.worker import IsolatedModel
from tests.test_worker import index_env, tensor_model  # noqa: F401 - fixtures

INFO = ModelInfo(
    model_dir=Path("/m"),
    runner_name="python",
    required_framework_version="*",
    runner_opts={},
    python_version="3.11.7",
)


class Counting:
    """Records how many calls overlap; a plain and a streaming call."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0
        self.guard = threading.Lock()

    def infer_with_tensors(self, tensors: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self.guard:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            for i in range(3):
                time.sleep(0.01)
                yield {"i": i, "x": tensors["x"]}
        finally:
            with self.guard:
                self.active -= 1


class AsyncStream:
    async def infer_with_tensors(self, tensors: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            await asyncio.sleep(0)
            yield {"i": i * tensors["x"]}


def test_infer_and_stream_of_an_in_process_model() -> None:
    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with aio.AsyncModel(Model(AsyncStream(), INFO)) as model:
            assert model.info is INFO
            last = await model.infer({"x": 2})
            items = [item async for item in model.infer_stream({"x": 3})]
            return last, items

    last, items = asyncio.run(main())
    assert last == {"i": 4}
    assert items == [{"i": 0}, {"i": 3}, {"i": 6}]


def test_concurrent_calls_on_one_model_are_serialized() -> None:
    instance = Counting()

    async def consume(model: aio.AsyncModel, x: int) -> list[int]:
        return [item["x"] async for item in model.infer_stream({"x": x})]

    async def main() -> list[Any]:
        model = aio.AsyncModel(Model(instance, INFO))
        results = await asyncio.gather(
            *(model.infer({"x": x}) for x in range(4)), *(consume(model, x) for x in range(3))
        )
        await model.close()
        return list(results)

    results = asyncio.run(main())
    assert instance.most == 1
    assert results[:4] == [{"i": 2, "x": x} for x in range(4)]
    assert results[4:] == [[x] * 3 for x in range(3)]


def test_an_abandoned_stream_frees_the_model() -> None:
    async def main() -> dict[str, Any]:
        model = aio.AsyncModel(Model(Counting(), INFO))
        stream = model.infer_stream({"x": 1})
        assert (await anext(stream))["i"] == 0
        await stream.aclose()
        return await asyncio.wait_for(model.infer({"x": 5}), timeout=5)

    assert asyncio.run(main()) == {"i": 2, "x": 5}


def test_the_twins_take_the_sync_arguments() -> None:
    assert loader.aio is aio
    for name in ("load", "load_unpacked", "pack", "get_model_info"):
        assert getattr(aio, name).__wrapped__ is getattr(loader, name)
        assert asyncio.iscoroutinefunction(getattr(aio, name))


@pytest.mark.slow
def test_a_worker_model_through_the_async_api(tensor_model: Path) -> None:  # noqa: F811
    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        model = await aio.load_unpacked(
            tensor_model,
            required_framework_version="=3.11",
            runner_opts={
                "entrypoint_package": "entry",
                "entrypoint_fn": "get_model",
                "model.kind": "stream",
            },
        )
        assert isinstance(model.model, IsolatedModel)
        try:
            lasts = await asyncio.gather(*(model.infer({"x": np.array([x])}) for x in range(3)))
            items = [item async for item in model.infer_stream({"x": np.array([1.0])})]
        finally:
            await model.close()
        return list(lasts), items

    lasts, items = asyncio.run(main())
    assert [last["x"].tolist() for last in lasts] == [[0], [2], [4]]
    assert [int(item["i"]) for item in items] == [0, 1, 2]
