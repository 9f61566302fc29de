"""The release of pushes held during users' quiet hours (docs/push.md, "Preferences and quiet
hours"): when a quiet period ends, each held push target gets one summary push.

Every process runs it, and once an interval each asks the store whether it is its turn
(`Retention.take_turn`, as the expiry sweeper does), so of the processes sharing a store one
releases per interval. The release itself is one transaction that deletes the held rows and
queues the summaries (`Preferences.release_held`): a held push is summarised once even if two
processes release at the same moment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partial
from typing import Protocol

from herald.feed import Clock
from herald.model import Message, NewDelivery, Payload, Provider, PushKind, VisualContent
from herald.preferences import HeldSummary
from herald.store import Preferences, Retention

log = logging.getLogger("herald.holds")

TURN = "release-held"
BATCH = 500  # subscriptions per release transaction
# What a summary's `id` and `appNotificationId` are: it stands for several notifications, and a
# device collapses one summary into the next (every provider's collapse key is the id).
SUMMARY_ID = "heraldSummary"


class HoldStore(Preferences, Retention, Protocol):
    pass


def summary(held: HeldSummary, due: datetime) -> NewDelivery:
    """The one push a subscription gets for what it had held: "3 new notifications"."""
    noun = "notification" if held.count == 1 else "notifications"
    message = Message(
        kind=PushKind.ALERT,
        notification_id=SUMMARY_ID,
        app_notification_id=SUMMARY_ID,
        position=held.position,
        payload=Payload(visual_content=VisualContent(title=f"{held.count} new {noun}")),
        expires=held.expires,
    )
    return NewDelivery(
        subscription_id=held.subscription_id,
        user_id=held.user_id,
        app=held.app,
        provider=Provider(held.provider),
        message=message,
        due=due,
    )


async def release_once(store: Preferences, clock: Clock) -> list[NewDelivery]:
    """Release every held push due now; returns the summaries queued."""
    queued: list[NewDelivery] = []
    while True:
        now = clock()
        batch = await store.release_held(now, BATCH, partial(summary, due=now))
        queued += batch
        if len(batch) < BATCH:
            return queued


async def run(
    store: HoldStore,
    interval: float,
    clock: Clock,
    pushed: Callable[[Iterable[Provider]], None] | None,
) -> None:
    """Every `interval` seconds until cancelled, release if it is this process's turn, and wake
    the push engine's lanes of what was queued; a failure is retried next interval."""
    while True:
        await asyncio.sleep(interval)
        try:
            if not await store.take_turn(TURN, clock(), interval):
                continue
            queued = await release_once(store, clock)
        except Exception:
            log.exception("releasing held pushes failed; retrying next interval")
            continue
        if queued:
            log.info("released held pushes", extra={"summaries": len(queued)})
            if pushed is not None:
                pushed({d.provider for d in queued})
