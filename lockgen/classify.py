"""Which resolved items stay URLs in the lockfile, which are bundled, which are built. Pure.

A wheel stays a URL only when any host running the model can fetch it again: the public
index's file host, or the host of an index the user configured or passed. Everything else —
``file://`` wheels, wheels from ad-hoc URLs — is copied into the model dir, and non-wheels
(sdists, VCS checkouts, local dirs) are built first.
"""

from __future__ import annotations

import enum
import shlex
import urllib.parse
from collections.abc import Iterable

from lockgen.pip_report import ResolvedItem

PUBLIC_FILE_HOST = "files.pythonhosted.org"
_INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url")


class Disposition(enum.Enum):
    URL = "url"  # locked by URL and sha256
    BUNDLE = "bundle"  # a wheel copied into .carton/bundled_wheels
    BUILD = "build"  # built with `pip wheel --no-deps`, then bundled


def url_host(url: str) -> str | None:
    """``host[:port]`` of an http(s) URL, lower-cased and without credentials; else None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


def kept_hosts(index_urls: Iterable[str]) -> frozenset[str]:
    """Hosts whose wheels stay URLs: the public file host and every index's host."""
    hosts = {PUBLIC_FILE_HOST}
    hosts.update(h for h in map(url_host, index_urls) if h is not None)
    return frozenset(hosts)


def disposition(item: ResolvedItem, hosts: frozenset[str]) -> Disposition:
    if not item.is_wheel:
        return Disposition.BUILD
    return Disposition.URL if url_host(item.url) in hosts else Disposition.BUNDLE


def strip_credentials(url: str) -> str:
    """The URL without ``user:password@``: a lockfile must never carry a secret."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def index_urls_in_args(args: Iterable[str]) -> list[str]:
    """Index URLs named by pip options (``-i X``, ``--index-url=X``, ``--extra-index-url X``)."""
    urls: list[str] = []
    pending = False
    for arg in args:
        if pending:
            urls.append(arg)
            pending = False
        elif arg in _INDEX_OPTIONS:
            pending = True
        elif arg.startswith(tuple(f"{opt}=" for opt in _INDEX_OPTIONS)):
            urls.append(arg.split("=", 1)[1])
        elif arg.startswith("-i") and len(arg) > 2:
            urls.append(arg[2:])
    return urls


def index_urls_in_requirements(text: str) -> list[str]:
    """Index URLs given by option lines inside a requirements file."""
    urls: list[str] = []
    for line in text.splitlines():
        stripped = line.split(" #", 1)[0].strip()
        if stripped.startswith("-"):
            try:
                urls.extend(index_urls_in_args(shlex.split(stripped)))
            except ValueError:
                continue
    return urls
