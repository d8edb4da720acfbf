"""The measured loader process of the isolated-worker figures: one fresh interpreter per sample.

``python -m benchmarks.isolated_worker COMMAND MODEL_DIR PYTHON_REQ`` loads the model with
``loader.load_unpacked(..., isolated=True)`` (untimed), measures in this process and prints
one JSON object. Times are ``time.perf_counter`` around each call.

Commands:
  overhead   WARMUP warm-up calls, then CALLS timed ``infer({"x": float32[16]})`` round trips
             -> ``{"calls": [seconds, ...]}``
  throughput per size (MiB) in THROUGHPUT_ROUNDS: one warm-up call, then REPEAT rounds of (one
             ``infer({"x": float32 array of that size})`` round trip, one ``numpy.copyto``
             of the same bytes into a preallocated array), alternating which goes first
             -> ``{"sizes": {MB: {"infer": [...], "memcpy": [...]}}}``

The environment (store, no daemon) comes from the parent.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

OVERHEAD_WARMUP = 200
OVERHEAD_CALLS = 2000
#: Tensor sizes in MiB, and the timed rounds at each.
THROUGHPUT_ROUNDS: dict[int, int] = {1: 50, 64: 10, 512: 3}

_RUNNER_OPTS: dict[str, str | bool] = {
    "entrypoint_package": "carton_entrypoint",
    "entrypoint_fn": "get_model",
    "model.an_example_custom_option": True,
}


def _load(model_dir: Path, python_req: str) -> Any:
    from loader import load_unpacked

    return load_unpacked(
        model_dir, required_framework_version=python_req, runner_opts=_RUNNER_OPTS, isolated=True
    )


def _overhead(model: Any) -> dict[str, Any]:
    x = np.arange(16, dtype=np.float32)
    for _ in range(OVERHEAD_WARMUP):
        model.infer({"x": x})
    calls: list[float] = []
    for _ in range(OVERHEAD_CALLS):
        t = time.perf_counter()
        out = model.infer({"x": x})
        calls.append(time.perf_counter() - t)
    if not np.array_equal(out["out"], x * 2):
        raise RuntimeError(f"the doubler answered {out!r}")
    return {"calls": calls}


def _throughput(model: Any) -> dict[str, Any]:
    sizes: dict[str, dict[str, list[float]]] = {}
    for mib, rounds in THROUGHPUT_ROUNDS.items():
        x = np.ones(mib * (1 << 20) // 4, dtype=np.float32)
        dst = np.empty_like(x)
        dst.fill(0.0)  # fault the pages in: memcpy is timed into memory already mapped
        model.infer({"x": x})  # warm-up (first shm file of this size)
        infer: list[float] = []
        memcpy: list[float] = []
        for i in range(rounds):
            order = ("infer", "memcpy") if i % 2 == 0 else ("memcpy", "infer")
            for what in order:
                t = time.perf_counter()
                if what == "infer":
                    out = model.infer({"x": x})["out"]
                    infer.append(time.perf_counter() - t)
                    if out.nbytes != x.nbytes or float(out[-1]) != 2.0:
                        raise RuntimeError(f"the doubler answered {out!r}")
                    del out
                else:
                    np.copyto(dst, x)
                    memcpy.append(time.perf_counter() - t)
        sizes[str(mib)] = {"infer": infer, "memcpy": memcpy}
        del x, dst
    return {"sizes": sizes}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("overhead", "throughput"):
        sys.stderr.write(__doc__ or "")
        return 2
    command, model_dir, python_req = argv[0], Path(argv[1]), argv[2]
    model = _load(model_dir, python_req)
    try:
        result = _overhead(model) if command == "overhead" else _throughput(model)
    finally:
        model.close()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
