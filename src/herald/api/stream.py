"""`/me/notificationSubscriptions/{id}/stream`: a device's live stream, WebSocket or SSE.

Served as raw ASGI in front of the router (like ingest): a server holds thousands of these open,
so each one is a single coroutine with a few slotted objects, not a framework request with its
own task group. A stream:

1. authenticates (header, or `?access_token=` for browsers) and resolves the subscription;
2. registers with the broker *before* reading the change log, then replays every change after
   the resume position, then forwards broker deliveries, skipping any position already sent.
   A change committed during the replay is either in the replay or delivered after it, so
   nothing falls in between; the skip removes the overlap.
3. sends keep-alives, and closes on token expiry, subscription deletion or expiry, a client
   that does not keep up, or server shutdown (see `herald/server.py`), saying why.

At most `max_streams_per_subscription` streams per subscription (one per browser tab: tabs share
the subscription, docs/inbox.md) and `max_streams_per_user` per (user, app) are open at once on a
node. One more is refused (429 with Retry-After), not let in by closing an older one: a client
stuck in a reconnect loop would otherwise take the streams of the user's working tabs and
devices, and two clients over the cap would keep closing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl

import msgspec
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.utils import ClientDisconnected

from herald.api import schemas
from herald.api.errors import error_body, error_headers, request_id
from herald.errors import Gone, HeraldError, InvalidRequest, NotFound, Throttled
from herald.model import Change, ChangeKind, DevicePlatform, Platform, Subscription

if TYPE_CHECKING:
    from herald.api.app import Services

log = logging.getLogger("herald.stream")
K = TypeVar("K")

PATH = re.compile(r"/(beta|v1\.0)/me/notificationSubscriptions/([^/]+)/stream/?")
REPLAY_BATCH = 500
# A client this far behind is cut off (it resumes from its last position when it reconnects)
# rather than letting its backlog grow without bound.
MAX_BACKLOG = 1000
MAX_POSITION = 2**63 - 1
# Deadlines (keep-alives, expiries) are checked this often, a slice of sessions at a time.
TICK_SECONDS = 1.0
# How long a stream that must close (too slow) may take to get its `closing` message out.
ABORT_SECONDS = 10.0
TICK_SLICE = 1000
QUERY_OPTIONS = {"access_token", "after"}

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


# -- transports --------------------------------------------------------------------------------


class Closed(Exception):
    """The client went away."""


class WebSocketSink:
    __slots__ = ("receive", "send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send

    async def refuse(self, exc: HeraldError, scope: Scope) -> None:
        """Answer the handshake with the Graph error as an ordinary HTTP response."""
        await _http_error(self.send, scope, exc, "websocket.http.response")

    async def start(self, scope: Scope) -> None:
        await self.send({"type": "websocket.accept"})

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
    __slots__ = ("receive", "send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self.receive = receive
        self.send = send

    async def refuse(self, exc: HeraldError, scope: Scope) -> None:
        await _http_error(self.send, scope, exc, "http.response")

    async def start(self, scope: Scope) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # tell a fronting nginx not to buffer the stream
            (b"request-id", request_id(scope).encode()),
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._write(b"retry: 2000\n\n")

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


# -- the stream --------------------------------------------------------------------------------


class Session:
    """One open stream: the broker's listener for (user, app).

    The connection's own coroutine waits in `receive()`, so it learns at once when the client
    goes away or the server closes the socket. Sending happens in a short-lived flusher task,
    started when there is something to send (a delivery, a revocation, or a deadline found by
    `Streams.tick`): an idle session holds no task or timer of its own.
    """

    __slots__ = (
        "backlog",
        "end",
        "flusher",
        "live",
        "platform",
        "sent",
        "services",
        "sink",
        "subscription",
        "token_expires",
        "quiet_since",
        "unsent",
        "main",
        "aborted",
    )

    def __init__(
        self, services: Services, sink: Sink, subscription: Subscription, token_expires: float
    ) -> None:
        self.services = services
        self.sink = sink
        self.subscription = subscription
        self.token_expires = token_expires
        self.platform = (
            None
            if subscription.platform is DevicePlatform.LIVE
            else Platform(subscription.platform.value)
        )
        # A plain list, swapped out whole when sent: an empty deque costs ten times the memory,
        # and there are thousands of idle sessions.
        self.backlog: list[Change] = []
        self.unsent = 0  # delivered but not yet sent: the backlog and the batch being sent
        self.end: tuple[str, str] | None = None  # why the stream must close
        self.flusher: asyncio.Task[None] | None = None
        self.main: asyncio.Task[Any] | None = None  # the connection's own task
        self.aborted = False
        self.live = False  # False while replaying: the replay sends, deliveries wait
        self.sent = 0  # the last position sent or skipped; positions at or below are dropped
        self.quiet_since = time.monotonic()

    # -- Listener -------------------------------------------------------------------------------
    def deliver(self, change: Change) -> None:
        if self.end is not None:
            return  # closing: the client resumes from its last position
        self.backlog.append(change)
        self.unsent += 1
        if self.unsent > MAX_BACKLOG:
            self.end = ("tooSlow", "The client fell too far behind; reconnect to resume.")
            # A client that reads nothing never lets the `closing` message out: cut it then.
            asyncio.get_running_loop().call_later(ABORT_SECONDS, self.abort)
        self.kick()

    def abort(self) -> None:
        """Drop a connection whose flusher is stuck on a client that does not read."""
        if self.flusher is not None and self.main is not None and not self.main.done():
            self.aborted = True
            self.flusher.cancel()
            self.main.cancel()

    def revoke(self, subscription_id: str) -> None:
        if subscription_id == self.subscription.id:
            self.end = ("subscriptionGone", "The subscription was deleted.")
            self.kick()

    # -- sending --------------------------------------------------------------------------------
    def kick(self) -> None:
        if self.live and self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        try:
            while True:
                if self.end is not None:
                    self.live = False
                    await self.sink.close(*self.end)
                    return
                if self.backlog:
                    batch, self.backlog = self.backlog, []
                    for change in batch:
                        if self.end is not None:
                            break  # e.g. fell too far behind while this loop waited to send
                        await self.send(change)
                        self.unsent -= 1
                    continue
                if not await self.on_time() and not self.backlog:
                    return  # (a delivery during on_time's await is sent before returning)
        except Closed:
            self.live = False
        finally:
            self.flusher = None

    async def send(self, change: Change) -> None:
        if change.position <= self.sent:
            return
        self.sent = change.position
        if self.wanted(change):
            await self.sink.message(render(change), change.kind.value, change.position)
            self.quiet_since = time.monotonic()
            if self.subscription.platform is DevicePlatform.IOS:
                # The device fetched it: its iOS fallback push is not needed (docs/push.md).
                self.services.fetched[self.subscription.id] = change.position

    async def on_time(self) -> bool:
        """Deadlines: keep-alive, token and subscription expiry. False when nothing is due."""
        now = time.time()
        if now >= self.token_expires:
            self.end = ("tokenExpired", "The access token expired; reconnect with a new one.")
            return True
        if now >= self.subscription.expiration_date_time.timestamp():
            s = self.services
            sub = await s.store.get_subscription(self.subscription.id, s.feed.clock())
            if sub is None:
                self.end = ("subscriptionGone", "The subscription expired.")
                return True
            self.subscription = sub  # renewed by a PATCH meanwhile
        keepalive = self.services.settings.keepalive_interval
        if time.monotonic() - self.quiet_since >= keepalive:
            await self.sink.keepalive()
            self.quiet_since = time.monotonic()
        return False

    def due(self, wall: float, mono: float, keepalive: float) -> bool:
        """Whether a keep-alive, or the token's or subscription's expiry, is due."""
        return (
            mono - self.quiet_since >= keepalive
            or wall >= self.token_expires
            or wall >= self.subscription.expiration_date_time.timestamp()
        )

    def stop(self) -> None:
        self.live = False
        if self.flusher is not None:
            self.flusher.cancel()

    def wanted(self, change: Change) -> bool:
        """Whether this device gets the change (position bookkeeping aside)."""
        if change.origin is not None and change.origin == self.subscription.id:
            return False  # the device made it itself
        n = change.notification
        if n is None:
            # A tombstone, or a created/updated whose notification is gone by now: in the
            # latter case the tombstone follows, so skip it.
            return change.kind in (ChangeKind.DELETED, ChangeKind.EXPIRED)
        return self.platform is None or self.platform in n.target_policy.platform_types


class Streams:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions: set[Session] = set()
        self.idle = asyncio.Event()  # set while no stream is open
        self.idle.set()
        self.ticker: asyncio.Task[None] | None = None
        self.recorder: asyncio.Task[None] | None = None
        # Open streams per subscription and per (user, app), for the caps.
        self.per_subscription: dict[str, int] = {}
        self.per_user: dict[tuple[str, str], int] = {}

    def start(self) -> None:
        self.ticker = asyncio.create_task(self.tick(), name="herald-stream-deadlines")

    async def stop(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
            self.ticker = None
        if self.recorder is not None:
            await self.recorder
        await self.record_fetched()  # what the last second's deliveries fetched

    async def tick(self) -> None:
        """Once a second, kick the sessions with a keep-alive or an expiry due.

        One task walking the sessions, not a timer per session: with thousands of streams,
        per-session timers re-armed every keep-alive fill the young GC generations with
        long-lived objects, and the collections that scan them are latency spikes.
        """
        keepalive = self.services.settings.keepalive_interval
        while True:
            await asyncio.sleep(TICK_SECONDS)
            if self.services.fetched and (self.recorder is None or self.recorder.done()):
                # Its own task: a slow store must not hold up keep-alives and expiry closes.
                self.recorder = asyncio.create_task(self.record_fetched())
            sessions = list(self.sessions)
            for start in range(0, len(sessions), TICK_SLICE):
                wall, mono = time.time(), time.monotonic()
                for session in sessions[start : start + TICK_SLICE]:
                    if session.live and session.due(wall, mono, keepalive):
                        session.kick()
                await asyncio.sleep(0)  # let requests in between slices

    async def record_fetched(self) -> None:
        """Store the positions iOS devices received over their streams since the last tick."""
        fetched, self.services.fetched = self.services.fetched, {}
        store = self.services.store
        # Together, so the store can write them in one statement.
        results = await asyncio.gather(
            *(store.seen(sub_id, position) for sub_id, position in fetched.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):  # only the fallback's precision suffers
                log.warning("could not record a fetched position", extra={"error": str(result)})

    def close_all(self) -> None:
        """Server shutdown: tell every stream why it ends (each then closes itself)."""
        for session in self.sessions:
            if session.end is None:
                session.end = ("shutdown", "The server is restarting; reconnect to resume.")
            session.kick()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, sub_id: str) -> None:
        sink: Sink
        if scope["type"] == "websocket":
            if (await receive())["type"] != "websocket.connect":
                return
            sink = WebSocketSink(receive, send)
        else:
            sink = SseSink(receive, send)
        try:
            sub, token_expires, start = await self._open(scope, sub_id)
            self.admit(sub)
        except HeraldError as exc:
            await sink.refuse(exc, scope)
            return
        protocol = "sse" if isinstance(sink, SseSink) else "websocket"
        gauge = self.services.metrics.streams.labels(protocol)
        gauge.inc()
        session = Session(self.services, sink, sub, token_expires)
        session.main = asyncio.current_task()
        self.sessions.add(session)
        self.idle.clear()
        try:
            await self._serve(scope, receive, session, start)
        except Closed:
            pass
        except asyncio.CancelledError:
            if not session.aborted or session.main is None:
                raise
            session.main.uncancel()  # our own abort: end quietly, the server drops the socket
        finally:
            self.leave(sub)
            self.sessions.discard(session)
            if not self.sessions:
                self.idle.set()
            session.stop()
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
        sub = await s.store.get_subscription(sub_id, now)
        if sub is None or sub.user_id != caller.user_id or sub.app != caller.app.host_name:
            raise NotFound(f"Subscription '{sub_id[:64]}' was not found.", target="id")
        after = _position(headers.get(b"last-event-id"), params.get("after"))
        pruned, head = await s.store.horizon(caller.user_id)
        if after is None:
            after = head
        elif after < pruned:
            raise Gone(
                f"Position {after} is older than the retained history: resync with "
                "GET /me/notifications/delta without a token."
            )
        elif after > head:
            raise InvalidRequest(f"Position {after} is ahead of the feed.", target="after")
        return sub, float(principal.expires_at), after

    async def _serve(self, scope: Scope, receive: Receive, session: Session, start: int) -> None:
        broker = self.services.broker
        sub = session.subscription
        await session.sink.start(scope)
        broker.listen(sub.user_id, sub.app, session)
        try:
            await session.sink.message(_encode(_Message("ready", start)), "ready", start)
            await self._replay(session, start)
            session.live = True
            session.kick()  # what arrived during the replay; then the timer keeps it going
            while True:  # until the client leaves or the server closes the connection
                message = await receive()
                if message["type"] in ("websocket.disconnect", "http.disconnect"):
                    return
        finally:
            broker.unlisten(sub.user_id, sub.app, session)

    async def _replay(self, session: Session, after: int) -> None:
        sub = session.subscription
        while True:
            changes = await self.services.store.changes(sub.user_id, sub.app, after, REPLAY_BATCH)
            for change in changes:
                if session.end is not None:
                    return  # closing anyway (e.g. too slow): no point replaying more
                await session.send(change)
            if changes:
                after = changes[-1].position
            session.sent = max(session.sent, after)
            if len(changes) < REPLAY_BATCH:
                return


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
