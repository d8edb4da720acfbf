"""The daemon's counters, how progress events feed them, and their Prometheus rendering.

Counters only go up, from start-up (``GET /v1/metrics``, docs/api.md); gauges (store size,
views, leases) are measured when asked and passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cas_daemon.progress import ProgressEvent
from cas_daemon.store import StoreStats


@dataclass(slots=True)
class Metrics:
    """Counters since start-up; they only go up (Prometheus counters)."""

    resolves: int = 0
    prefetches: int = 0
    downloads: int = 0
    bytes_fetched: int = 0
    published: int = 0
    cache_hits: int = 0
    uploads: int = 0
    #: Ready trees hard-linked into a view's staging during a cold resolve (cas_daemon.prelink).
    trees_linked_ahead: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    relocks: Counter[str] = field(default_factory=Counter)  # watched dirs' rounds, by result


class Meter:
    """Counts the store's progress events into :class:`Metrics`, each event once."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._last: ProgressEvent | None = None
        self._fetched: dict[str, int] = {}  # bytes fetched so far, per wheel being fetched

    def count(self, event: ProgressEvent) -> None:
        """Count an event once, however many requests listen to its wheel.

        The store hands the same event object to every listener of a wheel, one after the
        other, so comparing with the last event seen is enough to count each once.
        """
        if event is self._last:
            return
        self._last = event
        metrics, sha = self.metrics, event.sha256
        if event.kind == "start":
            self._fetched[sha] = 0
        elif event.kind == "bytes":
            metrics.bytes_fetched += event.nbytes
            self._fetched[sha] = self._fetched.get(sha, 0) + event.nbytes
        elif event.kind == "ready":
            metrics.published += 1
            metrics.downloads += bool(self._fetched.pop(sha, 0))
        elif event.kind == "cached":
            metrics.cache_hits += 1


def render_metrics(
    m: Metrics, stats: StoreStats, leases: int, views: int, deferred_trees: int = 0
) -> str:
    """Prometheus text exposition format (version 0.0.4) of the counters and the gauges."""
    families: list[tuple[str, str, str, list[tuple[str, int]]]] = [
        ("wheelcas_resolves_total", "counter", "Resolve requests served.", [("", m.resolves)]),
        ("wheelcas_prefetches_total", "counter", "Prefetch requests served.", [("", m.prefetches)]),
        ("wheelcas_downloads_total", "counter", "Wheels downloaded.", [("", m.downloads)]),
        ("wheelcas_fetched_bytes_total", "counter", "Bytes downloaded.", [("", m.bytes_fetched)]),
        (
            "wheelcas_published_total",
            "counter",
            "Trees published or compiled.",
            [("", m.published)],
        ),
        ("wheelcas_cache_hits_total", "counter", "Wheels already ready.", [("", m.cache_hits)]),
        ("wheelcas_uploads_total", "counter", "Bundled wheels received.", [("", m.uploads)]),
        (
            "wheelcas_view_trees_linked_ahead_total",
            "counter",
            "Trees linked into a view's staging while a cold resolve ran.",
            [("", m.trees_linked_ahead)],
        ),
        ("wheelcas_errors_total", "counter", "Failed requests.", [("", sum(m.errors.values()))]),
        (
            "wheelcas_errors_by_type_total",
            "counter",
            "Failed requests, by error type.",
            [(f'{{type="{kind}"}}', n) for kind, n in sorted(m.errors.items())],
        ),
        (
            "wheelcas_relocks_total",
            "counter",
            "Watched model dirs' re-lock rounds, by result.",
            [(f'{{result="{kind}"}}', n) for kind, n in sorted(m.relocks.items())],
        ),
        (
            "wheelcas_store_bytes",
            "gauge",
            "Bytes of blobs and trees.",
            [("", stats.blob_bytes + stats.tree_bytes)],
        ),
        ("wheelcas_store_trees", "gauge", "Published trees.", [("", stats.trees)]),
        ("wheelcas_store_views", "gauge", "Built views.", [("", views)]),
        ("wheelcas_leases", "gauge", "Leases of live processes.", [("", leases)]),
        (
            "wheelcas_deferred_bytecode_trees",
            "gauge",
            "Published trees whose test dirs still wait for bytecode.",
            [("", deferred_trees)],
        ),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"
