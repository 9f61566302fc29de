"""The Redis broker: changes travel between Herald processes over Redis pub/sub, which only cuts
latency; the change log (PostgreSQL) stays the truth and fills whatever pub/sub loses.

* **One channel, batched.** Changes and revocations go to `herald:changes`, which every node
  subscribes to when it starts, so `listen` needs no round trip: a listener registered before a
  publish gets it (the contract), and a node sees every change of its users whatever the app,
  which is what shows it a gap (`broker/cursor.py`). A message is a *batch*: the envelopes the
  writer found queued, in order (one PUBLISH, and one message for every other node to read,
  per writer round rather than per change: per message, redis-py's reading costs a node about
  10 us). Each node drops the changes of users it has no listener for after reading a small
  header. (Per-user channels would confirm a SUBSCRIBE after `listen` returned, losing the
  first changes of every stream to a gap; see docs/architecture.md "The Redis broker".)
* **Publishing.** A change is delivered to this node's listeners directly (no round trip, and
  same-node delivery goes on while Redis is down), then queued for one writer task that
  publishes what is queued, in order, as one batch (with the heartbeat, if due) on one
  connection. A node skips its own messages coming back.
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

PREFIX = "herald:"
# Not `herald:c:{shard}`, where Herald before 0.x published one change per message: during a
# rolling upgrade the two formats do not meet (each side fills the other's changes from the log).
CHANGES = f"{PREFIX}changes".encode()
BEAT_SECONDS = 0.5
DEADLINE_SECONDS = 1.5
RECONCILE_SECONDS = 5.0
POLL_SECONDS = 0.5
TIMEOUT_SECONDS = 2.0  # connect, SUBSCRIBE confirmation, a pipeline of PUBLISHes
MAX_QUEUED = 10_000  # messages waiting for the writer; past this the oldest are dropped
BATCH = 1000  # envelopes per message at most
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


_batches = msgspec.msgpack.Decoder(list[Envelope])
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
        self.beat_channel = f"{PREFIX}b:{self.node}".encode()
        self.beat, self.deadline, self.timeout = beat, deadline, timeout
        self.reconcile_every, self.poll = reconcile, poll
        # Encoded envelopes (changes, revocations) for the writer; a heartbeat is due.
        self.queue: deque[msgspec.Raw] = deque()
        self.beat_due = False
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
        self.dropped = 0  # envelopes not published (Redis unreachable, queue full)
        self.messages = 0  # batches published

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
        self.send(msgspec.Raw(_encoder.encode(envelope)))

    async def revoke(self, user_id: str, app: str, subscription_id: str) -> None:
        self.revoked(user_id, app, subscription_id)
        envelope = Envelope(self.node, "r", user_id, app, subscription_id, _NIL)
        self.send(msgspec.Raw(_encoder.encode(envelope)))

    def listeners(self) -> int:
        return self.cursors.count()

    # -- publishing --------------------------------------------------------------------------
    def send(self, envelope: msgspec.Raw) -> None:
        if self.closed:
            return
        if len(self.queue) >= MAX_QUEUED:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(envelope)
        self.queued.set()

    async def write_forever(self) -> None:
        """PUBLISH what is queued, in order, in batches of up to `BATCH` envelopes, with the
        heartbeat when one is due, on one connection."""
        assert self.publisher is not None
        failing = False
        while True:
            await self.queued.wait()
            self.queued.clear()
            while self.queue or self.beat_due:
                batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
                beat, self.beat_due = self.beat_due, False
                try:
                    async with asyncio.timeout(self.timeout):
                        pipe = self.publisher.pipeline(transaction=False)
                        if batch:
                            pipe.publish(CHANGES, _encoder.encode(batch))
                        if beat:
                            pipe.publish(self.beat_channel, b"")
                        await pipe.execute()
                except (RedisError, OSError, TimeoutError) as exc:
                    self.dropped += len(batch)
                    if not failing:  # once per outage; the other nodes fill from the log
                        log.warning("Redis publish failed", extra={"error": repr(exc)})
                    failing = True
                    await asyncio.sleep(BACKOFF[0])
                else:
                    self.messages += bool(batch)
                    failing = False

    async def beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beat)
            if not self.closed:
                self.beat_due = True
                self.queued.set()

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
        """Subscribe to the changes and this node's heartbeat, and wait until Redis has confirmed
        both (messages that arrive meanwhile are taken)."""
        wanted = 2
        async with asyncio.timeout(self.timeout):
            await pubsub.subscribe(CHANGES, self.beat_channel)
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
            envelopes = _batches.decode(data)
        except msgspec.DecodeError as exc:  # (the cursors fill what it held from the log)
            log.warning("undecodable broker message", extra={"error": str(exc)})
            return
        users = self.cursors.users
        for envelope in envelopes:
            if envelope.node == self.node or envelope.user not in users:
                continue  # ours (delivered directly), or nobody listens for that user here
            try:
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
