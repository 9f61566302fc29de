"""`/me/notificationSubscriptions/{id}/stream`: the HTTP side of a device's live stream,
WebSocket or SSE.

Served as raw ASGI in front of the router (like ingest): a server holds thousands of these open,
so each one is a single coroutine with a few slotted objects, not a framework request with its
own task group. This module does the handshake: it authenticates (header, or `?access_token=` for
browsers), resolves the subscription, applies the caps below and parses the resume position;
then `herald.outbound.streams` serves the stream (register, replay, forward, deadlines) through
one of the writers here, which frame its messages as WebSocket messages or SSE events.

At most `max_streams_per_subscription` streams per subscription (one per browser tab: tabs share
the subscription, docs/inbox.md) and `max_streams_per_user` per (user, app) are open at once on a
node. One more is refused (429 with Retry-After), not let in by closing an older one: a client
stuck in a reconnect loop would otherwise take the streams of the user's working tabs and
devices, and two clients over the cap would keep closing each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.utils import ClientDisconnected

from herald.api import schemas
from herald.api.errors import error_body, error_headers, request_id
from herald.errors import Gone, HeraldError, InvalidRequest, NotFound, Throttled
from herald.model import Change, Subscription
from herald.outbound.streams import Closed, Streams

if TYPE_CHECKING:
    from herald.service import Services

log = logging.getLogger("herald.stream")

K = TypeVar("K")

PATH = re.compile(r"/(beta|v1\.0)/me/notificationSubscriptions/([^/]+)/stream/?")
MAX_POSITION = 2**63 - 1
QUERY_OPTIONS = {"access_token", "after"}
DISCONNECT = ("websocket.disconnect", "http.disconnect")

# WebSocket close codes (4000-4999 are the application's) and the `closing` reasons.
CLOSE_CODES = {
    "tokenExpired": 4401,
    "subscriptionGone": 4404,
    "tooSlow": 4408,
    "shutdown": 1012,  # service restart
}


def match(scope: Scope) -> str | None:
    """The subscription id if this is a stream request (WebSocket, or HTTP GET for SSE)."""
    if scope["type"] == "http" and scope["method"] != "GET":
        return None
    m = PATH.fullmatch(scope["path"])
    return m.group(2) if m else None


# -- messages ----------------------------------------------------------------------------------


class _Removed(msgspec.Struct):
    reason: str = "deleted"


class _Message(msgspec.Struct, omit_defaults=True):
    type: str
    position: int | None = None
    id: str | None = None
    notification: dict[str, Any] | None = None
    removed: _Removed | None = msgspec.field(default=None, name="@removed")
    reason: str | None = None
    message: str | None = None


_encode = msgspec.json.Encoder().encode
KEEPALIVE = _encode(_Message("keepalive"))
# Most deliveries of a change go to several streams in a row: render it once.
_last_rendered: tuple[Change | None, bytes] = (None, b"")


def render(change: Change) -> bytes:
    global _last_rendered
    if _last_rendered[0] is change:
        return _last_rendered[1]
    kind, n = change.kind, change.notification
    if n is not None:
        msg = _Message(kind.value, change.position, n.id, notification=schemas.to_builtins(n))
    else:
        msg = _Message(kind.value, change.position, change.notification_id, removed=_Removed())
    data = _encode(msg)
    _last_rendered = (change, data)
    return data


def closing(reason: str, message: str) -> bytes:
    return _encode(_Message("closing", reason=reason, message=message))


# -- writers -----------------------------------------------------------------------------------


class WebSocketSink:
    """Each message a WebSocket text message."""

    __slots__ = ("scope", "send")

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope = scope
        self.send = send

    async def refuse(self, exc: HeraldError) -> None:
        """Answer the handshake with the Graph error as an ordinary HTTP response."""
        await _http_error(self.send, self.scope, exc, "websocket.http.response")

    async def start(self) -> None:
        await self.send({"type": "websocket.accept"})

    async def ready(self, position: int) -> None:
        await self.message(_encode(_Message("ready", position)), "ready", position)

    async def change(self, change: Change) -> None:  # the hot path: no call in between
        try:
            await self.send({"type": "websocket.send", "text": render(change).decode()})
        except (ClientDisconnected, OSError) as exc:
            raise Closed from exc

    async def message(self, data: bytes, kind: str, position: int | None) -> None:
        try:
            await self.send({"type": "websocket.send", "text": data.decode()})
        except (ClientDisconnected, OSError) as exc:
            raise Closed from exc

    async def keepalive(self) -> None:
        await self.message(KEEPALIVE, "keepalive", None)

    async def close(self, reason: str, text: str) -> None:
        with contextlib.suppress(Closed):
            await self.message(closing(reason, text), "closing", None)
        with contextlib.suppress(ClientDisconnected, OSError, RuntimeError):
            await self.send({"type": "websocket.close", "code": CLOSE_CODES[reason]})


class SseSink:
    """Each message an event named after its type, with its position as the event id (which
    EventSource sends back as Last-Event-ID when it reconnects)."""

    __slots__ = ("scope", "send")

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope = scope
        self.send = send

    async def refuse(self, exc: HeraldError) -> None:
        await _http_error(self.send, self.scope, exc, "http.response")

    async def start(self) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # tell a fronting nginx not to buffer the stream
            (b"request-id", request_id(self.scope).encode()),
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._write(b"retry: 2000\n\n")

    async def ready(self, position: int) -> None:
        await self.message(_encode(_Message("ready", position)), "ready", position)

    async def change(self, change: Change) -> None:
        data, kind = render(change), change.kind.value.encode()
        await self._write(b"id: %d\nevent: %s\ndata: %s\n\n" % (change.position, kind, data))

    async def message(self, data: bytes, kind: str, position: int | None) -> None:
        head = b"" if position is None else b"id: %d\n" % position
        await self._write(b"%sevent: %s\ndata: %s\n\n" % (head, kind.encode(), data))

    async def keepalive(self) -> None:
        await self._write(b": keepalive\n\n")

    async def close(self, reason: str, text: str) -> None:
        with contextlib.suppress(Closed):
            await self.message(closing(reason, text), "closing", None)
        with contextlib.suppress(ClientDisconnected, OSError, RuntimeError):
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, chunk: bytes) -> None:
        try:
            await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (ClientDisconnected, OSError) as exc:
            raise Closed from exc


Sink = WebSocketSink | SseSink


async def _http_error(send: Send, scope: Scope, exc: HeraldError, prefix: str) -> None:
    body = error_body(exc, scope)
    headers = [(b"content-type", b"application/json"), (b"request-id", request_id(scope).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(exc).items()]
    await send({"type": f"{prefix}.start", "status": exc.status, "headers": headers})
    await send({"type": f"{prefix}.body", "body": body})


# -- the endpoint ------------------------------------------------------------------------------


class Endpoint:
    """The stream endpoint: handshake and caps, then a `Stream` with a writer."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.streams: Streams = services.streams
        # Open streams per subscription and per (user, app), for the caps.
        self.per_subscription: dict[str, int] = {}
        self.per_user: dict[tuple[str, str], int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sub_id: str) -> None:
        sink: Sink
        if scope["type"] == "websocket":
            if (await receive())["type"] != "websocket.connect":
                return
            sink = WebSocketSink(scope, send)
        else:
            sink = SseSink(scope, send)
        try:
            sub, token_expires, start = await self._open(scope, sub_id)
            self.admit(sub)
        except HeraldError as exc:
            await sink.refuse(exc)
            return
        protocol = "sse" if isinstance(sink, SseSink) else "websocket"
        gauge = self.services.metrics.streams.labels(protocol)
        gauge.inc()
        try:
            async with self.streams.stream(sink, sub, token_expires, start):
                # Until the client leaves or the server closes the connection (a stream takes
                # nothing from its client).
                while (await receive())["type"] not in DISCONNECT:
                    pass
        except Closed:
            pass  # the client left while the stream started
        except HeraldError as exc:  # the store failed the replay: the stream was already open
            log.warning("stream replay failed", extra={"error": exc.message})
            await sink.close(
                "shutdown", f"The stream could not be resumed ({exc.message}); reconnect to resume."
            )
        finally:
            self.leave(sub)
            gauge.dec()

    def admit(self, sub: Subscription) -> None:
        """Count a new stream of `sub`, or refuse it at a cap (no await between check and count:
        two handshakes cannot both take the last place)."""
        settings, user = self.services.settings, (sub.user_id, sub.app)
        on_sub, on_user = self.per_subscription.get(sub.id, 0), self.per_user.get(user, 0)
        if on_sub >= settings.max_streams_per_subscription:
            cap, what = "subscription", f"this subscription ({on_sub})"
        elif on_user >= settings.max_streams_per_user:
            cap, what = "user", f"this user and app ({on_user})"
        else:
            self.per_subscription[sub.id] = on_sub + 1
            self.per_user[user] = on_user + 1
            return
        self.services.metrics.streams_refused.labels(cap).inc()
        # A stream whose client vanished is noticed at a keep-alive: retry after about one.
        raise Throttled(
            f"Too many live streams are open for {what}; close one or retry later.",
            retry_after=max(1, math.ceil(settings.keepalive_interval)),
        )

    def leave(self, sub: Subscription) -> None:
        _discount(self.per_subscription, sub.id)
        _discount(self.per_user, (sub.user_id, sub.app))

    async def _open(self, scope: Scope, sub_id: str) -> tuple[Subscription, float, int]:
        s = self.services
        params = _query(scope)
        headers = dict(scope["headers"])
        authorization = headers.get(b"authorization")
        if authorization is None and "access_token" in params:
            authorization = b"Bearer " + params["access_token"].encode()
        credential = authorization.decode("latin-1") if authorization else None
        principal = await s.access.principal(credential)
        if principal.user_id is None:
            raise InvalidRequest(
                "A live stream needs a delegated token of the device's user.", target="token"
            )
        caller = await s.access.caller(credential, None)
        now = s.feed.clock()
        if len(sub_id) > 64 or not sub_id.isprintable():
            raise NotFound(f"Subscription {sub_id[:64]!r} was not found.", target="id")
        sub = await s.subscriptions.get_subscription(sub_id, now)
        if sub is None or sub.user_id != caller.user_id or sub.app != caller.app.host_name:
            raise NotFound(f"Subscription '{sub_id[:64]}' was not found.", target="id")
        after = _position(headers.get(b"last-event-id"), params.get("after"))
        pruned, head = await s.changelog.horizon(caller.user_id)
        if after is None:
            after = head
        elif after < pruned:
            raise Gone(
                f"Position {after} is older than the retained history: resync with "
                "GET /me/notifications/delta without a token."
            )
        elif await s.changelog.lost(caller.user_id, after):
            raise Gone(
                f"Position {after} was lost when the database failed over: resync with "
                "GET /me/notifications/delta without a token."
            )
        elif after > head:
            raise InvalidRequest(f"Position {after} is ahead of the feed.", target="after")
        return sub, float(principal.expires_at), after


def _discount(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]  # no entry per user who once streamed


def _query(scope: Scope) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    params: dict[str, str] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        if key not in QUERY_OPTIONS:
            raise InvalidRequest(
                f"Query option '{key[:64]}' is not supported; use access_token and after.",
                target=key[:64],
            )
        if key in params:
            raise InvalidRequest(f"Query option '{key}' is given twice.", target=key)
        params[key] = value
    return params


def _position(last_event_id: bytes | None, after: str | None) -> int | None:
    """The resume position: Last-Event-ID (EventSource's reconnect) wins over `after`."""
    if last_event_id is not None:
        text, target = last_event_id.decode("latin-1").strip(), "Last-Event-ID"
    elif after is not None:
        text, target = after.strip(), "after"
    else:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_POSITION:
        raise InvalidRequest(
            f"{target} must be a position (a non-negative integer).", target=target
        )
    return int(text)
