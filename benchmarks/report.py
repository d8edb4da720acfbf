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


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Either ``ratio <= max_ratio`` against the yardstick, or ``median <= max_seconds``."""

    max_ratio: float | None = None
    max_seconds: float | None = None

    def describe(self) -> str:
        if self.max_ratio is not None:
            return f"ratio ≤ {self.max_ratio:g}"
        if self.max_seconds is not None:
            return f"≤ {format_seconds(self.max_seconds)}"
        return "-"

    def judge(self, median: float | None, ratio: float | None) -> Outcome:
        if self.max_ratio is not None and ratio is not None:
            return "pass" if ratio <= self.max_ratio else "FAIL"
        if self.max_seconds is not None and median is not None:
            return "pass" if median <= self.max_seconds else "FAIL"
        return "info"


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
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        lines.append(
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    row.name,
                    row.what,
                    format_seconds(row.median),
                    row.yardstick or "-",
                    format_seconds(row.yardstick_median),
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
