"""Dispatch wake-ups between nodes over Redis pub/sub (`herald:wake`).

A node's commit wakes its own dispatcher (the store's commit signal), but the entries it wrote
may be in shards another node holds (`outbound/leases.py`). So, while shards are shared, the
committing node also publishes a wake-up; every other node's dispatcher drains its own shards
on it. The message carries only the sender (which ignores its own): which shards a commit
touched is known only to the database (the shard is computed there).

A node that gives shards back (it stops, or another node joined) says so on the same channel,
and the others renew their leases at once, taking what was released, rather than at their next
renewal (up to 1 s later).

Only latency rides on this. A lost wake-up (Redis down, a dropped subscription) is caught by the
dispatcher's poll while shards are shared (`dispatcher.SHARED_POLL_SECONDS`), a lost hand-over by
the next renewal, so the loop here is simple: one PUBLISH at a time (commits meanwhile make one
more, not one each), and a subscription that, on any error, is made again after a short wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("herald.wake")

CHANNEL = b"herald:wake"
RELEASED = b"+"  # appended to the sender's name: it gave shards back
TIMEOUT_SECONDS = 2.0
RETRY_SECONDS = 0.5


class RedisWake:
    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url = url
        self.timeout = timeout
        self.node = uuid.uuid4().hex.encode()
        self.wanted = asyncio.Event()
        self.releasing = False  # a hand-over to say with the next message
        self.woken: Callable[[], None] = lambda: None
        self.released: Callable[[], None] = lambda: None
        self.publisher: Redis | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = 0  # wake-ups published, for tests and benchmarks

    def client(self) -> Redis:
        return Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def start(self, woken: Callable[[], None], released: Callable[[], None]) -> None:
        """Call `woken` (on the event loop) whenever another node signals, and `released` too
        when it gave shards back."""
        self.woken, self.released = woken, released
        self.publisher = self.client()
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self.publish_forever(), name="herald-wake-publisher"),
            loop.create_task(self.subscribe_forever(), name="herald-wake-subscriber"),
        ]

    def signal(self) -> None:
        """Wake the other nodes (soon; coalesced with other signals meanwhile)."""
        self.wanted.set()

    def hand_over(self) -> None:
        """Tell the other nodes that this one gave shards back (soon, or as it closes)."""
        self.releasing = True
        self.wanted.set()

    async def close(self) -> None:
        """Stop; a hand-over not said yet is said first."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks = []
        if self.publisher is not None:
            if self.releasing:
                await self.send()
            await _quietly(self.publisher.aclose())
            self.publisher = None

    async def publish_forever(self) -> None:
        while True:
            await self.wanted.wait()
            self.wanted.clear()
            if not await self.send():
                await asyncio.sleep(RETRY_SECONDS)  # the others' polls find the work

    async def send(self) -> bool:
        assert self.publisher is not None
        message = self.node + (RELEASED if self.releasing else b"")
        self.releasing = False
        try:
            async with asyncio.timeout(self.timeout):
                await self.publisher.publish(CHANNEL, message)
        except (RedisError, OSError, TimeoutError):
            return False
        self.sent += 1
        return True

    async def subscribe_forever(self) -> None:
        client = self.client()
        failing = False
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    async with asyncio.timeout(self.timeout):
                        await pubsub.subscribe(CHANNEL)
                    failing = False
                    while True:
                        message = await pubsub.get_message(timeout=self.timeout)
                        if message is not None and message.get("type") == "message":
                            self.take(message.get("data"))
                except (RedisError, OSError, TimeoutError) as exc:
                    if not failing:
                        log.warning("wake-up subscription lost", extra={"error": repr(exc)})
                    failing = True
                finally:
                    await _quietly(pubsub.aclose())
                await asyncio.sleep(RETRY_SECONDS)
        finally:
            await _quietly(client.aclose())

    def take(self, data: object) -> None:
        if not isinstance(data, bytes) or data.removesuffix(RELEASED) == self.node:
            return  # ours
        if data.endswith(RELEASED):
            self.released()
        self.woken()


async def _quietly(closing: Awaitable[object]) -> None:
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(TIMEOUT_SECONDS):
            await closing
