"""`Delivery` over real stores, against the tests' webhook receiver: a look whose read of the due
webhooks began while a delivery was in flight must not act on what it read of that webhook; a
look reads and moves only webhooks with something to send; a commit wakes delivery at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from herald.outbound.webhooks import Delivery
from herald.settings import Settings
from herald.store import Store, Webhook
from tests.hooks import Receiver, receiver
from tests.store.support import APP, put
from tests.store.test_changefeed import hook


@pytest.fixture
def sink() -> Iterator[Receiver]:
    yield from receiver()


class SlowDueRead:
    """The store, but once `slow` is set the next read of the due webhooks is answered only after
    the delivery in flight has ended (as a read queued behind a busy database would be), and
    that delivery reads the feed only once the due read is done."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.slow: asyncio.Task[None] | None = None  # the delivery the due read outlasts
        self.read = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def due_webhooks(self, now: datetime) -> list[Webhook]:
        due = await self.store.due_webhooks(now)
        if self.slow is not None:
            flying, self.slow = self.slow, None
            self.read.set()
            await asyncio.wait([flying])
        return due

    async def app_changes(self, app: str, after: int, limit: int) -> Any:
        if self.slow is not None:
            await self.read.wait()
        return await self.store.app_changes(app, after, limit)


async def test_a_failed_batch_is_not_resent_by_a_look_that_read_before_the_failure(
    store: Store, sink: Receiver
) -> None:
    sink.plan = [500]
    url = sink.url
    added = await store.add_webhook(hook(url=url, kinds=("created",)), limit=5)
    await put(store, "a")
    slowed = SlowDueRead(store)
    settings = Settings(webhook_allow_private_endpoints=True)  # its backoff: 5 s
    delivery = Delivery(slowed, settings, lambda: datetime.now(UTC))  # type: ignore[arg-type]
    try:
        await delivery.look()
        [first] = delivery.flying.values()
        slowed.slow = first
        # This look reads the webhook as due (no failure yet), then the first delivery fails.
        await delivery.look()
        await asyncio.sleep(0)
        assert first.done()
        state = await store.get_webhook(APP, added.id)
        assert state is not None and state.failures == 1 and state.next_attempt is not None
        assert [r.answer for r in sink.received] == [500]
        assert delivery.flying == {}, "a batch resent before its backoff"
        await delivery.look()  # read afresh: not due until the backoff has passed
        assert delivery.flying == {}
    finally:
        await delivery.close()
    assert [r.answer for r in sink.received] == [500]


async def test_a_change_costs_no_read_of_other_apps_webhooks(store: Store, sink: Receiver) -> None:
    """With many apps' webhooks registered, a look starts a delivery (a read of the feed, and a
    write to move the cursor) only for a webhook with something after its cursor."""
    ours = await store.add_webhook(hook("ours", url=sink.url, kinds=("created",)), limit=5)
    others = [
        await store.add_webhook(hook(f"other-{i}", app=f"other{i}.example.com"), limit=5)
        for i in range(5)
    ]
    await put(store, "a")
    delivery = Delivery(store, Settings(webhook_allow_private_endpoints=True), now)  # type: ignore[arg-type]
    try:
        await delivery.look()
        assert set(delivery.flying) == {ours.id}
        await asyncio.gather(*delivery.flying.values())
    finally:
        await delivery.close()
    assert [r.answer for r in sink.received] == [200]
    for other in others:  # untouched
        assert await store.get_webhook(other.app, other.id) == other


async def test_a_change_after_an_idle_spell_is_sent_at_once_not_at_the_next_poll(
    store: Store, sink: Receiver
) -> None:
    await store.add_webhook(hook(url=sink.url, kinds=("created",)), limit=5)
    settings = Settings(webhook_allow_private_endpoints=True, webhook_poll_interval=2.0)
    delivery = Delivery(store, settings, now)  # type: ignore[arg-type]
    delivery.start()
    try:
        await asyncio.sleep(2.3)  # the first poll has found the webhook, with nothing to send
        assert sink.received == []
        put_at = time.monotonic()
        await put(store, "a")
        await asyncio.to_thread(sink.wait, lambda got: len(got) >= 1, 5.0)
        # The commit woke delivery: well before the next poll (about 1.7 s away).
        assert sink.received[0].at - put_at < 1.2
    finally:
        await delivery.close()


def now() -> datetime:
    return datetime.now(UTC)
