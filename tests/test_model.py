"""The Model wrapper: plain, coroutine and streaming (async generator) models."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from loader.errors import EntrypointError, ModelError
from loader.model import Model, ModelInfo

INFO = ModelInfo(
    model_dir=Path("/m"),
    runner_name="python",
    required_framework_version="*",
    runner_opts={},
    python_version="3.11.7",
)


class Plain:
    def infer_with_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"out": tensors["x"] * 2}


class Streaming:
    async def infer_with_tensors(self, tensors: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for step in range(3):
            yield {"step": step, "x": tensors["x"]}


class Coroutine:
    async def infer_with_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {"out": tensors["x"] + 1}


class SyncGenerator:
    def infer_with_tensors(self, tensors: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield {"a": 1}
        yield {"a": 2}


class Broken:
    def infer_with_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("model bug")


class WrongType:
    def infer_with_tensors(self, tensors: dict[str, Any]) -> list[int]:
        return [1]


def test_plain() -> None:
    assert Model(Plain(), INFO).infer({"x": 2}) == {"out": 4}


def test_streaming_yields_each_and_infer_keeps_the_last() -> None:
    model = Model(Streaming(), INFO)
    assert [r["step"] for r in model.infer_stream({"x": 1})] == [0, 1, 2]
    assert model.infer({"x": 1}) == {"step": 2, "x": 1}
    model.close()


def test_coroutine_and_sync_generator() -> None:
    assert Model(Coroutine(), INFO).infer({"x": 1}) == {"out": 2}
    assert Model(SyncGenerator(), INFO).infer({}) == {"a": 2}


def test_model_exceptions_carry_the_traceback_text() -> None:
    with pytest.raises(ModelError) as info:
        Model(Broken(), INFO).infer({})
    assert "ValueError: model bug" in info.value.traceback_text
    assert "in infer_with_tensors" in info.value.traceback_text


def test_outputs_must_be_a_dict() -> None:
    with pytest.raises(EntrypointError, match="must return"):
        Model(WrongType(), INFO).infer({})
