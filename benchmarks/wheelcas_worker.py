"""The measured wheelcas process: one fresh interpreter per sample, like ``uv`` is one process.

``python -m benchmarks.wheelcas_worker COMMAND MODEL_DIR [STORE_ROOT | REPEAT]`` prints one
JSON object. The parent times the whole process; ``seconds`` here is the in-process part
(from before wheelcas is imported to the answer), reported in the notes.

Commands:
  ready MODEL_DIR STORE_ROOT   read the lockfile, make every wheel ready (cold store)
  warm  MODEL_DIR STORE_ROOT   read the lockfile, ``warm_site_dirs`` (warm store)
  lock  MODEL_DIR REPEAT       ``lock()`` once (import included), then REPEAT more times;
                               counts every subprocess started (there must be none)

Kept to the standard library and the adapter: what this module imports is measured too.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import json  # noqa: E402  (after _T0 on purpose)
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _ready(model_dir: Path, store_root: Path) -> dict[str, Any]:
    from benchmarks import wheelcas_adapter as wc

    site_dirs = wc.ready(model_dir, store_root)
    seconds = time.perf_counter() - _T0
    return {"seconds": seconds, "site_dirs": [str(p) for p in site_dirs]}


def _warm(model_dir: Path, store_root: Path) -> dict[str, Any]:
    from benchmarks import wheelcas_adapter as wc

    site_dirs = wc.warm_site_dirs(model_dir, store_root)
    seconds = time.perf_counter() - _T0
    listed = None if site_dirs is None else [str(p) for p in site_dirs]
    return {"seconds": seconds, "site_dirs": listed}


def _lock(model_dir: Path, repeat: int) -> dict[str, Any]:
    started: list[str] = []
    real_popen_init = subprocess.Popen.__init__

    def counting_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> None:
        started.append(repr(args))
        real_popen_init(self, args, *rest, **kw)

    subprocess.Popen.__init__ = counting_init  # type: ignore[method-assign]
    start = time.perf_counter()
    from benchmarks import wheelcas_adapter as wc

    actions = [wc.lock_action(model_dir)]
    first = time.perf_counter() - start
    steady: list[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        actions.append(wc.lock_action(model_dir))
        steady.append(time.perf_counter() - t)
    return {"first": first, "steady": steady, "actions": sorted(set(actions)), "popen": started}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("ready", "warm", "lock"):
        sys.stderr.write(__doc__ or "")
        return 2
    command, model_dir = argv[0], Path(argv[1])
    if command == "ready":
        result = _ready(model_dir, Path(argv[2]))
    elif command == "warm":
        result = _warm(model_dir, Path(argv[2]))
    else:
        result = _lock(model_dir, int(argv[2]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
