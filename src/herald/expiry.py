"""The expiry sweeper: removes expired notifications (telling the change log) and old history."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from herald.feed import Clock
from herald.settings import Settings
from herald.store import Retention

log = logging.getLogger("herald.expiry")
BATCH = 1000  # rows per sweep transaction: keeps each write short next to request traffic


async def sweep_once(store: Retention, settings: Settings, clock: Clock) -> int:
    """Expire everything due now; returns how many notifications expired."""
    total = 0
    while True:
        now = clock()
        retain_from = now - timedelta(seconds=settings.change_retention)
        expired = await store.sweep(now, retain_from, BATCH)
        total += expired
        if expired < BATCH:
            return total


async def run(store: Retention, settings: Settings, clock: Clock) -> None:
    """Sweep every `sweep_interval` seconds until cancelled; a failed sweep is retried later."""
    while True:
        await asyncio.sleep(settings.sweep_interval)
        try:
            expired = await sweep_once(store, settings, clock)
        except Exception:
            log.exception("expiry sweep failed; retrying next interval")
            continue
        if expired:
            log.info("expired notifications", extra={"count": expired})
