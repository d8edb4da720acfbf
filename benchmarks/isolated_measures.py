"""One sample of each isolated-worker figure: a function ``(Session) -> seconds``.

The model is the doubler (``examples/doubler``), copied into the run's scratch dir and locked
against the loopback index: its one requirement, numpy, is R40's numpy wheel. The store is
the run's own (``WHEELCAS_HOME``), filled by one untimed load; no daemon
(``WHEELCAS_SOCKET=off``). Every measured process is a fresh interpreter of the benchmarks'
venv in the isolated environment, like every other figure's.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import wheelcas_adapter as wc
from benchmarks.procs import REPO_ROOT, isolated_env, run, timed_run
from benchmarks.session import Session

DOUBLER = REPO_ROOT / "examples" / "doubler"
#: The Python the doubler asks for: the benchmarks' own minor version (R40 is for it).
PYTHON_REQ = f"={sys.version_info.major}.{sys.version_info.minor}"
_RESOURCE = "isolated_doubler"
#: The doubler's entrypoint (no pyproject metadata in the example) and its one option.
RUNNER_OPTS: dict[str, str | bool] = {
    "entrypoint_package": "carton_entrypoint",
    "entrypoint_fn": "get_model",
    "model.an_example_custom_option": True,
}


@dataclass(frozen=True, slots=True)
class Doubler:
    model_dir: Path
    env: dict[str, str]


def _load_code(model_dir: Path) -> str:
    return (
        "from loader import load_unpacked; "
        f"m = load_unpacked({str(model_dir)!r}, required_framework_version={PYTHON_REQ!r}, "
        f"runner_opts={RUNNER_OPTS!r}, isolated=True); m.close()"
    )


def doubler(session: Session) -> Doubler:
    """The locked doubler and its environment; its store filled by one untimed load."""
    found = session.resources.get(_RESOURCE)
    if isinstance(found, Doubler):
        return found
    model_dir = session.scratch("doubler") / "doubler"
    shutil.copytree(DOUBLER, model_dir)
    numpy_pin = next(p for p in session.mirror.pins if p.name.lower() == "numpy")
    requirements = (model_dir / "requirements.txt").read_text(encoding="utf-8")
    deps = [(numpy_pin.sha256, session.index.file_urls[numpy_pin.filename])]
    wc.write_model_dir(model_dir, requirements, deps)
    env = isolated_env(
        {"WHEELCAS_HOME": str(session.scratch("doubler-store")), "WHEELCAS_SOCKET": "off"}
    )
    run([sys.executable, "-c", _load_code(model_dir)], env=env)  # fills the store
    made = Doubler(model_dir=model_dir, env=env)
    session.resources[_RESOURCE] = made
    return made


def _child(session: Session, command: str) -> dict[str, Any]:
    d = doubler(session)
    argv: list[str | Path] = [sys.executable, "-m", "benchmarks.isolated_worker", command]
    out = run([*argv, d.model_dir, PYTHON_REQ], env=d.env, cwd=REPO_ROOT)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


# --- infer_overhead ---------------------------------------------------------------------------


def infer_overhead(session: Session) -> float:
    """The p50 of 2,000 ``infer`` round trips of a float32[16] in one loader process."""
    calls: list[float] = list(_child(session, "overhead")["calls"])
    pooled = session.resources.setdefault("infer_overhead_calls", [])
    assert isinstance(pooled, list)
    pooled.extend(calls)
    every: list[float] = [float(c) for c in pooled]
    session.notes["infer_overhead"] = [
        f"every call of every sample ({len(every)}): p50 {_us(percentile(every, 0.5))}, "
        f"p99 {_us(percentile(every, 0.99))}, max {_us(max(every))}; "
        f"this sample's p99 {_us(percentile(calls, 0.99))}"
    ]
    return percentile(calls, 0.5)


# --- infer_throughput -------------------------------------------------------------------------

#: The size whose round trip is the row's median (the others are in the notes).
THROUGHPUT_ROW_MIB = 64


def infer_throughput(session: Session) -> float:
    """One loader process: round trips and ``numpy.copyto`` at 1, 64 and 512 MiB."""
    sizes: dict[str, dict[str, list[float]]] = _child(session, "throughput")["sizes"]
    pooled = session.resources.setdefault("infer_throughput_sizes", {})
    assert isinstance(pooled, dict)
    notes: list[str] = []
    for mib, timings in sizes.items():
        both = pooled.setdefault(mib, {"infer": [], "memcpy": []})
        both["infer"].extend(timings["infer"])
        both["memcpy"].extend(timings["memcpy"])
        nbytes = int(mib) * (1 << 20)
        infer, memcpy = statistics.median(both["infer"]), statistics.median(both["memcpy"])
        notes.append(
            f"{mib} MiB: round trip {infer * 1e3:.2f} ms = {nbytes / infer / 1e9:.2f} GB/s, "
            f"memcpy {memcpy * 1e3:.2f} ms = {nbytes / memcpy / 1e9:.2f} GB/s, "
            f"time ratio {infer / memcpy:.1f} ({len(both['infer'])} calls)"
        )
    session.notes["infer_throughput"] = notes
    return statistics.median(sizes[str(THROUGHPUT_ROW_MIB)]["infer"])


# --- warm_load --------------------------------------------------------------------------------


def warm_load(session: Session) -> float:
    """``load_unpacked(doubler, isolated=True)`` then ``close()``, a whole new process."""
    d = doubler(session)
    return timed_run([sys.executable, "-c", _load_code(d.model_dir)], env=d.env).seconds


def import_numpy(session: Session) -> float:
    """``python -c "import numpy"`` with the same interpreter (the venv's numpy)."""
    d = doubler(session)
    return timed_run([sys.executable, "-c", "import numpy"], env=d.env).seconds
