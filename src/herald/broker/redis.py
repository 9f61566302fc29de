"""The Redis broker: changes travel between Herald processes over Redis pub/sub, which only cuts
latency; the change log (PostgreSQL) stays the truth and fills whatever pub/sub loses.

* **Channels.** A change goes to `herald:c:{shard}`, shard = crc32(user) % `SHARDS`, and every
  node subscribes to all of them when it starts, so `listen` needs no round trip: a listener
  registered before a publish gets it (the contract), and a node sees every change of its
  users whatever the app, which is what shows it a gap (`broker/cursor.py`). Each node drops
  the changes of users it has no listener for after reading a small header. (Per-user channels
  would confirm a SUBSCRIBE after `listen` returned, losing the first changes of every stream
  to a gap; see docs/architecture.md "The Redis broker" for the measurement.)
* **Publishing.** A change is delivered to this node's listeners directly (no round trip, and
  same-node delivery goes on while Redis is down), then queued for one writer task that
  pipelines PUBLISHes in order on one connection. A node skips its own messages coming back.
  A publish that fails is dropped and logged, never retried or waited for: the other nodes'
  cursors fill it from the log, and dispatch goes on (pushes are queued) while Redis is down.
* **Subscribing.** Herald owns the loop (redis-py's asyncio PubSub does not reconnect by
  itself, and where it does, silently, it would hide a gap): a subscription is a fresh PubSub on
  a client that never retries; any error, or a SUBSCRIBE not confirmed within `timeout`, ends
  it, and the loop starts another after a short backoff. A *silent* subscription (connected,
  delivering nothing: Redis stopped, a proxy that lost its upstream) is found by a self-addressed
  heartbeat: every `beat` seconds the node publishes to its own channel through the same path
  as changes; none back within `deadline` ends the subscription.
* **Gaps.** After every (re)subscription the cursors are reconciled with the users' newest
  positions (`Cursors.reconcile`): what was published while the node was not subscribed is
  read from the log. While not subscribed the node reconciles every `poll` seconds (delivery
  goes on from the log, slower); while subscribed, every `reconcile` seconds (a publish that
  another node failed to make shows no gap here until a later change of that user arrives).

Delay bounds (defaults), on top of the store read: a lost message followed by another change of
its user, `GRACE` (20 ms); a lost tail, `reconcile` (5 s); a dropped connection or Redis down,
`poll` (0.5 s) after it is noticed (at once for a closed connection); a silent subscription,
`deadline` + `poll` (2 s). A resumed stream's first live changes wait for its replay to end
(`Cursors.settle`, at most 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections import deque

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from herald.broker.base import Listener
from herald.broker.cursor import Cursors
from herald.model import Change
from herald.store.contract import ChangeLog

log = logging.getLogger("herald.broker")

SHARDS = 64
PREFIX = "herald:"
BEAT_SECONDS = 0.5
DEADLINE_SECONDS = 1.5
RECONCILE_SECONDS = 5.0
POLL_SECONDS = 0.5
TIMEOUT_SECONDS = 2.0  # connect, SUBSCRIBE confirmation, a pipeline of PUBLISHes
MAX_QUEUED = 10_000  # messages waiting for the writer; past this the oldest are dropped
PIPELINE = 1000
BACKOFF = (0.05, 0.5)  # first and longest wait between subscription attempts


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """A message: who sent it (a node skips its own), what it is and for whom; the change
    itself stays encoded until a node finds it has a listener for the user."""

    node: str
    kind: str  # "c": a change; "r": a revocation
    user: str
    app: str
    subscription: str  # a revocation's
    change: msgspec.Raw  # a change's, encoded; nil in a revocation


_envelopes = msgspec.msgpack.Decoder(Envelope)
_changes = msgspec.msgpack.Decoder(Change)
_encoder = msgspec.msgpack.Encoder()
_NIL = msgspec.Raw(_encoder.encode(None))


class Silent(Exception):
    """The subscription delivered nothing, not even this node's heartbeat, in time."""


class RedisBroker:
    def __init__(
        self,
        url: str,
        log: ChangeLog,
        *,
        beat: float = BEAT_SECONDS,
        deadline: float = DEADLINE_SECONDS,
        reconcile: float = RECONCILE_SECONDS,
        poll: float = POLL_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.cursors = Cursors(log)
        self.node = uuid.uuid4().hex
        self.channels = [f"{PREFIX}c:{shard}".encode() for shard in range(SHARDS)]
        self.beat_channel = f"{PREFIX}b:{self.node}".encode()
        self.beat, self.deadline, self.timeout = beat, deadline, timeout
        self.reconcile_every, self.poll = reconcile, poll
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.queued = asyncio.Event()
        self.changed = asyncio.Event()  # the subscription went up or down: reconcile now
        self.subscribed = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.publisher: Redis | None = None
        self.closed = False
        # What happened, for tests, benchmarks and logs.
        self.subscriptions = 0  # successful (re)subscriptions
        self.losses = 0  # subscriptions that ended (error, cut, silence)
        self.silences = 0  # subscriptions ended for want of a heartbeat
        self.dropped = 0  # messages not published (Redis unreachable, queue full)

    @property
    def connected(self) -> bool:
        return self.subscribed.is_set()

    @property
    def gaps(self) -> int:
        return self.cursors.gaps

    @property
    def filled(self) -> int:
        return self.cursors.filled

    def client(self) -> Redis:
        """A client that never retries or reconnects behind our back (a silent reconnect
        hides a gap)."""
        return Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.publisher = self.client()
        loop = asyncio.get_running_loop()
        for job, name in (
            (self.subscribe_forever(), "subscriber"),
            (self.write_forever(), "writer"),
            (self.beat_forever(), "heartbeat"),
            (self.reconcile_forever(), "reconciler"),
        ):
            self.tasks.append(loop.create_task(job, name=f"herald-redis-{name}"))
        # Subscribed before serving, so this node's first streams miss nothing live; if Redis
        # is unreachable, serve anyway (streams fill from the log meanwhile).
        try:
            async with asyncio.timeout(self.timeout * 2):
                await self.subscribed.wait()
        except TimeoutError:
            log.warning("Redis is unreachable: live delivery reads the change log until it is back")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cursors.clear()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()
        if self.publisher is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await self.publisher.aclose()

    # -- Broker ------------------------------------------------------------------------------
    def listen(self, user_id: str, app: str, listener: Listener) -> None:
        if not self.closed:
            self.cursors.listen(user_id, app, listener)

    def unlisten(self, user_id: str, app: str, listener: Listener) -> None:
        self.cursors.unlisten(user_id, app, listener)

    async def publish(self, change: Change) -> None:
        self.cursors.offer(change)
        envelope = Envelope(
            self.node,
            "c",
            change.user_id,
            change.app,
            "",
            msgspec.Raw(_encoder.encode(change)),
        )
        self.send(self.channel(change.user_id), _encoder.encode(envelope))

    async def revoke(self, user_id: str, app: str, subscription_id: str) -> None:
        self.revoked(user_id, app, subscription_id)
        envelope = Envelope(self.node, "r", user_id, app, subscription_id, _NIL)
        self.send(self.channel(user_id), _encoder.encode(envelope))

    def listeners(self) -> int:
        return self.cursors.count()

    # -- publishing --------------------------------------------------------------------------
    def channel(self, user_id: str) -> bytes:
        return self.channels[zlib.crc32(user_id.encode()) % SHARDS]

    def send(self, channel: bytes, data: bytes) -> None:
        if self.closed:
            return
        if len(self.queue) >= MAX_QUEUED:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append((channel, data))
        self.queued.set()

    async def write_forever(self) -> None:
        """PUBLISH what is queued, in order, a pipeline at a time on one connection."""
        assert self.publisher is not None
        failing = False
        while True:
            await self.queued.wait()
            self.queued.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(PIPELINE, len(self.queue)))]
                try:
                    async with asyncio.timeout(self.timeout):
                        pipe = self.publisher.pipeline(transaction=False)
                        for channel, data in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    self.dropped += len(batch)
                    if not failing:  # once per outage; the other nodes fill from the log
                        log.warning("Redis publish failed", extra={"error": repr(exc)})
                    failing = True
                    await asyncio.sleep(BACKOFF[0])
                else:
                    failing = False

    async def beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beat)
            self.send(self.beat_channel, b"")

    # -- subscribing -------------------------------------------------------------------------
    async def subscribe_forever(self) -> None:
        wait = BACKOFF[0]
        subscriber = self.client()
        try:
            while True:
                pubsub = subscriber.pubsub()
                try:
                    await self.confirm(pubsub)
                    self.up()
                    wait = BACKOFF[0]
                    await self.read(pubsub)
                except (RedisError, OSError, TimeoutError, Silent) as exc:
                    self.down(exc)
                finally:
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        async with asyncio.timeout(self.timeout):
                            await pubsub.aclose()
                await asyncio.sleep(wait)
                wait = min(wait * 2, BACKOFF[1])
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await subscriber.aclose()

    async def confirm(self, pubsub: PubSub) -> None:
        """Subscribe to every channel and wait until Redis has confirmed each (messages that
        arrive meanwhile are taken)."""
        wanted = len(self.channels) + 1
        async with asyncio.timeout(self.timeout):
            await pubsub.subscribe(*self.channels, self.beat_channel)
            while wanted:
                message = await pubsub.get_message(timeout=self.timeout)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    wanted -= 1
                else:
                    self.take(message)

    async def read(self, pubsub: PubSub) -> None:
        last_beat = time.monotonic()
        while True:
            left = last_beat + self.deadline - time.monotonic()
            if left <= 0:
                raise Silent(f"no heartbeat for {self.deadline} s")
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                # redis-py reconnected and subscribed again by itself: what was published
                # in between is lost to us, so start over (and reconcile).
                raise RedisError("resubscribed without us")
            if message.get("channel") == self.beat_channel:
                last_beat = time.monotonic()
            else:
                self.take(message)

    def take(self, message: dict[str, object]) -> None:
        data = message.get("data")
        if message.get("type") != "message" or not isinstance(data, bytes):
            return
        try:
            envelope = _envelopes.decode(data)
            if envelope.node == self.node or envelope.user not in self.cursors.users:
                return  # ours (delivered directly), or nobody listens for that user here
            if envelope.kind == "c":
                self.cursors.offer(_changes.decode(envelope.change))
            elif envelope.kind == "r":
                self.revoked(envelope.user, envelope.app, envelope.subscription)
        except msgspec.DecodeError as exc:
            log.warning("undecodable broker message", extra={"error": str(exc)})

    def revoked(self, user_id: str, app: str, subscription_id: str) -> None:
        for listener in self.cursors.listeners(user_id, app):
            try:
                listener.revoke(subscription_id)
            except Exception:
                log.exception("listener failed", extra={"user": user_id})

    def up(self) -> None:
        self.subscriptions += 1
        if self.subscriptions > 1:
            log.info("Redis subscription restored; filling gaps from the change log")
        self.subscribed.set()
        self.changed.set()

    def down(self, exc: BaseException) -> None:
        if isinstance(exc, Silent):
            self.silences += 1
        if self.subscribed.is_set():
            self.losses += 1
            log.warning("Redis subscription lost", extra={"error": repr(exc)})
        self.subscribed.clear()
        self.changed.set()

    # -- reconciling -------------------------------------------------------------------------
    async def reconcile_forever(self) -> None:
        while True:
            every = self.reconcile_every if self.subscribed.is_set() else self.poll
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self.changed.wait()
            self.changed.clear()
            if not self.cursors.users:
                continue
            try:
                await self.cursors.reconcile()
            except Exception as exc:  # the store is unavailable: try again next round
                log.warning("could not reconcile with the change log", extra={"error": str(exc)})
