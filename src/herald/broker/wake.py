"""Dispatch wake-ups between nodes over Redis pub/sub (`herald:wake`).

A node's commit wakes its own dispatcher (the store's commit signal), but the entries it wrote
may be in shards another node holds (`outbound/leases.py`). So, while shards are shared, the
committing node also publishes a wake-up; every other node's dispatcher drains its own shards
on it. The message carries only the sender (which ignores its own): which shards a commit
touched is known only to the database (the shard is computed there).

Only latency rides on this. A lost wake-up (Redis down, a dropped subscription) is caught by the
dispatcher's poll while shards are shared (`dispatcher.SHARED_POLL_SECONDS`), so the loop
here is simple: one PUBLISH at a time (commits meanwhile make one more, not one each), and a
subscription that, on any error, is made again after a short wait.
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
TIMEOUT_SECONDS = 2.0
RETRY_SECONDS = 0.5


class RedisWake:
    def __init__(self, url: str, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url = url
        self.timeout = timeout
        self.node = uuid.uuid4().hex.encode()
        self.wanted = asyncio.Event()
        self.woken: Callable[[], None] = lambda: None
        self.tasks: list[asyncio.Task[None]] = []
        self.sent = 0  # wake-ups published, for tests and benchmarks

    def client(self) -> Redis:
        return Redis.from_url(
            self.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def start(self, woken: Callable[[], None]) -> None:
        """Call `woken` (on the event loop) whenever another node signals."""
        self.woken = woken
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self.publish_forever(), name="herald-wake-publisher"),
            loop.create_task(self.subscribe_forever(), name="herald-wake-subscriber"),
        ]

    def signal(self) -> None:
        """Wake the other nodes (soon; coalesced with other signals meanwhile)."""
        self.wanted.set()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks = []

    async def publish_forever(self) -> None:
        client = self.client()
        try:
            while True:
                await self.wanted.wait()
                self.wanted.clear()
                try:
                    async with asyncio.timeout(self.timeout):
                        await client.publish(CHANNEL, self.node)
                    self.sent += 1
                except (RedisError, OSError, TimeoutError):
                    await asyncio.sleep(RETRY_SECONDS)  # the others' polls find the work
        finally:
            await _quietly(client.aclose())

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
                        if (
                            message is not None
                            and message.get("type") == "message"
                            and message.get("data") != self.node
                        ):
                            self.woken()
                except (RedisError, OSError, TimeoutError) as exc:
                    if not failing:
                        log.warning("wake-up subscription lost", extra={"error": repr(exc)})
                    failing = True
                finally:
                    await _quietly(pubsub.aclose())
                await asyncio.sleep(RETRY_SECONDS)
        finally:
            await _quietly(client.aclose())


async def _quietly(closing: Awaitable[object]) -> None:
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(TIMEOUT_SECONDS):
            await closing
