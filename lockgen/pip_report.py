"""pip, run as a subprocess of the target interpreter, and its installation report as values.

``run_pip`` is the one function that starts pip. Everything after the report is pure:
``parse_report`` turns pip's JSON (report format version "1") into :class:`ResolvedItem` values,
tested on recorded reports.

pip runs with the user's environment untouched, so their pip configuration (indexes,
find-links, constraints, certificates) applies exactly as it would to ``pip install``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lockgen.errors import InterpreterError, PipError, PipReportError
from lockgen.lockfile import Sha256, sha256_hex

SUPPORTED_REPORT_VERSION = "1"

SourceKind = Literal["archive", "vcs", "dir"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedItem:
    """One distribution pip would install, and where its bytes come from."""

    name: str
    version: str
    url: str
    sha256: Sha256 | None
    kind: SourceKind
    #: The argument that makes ``pip wheel --no-deps`` build this item (non-wheels only).
    build_requirement: str

    @property
    def is_wheel(self) -> bool:
        return self.kind == "archive" and urllib.parse.urlsplit(self.url).path.endswith(".whl")

    @property
    def filename(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    pip_version: str
    environment: Mapping[str, str]
    items: tuple[ResolvedItem, ...]


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (POSIX; urllib.request is too heavy to import)."""
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))


def _get(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        raise PipReportError(
            f"pip's report has no valid `{where}.{key}` (got {value!r}); this pip is not "
            "supported, upgrade it in the target interpreter (`python -m pip install -U pip`)."
        )
    return value


def _with_subdirectory(requirement: str, subdirectory: str | None) -> str:
    return f"{requirement}#subdirectory={subdirectory}" if subdirectory else requirement


def _parse_item(raw: Mapping[str, Any], where: str) -> ResolvedItem:
    metadata = _get(raw, "metadata", dict, where)
    info = _get(raw, "download_info", dict, where)
    url = _get(info, "url", str, f"{where}.download_info")
    subdirectory = info.get("subdirectory")
    sha: Sha256 | None = None
    kind: SourceKind
    if "vcs_info" in info:
        vcs = _get(info, "vcs_info", dict, f"{where}.download_info")
        kind = "vcs"
        requirement = f"{vcs.get('vcs', 'git')}+{url}@{vcs.get('commit_id', '')}"
    elif "dir_info" in info:
        kind = "dir"
        requirement = str(file_url_path(url))
    else:
        kind = "archive"
        requirement = url
        archive = info.get("archive_info") or {}
        hashes = archive.get("hashes") or {}
        legacy = str(archive.get("hash") or "")
        candidate = hashes.get("sha256") or (legacy[7:] if legacy.startswith("sha256=") else None)
        if candidate:
            try:
                sha = sha256_hex(str(candidate).lower())
            except ValueError:
                raise PipReportError(
                    f"pip's report gives {url} an invalid sha256 {candidate!r}"
                ) from None
    return ResolvedItem(
        name=_get(metadata, "name", str, f"{where}.metadata"),
        version=_get(metadata, "version", str, f"{where}.metadata"),
        url=url,
        sha256=sha,
        kind=kind,
        build_requirement=_with_subdirectory(requirement, subdirectory),
    )


def parse_report(data: Mapping[str, Any]) -> Report:
    """Validate pip's installation report and keep what locking needs."""
    version = data.get("version")
    if version != SUPPORTED_REPORT_VERSION:
        raise PipReportError(
            f"pip wrote an installation report of version {version!r}; wheelcas reads version "
            f"{SUPPORTED_REPORT_VERSION!r}. Use a pip that writes it (pip 22.2 to today's), "
            "e.g. `python -m pip install 'pip>=23'` in the target interpreter."
        )
    environment = _get(data, "environment", dict, "report")
    raw_items = _get(data, "install", list, "report")
    items = tuple(_parse_item(item, f"install[{i}]") for i, item in enumerate(raw_items))
    return Report(
        pip_version=str(data.get("pip_version", "")),
        environment={str(k): str(v) for k, v in environment.items()},
        items=items,
    )


def run_pip(python: str, args: Sequence[str], *, cwd: Path, action: str) -> str:
    """Run ``python -m pip ARGS`` and return its stdout; failure raises :class:`PipError`.

    pip's stderr is captured so that the error we raise carries pip's own words.
    """
    argv = [python, "-m", "pip", "--disable-pip-version-check", *args]
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise InterpreterError(
            f"cannot run the interpreter {python!r}: {exc.strerror}. Pass an existing "
            "interpreter with --python."
        ) from None
    if done.returncode != 0:
        if "No module named pip" in done.stderr:
            raise InterpreterError(
                f"{python} has no pip; install it with `{python} -m ensurepip` and retry."
            )
        raise PipError(action, done.returncode, done.stderr or done.stdout)
    return done.stdout


def resolve_requirements(
    python: str, requirements: Path, *, cwd: Path, pip_args: Sequence[str] = ()
) -> Report:
    """pip's view of what ``requirements`` installs into ``python``, as a :class:`Report`."""
    with tempfile.TemporaryDirectory(prefix="wheelcas-report-") as tmp:
        report_path = Path(tmp) / "report.json"
        run_pip(
            python,
            [
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report_path),
                "-r",
                str(requirements),
                *pip_args,
            ],
            cwd=cwd,
            action=f"resolving {requirements}",
        )
        try:
            data = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipReportError(f"pip wrote no readable report ({exc})") from None
    if not isinstance(data, dict):
        raise PipReportError("pip's report is not a JSON object")
    return parse_report(data)


def configured_index_urls(python: str, *, cwd: Path) -> list[str]:
    """Index URLs from the user's pip configuration (files and ``PIP_*`` variables)."""
    output = run_pip(python, ["config", "list"], cwd=cwd, action="reading pip's configuration")
    return parse_config_index_urls(output)


def parse_config_index_urls(config_list_output: str) -> list[str]:
    """The values of every ``*.index-url`` and ``*.extra-index-url`` in ``pip config list``."""
    urls: list[str] = []
    for line in config_list_output.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key.endswith(("index-url", "index_url")):
            continue
        urls.extend(value.strip().strip("'\"").split())
    return urls
