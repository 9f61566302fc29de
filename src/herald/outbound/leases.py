"""This node's share of dispatch: the outbox shards it holds a lease on (`store.Shards`).

Every `renew` seconds (`dispatch_renew_interval`) the node renews its leases (good for `ttl`
seconds on the database's clock: `dispatch_lease_ttl`, which is also how long its heartbeat
counts it live), takes unowned or lapsed shards up to its fair share of the live nodes and gives
back what it holds beyond that; on a clean shutdown it releases them all, so the others take them
at their next renewal rather than when the leases run out. No leader: each node does this alone.
A killed node's leases run out at most `ttl` after its last renewal, and the others take its
shards at their first renewal after that: within about ttl + renew of the kill.

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
from herald.settings import Settings
from herald.store import Shards

log = logging.getLogger("herald.leases")

TTL_SECONDS: float = Settings.dispatch_lease_ttl
RENEW_SECONDS: float = Settings.dispatch_renew_interval


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
        # Shards gained and lost (given back, lapsed, released) so far: gained - lost = held.
        self.gains = 0
        self.losses = 0
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
        self.lapse()
        before = self.held
        self.held, self.valid_until = held, asked + self.ttl
        self.gains += len(held - before)
        self.losses += len(before - held)
        if held != before:
            log.info(
                "dispatch shards changed",
                extra={"node": self.node, "held": len(held), "gained": len(held - before)},
            )
        if held - before:
            self.gained()
        if before - held:
            self.lost()

    def lapse(self) -> None:
        """Forget the shards once the lease may have run out (counted as lost)."""
        if self.held and time.monotonic() >= self.valid_until:
            self.losses += len(self.held)
            self.held = frozenset()

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
            self.lapse()

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
        self.losses += len(self.held)
        self.held, self.valid_until = frozenset(), 0.0
        try:
            await self.store.release(self.node)
        except HeraldError as exc:  # the others take the shards when the leases run out
            log.warning("lease release failed", extra={"error": exc.message})
