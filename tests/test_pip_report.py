"""pip's installation report, parsed from a recorded report; and which items stay URLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lockgen.classify import (
    Disposition,
    disposition,
    index_urls_in_args,
    index_urls_in_requirements,
    kept_hosts,
    strip_credentials,
    url_host,
)
from lockgen.errors import PipReportError
from lockgen.pip_report import parse_config_index_urls, parse_report

RECORDED = Path(__file__).parent / "golden" / "pip_report_v1.json"


def _report() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RECORDED.read_text())
    return data


def test_parses_every_kind_of_item() -> None:
    report = parse_report(_report())
    six, idna, sdist, vcs, local = report.items
    assert (six.name, six.version, six.kind, six.is_wheel) == ("six", "1.17.0", "archive", True)
    assert six.sha256 == "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274"
    assert idna.sha256 is not None
    assert idna.sha256.startswith("ab7ae712")
    assert sdist.is_wheel is False
    assert sdist.build_requirement == sdist.url
    assert vcs.kind == "vcs"
    assert vcs.build_requirement == (
        "git+https://github.com/org/repo.git@0123456789abcdef0123456789abcdef01234567"
        "#subdirectory=python"
    )
    assert local.kind == "dir"
    assert local.build_requirement == "/work/model/localpkg"
    assert report.environment["python_version"] == "3.11"


def test_a_report_version_other_than_1_is_a_clear_error() -> None:
    data = _report() | {"version": "2"}
    with pytest.raises(PipReportError, match=r"version '2'.*reads version '1'"):
        parse_report(data)


def test_a_malformed_item_names_its_place() -> None:
    data = _report()
    del data["install"][2]["metadata"]["name"]
    with pytest.raises(PipReportError, match=r"install\[2\]\.metadata\.name"):
        parse_report(data)


def test_classification() -> None:
    report = parse_report(_report())
    hosts = kept_hosts(["https://user:pw@pypi.example.com:8443/simple"])
    assert hosts == {"files.pythonhosted.org", "pypi.example.com:8443"}
    six, idna, sdist, vcs, local = report.items
    assert disposition(six, hosts) is Disposition.URL
    assert disposition(idna, hosts) is Disposition.BUNDLE  # file:// is always bundled
    assert {disposition(i, hosts) for i in (sdist, vcs, local)} == {Disposition.BUILD}


def test_url_helpers() -> None:
    assert url_host("http://127.0.0.1:8080/files/x.whl") == "127.0.0.1:8080"
    assert url_host("HTTPS://Files.PythonHosted.org/x") == "files.pythonhosted.org"
    assert url_host("file:///opt/x.whl") is None
    assert strip_credentials("https://u:p@h.example/x.whl") == "https://h.example/x.whl"
    assert strip_credentials("https://h.example/x.whl") == "https://h.example/x.whl"


def test_index_urls_from_args_requirements_and_pip_config() -> None:
    assert index_urls_in_args(
        ["-i", "http://a/simple", "--extra-index-url=http://b/simple", "-ihttp://c", "numpy"]
    ) == ["http://a/simple", "http://b/simple", "http://c"]
    text = "--index-url http://r/simple\nnumpy  # --extra-index-url http://no\n-e ./x\n"
    assert index_urls_in_requirements(text) == ["http://r/simple"]
    config = (
        "global.extra-index-url='file:///opt/pypi/simple https://mirror.example/simple'\n"
        "global.find-links='/opt/wheels'\n"
        ":env:.index-url='https://idx.example/simple'\n"
    )
    assert parse_config_index_urls(config) == [
        "file:///opt/pypi/simple",
        "https://mirror.example/simple",
        "https://idx.example/simple",
    ]
