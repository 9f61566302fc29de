"""The composition root: the services one Herald process runs, built from its settings
(`build_services`), and `lifespan`, which starts and stops them in order.

Nothing here knows HTTP: `api/app.py` builds the ASGI app from a `Services` and runs `lifespan`
as its own; a process without HTTP (a worker, a test) runs `lifespan` alone. docs/architecture.md
has the layers and the path of a notification through these services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

from herald import expiry
from herald.access import Access, Apps, Users
from herald.auth.issuer import LocalIssuer, import_key
from herald.auth.sessions import Sessions
from herald.auth.tokens import IssuerConfig, TokenVerifier
from herald.broker import Broker, MemoryBroker
from herald.collector import Collector
from herald.feed import Clock, Feed, utcnow
from herald.limits import Limiter, Limits, RateCheck, RateLimits
from herald.logs import redact_tokens, report_repeats
from herald.metrics import BrokerMetrics, LeaseMetrics, Metrics
from herald.outbound import holds
from herald.outbound.dispatcher import Dispatcher
from herald.outbound.leases import Leases
from herald.outbound.providers import PROVIDERS
from herald.outbound.providers.keyring import Keyring
from herald.outbound.pusher import Pusher
from herald.outbound.streams import Streams
from herald.outbound.webhooks import Delivery
from herald.sends import Sends
from herald.settings import Settings
from herald.store import (
    Audiences,
    ChangeFeed,
    ChangeLog,
    Directory,
    Idempotency,
    Issuance,
    Preferences,
    Store,
    Subscriptions,
    Webhooks,
    open_store,
)
from herald.store.sqlite import SqliteStore

log = logging.getLogger("herald.service")


@dataclass
class Services:
    """Everything a request handler (or any other front end) may use."""

    settings: Settings
    store: Store  # the whole store: its life (open, close, ping) is the process's
    # The same store, by the one Protocol each front end needs (docs/architecture.md).
    directory: Directory
    changelog: ChangeLog
    subscriptions: Subscriptions
    idempotency: Idempotency
    preferences: Preferences
    changefeed: ChangeFeed  # the app-wide feed (api/changes.py, api/webhooks.py)
    hooks: Webhooks
    feed: Feed
    access: Access
    issuer: LocalIssuer | None
    sessions: Sessions | None
    verifier: TokenVerifier
    metrics: Metrics
    limits: Limits
    idempotency_ttl: timedelta
    token_limiter: Limiter
    broker: Broker
    dispatcher: Dispatcher
    keyring: Keyring
    pusher: Pusher | None
    streams: Streams
    webhooks: Delivery
    audiences: Audiences
    sends: Sends
    # Per Idempotency-Key: the lock and how many requests hold or wait for it.
    locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def idempotency_lock(self, scope: str, key: str) -> AsyncIterator[None]:
        """Serialise requests that share an Idempotency-Key, so only the first one acts."""
        name = (scope, key)
        lock, users = self.locks.setdefault(name, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:  # nobody holds or awaits it: forget it (waiters keep it alive)
                del self.locks[name]


def build_services(
    settings: Settings, store: Store | None = None, clock: Clock = utcnow
) -> Services:
    """Every service, built and wired but not started (`lifespan` starts them)."""
    redact_tokens()
    store = store or open_store(settings.resolved_store_url, settings)
    issuer = None
    if settings.local_issuer:
        settings.data.mkdir(parents=True, exist_ok=True)
        issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    verifier = TokenVerifier(
        local=issuer, issuers=[IssuerConfig(**dict(i)) for i in settings.issuers]
    )
    metrics = Metrics()
    broker: Broker = MemoryBroker()
    waker = None
    if settings.broker == "redis":
        from herald.broker.redis import RedisBroker  # the `redis` extra
        from herald.broker.wake import RedisWake

        redis = RedisBroker(settings.redis_url, store)
        metrics.watch([BrokerMetrics(redis)])
        broker = redis
        waker = RedisWake(settings.redis_url)
    if isinstance(store, SqliteStore):
        metrics.watch(store.metrics.collectors())
    keyring = Keyring(store)
    pusher = None
    if settings.push_enabled:
        pusher = Pusher(store, PROVIDERS.senders(settings, keyring), settings, metrics, clock)
    local = RateLimits(
        Limiter(settings.app_rate, settings.app_burst),
        Limiter(settings.user_rate, settings.user_burst),
    )
    limiter: RateCheck = local
    if settings.broker == "redis":  # the limits hold for the cluster (per process if Redis is out)
        from herald.broker.limits import ClusterRateLimits

        limiter = ClusterRateLimits(settings.redis_url, local)
    users = Users(store, clock, learn=settings.learn_user_names)
    leases = Leases(store, ttl=settings.dispatch_lease_ttl, renew=settings.dispatch_renew_interval)
    metrics.watch([LeaseMetrics(leases)])
    return Services(
        settings=settings,
        store=store,
        directory=store,
        changelog=store,
        subscriptions=store,
        idempotency=store,
        preferences=store,
        changefeed=store,
        hooks=store,
        feed=Feed(store, clock),
        access=Access(verifier, Apps(store), limiter, store, clock, users),
        issuer=issuer,
        sessions=Sessions(issuer, store) if issuer else None,
        verifier=verifier,
        metrics=metrics,
        limits=Limits(
            max_payload_bytes=settings.max_payload_bytes,
            default_ttl=settings.default_ttl,
            max_ttl=settings.max_ttl,
            clamp_ttl=settings.ttl_policy == "clamp",
        ),
        idempotency_ttl=timedelta(seconds=settings.idempotency_ttl),
        token_limiter=Limiter(settings.token_rate, settings.token_burst),
        broker=broker,
        dispatcher=Dispatcher(
            store,
            broker,
            metrics,
            pushed=pusher.wake if pusher else None,
            clock=clock,
            leases=leases,
            waker=waker,
        ),
        keyring=keyring,
        pusher=pusher,
        # Other processes may delete subscriptions only on a shared store (not SQLite's).
        streams=Streams(store, broker, settings, clock, audit=not isinstance(store, SqliteStore)),
        # Webhooks go by the dispatch shards' leases: one node delivers each (outbound/webhooks).
        webhooks=Delivery(store, settings, clock, leases),
        audiences=store,
        # Runs the sends of the dispatch shards this node leases (the dispatcher renews them).
        sends=Sends(store, clock, settings.send_batch, settings.send_pause, leases),
    )


@contextlib.asynccontextmanager
async def lifespan(services: Services) -> AsyncIterator[Services]:
    """Run the services: open the store, then start what reads it, consumers before producers
    (the broker and the push engine before the dispatcher that feeds them, the dispatcher before
    the streams); on the way out stop them in the reverse order, each even if a later one failed
    to start, and close the store last."""
    s = services
    async with contextlib.AsyncExitStack() as stack:
        await s.store.open()
        stack.push_async_callback(s.store.close)
        if s.issuer is not None and not isinstance(s.store, SqliteStore):
            await share_issuer_key(s.issuer, s.store)
        stack.push_async_callback(s.verifier.aclose)
        stack.push_async_callback(s.access.limits.close)
        # Keeps the cyclic GC off long-lived state: what start-up allocated, then live streams
        # as they open (herald/collector.py; full collections are the long pauses).
        collector = Collector(s.streams)
        collector.start()
        stack.push_async_callback(collector.stop)
        period = min(1.0, s.settings.log_repeat_window / 4)
        sweeper = expiry.run(s.store, s.settings, s.feed.clock, s.metrics)
        for job in (sweeper, report_repeats(period)):
            stack.push_async_callback(_cancel, asyncio.create_task(job))
        await s.broker.start()
        stack.push_async_callback(s.broker.close)
        if s.pusher is not None:
            await s.pusher.start()
            stack.push_async_callback(s.pusher.close)
        await s.dispatcher.start()
        stack.push_async_callback(s.dispatcher.close)
        if s.pusher is not None:  # pushes held for quiet hours: their summaries when they end
            release = holds.run(
                s.store, s.settings.quiet_release_interval, s.feed.clock, s.pusher.wake
            )
            stack.push_async_callback(_cancel, asyncio.create_task(release))
        s.webhooks.start()
        stack.push_async_callback(s.webhooks.close)
        s.sends.start()
        stack.push_async_callback(s.sends.close)
        s.streams.start()
        stack.push_async_callback(s.streams.stop)
        yield s


async def share_issuer_key(issuer: LocalIssuer, store: Issuance) -> None:
    """On a store several processes (machines) share: sign with the key stored there, storing
    this one (the data directory's) if it holds none, so that a token minted via any node is
    accepted by every node. (SQLite keeps the data directory's key file.)"""
    stored = import_key(await store.issuer_key(issuer.private_bytes()))
    if stored.thumbprint() != issuer.key.thumbprint():
        log.info(
            "signing with the store's issuer key, not the data directory's",
            extra={"kid": stored.kid, "file_kid": issuer.kid},
        )
        issuer.use(stored)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
