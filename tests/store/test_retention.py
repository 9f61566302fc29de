"""The `Retention` contract on every backend: what a sweep removes, and what it leaves."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from herald.model import ChangeKind
from herald.store import Store

from .conftest import Backend
from .support import (
    APP,
    T0,
    claim_all,
    enqueue,
    log_of,
    new_delivery,
    put,
    remembered,
    subscription,
    web_sub,
)


async def test_sweep_expires_prunes_and_moves_horizon(store: Store) -> None:
    soon = T0 + timedelta(minutes=1)
    expiring = [(await put(store, f"e{i}", expiration_date_time=soon))[0] for i in range(3)]
    keeper, _ = await put(store, "k", at=T0 + timedelta(minutes=5))
    other, _ = await put(store, "o", user="u2", expiration_date_time=soon)
    now = T0 + timedelta(minutes=10)
    assert await store.sweep(now, T0, limit=2) == 2
    assert await store.sweep(now, T0, limit=100) == 2
    assert await store.sweep(now, T0, limit=100) == 0
    changes = await store.changes("u1", APP, 0, 100)
    assert [c.kind for c in changes[4:]] == [ChangeKind.EXPIRED] * 3
    assert {c.notification_id for c in changes[4:]} == set(expiring)
    assert [c.position for c in changes] == list(range(1, 8))
    assert changes[3].notification is not None and changes[3].notification_id == keeper
    # Prune everything recorded before T0 + 2 minutes: the first three creates.
    assert await store.sweep(now, T0 + timedelta(minutes=2), limit=100) == 0
    assert await store.horizon("u1") == (3, 7)
    assert [c.position for c in await store.changes("u1", APP, 0, 100)] == [4, 5, 6, 7]
    assert await store.horizon("u2") == (1, 2)
    assert [c.kind for c in await store.changes("u2", APP, 0, 10)] == [ChangeKind.EXPIRED]
    assert other


async def test_sweep_drops_expired_idempotency_rows(store: Store) -> None:
    await remembered(store, "s", "k", "fp", 201, b"{}", None, T0 + timedelta(minutes=1))
    await store.sweep(T0 + timedelta(minutes=2), T0, 10)
    assert await store.recall("s", "k", T0) is None


async def test_sweep_removes_expired_subscriptions(store: Store) -> None:
    soon = T0 + timedelta(minutes=1)
    expiring = [subscription(user=f"u{i}", expires=soon) for i in range(3)]
    keeper = subscription()
    for sub in (*expiring, keeper):
        await store.add_subscription(sub, 10, T0)
    now = T0 + timedelta(minutes=2)
    assert await store.sweep(now, T0 - timedelta(days=1), 2) == 0  # counts notifications only
    # Read as of T0, when all were live: the swept ones are gone from the database.
    left = [s for s in expiring if await store.get_subscription(s.id, T0) is not None]
    assert len(left) == 1
    await store.sweep(now, T0 - timedelta(days=1), 2)
    assert [await store.get_subscription(s.id, T0) for s in expiring] == [None] * 3
    assert await store.get_subscription(keeper.id, now) == keeper


async def test_pruning_the_log_drops_entries_of_pruned_changes(store: Store) -> None:
    await put(store, "old")
    kept, _ = await put(store, "new", at=T0 + timedelta(minutes=5))
    assert len(await store.pending(100)) == 2
    await store.sweep(T0 + timedelta(minutes=6), T0 + timedelta(minutes=1), 100)
    assert log_of(await store.pending(100)) == [("u1", 2, ChangeKind.CREATED, kept, None)]


async def test_a_swept_subscription_takes_its_deliveries(store: Store) -> None:
    soon = T0 + timedelta(minutes=1)
    expiring = await web_sub(store, expiration_date_time=soon)
    keeper = await web_sub(store, user="u2", endpoint="https://push.example.net/2")
    await enqueue(store, new_delivery(expiring, 1), new_delivery(keeper, 1))
    assert await store.count_deliveries() == 2
    await store.sweep(T0 + timedelta(minutes=2), T0 - timedelta(days=1), 10)
    assert await store.get_subscription(expiring.id, T0) is None
    assert await store.count_deliveries() == 1
    assert [d.subscription_id for d in await claim_all(store)] == [keeper.id]


async def test_a_turn_is_taken_once_an_interval(store: Store) -> None:
    assert await store.take_turn("sweep", T0, 30)
    assert not await store.take_turn("sweep", T0 + timedelta(seconds=29), 30)
    assert await store.take_turn("other", T0 + timedelta(seconds=29), 30)
    assert await store.take_turn("sweep", T0 + timedelta(seconds=30), 30)
    assert not await store.take_turn("sweep", T0 + timedelta(seconds=31), 30)


async def test_two_nodes_asking_at_once_get_one_turn(durable_backend: Backend) -> None:
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        for i in range(10):
            now = T0 + timedelta(seconds=30 * i)
            turns = await asyncio.gather(
                *(s.take_turn("sweep", now, 30) for _ in range(3) for s in (a, b))
            )
            assert sorted(turns) == [False] * 5 + [True], (i, turns)
    finally:
        await a.close()
        await b.close()
