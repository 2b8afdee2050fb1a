"""Prometheus metrics, read from the server's own state at scrape time.

Nothing is counted on the hot path for this: the collector reads the numbers the
hub, writer and sessions keep anyway, when /metrics is asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..core.app import App


class Metrics(Collector):
    def __init__(self, app: "App") -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        sessions = list(app.sessions)
        yield GaugeMetricFamily("barosync_connections", "Open WebSocket connections.", value=len(sessions))
        yield GaugeMetricFamily("barosync_rooms", "Projects with at least one subscriber.", value=len(app.hub.rooms))
        yield GaugeMetricFamily(
            "barosync_present_users", "Users present, summed over projects.",
            value=sum(len(room.users) for room in app.hub.rooms.values()))
        yield GaugeMetricFamily(
            "barosync_unacked_messages", "Server messages sent but not yet acked by clients.",
            value=sum(len(s.unacked) for s in sessions))
        yield GaugeMetricFamily(
            "barosync_outbox_bytes", "Bytes waiting in connection outboxes.",
            value=sum(s.outbox_bytes for s in sessions))
        yield CounterMetricFamily("barosync_deliveries", "Change messages fanned out to subscribers.", value=app.hub.deliveries)
        yield CounterMetricFamily("barosync_commits", "Group commits (LMDB write transactions).", value=app.writer.batches)
        yield CounterMetricFamily("barosync_mutations", "Mutations processed by the writer.", value=app.writer.committed)
        yield GaugeMetricFamily(
            "barosync_storage_degraded", "1 while writes are refused because storage is full, else 0.",
            value=1 if app.writer.degraded is not None else 0)
        yield CounterMetricFamily(
            "barosync_storage_refused_writes", "Writes refused because storage was full or had failed.",
            value=app.writer.refused)
        usage = app.queries.map_usage()
        if usage is not None:
            used, size = usage
            yield GaugeMetricFamily("barosync_lmdb_used_bytes", "Bytes of the LMDB map in use.", value=used)
            yield GaugeMetricFamily("barosync_lmdb_map_bytes", "Current LMDB map size.", value=size)
