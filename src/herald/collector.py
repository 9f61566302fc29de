"""The cyclic garbage collector, kept away from the live connections.

A node holds thousands of idle live streams, each with its connection's objects (the server's
protocol, the WebSocket state, buffers, the stream's coroutine): about a million objects the
cyclic collector would walk in every full collection, stopping the event loop for most of a
second. These objects live as long as their connection, so walking them again and again finds
nothing. The `Collector` takes them out of its reach with `gc.freeze()`, in batches as streams
open: once a second, if streams opened since the last batch, it runs a full collection (which
walks only what is not frozen yet: what arrived since the last batch) and freezes what survives.

Frozen objects are still freed by reference counting, but a frozen reference cycle (what a
closed connection leaves behind) is not, until it is unfrozen. So when the streams closed since
the last unfreeze reach half of the streams that were frozen (plus `MIN_CLOSED`), everything is
unfrozen, collected once (a walk of the whole heap: the one long pause, as often as Python's own
full collections would come under the same churn, and never while streams only open or stay)
and frozen again. What a closed connection leaves is thereby bounded by about the memory of the
open ones. Objects of requests in flight when a batch is frozen wait for that same collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Protocol

log = logging.getLogger("herald.collector")

TICK_SECONDS = 1.0
# Unfreeze and collect once closed streams reach this many plus half of those frozen.
MIN_CLOSED = 100
CLOSED_SHARE = 0.5
THAW_WAIT = 10


class Counts(Protocol):
    """What the collector watches: streams opened and closed since the process began."""

    @property
    def opened(self) -> int: ...

    @property
    def closed(self) -> int: ...


class Collector:
    """Freezes long-lived connection state as it arrives, and collects what closed streams
    leave (see the module docstring)."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.opened = 0  # `counts.opened` at the last freeze
        self.closed = 0  # `counts.closed` at the last unfreeze
        self.frozen = 0  # streams opened (and frozen) since the last unfreeze
        self.seen = 0  # `counts.closed` at the last tick
        self.waited = 0  # ticks an unfreeze has been due
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Freeze what start-up allocated (it lives as long as the process), then watch."""
        self.thaw()
        self.task = asyncio.create_task(self.run(), name="herald-collector")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick()

    def tick(self) -> None:
        counts = self.counts
        closing = counts.closed != self.seen  # streams closed during the last tick
        self.seen = counts.closed
        if counts.closed - self.closed >= MIN_CLOSED + CLOSED_SHARE * self.frozen:
            # Once closing pauses (what a closed stream leaves is all garbage by then, not
            # frozen again by the thaw), or after THAW_WAIT ticks under constant churn.
            self.waited += 1
            if not closing or self.waited > THAW_WAIT:
                self.thaw()
                return
        if counts.opened > self.opened:
            self.frozen += counts.opened - self.opened
            self.opened = counts.opened
            gc.collect()  # only what is not frozen yet: what arrived since the last batch
            gc.freeze()

    def thaw(self) -> None:
        """Unfreeze everything, collect, and freeze what is alive."""
        began = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        counts = self.counts
        self.opened, self.closed, self.waited = counts.opened, counts.closed, 0
        self.frozen = counts.opened - counts.closed  # the streams open now
        log.debug(
            "full collection",
            extra={"ms": round(1000 * (time.perf_counter() - began), 1), "open": self.frozen},
        )
