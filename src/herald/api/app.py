"""The composition root: `create_app(settings)` builds every dependency and the ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from herald import expiry
from herald.api import (
    batch,
    delta,
    inbox,
    metadata,
    notifications,
    operations,
    schemas,
    stream,
    subscriptions,
    token,
)
from herald.api.access import Access, Apps, Users
from herald.api.errors import (
    RequestIdMiddleware,
    herald_error_handler,
    http_error_handler,
    unexpected_error_handler,
)
from herald.api.ingest import Ingest, match
from herald.auth.issuer import LocalIssuer
from herald.auth.sessions import Sessions
from herald.auth.tokens import IssuerConfig, TokenVerifier
from herald.broker import Broker, MemoryBroker
from herald.collector import Collector
from herald.errors import HeraldError
from herald.feed import Clock, Feed, utcnow
from herald.limits import Limiter, RateLimits
from herald.logs import redact_tokens, report_repeats
from herald.metrics import Metrics, MetricsMiddleware
from herald.outbound.dispatcher import Dispatcher
from herald.outbound.providers import PROVIDERS
from herald.outbound.providers.keyring import Keyring
from herald.outbound.pusher import Pusher
from herald.outbound.streams import Streams
from herald.settings import Settings
from herald.store import Store, open_store
from herald.store.sqlite import SqliteStore


@dataclass
class Services:
    """Everything a request handler may use; lives in `app.state.services`."""

    settings: Settings
    store: Store
    feed: Feed
    access: Access
    issuer: LocalIssuer | None
    sessions: Sessions | None
    verifier: TokenVerifier
    metrics: Metrics
    limits: schemas.Limits
    idempotency_ttl: timedelta
    token_limiter: Limiter
    broker: Broker
    dispatcher: Dispatcher
    keyring: Keyring
    pusher: Pusher | None
    streams: Streams
    # Per Idempotency-Key: the lock and how many requests hold or wait for it.
    locks: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = field(default_factory=dict)
    # The whole application, for $batch to dispatch inner requests through.
    asgi: ASGIApp | None = None

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
    store = store or open_store(settings.resolved_store_url, settings)
    issuer = None
    if settings.local_issuer:
        settings.data.mkdir(parents=True, exist_ok=True)
        issuer = LocalIssuer.load_or_create(settings.data, settings.issuer_url, settings.audience)
    verifier = TokenVerifier(
        local=issuer, issuers=[IssuerConfig(**dict(i)) for i in settings.issuers]
    )
    broker = MemoryBroker()
    metrics = Metrics()
    if isinstance(store, SqliteStore):
        metrics.watch(store.metrics.collectors())
    keyring = Keyring(store)
    pusher = None
    if settings.push_enabled:
        pusher = Pusher(store, PROVIDERS.senders(settings, keyring), settings, metrics, clock)
    limiter = RateLimits(
        Limiter(settings.app_rate, settings.app_burst),
        Limiter(settings.user_rate, settings.user_burst),
    )
    users = Users(store, clock, learn=settings.learn_user_names)
    return Services(
        settings=settings,
        store=store,
        feed=Feed(store, clock),
        access=Access(verifier, Apps(store), limiter, store, clock, users),
        issuer=issuer,
        sessions=Sessions(issuer) if issuer else None,
        verifier=verifier,
        metrics=metrics,
        limits=schemas.Limits(
            max_payload_bytes=settings.max_payload_bytes,
            default_ttl=settings.default_ttl,
            max_ttl=settings.max_ttl,
            clamp_ttl=settings.ttl_policy == "clamp",
        ),
        idempotency_ttl=timedelta(seconds=settings.idempotency_ttl),
        token_limiter=Limiter(settings.token_rate, settings.token_burst),
        broker=broker,
        dispatcher=Dispatcher(
            store, broker, metrics, pushed=pusher.wake if pusher else None, clock=clock
        ),
        keyring=keyring,
        pusher=pusher,
        streams=Streams(store, broker, settings, clock),
    )


def api_routes() -> list[BaseRoute]:
    # delta before notifications: `…/notifications/{id}` would otherwise take "delta" as an id.
    return (
        delta.routes()
        + notifications.routes()
        + subscriptions.routes()
        + batch.routes()
        + metadata.routes()
    )


class Herald:
    """The ASGI application: `POST …/notifications` goes straight to the ingest handler (the hot
    path) and live streams to their handler (thousands stay open), everything else through the
    Starlette app (routing, middleware, lifespan). CORS wraps all three for the paths web apps on
    other origins use (`CORS_PATHS`: the API, the token endpoint, `herald.js`; docs/inbox.md); it
    costs a request without an `Origin` header about 2 µs."""

    def __init__(
        self,
        router: Starlette,
        ingest: Ingest,
        live: stream.Endpoint,
        cors_origins: list[str] | None = None,
    ) -> None:
        self.router = router
        self.ingest = ingest
        self.live = live
        self.streams = live.streams  # the server closes them at shutdown
        self.state = router.state
        self.handle: ASGIApp = self.route
        if cors_origins:
            self.handle = CORSMiddleware(
                self.route,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_RESPONSE_HEADERS,
                max_age=3600,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path", "").startswith(CORS_PATHS):
            await self.handle(scope, receive, send)
        else:
            await self.route(scope, receive, send)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            target = match(scope) if kind == "http" else None
            if target is not None:
                await self.ingest(scope, receive, send, *target)
                return
            subscription = stream.match(scope)
            if subscription is not None:
                await self.live(scope, receive, send, subscription)
                return
        await self.router(scope, receive, send)


# Where CORS applies: the API, the token endpoint and discovery, and the client library; not the
# operational endpoints (/metrics, /readyz…), which no web page of another origin needs to read.
CORS_PATHS = (
    "/beta/",
    "/v1.0/",
    "/oauth2/",
    "/.well-known/",
    "/discovery/",
    "/inbox/herald.js",
)
# What a browser on another origin may send and read (Authorization: tokens are bearer tokens,
# never cookies, so allowing an origin grants it nothing a server-side caller couldn't do).
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "If-Match",
    "If-None-Match",
    "Idempotency-Key",
    "Prefer",
    "X-UNS-ID",
    "client-request-id",
    "Last-Event-ID",
]
CORS_RESPONSE_HEADERS = [
    "request-id",
    "client-request-id",
    "ETag",
    "Location",
    "Retry-After",
    "Preference-Applied",
]


def create_app(settings: Settings, store: Store | None = None, clock: Clock = utcnow) -> Herald:
    redact_tokens()
    services = build_services(settings, store, clock)
    streams = services.streams
    collector = Collector(streams)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.store.open()
        collector.start()  # keeps the cyclic GC off long-lived state (herald/collector.py)
        sweeper = asyncio.create_task(expiry.run(services.store, settings, services.feed.clock))
        reporter = asyncio.create_task(report_repeats(min(1.0, settings.log_repeat_window / 4)))
        await services.broker.start()
        await services.dispatcher.start()
        if services.pusher is not None:
            await services.pusher.start()
        streams.start()
        try:
            yield
        finally:
            await collector.stop()
            await streams.stop()
            await services.dispatcher.close()
            if services.pusher is not None:
                await services.pusher.close()
            await services.broker.close()
            for task in (sweeper, reporter):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.verifier.aclose()
            await services.store.close()

    app = Starlette(
        routes=[
            Mount("/beta", routes=api_routes()),
            Mount("/v1.0", routes=api_routes()),
            *operations.routes(),
            *token.routes(),
            *inbox.routes(settings),
        ],
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(MetricsMiddleware, services.metrics),
        ],
        exception_handlers={
            HeraldError: herald_error_handler,
            HTTPException: http_error_handler,
            Exception: unexpected_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.services = services
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    herald = Herald(app, Ingest(services), stream.Endpoint(services), origins)
    services.asgi = herald
    return herald
