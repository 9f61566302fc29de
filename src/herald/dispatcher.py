"""The dispatcher: turns committed outbox entries into deliveries.

The store writes an outbox entry with every change, in the same transaction (see
`store/base.py`). This loop reads them oldest first, publishes each change to the broker (the live
streams; push channels will hang off the same loop), and only then removes the entries. A crash in
between publishes those changes again after restart: at-least-once, and streams drop what they
have already sent by position. It wakes on the store's commit signal and also polls, so entries
written by another process (or left by a crash) are picked up too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from herald.broker import Broker
from herald.errors import HeraldError
from herald.metrics import Metrics
from herald.store import Store

log = logging.getLogger("herald.dispatcher")

BATCH = 512
POLL_SECONDS = 1.0
RETRY_SECONDS = 1.0


class Dispatcher:
    def __init__(
        self, store: Store, broker: Broker, metrics: Metrics, poll: float = POLL_SECONDS
    ) -> None:
        self.store = store
        self.broker = broker
        self.metrics = metrics
        self.poll = poll
        self.wake = asyncio.Event()
        self.dispatched = 0
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.store.on_commit(self.wake.set)
        self.task = asyncio.create_task(self.run(), name="herald-dispatcher")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def run(self) -> None:
        while True:
            self.wake.clear()
            try:
                while await self.drain() == BATCH:
                    pass  # a full batch: more may be waiting
            except HeraldError as exc:  # the store is unavailable: back off, try again
                log.warning("dispatch failed", extra={"error": exc.message})
                await asyncio.sleep(RETRY_SECONDS)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await self.wake.wait()

    async def drain(self) -> int:
        """Publish one batch of pending changes, then remove them from the outbox."""
        pending = await self.store.pending(BATCH)
        if not pending:
            return 0
        now = time.time()
        for entry in pending:
            await self.broker.publish(entry.change)
            self.metrics.dispatch_lag.observe(max(0.0, now - entry.change.at.timestamp()))
        await self.store.dispatched([entry.seq for entry in pending])
        self.dispatched += len(pending)
        self.metrics.dispatched.inc(len(pending))
        return len(pending)
