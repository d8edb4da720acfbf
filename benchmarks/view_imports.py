"""Should views link with symlinks or hard links? Measure imports, builds and dedupe on real wheels.

Run ``.venv/bin/python -m benchmarks.view_imports`` (``--help`` for options). It unpacks and
precompiles every wheel of the sample into a store of its own (kept in ``--work-dir`` for the
next run), makes a venv-like directory of the same wheels (everything unpacked into one dir and
compiled, as pip installs), and then:

* times ``import numpy, pandas, scipy.stats, sklearn.linear_model, requests, yaml, jinja2,
  pydantic`` (those the sample has) in fresh ``python -I -S -B`` processes whose ``sys.path``
  gets each layout by ``sys.path[0:0] = [...]`` (or appended, where a venv's site-packages
  sits): rounds of one process per layout, in an order rotated each round; per layout the
  median wall time and the median CPU time (user + system of the child, which the other load
  of a shared 2-core machine disturbs much less), each with its ratio to the venv;
* times building each kind of view (``ensure_view`` from nothing, trees in the page cache);
* hashes every tree file once and replays :func:`cas_daemon.dedupe.plan_dedupe` with several
  size thresholds over the sample and a set of neighbouring versions of the same projects,
  then times the real :func:`cas_daemon.dedupe.dedupe_tree` for three of them, each on fresh
  copies of the trees.

``-S`` keeps the benchmark venv's own site-packages (where numpy is installed too) out of every
process; all layouts are given the same way, so the ratios compare layouts only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from benchmarks.procs import isolated_env
from cas_daemon import dedupe, view_plan, views
from cas_daemon.layout import StoreLayout
from cas_daemon.precompile import compile_tree, remove_sealed, seal_read_only, write_marker
from cas_daemon.unpack import unpack_wheel

R40_WHEELS = Path.home() / ".cache/wheelcas-bench/r40/wheels"
PYPI_FILES = Path("/opt/pypi/files")
DEFAULT_WORK = Path.home() / ".cache/wheelcas-bench/views"
IMPORTS = (
    "numpy",
    "pandas",
    "scipy.stats",
    "sklearn.linear_model",
    "requests",
    "yaml",
    "jinja2",
    "pydantic",
)
TAG = sys.implementation.cache_tag
THRESHOLDS = (1, 256, 1024, 4096, 16384)
TIMED_THRESHOLDS = (1, 1024, 4096)
BLOCK = 4096


def _progress(text: str) -> None:
    print(f"[view_imports] {text}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the sample ----------------------------------------------------------------------------


def _project(wheel: Path) -> str:
    return canonicalize_name(parse_wheel_filename(wheel.name)[0])


def _installable(wheel: Path, tags: frozenset[str]) -> bool:
    return any(str(t) in tags for t in parse_wheel_filename(wheel.name)[3])


def neighbours(sample: Sequence[Path], pool: Path) -> list[Path]:
    """For each project of ``sample``: the newest other version in ``pool`` this Python can use."""
    tags = frozenset(str(t) for t in sys_tags())
    wanted = {_project(w): parse_wheel_filename(w.name)[1] for w in sample}
    best: dict[str, tuple[Version, Path]] = {}
    for wheel in sorted(pool.glob("*.whl")):
        try:
            name, version, _build, _tags = parse_wheel_filename(wheel.name)
        except ValueError:
            continue
        project = canonicalize_name(name)
        if project not in wanted or version == wanted[project]:
            continue
        if not _installable(wheel, tags):
            continue
        if project not in best or version > best[project][0]:
            best[project] = (version, wheel)
    return [path for _, path in sorted(best.values(), key=lambda vp: vp[1].name)]


@dataclass(frozen=True)
class Tree:
    wheel: str
    sha: str
    site: Path


def publish(layout: StoreLayout, wheels: Sequence[Path]) -> list[Tree]:
    """Each wheel unpacked, compiled and sealed in ``layout``, as the store does (reused)."""
    trees: list[Tree] = []
    for wheel in wheels:
        sha = _sha256(wheel)
        site = layout.site_dir(sha)
        marker = layout.pyc_marker(sha, TAG)
        if not marker.exists():
            _progress(f"unpacking and compiling {wheel.name}")
            remove_sealed(layout.tree_dir(sha))
            unpack_wheel(wheel, site, verify_record=False)
            compile_tree(site, sys.executable, display_dir=site)
            seal_read_only(site)
            write_marker(marker, sys.executable)
        trees.append(Tree(wheel.name, sha, site))
    return trees


def make_venv_like(target: Path, wheels: Sequence[Path]) -> Path:
    """Every wheel unpacked into one directory and compiled there: a venv's site-packages."""
    done = target / ".complete"
    if done.exists():
        return target
    if target.exists():
        remove_sealed(target)
    target.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        for wheel in wheels:
            one = Path(scratch) / wheel.name
            unpack_wheel(wheel, one, verify_record=False)
            shutil.copytree(one, target, dirs_exist_ok=True)
    _progress(f"compiling the venv-like dir {target}")
    compile_tree(target, sys.executable, display_dir=target)
    done.touch()
    return target


# --- imports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    entries: tuple[str, ...]
    append: bool = False

    def argv(self, modules: Sequence[str]) -> list[str]:
        entries = list(self.entries)
        if self.append:
            prelude = f"import sys; sys.path.extend({entries!r})"
        else:
            prelude = f"import sys; sys.path[0:0] = {entries!r}"
        return [sys.executable, "-I", "-S", "-B", "-c", f"{prelude}\nimport {', '.join(modules)}"]


def check_origins(layout: Layout, modules: Sequence[str], env: dict[str, str]) -> None:
    """Fail unless every imported top-level package comes from the layout's entries."""
    tops = sorted({m.split(".")[0] for m in modules})
    code = f"import json; print(json.dumps([__import__(m).__file__ for m in {tops!r}]))"
    argv = [*layout.argv(modules)[:-1], layout.argv(modules)[-1] + "\n" + code]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{layout.name}: the imports fail:\n{out.stderr[-3000:]}")
    for path in json.loads(out.stdout):
        if not any(path.startswith(entry + "/") for entry in layout.entries):
            raise SystemExit(f"{layout.name}: imported {path} from outside the layout")


@dataclass
class Samples:
    """Per process: wall time, and CPU time (user + system) that other load disturbs less."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_imports(
    layouts: Sequence[Layout], modules: Sequence[str], rounds: int
) -> dict[str, Samples]:
    env = isolated_env()
    for layout in layouts:
        check_origins(layout, modules, env)  # also brings every file into the page cache
    samples = {layout.name: Samples() for layout in layouts}
    for round_no in range(rounds):
        shift = round_no % len(layouts)
        for layout in [*layouts[shift:], *layouts[:shift]]:
            argv = layout.argv(modules)
            cpu = _children_cpu()
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True)
            samples[layout.name].wall.append(time.perf_counter() - start)
            samples[layout.name].cpu.append(_children_cpu() - cpu)
        _progress(f"import round {round_no + 1}/{rounds}")
    return samples


def imported_files(layout: Layout, modules: Sequence[str], env: dict[str, str]) -> list[str]:
    """The ``__file__`` of every module the imports load from ``layout``, relative to it."""
    code = (
        "import json; print(json.dumps([getattr(m, '__file__', None) "
        "for m in list(sys.modules.values())]))"
    )
    argv = [*layout.argv(modules)[:-1], layout.argv(modules)[-1] + "\n" + code]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    root = layout.entries[0] + "/"
    return sorted(f[len(root) :] for f in json.loads(out.stdout) if f and f.startswith(root))


def _bytecode_of(path: str) -> str | None:
    """The ``.pyc`` of a source; None for an extension module or a source without one."""
    if not path.endswith(".py"):
        return None
    pyc = importlib.util.cache_from_source(path)
    return pyc if Path(pyc).exists() else None


def time_lookups(roots: dict[str, list[str]], passes: int) -> dict[str, float]:
    """Per layout: the best of ``passes`` of what the import system asks the kernel per module.

    For each module file: ``stat`` of its dir (the path finder does it on every lookup),
    ``stat`` of the file and ``open`` of its ``.pyc``; paths given as the import system
    gives them, under the layout's entry. In-process and repeated, so the cost of resolving
    paths through the layout shows without the noise of starting processes.
    """
    best: dict[str, float] = {}
    for name, paths in roots.items():
        triples = [(os.path.dirname(p), p, _bytecode_of(p)) for p in paths]  # noqa: PTH120
        times: list[float] = []
        for _ in range(passes):
            start = time.perf_counter()
            for directory, path, pyc in triples:
                os.stat(directory)  # noqa: PTH116
                os.stat(path)  # noqa: PTH116
                if pyc is not None:
                    os.close(os.open(pyc, os.O_RDONLY))
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return best


# --- building views -------------------------------------------------------------------------


def build_once(layout: StoreLayout, trees: Sequence[Tree], mode: views.LinkMode) -> Path:
    """A fresh view of ``trees`` in ``mode`` (under a key of its own), the old one removed."""
    key = hashlib.sha256(
        f"{view_plan.view_key([t.sha for t in trees], TAG)}-{mode}".encode()
    ).hexdigest()
    remove_sealed(layout.view_dir(key))
    return views.ensure_view(layout, [(t.wheel, t.site) for t in trees], key, link_mode=mode)


def time_builds(
    layout: StoreLayout, trees: Sequence[Tree], repeats: int
) -> dict[str, tuple[list[float], int]]:
    results: dict[str, tuple[list[float], int]] = {}
    for mode in ("symlink", "hardlink"):
        seconds: list[float] = []
        for _ in range(repeats):
            start = time.perf_counter()
            site = build_once(layout, trees, mode)
            seconds.append(time.perf_counter() - start)
        links = sum(1 for _ in _view_entries(site))
        results[mode] = (seconds, links)
    return results


def _view_entries(site: Path) -> list[Path]:
    found: list[Path] = []
    for path in site.rglob("*"):
        if path.is_symlink() or not path.is_dir():
            found.append(path)
    return found


# --- dedupe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupeRow:
    threshold: int
    candidates: int
    linked: int
    bytes_saved: int
    blocks_saved: int
    seconds: float | None = None  # of the real dedupe_tree runs, where measured


@dataclass(frozen=True)
class DedupeFigures:
    trees: int
    hashing: float
    rows: list[DedupeRow]
    savings: int  # dedupe_savings after the run at the default threshold


def replay_dedupe(facts: Sequence[Sequence[dedupe.FileFact]], threshold: int) -> DedupeRow:
    """Run the pure planner over the trees in order: what ``threshold`` would link."""
    index: dict[str, dedupe.IndexFact] = {}
    candidates = linked = saved = blocks = 0
    for tree_facts in facts:
        kept = [f for f in tree_facts if f.size >= threshold]
        candidates += len(kept)
        for step in dedupe.plan_dedupe(kept, index):
            if step.action == "link":
                linked += 1
                saved += step.size
                blocks += -(-step.size // BLOCK) * BLOCK
        for f in kept:
            entry = dedupe.IndexFact(f.size, f.inode)
            index.setdefault(dedupe.index_name(f.digest, f.mode), entry)
    return DedupeRow(threshold, candidates, linked, saved, blocks)


def copy_trees(target: StoreLayout, trees: Sequence[Tree]) -> list[Tree]:
    """Copies of ``trees`` in a fresh store, so that every run dedupes trees never deduped."""
    remove_sealed(target.root)
    copies: list[Tree] = []
    for tree in trees:
        site = target.site_dir(tree.sha)
        site.parent.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tree.site, site, symlinks=True)
        copies.append(Tree(tree.wheel, tree.sha, site))
    return copies


def measure_dedupe(work: Path, trees: Sequence[Tree]) -> DedupeFigures:
    """Replay every threshold; run the real thing on fresh copies for :data:`TIMED_THRESHOLDS`."""
    start = time.perf_counter()
    facts = [dedupe.scan_files(t.site, 1) for t in trees]
    hashing = time.perf_counter() - start
    timed: dict[int, float] = {}
    savings = 0
    for threshold in TIMED_THRESHOLDS:
        layout = StoreLayout(work / "dedupe-store")
        copies = copy_trees(layout, trees)
        try:
            start = time.perf_counter()
            for tree in copies:
                dedupe.dedupe_tree(layout, tree.site, min_size=threshold)
            timed[threshold] = time.perf_counter() - start
            if threshold == dedupe.MIN_DEDUPE_SIZE:
                savings = dedupe.dedupe_savings(layout)
        finally:
            remove_sealed(layout.root)
        _progress(f"dedupe at {threshold} B: {timed[threshold]:.2f} s")
    rows = [replace(replay_dedupe(facts, t), seconds=timed.get(t)) for t in THRESHOLDS]
    return DedupeFigures(len(trees), hashing, rows, savings)


# --- report --------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def render(
    wheels: Sequence[Path],
    imports: dict[str, Samples],
    yardstick: str,
    builds: dict[str, tuple[list[float], int]],
    dedupe_figures: DedupeFigures | None,
) -> str:
    base_wall = statistics.median(imports[yardstick].wall)
    base_cpu = statistics.median(imports[yardstick].cpu)
    lines = [
        f"Sample: {len(wheels)} wheels; Python {sys.version.split()[0]}; "
        f"{len(imports[yardstick].wall)} processes per layout.",
        "",
        "| layout | median wall | vs venv | median CPU | vs venv |",
        "|---|---|---|---|---|",
    ]
    for name, values in imports.items():
        wall, cpu = statistics.median(values.wall), statistics.median(values.cpu)
        lines.append(
            f"| {name} | {wall:.3f} s | {wall / base_wall:.3f} | {cpu:.3f} s | "
            f"{cpu / base_cpu:.3f} |"
        )
    lines += ["", "| view build | median | min | entries in the view |", "|---|---|---|---|"]
    for mode, (seconds, count) in builds.items():
        lines.append(
            f"| {mode} | {statistics.median(seconds) * 1000:.0f} ms | "
            f"{min(seconds) * 1000:.0f} ms | {count} |"
        )
    if dedupe_figures is not None:
        figures = dedupe_figures
        lines += [
            "",
            f"Dedupe of {figures.trees} trees (the sample, then neighbouring versions of its "
            f"projects); hashing every file once: {figures.hashing:.2f} s.",
            "",
            "| threshold | files hashed | files linked | bytes saved | 4 KiB blocks saved "
            "| `dedupe_tree` of all trees |",
            "|---|---|---|---|---|---|",
        ]
        for row in figures.rows:
            took = "-" if row.seconds is None else f"{row.seconds:.2f} s"
            lines.append(
                f"| {row.threshold} B | {row.candidates} | {row.linked} | "
                f"{_mb(row.bytes_saved)} | {_mb(row.blocks_saved)} | {took} |"
            )
        lines += ["", f"`dedupe_savings` after the default: {_mb(figures.savings)}."]
    return "\n".join(lines) + "\n"


def render_lookups(lookups: dict[str, float], modules: int) -> str:
    base = lookups["venv"]
    lines = [
        "",
        f"Kernel lookups for the {modules} module files the imports load (stat of the dir and "
        "the file, open of the .pyc), best of the passes:",
        "",
        "| layout | all modules | per module | vs venv |",
        "|---|---|---|---|",
    ]
    for name, seconds in lookups.items():
        lines.append(
            f"| {name} | {seconds * 1000:.2f} ms | {seconds / modules * 1e6:.2f} µs | "
            f"{seconds / base:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _default_sample() -> list[Path]:
    if R40_WHEELS.is_dir():
        return sorted(R40_WHEELS.glob("*.whl"))
    raise SystemExit(
        f"no sample: {R40_WHEELS} is missing. Run `python -m benchmarks --only pip_import` once "
        "to make it, or pass --wheels DIR."
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.view_imports", description=__doc__)
    parser.add_argument("--wheels", type=Path, help=f"dir of the sample wheels ({R40_WHEELS})")
    parser.add_argument("--pool", type=Path, default=PYPI_FILES, help="where neighbours come from")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="kept between runs")
    parser.add_argument("--rounds", type=int, default=11, help="processes per layout (>= 7)")
    parser.add_argument("--builds", type=int, default=5, help="builds per view kind")
    parser.add_argument("--lookup-passes", type=int, default=200, help="of the lookup figure")
    parser.add_argument("--no-dedupe", action="store_true", help="skip the dedupe figures")
    parser.add_argument("--json", type=Path, help="also write every sample here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels else _default_sample()
    modules = [m for m in IMPORTS if any(_project(w) == _module_project(m) for w in wheels)]
    store = StoreLayout(args.work_dir / "store")
    trees = publish(store, wheels)
    # As deep as a view (store/v1/views/<key>/site): paths as long, lookups comparable.
    venv_site = make_venv_like(args.work_dir / "venv/v1/views" / ("0" * 64) / "site", wheels)

    builds = time_builds(store, trees, args.builds)
    sym_site = build_once(store, trees, "symlink")
    hard_site = build_once(store, trees, "hardlink")
    per_tree = tuple(str(t.site) for t in trees)
    layouts = [
        Layout("venv: site-packages after the stdlib", (str(venv_site),), append=True),
        Layout("venv: site-packages before the stdlib", (str(venv_site),)),
        Layout("view, hard links, before the stdlib", (str(hard_site),)),
        Layout("view, symlinks, before the stdlib", (str(sym_site),)),
        Layout(f"one entry per tree ({len(per_tree)}), before the stdlib", per_tree),
    ]
    imports = time_imports(layouts, modules, args.rounds)
    files = imported_files(layouts[0], modules, isolated_env())
    owner = {rel: t.site for t in trees for rel in files if (t.site / rel).exists()}
    lookups = time_lookups(
        {
            "venv": [f"{venv_site}/{rel}" for rel in files],
            "view, hard links": [f"{hard_site}/{rel}" for rel in files],
            "view, symlinks": [f"{sym_site}/{rel}" for rel in files],
            "one entry per tree": [f"{owner[rel]}/{rel}" for rel in files],
        },
        args.lookup_passes,
    )

    dedupe_figures = None
    extra: list[Path] = []
    if not args.no_dedupe:
        extra = neighbours(wheels, args.pool)
        all_trees = publish(store, [*wheels, *extra])
        dedupe_figures = measure_dedupe(args.work_dir, all_trees)

    report = render(wheels, imports, layouts[0].name, builds, dedupe_figures)
    report += render_lookups(lookups, len(files))
    print(report)
    if args.json:
        doc = {
            "imports": {name: asdict(values) for name, values in imports.items()},
            "builds": {mode: seconds for mode, (seconds, _) in builds.items()},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


_IMPORT_PROJECTS = {"yaml": "pyyaml", "sklearn": "scikit-learn"}


def _module_project(module: str) -> str:
    top = module.split(".")[0]
    return _IMPORT_PROJECTS.get(top, top)


if __name__ == "__main__":
    main()
