"""``python -m benchmarks`` (``make bench``): wheelcas against uv and pip on R40.

Prints a markdown table and writes it to ``benchmarks/results/latest.md`` (every sample goes
to ``latest.json`` beside it). The first run downloads the R40 wheels (about 94 MB) into
``~/.cache/wheelcas-bench/r40/``; later runs reuse them. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.figures import ALL_FIGURES, DEFAULT_FIGURES, run_figure
from benchmarks.index_server import IndexProcess
from benchmarks.mirror import DEFAULT_CACHE, REFERENCE_REQUIREMENTS, ensure_mirror
from benchmarks.procs import force_rmtree
from benchmarks.report import Row, machine_info, render, write_results
from benchmarks.session import Session, Settings, compile_project

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="samples per figure (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="one sample per figure (a smoke run, not figures)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these figures (repeat or comma-separate); --list names them",
    )
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--requirements", type=Path, default=REFERENCE_REQUIREMENTS)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--keep-work", action="store_true", help="keep the scratch venvs, caches and stores"
    )
    parser.add_argument(
        "--own-index", action="store_true", help="serve with benchmarks.index_server, not tests'"
    )
    return parser


def _selected(only: Sequence[str]) -> list[str]:
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; known: {', '.join(ALL_FIGURES)}")
    return names or list(DEFAULT_FIGURES)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, figure in ALL_FIGURES.items():
            print(f"{name:22} {figure.what}")
        return 0
    names = _selected(args.only)
    runs = 1 if args.quick else max(1, args.runs)
    settings = Settings(
        runs=runs,
        cheap_runs=1 if args.quick else 3 * runs,
        cache=args.cache_dir.expanduser(),
        keep_work=args.keep_work,
    )
    log: list[str] = []
    mirror = ensure_mirror(settings.cache, args.requirements, log)
    for line in log:
        print(line, file=sys.stderr)
    compile_project()
    for pin in mirror.pins:  # the wheels in the page cache: no first sample reads the disk
        (mirror.wheels_dir / pin.filename).read_bytes()
    work = Path(tempfile.mkdtemp(prefix="wheelcas-bench."))
    rows: list[Row] = []
    try:
        with IndexProcess(mirror.wheels_dir, own=args.own_index) as index:
            session = Session(settings=settings, mirror=mirror, index=index, work=work, log=log)
            try:
                rows = [run_figure(session, ALL_FIGURES[name]) for name in names]
            finally:
                session.close()  # daemons and extra index servers end with the run
            log.append(session.settler.summary())
    finally:
        if args.keep_work:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            force_rmtree(work)
    preamble = [
        f"workload: R40 = {len(mirror.pins)} wheels, {mirror.total_bytes / 1e6:.1f} MB, "
        f"from {len(mirror.requested)} requested"
        + (f" (no wheel, dropped: {', '.join(mirror.dropped)})" if mirror.dropped else ""),
        f"index: {index.implementation} on loopback; uv/pip isolated from machine config",
        "wheelcas's own packages and the pip venv are precompiled (.pyc); "
        "PYTHONDONTWRITEBYTECODE=1 in every measured process",
        *log,
    ]
    machine = machine_info()
    markdown = render(rows, machine, runs, preamble)
    print(markdown)
    path = write_results(args.results_dir, markdown, rows, machine)
    print(f"written to {path}", file=sys.stderr)
    return 1 if any(r.outcome == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
