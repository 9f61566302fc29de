"""The `ChangeLog` contract on every backend: positions, the notification each change carries,
origins, replaces, and how far a device has read."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from herald.model import ChangeKind, ReadState, StatePatch
from herald.query import Query
from herald.store import Store

from .support import APP, T0, content, fetch, new_id, once, put, web_sub


async def test_changes_carry_current_state_and_page(store: Store) -> None:
    nid, _ = await put(store, "a")
    await store.update("u1", APP, nid, StatePatch(read_state=ReadState.READ), None, T0)
    other, _ = await put(store, "b")
    changes = await store.changes("u1", APP, 0, 10)
    assert [c.position for c in changes] == [1, 2, 3]
    assert changes[0].notification == changes[1].notification
    assert changes[0].notification is not None
    assert changes[0].notification.read_state is ReadState.READ
    assert [c.position for c in await store.changes("u1", APP, 1, 1)] == [2]
    assert await store.changes("u1", APP, 3, 10) == []
    assert await store.horizon("u1") == (0, 3)
    assert await store.horizon("nobody") == (0, 0)
    assert other


async def test_positions_gap_free_under_concurrency(store: Store) -> None:
    users = [f"user{i:02d}" for i in range(20)]
    results = await asyncio.gather(
        *(store.put(users[i % 20], APP, content(f"k{i % 60}"), new_id(), T0) for i in range(500))
    )
    assert len(results) == 500
    for user in users:
        changes = await store.changes(user, None, 0, 1000)
        assert [c.position for c in changes] == list(range(1, 26))
        assert await store.horizon(user) == (0, 25)
        # 3 distinct keys per user: 3 creates, the rest replaces, versions sum to 25.
        page = await store.list(user, APP, Query(count=True), T0)
        assert page.total == 3 and sum(n.version for n in page.items) == 25
        assert sum(c.kind == ChangeKind.CREATED for c in changes) == 3


async def test_origin_is_recorded_on_the_change(store: Store) -> None:
    a, _ = await put(store, "a", group_name="g")
    b, _ = await put(store, "b", group_name="g")
    c, _ = await put(store, "c")
    await store.update("u1", APP, a, StatePatch(read_state=ReadState.READ), None, T0, "sub-a")
    await store.update("u1", APP, a, StatePatch(), None, T0)  # no origin
    await store.delete("u1", APP, c, None, T0, origin="sub-c")
    await store.delete_group("u1", APP, "g", T0, origin="sub-g")
    changes = await store.changes("u1", APP, 0, 100)
    assert [(ch.kind, ch.origin) for ch in changes] == [
        (ChangeKind.CREATED, None),
        (ChangeKind.CREATED, None),
        (ChangeKind.CREATED, None),
        (ChangeKind.UPDATED, "sub-a"),
        (ChangeKind.UPDATED, None),
        (ChangeKind.DELETED, "sub-c"),
        (ChangeKind.DELETED, "sub-g"),
        (ChangeKind.DELETED, "sub-g"),
    ]
    assert {ch.notification_id for ch in changes[-2:]} == {a, b}
    assert [p.change.origin for p in await store.pending(100)] == [ch.origin for ch in changes]


async def test_replaced_marks_updates_made_by_a_replacing_put(store: Store) -> None:
    a, _ = await put(store, "a")  # created
    await put(store, "a")  # replaced, one put alone
    await store.update("u1", APP, a, StatePatch(read_state=ReadState.READ), None, T0)  # patched
    # Puts that arrive together are written set-wise: a create, then a replace of it.
    (b, created), (b2, replaced_one) = await asyncio.gather(put(store, "b"), put(store, "b"))
    assert created and not replaced_one and b == b2
    # A put over an expired row is a create (after EXPIRED), not a replace.
    await put(store, "c", expiration_date_time=T0 + timedelta(minutes=1))
    c2, created = await put(store, "c", at=T0 + timedelta(minutes=2))
    assert created
    await store.delete("u1", APP, a, None, T0)

    expected = [
        (ChangeKind.CREATED, False),
        (ChangeKind.UPDATED, True),
        (ChangeKind.UPDATED, False),
        (ChangeKind.CREATED, False),
        (ChangeKind.UPDATED, True),
        (ChangeKind.CREATED, False),
        (ChangeKind.EXPIRED, False),
        (ChangeKind.CREATED, False),
        (ChangeKind.DELETED, False),
    ]
    changes = await store.changes("u1", APP, 0, 100)
    assert [(c.kind, c.replaced) for c in changes] == expected
    assert [p.change for p in await store.pending(100)] == changes
    # A replaced change carries the notification as it is now, like any update.
    assert changes[4].notification is not None and changes[4].notification.id == b
    assert changes[7].notification is not None and changes[7].notification.id == c2


async def test_replaced_in_batches_of_puts(store: Store) -> None:
    await asyncio.gather(*(put(store, f"k{i}") for i in range(30)))
    results = await asyncio.gather(*(put(store, f"k{i % 40}") for i in range(60)))
    assert sum(created for _, created in results) == 10
    changes = await store.changes("u1", APP, 30, 100)
    # PostgreSQL logs a batch's second put of a key after the others, so compare as multisets.
    assert sorted(c.replaced for c in changes) == sorted(not created for _, created in results)
    assert all(c.replaced == (c.kind is ChangeKind.UPDATED) for c in changes)
    assert {c.kind for c in changes} == {ChangeKind.CREATED, ChangeKind.UPDATED}


async def test_seen_only_raises_the_position(store: Store) -> None:
    sub = await web_sub(store)
    assert (await fetch(store, sub)).seen_position == 0
    await store.seen(sub.id, 5)
    await store.seen(sub.id, 3)
    assert (await fetch(store, sub)).seen_position == 5
    await asyncio.gather(*(store.seen(sub.id, p) for p in (9, 12, 7, 11)))
    assert (await fetch(store, sub)).seen_position == 12
    await store.seen("unknown", 100)  # ignored
    assert [s.seen_position for s in await store.list_subscriptions("u1", APP, T0)] == [12]


async def test_a_put_records_its_origin(store: Store) -> None:
    """`put`'s origin (the posting device) is recorded on its change, whether the put is
    written alone, set-wise with others, or with an Idempotency-Key."""
    await store.put("u1", APP, content("a"), new_id(), T0, "dev-a")
    await asyncio.gather(
        store.put("u1", APP, content("b"), new_id(), T0, "dev-b"),
        store.put("u1", APP, content("c"), new_id(), T0),
        store.put("u1", APP, content("a"), new_id(), T0, "dev-c"),  # replaces a
    )
    await store.put_once("u1", APP, content("d"), new_id(), T0, once("k"), "dev-d")
    changes = await store.changes("u1", APP, 0, 10)
    assert [(c.notification_id is not None, c.origin) for c in changes] == [
        (True, "dev-a"),
        (True, "dev-b"),
        (True, None),
        (True, "dev-c"),
        (True, "dev-d"),
    ]
    assert [p.change.origin for p in await store.pending(10)] == [c.origin for c in changes]


async def test_positions_are_never_reused_after_the_log_is_pruned(store: Store) -> None:
    """A user whose whole log was pruned goes on from the position after the last one."""
    for key in ("a", "b", "c"):
        await put(store, key)
    await store.sweep(T0 + timedelta(minutes=1), T0 + timedelta(minutes=1), 100)
    assert await store.horizon("u1") == (3, 3)
    assert await store.changes("u1", APP, 0, 10) == []
    fresh, _ = await put(store, "d", at=T0 + timedelta(minutes=2))
    assert [(c.position, c.notification_id) for c in await store.changes("u1", APP, 3, 10)] == [
        (4, fresh)
    ]
    assert await store.horizon("u1") == (3, 4)


async def test_heads_are_each_users_newest_position_in_one_read(store: Store) -> None:
    for i in range(3):
        await store.put("u1", APP, content(f"k{i}"), new_id(), T0)
    await store.put("u2", APP, content("k"), new_id(), T0)
    heads = await store.heads(["u1", "u2", "nobody"])
    assert heads == {"u1": 3, "u2": 1, "nobody": 0}
    assert await store.heads([]) == {}
    # Pruning the whole log keeps the head: positions are never reused.
    await store.sweep(T0 + timedelta(days=400), T0 + timedelta(days=400), 100)
    assert (await store.heads(["u1"]))["u1"] == (await store.horizon("u1"))[1] >= 3
