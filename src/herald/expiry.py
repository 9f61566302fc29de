"""The expiry sweeper: removes expired notifications (telling the change log) and old history.

Every process runs it, and once an interval each asks the store whether it is its turn
(`Retention.take_turn`): of the processes sharing a store, one sweeps per interval, the others
skip (a sweep is the same work whoever does it, and N of them at once queue on the same locks).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from herald.feed import Clock
from herald.metrics import Metrics
from herald.settings import Settings
from herald.store import Retention

log = logging.getLogger("herald.expiry")
TURN = "sweep"
BATCH = 1000  # rows per sweep transaction: keeps each write short next to request traffic


async def sweep_once(store: Retention, settings: Settings, clock: Clock) -> int:
    """Expire everything due now, and remove sends finished longer than `operation_retention`
    ago; returns how many notifications expired."""
    total = 0
    while True:
        now = clock()
        retain_from = now - timedelta(seconds=settings.change_retention)
        expired = await store.sweep(now, retain_from, BATCH)
        total += expired
        if expired < BATCH:
            break
    finished_before = clock() - timedelta(seconds=settings.operation_retention)
    while await store.prune_sends(finished_before, BATCH) == BATCH:
        pass
    return total


async def run(store: Retention, settings: Settings, clock: Clock, metrics: Metrics) -> None:
    """Every `sweep_interval` seconds until cancelled, sweep if it is this process's turn; a
    failed sweep is retried later (by whichever process's turn it is then)."""
    while True:
        await asyncio.sleep(settings.sweep_interval)
        try:
            if not await store.take_turn(TURN, clock(), settings.sweep_interval):
                metrics.sweeps.labels("skipped").inc()
                continue
            metrics.sweeps.labels("swept").inc()
            expired = await sweep_once(store, settings, clock)
        except Exception:
            log.exception("expiry sweep failed; retrying next interval")
            continue
        if expired:
            log.info("expired notifications", extra={"count": expired})
