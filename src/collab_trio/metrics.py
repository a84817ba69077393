"""The internal endpoint (`--metrics-address`): /metrics, /livez and /readyz.

`/metrics` is Prometheus' text format made by prometheus_client from a
registry of this server's own (tests run several servers in one process).
Its numbers are read at scrape time: the server keeps plain integers and
bucket counts (counters.py) and the live state (connections, sessions,
queues) where it already is; one `ServerCollector` turns them into metric
families. Nothing on the message path touches prometheus_client.

`/livez` is 200 while the process serves HTTP at all (no dependency is
checked: a restart would not cure a failing disk). `/readyz` is 503 while
the server starts, while it drains (graceful stop), and while the store
cannot commit (see `readiness()`); 200 otherwise. Each body is one line
saying why.

The endpoint runs in serve()'s nursery from before the WebSocket port opens
until the graceful stop is over, so a probe sees both 503 phases.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__
from .config import split_address
from .counters import Counters, Histogram
from .httpd import HTTPServer, Response, text_response

if TYPE_CHECKING:
    from .serving import WebSocketServer
    from .session import SessionRegistry

log = logging.getLogger(__name__)

# Seconds /readyz stays 503 after a failed commit when no commit succeeds
# meanwhile (a success makes it 200 at once). A server that a load balancer
# took out of rotation may get no changes to try again with: it is tried
# again after this, and is out again at the next failure.
STORE_FAILURE_HOLD = 30.0


class MetricsAddressError(OSError):
    """The internal endpoint can't listen where --metrics-address says; a one-line message."""


def readiness(
    *,
    accepting: bool,
    draining: bool,
    commit_failed_at: float | None,
    commit_error: str,
    now: float,
    store_unreachable: str | None = None,
) -> tuple[bool, str]:
    """Whether the server should get new clients, and why (one line).

    Args:
        accepting: the WebSocket listeners accept.
        draining: a graceful stop has started.
        commit_failed_at: when the latest commit failed, if none succeeded since.
        commit_error: why it failed.
        now: the time on the same clock.
        store_unreachable: why the store can't be reached (postgres: the
            last lease renewal failed), if it can't.
    """
    if draining:
        return False, "draining: the server is shutting down"
    if not accepting:
        return False, "starting: the WebSocket port does not accept connections yet"
    if store_unreachable is not None:
        return False, f"the store is unreachable: {store_unreachable}"
    if commit_failed_at is not None and now - commit_failed_at < STORE_FAILURE_HOLD:
        return False, f"the store cannot commit: {commit_error}"
    return True, "ready"


class MonitoredServer(Protocol):
    """What the endpoint reads of the server (server.CollabServer)."""

    accepting: bool
    registry: SessionRegistry
    web: WebSocketServer

    @property
    def closing(self) -> bool: ...


@attrs.define(eq=False)
class Monitor:
    """What the endpoint reports on: the server's counters, and the server once it exists."""

    counters: Counters
    server: MonitoredServer | None = None
    registry: CollectorRegistry = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(self))
        # CPU, memory, open files of the process: from /proc at scrape time.
        ProcessCollector(registry=self.registry)

    def readiness(self) -> tuple[bool, str]:
        server, counters = self.server, self.counters
        return readiness(
            accepting=server is not None and server.accepting,
            draining=server is not None and server.closing,
            commit_failed_at=counters.commit_failed_at,
            commit_error=counters.last_commit_error,
            now=trio.current_time(),
            store_unreachable=None if server is None else server.registry.store.unreachable,
        )

    def respond(self, method: str, target: str) -> Response:
        """The answer to one HTTP request."""
        path = target.partition("?")[0]
        if path not in ("/metrics", "/livez", "/readyz"):
            return text_response(404, f"not found: {path[:100]} (try /metrics, /livez or /readyz)")
        if method not in ("GET", "HEAD"):
            return text_response(405, f"method {method[:20]} not allowed", ("Allow", "GET, HEAD"))
        if path == "/livez":
            return text_response(200, "ok")
        if path == "/readyz":
            ready, why = self.readiness()
            return text_response(200 if ready else 503, why)
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total)


@attrs.define(eq=False)
class ServerCollector(Collector):
    """Every collab_trio_ metric, read from the server when Prometheus scrapes."""

    monitor: Monitor

    def collect(self) -> Iterator[Metric]:
        counters, server = self.monitor.counters, self.monitor.server
        yield InfoMetricFamily("collab_trio_build", "The collab-trio version", value={"version": __version__})
        ready, _ = self.monitor.readiness()
        yield _gauge("collab_trio_ready", "1 when /readyz answers 200, else 0", 1 if ready else 0)
        connections = tcp = sessions = queued = 0
        corrections = merges = refusals = 0
        if server is not None:
            registry = server.registry
            live = list(registry.sessions.values())
            sessions = len(live)
            members = [conn for session in live for conn in session.members.values()]
            connections = len(members)
            queued = sum(conn.wire.queued_bytes for conn in members)
            tcp = server.web.tcp_connections
            convergence = registry.convergence_stats()
            corrections, merges, refusals = convergence.corrections, convergence.merges, convergence.refusals
        yield _gauge("collab_trio_connections", "WebSocket connections of session members", connections)
        yield _gauge(
            "collab_trio_tcp_connections", "TCP connections to the WebSocket port, handshakes included", tcp
        )
        yield _gauge("collab_trio_sessions", "Live sessions (loaded, with members)", sessions)
        yield _gauge(
            "collab_trio_queue_bytes", "Bytes queued for clients and not yet written, all connections", queued
        )
        yield _by_label(
            "collab_trio_messages_received_total",
            "Messages received from clients, by type (other: unparsable or binary)",
            "type",
            counters.received,
        )
        yield _by_label(
            "collab_trio_messages_sent_total",
            "Messages sent to clients, by type (one per recipient)",
            "type",
            counters.sent,
        )
        yield _counter("collab_trio_sent_bytes_total", "Bytes written to client sockets", counters.bytes_sent)
        yield _histogram(
            "collab_trio_commit_batch_size", "Changes per committed batch (one transaction)", counters.commit_batch_size
        )
        yield _histogram(
            "collab_trio_commit_duration_seconds", "Time the store took for one committed batch", counters.commit_seconds
        )
        yield _counter(
            "collab_trio_commit_failures_total",
            "Batches the store failed to commit (their senders got not_persisted, or all reconnected)",
            counters.commit_failures,
        )
        yield _histogram(
            "collab_trio_ack_latency_seconds",
            "From receiving a command to queueing its ack (after the commit)",
            counters.ack_seconds,
        )
        yield _by_label(
            "collab_trio_slow_client_disconnects_total",
            "Clients closed with 1013, by reason (queue_bytes: over --max-queue-bytes;"
            " write_timeout: no bytes taken for --write-timeout)",
            "reason",
            counters.slow_disconnects,
        )
        yield _by_label(
            "collab_trio_resumes_total",
            "Sync requests with `since` (resumes), by what answered them",
            "outcome",
            counters.resumes,
        )
        yield _counter("collab_trio_corrections_total", "Corrections sent to members", corrections)
        yield _counter(
            "collab_trio_merged_updates_total", "Updates whose merge kept a stale field of the sender's out", merges
        )
        yield _counter("collab_trio_refused_changes_total", "Moves and updates of removed items refused", refusals)
        yield _by_label(
            "collab_trio_auth_failures_total", "Handshakes refused by the access checks, by reason", "reason",
            counters.auth_failures,
        )
        yield _counter(
            "collab_trio_rate_limited_messages_total",
            "Messages and frames dropped for the per-connection rate limit",
            counters.rate_limited,
        )
        yield _counter(
            "collab_trio_held_messages_total",
            "Moves, updates and cursors over the rate limit held and taken in at the rate instead of dropped",
            counters.held,
        )
        yield _counter(
            "collab_trio_held_superseded_messages_total",
            "Held messages a later one of the same item and kind replaced before their turn",
            counters.held_superseded,
        )


async def run_endpoint(
    monitor: Monitor, address: str, *, task_status: trio.TaskStatus[HTTPServer] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve /metrics, /livez and /readyz at `address` (HOST:PORT) until cancelled.

    Raises:
        MetricsAddressError: the address can't be bound (before started()).
    """
    host, port = split_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise MetricsAddressError(f"Cannot serve metrics on {address}: {_reason(exc)}") from None
    httpd = HTTPServer(listeners, monitor.respond)
    for url in endpoint_urls(httpd):
        log.info("Metrics and health on %s", url)
    async with trio.open_nursery() as nursery:
        await nursery.start(httpd.run)
        task_status.started(httpd)


def endpoint_urls(httpd: HTTPServer) -> list[str]:
    """http://HOST:PORT/metrics for each listener."""
    urls = []
    for listener in httpd.listeners:
        host, port = listener.socket.getsockname()[:2]  # type: ignore[attr-defined]
        urls.append(f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics")
    return urls


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use"
    return exc.strerror or str(exc)
