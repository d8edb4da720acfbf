"""Figures' results as values, and their markdown rendering (stdout and results/latest.md)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from benchmarks.procs import REPO_ROOT, run, tool_version, uv_binary

Outcome = Literal["pass", "FAIL", "info", "skipped", "error"]
Unit = Literal["s", "B"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """``ratio <= max_ratio`` against the yardstick, ``median <= max_seconds``, or both.

    With both, the figure passes only if both hold (of those that could be computed).
    """

    max_ratio: float | None = None
    max_seconds: float | None = None

    def describe(self) -> str:
        parts: list[str] = []
        if self.max_seconds is not None:
            parts.append(f"≤ {format_seconds(self.max_seconds)}")
        if self.max_ratio is not None:
            parts.append(f"ratio ≤ {self.max_ratio:g}")
        return " and ".join(parts) or "-"

    def judge(self, median: float | None, ratio: float | None) -> Outcome:
        checks: list[bool] = []
        if self.max_ratio is not None and ratio is not None:
            checks.append(ratio <= self.max_ratio)
        if self.max_seconds is not None and median is not None:
            checks.append(median <= self.max_seconds)
        if not checks:
            return "info"
        return "pass" if all(checks) else "FAIL"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    name: str
    what: str
    samples: tuple[float, ...] = ()
    yardstick: str | None = None
    yardstick_samples: tuple[float, ...] = ()
    target: Target = field(default_factory=Target)
    outcome: Outcome = "info"
    notes: tuple[str, ...] = ()
    #: What the samples count: seconds (every timed figure) or bytes (disk usage figures).
    unit: Unit = "s"

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def yardstick_median(self) -> float | None:
        return statistics.median(self.yardstick_samples) if self.yardstick_samples else None

    @property
    def ratio(self) -> float | None:
        mine, theirs = self.median, self.yardstick_median
        if mine is None or theirs is None or theirs <= 0:
            return None
        return mine / theirs


def judged(row: Row) -> Row:
    """``row`` with its outcome decided from its samples (unless skipped or failed)."""
    if row.outcome in ("skipped", "error"):
        return row
    return replace(row, outcome=row.target.judge(row.median, row.ratio))


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.1f} ms" if value < 0.1 else f"{value * 1000:.0f} ms"
    return f"{value:.2f} s"


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e9:
        return f"{value / 1e9:.2f} GB"
    if value >= 1e6:
        return f"{value / 1e6:.1f} MB"
    return f"{value / 1e3:.1f} kB"


def format_ratio(ratio: float | None) -> str:
    """Two decimals; below 0.1 two significant digits and how many times faster (1/N)."""
    if ratio is None:
        return "-"
    if ratio >= 0.1 or ratio <= 0:
        return f"{ratio:.2f}"
    return f"{ratio:.2g} (1/{1 / ratio:.0f})"


def format_value(value: float | None, unit: Unit) -> str:
    return format_bytes(value) if unit == "B" else format_seconds(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Machine:
    date: str
    nproc: int
    cpus_usable: int
    python: str
    uv: str
    pip: str
    platform: str
    commit: str


def machine_info() -> Machine:
    try:
        commit = run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"])
        commit += " (uncommitted changes)" if dirty.strip() else ""
    except Exception:
        commit = "unknown"
    return Machine(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        nproc=os.cpu_count() or 0,
        cpus_usable=len(os.sched_getaffinity(0)),
        python=f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        uv=tool_version([uv_binary(), "--version"]),
        pip=tool_version([sys.executable, "-m", "pip", "--version"]).split(" from ")[0],
        platform=platform.platform(),
        commit=commit,
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: Sequence[Row], machine: Machine, runs: int, preamble: Sequence[str] = ()) -> str:
    lines = [
        "# wheelcas benchmarks: R40",
        "",
        f"- date: {machine.date}; commit {machine.commit}",
        f"- machine: nproc {machine.nproc} (usable {machine.cpus_usable}), {machine.platform}",
        f"- python: {machine.python}",
        f"- yardsticks: {machine.uv}, {machine.pip}",
        f"- runs per figure: {runs} (median reported; see benchmarks/README.md for each figure)",
        *(f"- {p}" for p in preamble),
        "",
        "| figure | what | median | yardstick | yardstick median | ratio | target | result "
        "| notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = format_ratio(row.ratio)
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    row.name,
                    row.what,
                    format_value(row.median, row.unit),
                    row.yardstick or "-",
                    format_value(row.yardstick_median, row.unit),
                    ratio,
                    row.target.describe(),
                    row.outcome,
                    "; ".join(row.notes) or "",
                )
            )
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def write_results(directory: Path, markdown: str, rows: Sequence[Row], machine: Machine) -> Path:
    """Write ``latest.md`` and ``latest.json`` (every sample) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest.md").write_text(markdown, encoding="utf-8")
    raw = {
        "machine": asdict(machine),
        "rows": [
            {**asdict(r), "median": r.median, "yardstick_median": r.yardstick_median} for r in rows
        ],
    }
    (directory / "latest.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return directory / "latest.md"
