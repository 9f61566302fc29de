"""Live streams: a device's open connection that receives its user's changes as they commit.

A stream:

1. registers with the broker *before* reading the change log, then replays every change after
   the resume position, then forwards broker deliveries, skipping any position already sent.
   A change committed during the replay is either in the replay or delivered after it, so
   nothing falls in between; the skip removes the overlap (per-user order holds: positions
   only go up).
2. sends keep-alives, and closes on token expiry, subscription deletion or expiry, a client
   that does not keep up (`MAX_BACKLOG`), or server shutdown, saying why. A deletion arrives
   from the broker (at once, but a networked broker may lose it) and, where several processes
   share the store, from `Streams.audit` (within `AUDIT_SECONDS`, whatever the broker lost).
3. records, for an iOS device, the newest position it received: its fallback push is then not
   needed (docs/push.md); `Streams` stores those positions once a second.

The transport is a `Sink` (api/stream.py writes WebSocket and SSE frames); nothing here knows
ASGI, so a process with another front end can serve streams the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from herald.broker import Broker
from herald.feed import Clock
from herald.model import Change, ChangeKind, DevicePlatform, Platform, Subscription
from herald.settings import Settings
from herald.store import ChangeLog, Subscriptions

log = logging.getLogger("herald.stream")

REPLAY_BATCH = 500
# A client this far behind is cut off (it resumes from its last position when it reconnects)
# rather than letting its backlog grow without bound.
MAX_BACKLOG = 1000
# Deadlines (keep-alives, expiries) are checked this often, a slice of streams at a time.
TICK_SECONDS = 1.0
TICK_SLICE = 1000
# ...in this many parts spread over the second: with 19,000 streams about 760 keep-alives fall
# due each second, and kicked all at once their sends queued up ahead of the deliveries.
TICK_PARTS = 10
# How long a stream that must close (too slow) may take to get its `closing` message out.
ABORT_SECONDS = 10.0
# How often a node checks, in one read, that its streams' subscriptions still exist (when
# several processes share the store): a deletion made through another node then closes them
# within this, even if the broker lost its message.
AUDIT_SECONDS = 0.5


class Closed(Exception):
    """The client went away (raised by a Sink)."""


class StreamStore(ChangeLog, Subscriptions, Protocol):
    """What streams use of the store: the change log (replay, fetched positions) and the
    subscriptions (whether an expiring one was renewed)."""


class Sink(Protocol):
    """Writes one stream's messages to its client; raises Closed when the client is gone."""

    async def start(self) -> None:
        """Accept the connection."""

    async def ready(self, position: int) -> None:
        """The stream replays from `position`."""

    async def change(self, change: Change) -> None: ...

    async def keepalive(self) -> None: ...

    async def close(self, reason: str, text: str) -> None:
        """Say why the stream ends (`reason`: tokenExpired, subscriptionGone, tooSlow,
        shutdown) and end it; never raises."""


class Stream:
    """One open stream: the broker's listener for (user, app).

    The connection's own coroutine waits for the client to leave, so it learns at once when the
    client goes away or the server closes the socket. Sending happens in a short-lived flusher
    task, started when there is something to send (a delivery, a revocation, or a deadline found
    by `Streams.tick`): an idle stream holds no task or timer of its own.
    """

    __slots__ = (
        "backlog",
        "end",
        "expires",
        "flusher",
        "live",
        "platform",
        "sent",
        "streams",
        "sink",
        "subscription",
        "token_expires",
        "quiet_since",
        "unsent",
        "main",
        "aborted",
    )

    def __init__(
        self,
        streams: Streams,
        sink: Sink,
        subscription: Subscription,
        token_expires: float,
        after: int,
    ) -> None:
        self.streams = streams
        self.sink = sink
        self.subscription = subscription
        self.token_expires = token_expires
        # The earlier of the two expiries, as a number: the ticker compares it for every stream
        # every second (a datetime's timestamp() each time was most of the ticker's cost).
        self.expires = min(token_expires, subscription.expiration_date_time.timestamp())
        self.platform = (
            None
            if subscription.platform is DevicePlatform.LIVE
            else Platform(subscription.platform.value)
        )
        # A plain list, emptied when sent: an empty deque costs ten times the memory, and there
        # are thousands of idle streams.
        self.backlog: list[Change] = []
        self.unsent = 0  # delivered but not yet sent: the backlog and the batch being sent
        self.end: tuple[str, str] | None = None  # why the stream must close
        self.flusher: asyncio.Task[None] | None = None
        self.main: asyncio.Task[Any] | None = None  # the connection's own task
        self.aborted = False
        self.live = False  # False while replaying: the replay sends, deliveries wait
        # The last position sent or skipped (at first, the resume position): positions at or
        # below it are dropped.
        self.sent = after
        self.quiet_since = time.monotonic()

    # -- serving --------------------------------------------------------------------------------
    async def __aenter__(self) -> Stream:
        """Start: register with the broker, then replay, then go live. The caller then waits
        for its client to leave inside the `async with` (no task or frame of ours meanwhile:
        thousands of streams are idle at once)."""
        s, sub = self.streams, self.subscription
        self.main = asyncio.current_task()
        s.open.add(self)
        if s.audit:
            s.fresh.add(self)
        s.opened += 1
        s.idle.clear()
        try:
            await self.sink.start()
            s.broker.listen(sub.user_id, sub.app, self)
            await self.sink.ready(self.sent)
            await s.replay(self)
        except BaseException:
            self.leave()
            raise
        self.live = True
        self.kick()  # what arrived during the replay; then the ticker keeps it going
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *exc: object) -> bool:
        self.leave()
        if kind is asyncio.CancelledError and self.aborted and self.main is not None:
            self.main.uncancel()  # our own abort: end quietly, the server drops the socket
            return True
        return False

    def leave(self) -> None:
        s, sub = self.streams, self.subscription
        s.broker.unlisten(sub.user_id, sub.app, self)
        s.open.discard(self)
        s.fresh.discard(self)
        s.closed += 1
        if not s.open:
            s.idle.set()
        self.stop()

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
                    await self.send_backlog()
                    continue
                if not await self.on_time() and not self.backlog:
                    return  # (a delivery during on_time's await is sent before returning)
        except Closed:
            self.live = False
        finally:
            self.flusher = None

    async def send_backlog(self) -> None:
        """Send the backlog, deliveries arriving meanwhile included. The list is kept and
        emptied, not replaced: a new list per flush would be one more object per stream for
        the cyclic collector to walk (the frozen one stays frozen, herald/collector.py)."""
        backlog, done = self.backlog, 0
        try:
            while done < len(backlog):
                if self.end is not None:
                    return  # e.g. fell too far behind while this loop waited to send
                change = backlog[done]
                done += 1
                await self.send(change)
                self.unsent -= 1
        finally:
            del backlog[:done]

    async def send(self, change: Change) -> None:
        if change.position <= self.sent:
            return
        self.sent = change.position
        if self.wanted(change):
            await self.sink.change(change)
            self.quiet_since = time.monotonic()
            if self.subscription.platform is DevicePlatform.IOS:
                # The device fetched it: its iOS fallback push is not needed (docs/push.md).
                self.streams.fetched[self.subscription.id] = change.position

    async def on_time(self) -> bool:
        """Deadlines: keep-alive, token and subscription expiry. False when nothing is due."""
        now = time.time()
        if now >= self.token_expires:
            self.end = ("tokenExpired", "The access token expired; reconnect with a new one.")
            return True
        if now >= self.subscription.expiration_date_time.timestamp():
            s = self.streams
            sub = await s.store.get_subscription(self.subscription.id, s.clock())
            if sub is None:
                self.end = ("subscriptionGone", "The subscription expired.")
                return True
            self.subscription = sub  # renewed by a PATCH meanwhile
            self.expires = min(self.token_expires, sub.expiration_date_time.timestamp())
        if time.monotonic() - self.quiet_since >= self.streams.settings.keepalive_interval:
            await self.sink.keepalive()
            self.quiet_since = time.monotonic()
        return False

    def due(self, wall: float, mono: float, keepalive: float) -> bool:
        """Whether a keep-alive, or the token's or subscription's expiry, is due."""
        return mono - self.quiet_since >= keepalive or wall >= self.expires

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
    """The streams open on this node: serves each, ticks their deadlines, stores what iOS
    devices fetched, and closes them all at shutdown."""

    def __init__(
        self,
        store: StreamStore,
        broker: Broker,
        settings: Settings,
        clock: Clock,
        audit: bool = False,
    ) -> None:
        self.store = store
        # Whether other processes may delete subscriptions (a shared store): check them.
        self.audit = audit
        self.auditor: asyncio.Task[None] | None = None
        self.removals: int | None = None  # `subscription_removals` as of the last check
        # Streams opened since the last check: checked at the next one whatever the count says
        # (one may have read its subscription just before a removal the last check counted).
        self.fresh: set[Stream] = set()
        self.broker = broker
        self.settings = settings
        self.clock = clock
        self.open: set[Stream] = set()
        # Streams opened and closed since the process began (herald.collector watches them).
        self.opened = 0
        self.closed = 0
        self.idle = asyncio.Event()  # set while no stream is open
        self.idle.set()
        self.ticker: asyncio.Task[None] | None = None
        self.recorder: asyncio.Task[None] | None = None
        # Positions iOS devices received over their streams, not yet stored (see `tick`).
        self.fetched: dict[str, int] = {}
        store.on_history(self.resync)

    def start(self) -> None:
        self.ticker = asyncio.create_task(self.tick(), name="herald-stream-deadlines")
        if self.audit:
            self.auditor = asyncio.create_task(self.check_forever(), name="herald-stream-audit")

    async def stop(self) -> None:
        if self.auditor is not None:
            self.auditor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.auditor
            self.auditor = None
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
            self.ticker = None
        if self.recorder is not None:
            await self.recorder
        await self.record_fetched()  # what the last second's deliveries fetched

    async def tick(self) -> None:
        """Once a second, kick the streams with a keep-alive or an expiry due: each
        `TICK_SECONDS / TICK_PARTS`, the next part of the open streams (as they were at the
        start of the second), so that the keep-alives falling due in a second go out spread
        over it, not in one burst that deliveries wait behind.

        One task walking the streams, not a timer per stream: with thousands of streams,
        per-stream timers re-armed every keep-alive fill the young GC generations with
        long-lived objects, and the collections that scan them are latency spikes.
        """
        keepalive = self.settings.keepalive_interval
        streams: list[Stream] = []
        part = 0
        while True:
            await asyncio.sleep(TICK_SECONDS / TICK_PARTS)
            if part == 0:
                if self.fetched and (self.recorder is None or self.recorder.done()):
                    # Its own task: a slow store must not hold up keep-alives and expiry closes.
                    self.recorder = asyncio.create_task(self.record_fetched())
                streams = list(self.open)
            size = -(-len(streams) // TICK_PARTS)  # rounded up: every stream once a second
            share = streams[part * size : (part + 1) * size]
            part = (part + 1) % TICK_PARTS
            for start in range(0, len(share), TICK_SLICE):
                wall, mono = time.time(), time.monotonic()
                for stream in share[start : start + TICK_SLICE]:
                    if stream.live and stream.due(wall, mono, keepalive):
                        stream.kick()
                await asyncio.sleep(0)  # let requests in between slices

    async def record_fetched(self) -> None:
        """Store the positions iOS devices received over their streams since the last tick."""
        fetched, self.fetched = self.fetched, {}
        # Together, so the store can write them in one statement.
        results = await asyncio.gather(
            *(self.store.seen(sub_id, position) for sub_id, position in fetched.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):  # only the fallback's precision suffers
                log.warning("could not record a fetched position", extra={"error": str(result)})

    async def check_forever(self) -> None:
        """Every `AUDIT_SECONDS`, close the streams whose subscription is gone (`check`). Its
        own task: a slow store must not hold up keep-alives."""
        while True:
            await asyncio.sleep(AUDIT_SECONDS)
            try:
                await self.check()
            except Exception as exc:  # the store is unavailable: the next round tries again
                log.warning("could not check the streams' subscriptions", extra={"error": str(exc)})

    async def check(self) -> None:
        """Close the live streams whose subscription was deleted, by any node. The broker's
        revocation is the fast path; this is what holds when its message was lost.

        One small read when no subscription was removed anywhere since the last check (the
        store's removal count), plus one for the streams opened since; else one read for all
        of this node's streams (about 30-50 ms of PostgreSQL for 10,000, measured on the
        shared 2-core machine)."""
        fresh, self.fresh = self.fresh, set()
        try:
            # Read before the subscriptions: a removal after it moves the count past it.
            removals = await self.store.subscription_removals()
            every = removals != self.removals
            streams = [s for s in (self.open if every else fresh) if s.end is None]
            ids = {stream.subscription.id for stream in streams}
            now = self.clock()
            found = await self.store.live_subscriptions(list(ids), now) if ids else set()
        except BaseException:
            self.fresh |= fresh & self.open  # not checked: next time
            raise
        self.removals = removals
        for stream in streams:
            sub = stream.subscription
            # An expiry is `on_time`'s to report (it may have been renewed on another node).
            if sub.id not in found and sub.expiration_date_time > now:
                stream.revoke(sub.id)

    def close_all(self, text: str = "The server is restarting; reconnect to resume.") -> None:
        """Server shutdown: tell every stream why it ends (each then closes itself)."""
        for stream in self.open:
            if stream.end is None:
                stream.end = ("shutdown", text)
            stream.kick()

    def resync(self) -> None:
        """The database is on another history (a failover that may have lost changes, or a
        restore): what the streams sent may be gone. Each device reconnects and resumes from
        its last position, and one holding a lost position is told to resync (410)."""
        self.close_all("The database failed over; reconnect to resume.")

    def stream(self, sink: Sink, sub: Subscription, token_expires: float, after: int) -> Stream:
        """A stream of `sub` from position `after`, served while its caller is inside
        `async with` (see `Stream.__aenter__`)."""
        return Stream(self, sink, sub, token_expires, after)

    async def replay(self, stream: Stream) -> None:
        """Send what the change log holds after the stream's resume position."""
        sub, after = stream.subscription, stream.sent
        while True:
            changes = await self.store.changes(sub.user_id, sub.app, after, REPLAY_BATCH)
            for change in changes:
                if stream.end is not None:
                    return  # closing anyway (e.g. too slow): no point replaying more
                await stream.send(change)
            if changes:
                after = changes[-1].position
            stream.sent = max(stream.sent, after)
            if len(changes) < REPLAY_BATCH:
                return
