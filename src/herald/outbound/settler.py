"""The settler: records push outcomes in batches, one transaction for whatever has accumulated."""

from __future__ import annotations

import asyncio
import logging

from herald.errors import HeraldError, Unavailable
from herald.feed import Clock
from herald.model import Settlement
from herald.store import DeliveryQueue

log = logging.getLogger("herald.push")

ROUNDS_BEFORE_ONE_BY_ONE = 5  # failed flushes of a batch before its settlements go one by one


class Settler:
    """Records outcomes in batches (one transaction for whatever has accumulated). If the store
    is unavailable they are kept and recorded later; until then their leases keep them from
    being sent again, and a crash before recording means at most a repeated push."""

    def __init__(self, store: DeliveryQueue, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.pending: list[Settlement] = []
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.settled = 0
        self.failures = 0  # consecutive failed flushes

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="herald-push-settler")

    def add(self, settlement: Settlement) -> None:
        self.pending.append(settlement)
        self.ready.set()

    async def run(self) -> None:
        while not self.closing:
            await self.ready.wait()
            self.ready.clear()
            failed = not await self.flush()
            # Only after a failure: settlements that came in during a good flush go at once.
            if failed and self.pending and not self.closing:
                await asyncio.sleep(1.0)  # the store failed: wait, try again

    async def flush(self) -> bool:
        """Record what is pending; False if the store failed (some may be pending again)."""
        batch, self.pending = self.pending, []
        if not batch:
            return True
        try:
            await self.store.settle(batch, self.clock())
            self.settled += len(batch)
            self.failures = 0
            return True
        except HeraldError as exc:  # e.g. the database is failing over: keep them, try again
            self.failures += 1
            log.warning("push settle failed", extra={"error": exc.message})
            if self.failures < ROUNDS_BEFORE_ONE_BY_ONE or isinstance(exc, Unavailable):
                self.pending = batch + self.pending
                self.ready.set()
            else:  # the same batch keeps failing: one bad settlement must not hold up the rest
                await self.one_by_one(batch)
        except Exception:
            log.exception("push settle failed; settling one by one")
            await self.one_by_one(batch)
        return False

    async def one_by_one(self, batch: list[Settlement]) -> None:
        for settlement in batch:
            try:
                await self.store.settle([settlement], self.clock())
                self.settled += 1
            except Unavailable:
                self.pending.append(settlement)
                self.ready.set()
            except Exception:  # dropped: its lease runs out and it is claimed again
                log.exception("push settlement dropped", extra={"delivery": settlement.id})

    async def close(self) -> None:
        """Record everything still pending (a flush in progress is awaited, not cancelled)."""
        self.closing = True
        self.ready.set()
        if self.task is not None:
            await self.task
        await self.flush()
