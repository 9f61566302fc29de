"""The ASGI app: `build_app(services)` serves the services `herald.service` builds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from herald.api import (
    audiences,
    batch,
    changes,
    delta,
    inbox,
    metadata,
    notifications,
    operations,
    preferences,
    stream,
    subscriptions,
    token,
    webhooks,
)
from herald.api.errors import (
    RequestIdMiddleware,
    herald_error_handler,
    http_error_handler,
    unexpected_error_handler,
)
from herald.api.ingest import Ingest, match
from herald.errors import HeraldError
from herald.feed import Clock, utcnow
from herald.metrics import MetricsMiddleware
from herald.service import Services, build_services, lifespan
from herald.settings import Settings
from herald.store import Store


def api_routes() -> list[BaseRoute]:
    # delta before notifications: `…/notifications/{id}` would otherwise take "delta" as an id.
    return (
        delta.routes()
        + notifications.routes()
        + subscriptions.routes()
        + preferences.routes()
        + batch.routes()
        + metadata.routes()
        + changes.routes()
        + webhooks.routes()
        + audiences.routes()
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
    """The services (`herald.service`) and the ASGI app serving them."""
    return build_app(build_services(settings, store, clock))


def build_app(services: Services) -> Herald:
    """The ASGI app for these services; its lifespan is theirs (`herald.service.lifespan`)."""

    @contextlib.asynccontextmanager
    async def running(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(services):
            yield

    settings = services.settings
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
        lifespan=running,
    )
    app.state.services = services
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    herald = Herald(app, Ingest(services), stream.Endpoint(services), origins)
    app.state.asgi = herald  # for $batch to dispatch inner requests through
    return herald
