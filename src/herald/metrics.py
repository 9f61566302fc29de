"""Prometheus metrics: one registry per app instance (so tests can run two apps side by side)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "herald_http_requests",
            "HTTP requests by handler, method and status.",
            ["handler", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "herald_http_request_seconds",
            "Time from request start to the end of the response, by handler.",
            ["handler"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "herald_connections_refused",
            "Connections answered and closed by Herald's limits, by reason (url, headers, "
            "pending, idle, headers_timeout, body_timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.streams_refused = Counter(
            "herald_live_streams_refused",
            "Live streams refused at a cap, by cap (subscription, user).",
            ["cap"],
            registry=self.registry,
        )

        self.streams = Gauge(
            "herald_live_streams",
            "Open live streams, by protocol (websocket, sse).",
            ["protocol"],
            registry=self.registry,
        )
        self.sweeps = Counter(
            "herald_expiry_sweeps",
            "Sweeper intervals by outcome: swept (this process's turn), skipped (another "
            "process sharing the store swept in this interval).",
            ["outcome"],
            registry=self.registry,
        )
        self.dispatched = Counter(
            "herald_dispatched_changes",
            "Changes the dispatcher has published to the broker.",
            registry=self.registry,
        )
        self.dispatch_lag = Histogram(
            "herald_dispatch_lag_seconds",
            "From a change's commit timestamp to its publication by the dispatcher.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.push_attempts = Counter(
            "herald_push_attempts",
            "Push attempts by provider and outcome (delivered, retry, gone, rejected).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.push_seconds = Histogram(
            "herald_push_seconds",
            "Time one push request took (rendering, encryption and the provider's answer).",
            ["provider"],
            buckets=LATENCY_BUCKETS + (5.0, 10.0),
            registry=self.registry,
        )
        self.push_queued = Gauge(
            "herald_push_queued",
            "Pushes waiting in the store (due now or later), by provider; sampled every 10 s.",
            ["provider"],
            registry=self.registry,
        )
        self.push_credential_failures = Counter(
            "herald_push_credential_failures",
            "Attempts refused because of the app's credentials (or missing ones), by provider.",
            ["provider"],
            registry=self.registry,
        )

    def identify(self, worker: int) -> None:
        """Name this process in every scrape (`herald serve --workers`): which worker, which pid."""
        info = Info("herald_worker", "This worker process of a supervisor.", registry=self.registry)
        info.info({"index": str(worker), "pid": str(os.getpid())})

    def watch(self, collectors: list[Any]) -> None:
        """Report a component's own collectors (the SQLite store's) with the rest."""
        for collector in collectors:
            self.registry.register(collector)

    def observe(self, handler: str, method: str, status: int, seconds: float) -> None:
        # Label lookups cost microseconds each; cache the children (few distinct combinations).
        key = (handler, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(handler, method, str(status)),
                self.latency.labels(handler),
            )
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class SqliteMetrics:
    """The SQLite store's figures. Made with the store (before the app's registry exists) and
    registered with it by `Metrics.watch`; the checkpointer thread updates some of them."""

    def __init__(self) -> None:
        self.wal_bytes = Gauge(
            "herald_sqlite_wal_bytes",
            "Size of the SQLite WAL file, read when scraped.",
            registry=None,
        )
        self.disk_free_bytes = Gauge(
            "herald_sqlite_disk_free_bytes",
            "Free space (for unprivileged users) on the SQLite database's file system.",
            registry=None,
        )
        self.checkpoints = Counter(
            "herald_sqlite_checkpoints",
            "Checkpoints by mode (passive; restart: the WAL passed half sqlite_wal_limit;"
            " truncate: idle) and outcome (done; busy: readers or another process kept it from"
            " completing; failed: an I/O error such as a full disk).",
            ["mode", "outcome"],
            registry=None,
        )
        self.checkpoint_seconds = Histogram(
            "herald_sqlite_checkpoint_seconds",
            "Time one checkpoint took, by mode; writes are held during a restart or truncate.",
            ["mode"],
            buckets=LATENCY_BUCKETS + (5.0,),
            registry=None,
        )
        self.write_waits = Histogram(
            "herald_sqlite_write_wait_seconds",
            "How long writes waited before their transaction could begin, by reason (checkpoint:"
            " a restart or truncate checkpoint ran; wal_limit: the WAL was at sqlite_wal_limit;"
            " locked: another process held the write lock).",
            ["reason"],
            buckets=LATENCY_BUCKETS + (5.0, 10.0),
            registry=None,
        )
        self.write_failures = Counter(
            "herald_sqlite_write_failures",
            "Write batches answered 503, by reason (full: the disk is full; io: another I/O"
            " error; locked: the write lock or the WAL bound for longer than"
            " sqlite_lock_timeout).",
            ["reason"],
            registry=None,
        )
        self.queries_stopped = Counter(
            "herald_sqlite_queries_stopped",
            "Lists and counts stopped after sqlite_query_timeout.",
            registry=None,
        )
        self.readers_busy = Gauge(
            "herald_sqlite_readers_busy",
            "Reader threads running a list or count.",
            registry=None,
        )
        self.commits = Counter(
            "herald_sqlite_commits",
            "Write transactions that changed the database (each appends to the WAL). Writes"
            " are committed in batches (group commit): herald_sqlite_writes_total /"
            " herald_sqlite_commits_total is writes per commit.",
            registry=None,
        )
        self.writes = Counter(
            "herald_sqlite_writes",
            "Writes in those transactions (a post, a state change, an outbox removal...).",
            registry=None,
        )

    def collectors(self) -> list[Any]:
        return [
            self.wal_bytes,
            self.disk_free_bytes,
            self.checkpoints,
            self.checkpoint_seconds,
            self.write_waits,
            self.write_failures,
            self.queries_stopped,
            self.readers_busy,
            self.commits,
            self.writes,
        ]


class BrokerFigures(Protocol):
    """What the Redis broker counts as it goes (plain attributes: no metrics in the broker)."""

    subscriptions: int
    losses: int
    silences: int
    dropped: int

    @property
    def connected(self) -> bool: ...

    @property
    def gaps(self) -> int: ...

    @property
    def filled(self) -> int: ...


class BrokerMetrics:
    """The Redis broker's figures, read from it when scraped (registered by `Metrics.watch`)."""

    def __init__(self, broker: BrokerFigures) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Metric]:
        b = self.broker
        yield GaugeMetricFamily(
            "herald_redis_subscribed",
            "1 while this process's Redis subscription is up, 0 while it reads the change log.",
            value=int(b.connected),
        )
        for name, text, value in (
            (
                "subscriptions",
                "Redis subscriptions made (the first and every restoration).",
                b.subscriptions,
            ),
            ("subscription_losses", "Redis subscriptions lost (error, cut or silence).", b.losses),
            (
                "silences",
                "Subscriptions ended because the node's own heartbeat stopped coming back.",
                b.silences,
            ),
            (
                "publish_dropped",
                "Changes not published to Redis (unreachable, queue full); other nodes read them"
                " from the change log.",
                b.dropped,
            ),
            ("gaps", "Gaps in a user's positions read from the change log.", b.gaps),
            ("filled_changes", "Changes delivered from the change log instead of Redis.", b.filled),
        ):
            yield CounterMetricFamily(f"herald_redis_{name}", text, value=value)


class LeaseFigures(Protocol):
    """What this node's dispatch leases count as they go (`outbound/leases.py`)."""

    gains: int
    losses: int

    def shards(self) -> frozenset[int]: ...


class LeaseMetrics:
    """This node's share of dispatch, read from its leases when scraped (registered by
    `Metrics.watch`): over the nodes sharing a store the gauges sum to the 64 shards once
    settled (less for a moment after a node dies, until its leases run out)."""

    def __init__(self, leases: LeaseFigures) -> None:
        self.leases = leases

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "herald_dispatch_shards_held",
            "Outbox shards this process may dispatch now (its leases have not run out).",
            value=len(self.leases.shards()),
        )
        changes = CounterMetricFamily(
            "herald_dispatch_shard_changes",
            "Shards this process gained (taken) and lost (given back to a joining node, lapsed"
            " after failed renewals, released on shutdown): gained - lost is what it holds.",
            labels=["change"],
        )
        changes.add_metric(["gained"], self.leases.gains)
        changes.add_metric(["lost"], self.leases.losses)
        yield changes


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled by the route's handler name (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope.get("endpoint")
            handler = getattr(endpoint, "__name__", "unmatched")
            self.metrics.observe(handler, scope["method"], status, time.perf_counter() - start)
