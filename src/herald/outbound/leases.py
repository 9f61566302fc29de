"""This node's share of dispatch: the outbox shards it holds a lease on (`store.Shards`).

Every `renew` seconds the node renews its leases (good for `ttl` seconds on the database's
clock), takes unowned or lapsed shards up to its fair share of the live nodes and gives back
what it holds beyond that; on a clean shutdown it releases them all, so the others take them at
their next renewal rather than when the leases run out. No leader: each node does this alone.

The node dispatches a shard only while its lease surely holds: until `ttl` after it *asked*
(its own monotonic clock), so a node whose renewals fail, or that was paused, stops before
another node can have taken its shards. A batch already being dispatched may still finish
after that (the store keeps pushes exactly once, and streams drop a position sent twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from herald.errors import HeraldError
from herald.store import Shards

log = logging.getLogger("herald.leases")

TTL_SECONDS = 5.0
RENEW_SECONDS = 1.0


def node_name() -> str:
    """A name unique to this process: host and pid (for people reading the table), and a random
    part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    def __init__(
        self,
        store: Shards,
        node: str | None = None,
        ttl: float = TTL_SECONDS,
        renew: float = RENEW_SECONDS,
    ) -> None:
        self.store = store
        self.node = node or node_name()
        self.ttl = ttl
        self.renew_every = renew
        self.held: frozenset[int] = frozenset()
        self.valid_until = 0.0  # monotonic
        # Called when the node gains shards (their entries may be waiting): the dispatcher's wake;
        # and when it gives some back (another node joined): tell the others to take them now.
        self.gained: Callable[[], None] = lambda: None
        self.lost: Callable[[], None] = lambda: None
        self.soon = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def shards(self) -> frozenset[int]:
        """The shards this node may dispatch now: none once its lease may have run out."""
        return self.held if time.monotonic() < self.valid_until else frozenset()

    async def renew(self) -> None:
        asked = time.monotonic()
        held = await self.store.lease(self.node, self.ttl)
        before = self.shards()
        self.held, self.valid_until = held, asked + self.ttl
        if held != before:
            log.info(
                "dispatch shards changed",
                extra={"node": self.node, "held": len(held), "gained": len(held - before)},
            )
        if held - before:
            self.gained()
        if before - held:
            self.lost()

    def renew_soon(self) -> None:
        """Renew now rather than at the next period (another node released shards)."""
        self.soon.set()

    async def start(self) -> None:
        await self.attempt()
        self.task = asyncio.create_task(self.run(), name="herald-leases")

    async def attempt(self) -> None:
        try:
            await self.renew()
        except HeraldError as exc:  # the store is unavailable: the lease runs out, try again
            log.warning("lease renewal failed", extra={"error": exc.message})

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_every):
                    await self.soon.wait()
            self.soon.clear()
            await self.attempt()

    async def close(self) -> None:
        """Stop renewing and release every shard (call once this node has stopped dispatching)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        self.held, self.valid_until = frozenset(), 0.0
        try:
            await self.store.release(self.node)
        except HeraldError as exc:  # the others take the shards when the leases run out
            log.warning("lease release failed", extra={"error": exc.message})
