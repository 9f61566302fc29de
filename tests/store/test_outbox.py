"""The `Outbox` contract on every backend: an entry per change, in order, until dispatched; the
commit signal; push targets; `dispatched` queueing each push once and superseding older ones."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta

import msgspec
import pytest

from herald.errors import HeraldError, NotFound
from herald.model import (
    ChangeKind,
    Delivery,
    DeliveryState,
    DevicePlatform,
    NewDelivery,
    Pending,
    Provider,
    ReadState,
    Settle,
    StatePatch,
    Subscription,
)
from herald.store import Store
from herald.store.postgres import PostgresStore

from .conftest import Backend
from .support import (
    APP,
    LEASE,
    OTHER_APP,
    SOON,
    T0,
    assert_ascending,
    claim_all,
    content,
    enqueue,
    fetch,
    log_of,
    message,
    new_delivery,
    new_id,
    outbox_entries,
    outcome,
    positions,
    put,
    replace,
    state,
    subscription,
    two_nodes,
    web_push,
    web_sub,
)


async def test_every_change_kind_gets_an_outbox_entry(store: Store) -> None:
    a, _ = await put(store, "a", group_name="g")  # a lone put
    # Puts that arrive together are written set-wise (one batch): creates, then a replace.
    (b, _), (c, _) = await asyncio.gather(
        put(store, "b", group_name="g"),
        put(store, "c", expiration_date_time=T0 + timedelta(minutes=1)),
    )
    (b2, replaced), (f, _) = await asyncio.gather(
        put(store, "b", group_name="g", at=T0 + timedelta(seconds=1)), put(store, "f")
    )
    assert b2 == b and not replaced
    await store.update("u1", APP, a, StatePatch(read_state=ReadState.READ), None, T0, "dev-1")
    await store.delete("u1", APP, a, None, T0, "dev-2")
    assert await store.delete_group("u1", APP, "g", T0, "dev-3") == 1
    # A put over an expired row expires it first, in the put path.
    d, _ = await put(store, "d", expiration_date_time=T0 + timedelta(minutes=1))
    at = T0 + timedelta(minutes=2)
    d2, created = await put(store, "d", at=at)
    assert created and d2 != d
    assert await store.sweep(at, T0 - timedelta(days=1), 100) == 1  # c, prunes nothing

    pending = await store.pending(100)
    assert_ascending(pending)
    assert log_of(pending) == [
        ("u1", 1, ChangeKind.CREATED, a, None),
        ("u1", 2, ChangeKind.CREATED, b, None),
        ("u1", 3, ChangeKind.CREATED, c, None),
        ("u1", 4, ChangeKind.UPDATED, b, None),
        ("u1", 5, ChangeKind.CREATED, f, None),
        ("u1", 6, ChangeKind.UPDATED, a, "dev-1"),
        ("u1", 7, ChangeKind.DELETED, a, "dev-2"),
        ("u1", 8, ChangeKind.DELETED, b, "dev-3"),
        ("u1", 9, ChangeKind.CREATED, d, None),
        ("u1", 10, ChangeKind.EXPIRED, d, None),
        ("u1", 11, ChangeKind.CREATED, d2, None),
        ("u1", 12, ChangeKind.EXPIRED, c, None),
    ]
    # Each entry carries the change exactly as the change log has it (notification as it is now).
    assert [p.change for p in pending] == await store.changes("u1", None, 0, 100)
    live = {p.change.position: p.change.notification for p in pending if p.change.notification}
    assert {position: n.id for position, n in live.items()} == {5: f, 11: d2}


async def test_pending_is_oldest_first_and_limited(store: Store) -> None:
    ids = [(await put(store, f"k{i}", user=f"user{i % 2}"))[0] for i in range(5)]
    everything = await store.pending(100)
    assert_ascending(everything)
    assert [p.change.notification_id for p in everything] == ids  # commit order
    assert [(p.change.user_id, p.change.position) for p in everything] == [
        ("user0", 1),
        ("user1", 1),
        ("user0", 2),
        ("user1", 2),
        ("user0", 3),
    ]
    assert await store.pending(2) == everything[:2]
    assert await store.pending(0) == []


async def test_pending_leaves_out_the_skipped_entries_and_fills_its_limit_with_others(
    store: Store,
) -> None:
    for i in range(5):
        await put(store, f"k{i}", user=f"user{i % 2}")
    everything = await store.pending(100)
    skipped = {everything[0].seq, everything[2].seq}
    # The limit counts only the entries returned: the dispatcher reads a full batch past the
    # entries it is still removing.
    assert await store.pending(2, skip=skipped) == [everything[1], everything[3]]
    assert await store.pending(100, skip=skipped) == [everything[i] for i in (1, 3, 4)]
    assert await store.pending(100, skip=[]) == everything


async def test_waiting_counts_the_undispatched_entries_up_to_its_limit(store: Store) -> None:
    assert await store.waiting(10) == 0
    for i in range(5):
        await put(store, f"k{i}", user=f"user{i % 2}")
    assert await store.waiting(10) == 5
    assert await store.waiting(3) == 3
    everything = await store.pending(100)
    await store.dispatched([p.seq for p in everything[:2]])
    assert await store.waiting(10) == 3


async def test_pending_keeps_each_users_position_order_under_concurrency(store: Store) -> None:
    users = [f"user{i:02d}" for i in range(25)]
    first = {u: (await put(store, "seed", user=u))[0] for u in users}
    writes: list[Awaitable[object]] = []
    for i in range(500):
        user = users[i % 25]
        if (i // 25) % 5 == 4:  # every fifth round: 4 updates per user
            writes.append(store.update(user, APP, first[user], StatePatch(), None, T0, "dev"))
        else:
            writes.append(store.put(user, APP, content(f"k{i % 75}"), new_id(), T0))
    await asyncio.gather(*writes)

    pending = await store.pending(10_000)
    assert len(pending) == 525
    assert_ascending(pending)
    for user in users:
        mine = [p.change for p in pending if p.change.user_id == user]
        assert [c.position for c in mine] == list(range(1, 22))
        assert mine == await store.changes(user, None, 0, 100)
        assert sum(c.origin == "dev" for c in mine) == 4


async def test_outbox_order_with_two_stores_on_one_database(durable_backend: Backend) -> None:
    """Two Herald nodes writing the same users: each user's entries still come in order."""
    async with two_nodes(durable_backend) as (a, b):
        users = [f"user{i}" for i in range(7)]
        await asyncio.gather(
            *(
                s.put(users[i % 7], APP, content(f"k{i}"), new_id(), T0)
                for i in range(150)
                for s in (a, b)
            )
        )
        pending = await b.pending(1000)
        assert len(pending) == 300
        assert_ascending(pending)
        for user in users:
            positions = [p.change.position for p in pending if p.change.user_id == user]
            assert positions == list(range(1, len(positions) + 1))


async def test_dispatched_removes_entries(store: Store) -> None:
    for i in range(5):
        await put(store, f"k{i}")
    pending = await store.pending(100)
    assert len(pending) == 5
    await store.dispatched([pending[0].seq, pending[2].seq, 10**12])  # unknown seqs are ignored
    await store.dispatched([])
    rest = await store.pending(100)
    assert rest == [pending[1], pending[3], pending[4]]
    await store.dispatched([p.seq for p in rest])
    assert await store.pending(100) == []
    # The change log is untouched by dispatching.
    assert [c.position for c in await store.changes("u1", APP, 0, 100)] == [1, 2, 3, 4, 5]
    # New entries after an empty outbox are pending again.
    fresh, _ = await put(store, "after")
    assert log_of(await store.pending(100)) == [("u1", 6, ChangeKind.CREATED, fresh, None)]


async def test_outbox_survives_a_restart(durable_backend: Backend) -> None:
    """A crash between commit and dispatch loses nothing: the entries are read again."""
    first = durable_backend.make()
    await first.open()
    await asyncio.gather(*(put(first, f"k{i}", user=f"user{i % 3}") for i in range(12)))
    nid, _ = await put(first, "x")
    await first.update("u1", APP, nid, StatePatch(read_state=ReadState.READ), None, T0, "dev")
    before = await first.pending(100)
    await first.dispatched([before[0].seq])
    await first.close()  # the dispatcher never ran for the rest

    second = durable_backend.make()
    await second.open()
    try:
        after = await second.pending(100)
        assert after == before[1:]
        assert len(after) == 13 and after[-1].change.origin == "dev"
        await second.dispatched([p.seq for p in after])
    finally:
        await second.close()
    third = durable_backend.make()
    await third.open()
    try:
        assert await third.pending(100) == []
    finally:
        await third.close()


async def test_on_commit_signals_commits_that_add_entries(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("a broken listener")

    store.on_commit(broken)  # registered first: must not keep the next one from running
    store.on_commit(lambda: calls.append("commit"))
    with caplog.at_level(logging.ERROR):
        nid, _ = await put(store, "a", expiration_date_time=T0 + timedelta(minutes=1))
    assert calls == ["commit"]
    assert "on_commit callback failed" in caplog.text

    # Writes that add no outbox entries do not signal.
    with pytest.raises(NotFound):
        await store.update("u1", APP, "missing", StatePatch(), None, T0)
    assert await store.delete_group("u1", APP, "none", T0) == 0
    await store.add_subscription(subscription(), 10, T0)
    await store.put_push_credentials(APP, "vapid", b"k")
    await store.dispatched([p.seq for p in await store.pending(10)])
    assert await store.sweep(T0, T0 - timedelta(days=1), 10) == 0
    assert calls == ["commit"]

    await store.update("u1", APP, nid, StatePatch(), None, T0)
    assert calls == ["commit"] * 2
    await asyncio.gather(*(put(store, f"b{i}") for i in range(50)))
    assert 3 <= len(calls) <= 52
    before = len(calls)
    assert await store.sweep(T0 + timedelta(minutes=2), T0 - timedelta(days=1), 10) == 1
    assert len(calls) == before + 1
    # The writer still works after the broken callback.
    assert (await put(store, "z"))[1]


async def test_push_targets(store: Store) -> None:
    def sub(user: str, app: str = APP, n: int = 0, **kw: object) -> Subscription:
        s = subscription(
            user=user,
            app=app,
            channel=web_push(f"https://push.example.net/{user}/{app}/{n}"),
            platform=DevicePlatform.WEBPUSH,
            at=T0 + timedelta(seconds=10 - n),
        )
        return replace(s, **kw)

    newer, older = sub("u1", n=1), sub("u1", n=2)
    live_only = sub("u1", n=3, push_channel=None)
    expired = sub("u1", n=4, expiration_date_time=T0 + timedelta(minutes=1))
    gone = sub("u1", n=5)
    u2, other_app, u3 = sub("u2"), sub("u1", OTHER_APP), sub("u3")
    for s in (newer, older, live_only, expired, gone, u2, other_app, u3):
        await store.add_subscription(s, 10, T0)
    await enqueue(store, new_delivery(gone, 1))
    (d,) = await claim_all(store)
    await store.settle([outcome(d, Settle.GONE)], T0)

    now = T0 + timedelta(minutes=1)
    pairs = [("u2", APP), ("u1", APP), ("u1", OTHER_APP), ("u1", APP), ("nobody", APP)]
    targets = await store.push_targets(pairs, now)
    assert [s.id for s in targets] == [older.id, newer.id, other_app.id, u2.id]
    assert targets[0] == await fetch(store, older)
    assert await store.push_targets([], now) == []


async def test_an_entry_without_push_targets_may_say_so(store: Store) -> None:
    """`Pending.pushable` is False only where `push_targets` finds nobody: the dispatcher then
    skips that read. A pair with a push channel is pushable (also on another app of the user)."""
    await web_sub(store, "pushed")
    await store.add_subscription(subscription(user="live"), 10, T0)  # no push channel
    for user in ("pushed", "live", "plain"):
        await put(store, user=user)
    await put(store, user="pushed", app=OTHER_APP)
    entries = await store.pending(10)
    assert len(entries) == 4
    now = T0 + timedelta(seconds=1)
    for entry in entries:
        pair = (entry.change.user_id, entry.change.app)
        if not entry.pushable:
            assert await store.push_targets([pair], now) == [], pair
        if pair == ("pushed", APP):
            assert entry.pushable
    assert {(e.change.user_id, e.change.app) for e in entries if e.pushable} == {("pushed", APP)}


async def test_dispatched_removes_entries_and_queues_deliveries(store: Store) -> None:
    sub = await web_sub(store)
    for i in range(3):
        await put(store, f"k{i}")
    pending = await store.pending(10)
    assert await store.count_deliveries() == 0
    queued = [new_delivery(sub, p.change.position) for p in pending[:2]]
    await store.dispatched([p.seq for p in pending[:2]], queued)
    assert await store.pending(10) == pending[2:]
    assert await store.count_deliveries() == 2
    assert await store.count_deliveries(Provider.WEBPUSH) == 2
    assert await store.count_deliveries(Provider.APNS) == 0
    await store.dispatched([pending[2].seq])  # deliveries default to none
    assert await store.pending(10) == []
    assert await store.count_deliveries() == 2
    await store.dispatched([], [])  # nothing at all


async def test_dispatched_is_one_transaction(store: Store) -> None:
    """A delivery that cannot be stored fails the call, and the outbox entries stay."""
    sub = await web_sub(store)
    await put(store, "a")
    await put(store, "b")
    pending = await store.pending(10)
    broken = replace(new_delivery(sub, 2), subscription_id=None)  # violates NOT NULL
    with pytest.raises(HeraldError):
        await store.dispatched([p.seq for p in pending], [new_delivery(sub, 1), broken])
    assert await store.pending(10) == pending
    assert await store.count_deliveries() == 0
    # The store still works, and the same call without the broken row commits both parts.
    await store.dispatched([p.seq for p in pending], [new_delivery(sub, 1), new_delivery(sub, 2)])
    assert await store.pending(10) == []
    assert await store.count_deliveries() == 2


async def test_concurrent_dispatches_each_commit_whole(store: Store) -> None:
    sub = await web_sub(store)
    await asyncio.gather(*(put(store, f"k{i}") for i in range(40)))
    pending = await store.pending(100)
    assert len(pending) == 40
    calls = []
    for i in range(0, 40, 4):
        chunk = pending[i : i + 4]
        calls.append(
            store.dispatched(
                [p.seq for p in chunk], [new_delivery(sub, p.change.position) for p in chunk]
            )
        )
    await asyncio.gather(*calls)
    assert await store.pending(100) == []
    claimed = await store.claim(Provider.WEBPUSH, T0, LEASE, 100)
    assert sorted(positions(claimed)) == list(range(1, 41))


async def test_dispatched_queues_only_the_deliveries_of_entries_it_removes(store: Store) -> None:
    sub = await web_sub(store)
    laptop = await web_sub(store, endpoint="https://push.example.net/laptop")
    stranger = await web_sub(store, user="u2", endpoint="https://push.example.net/u2")
    for i in range(3):
        await put(store, f"k{i}")
    p1, p2, p3 = await store.pending(10)
    # A delivery of a change whose entry the call does not remove is not queued ...
    await store.dispatched([p1.seq], [new_delivery(sub, 1), new_delivery(sub, 2)])
    assert positions(await claim_all(store)) == [1]
    # ... nor one of an entry already removed (the same batch dispatched again) ...
    await store.dispatched([p1.seq], [new_delivery(sub, 1)])
    # ... nor one without any entry.
    await store.dispatched([], [new_delivery(sub, 2)])
    assert await store.count_deliveries() == 1
    assert await store.pending(10) == [p2, p3]
    # A change is (user, position): the same position of another user is another change.
    await store.dispatched(
        [p2.seq, p3.seq, 10**12],
        [
            new_delivery(sub, 2),
            new_delivery(laptop, 2),
            new_delivery(stranger, 2),
            new_delivery(sub, 3),
        ],
    )
    assert await store.pending(10) == []
    queued = await claim_all(store, SOON)
    assert sorted((d.message.position, d.subscription_id) for d in queued) == sorted(
        [(1, sub.id), (2, sub.id), (2, laptop.id), (3, sub.id)]
    )
    # Two entries for one change (the store never writes that; still): queued once.
    await store.dispatched(await outbox_entries(store, [("u1", 9)] * 2), [new_delivery(sub, 9)])
    assert await store.count_deliveries() == 5


async def test_two_nodes_dispatching_one_entry_queue_its_deliveries_once(
    durable_backend: Backend,
) -> None:
    async with two_nodes(durable_backend) as (a, b):
        sub = await web_sub(a)
        # The reviewer's case: both read the entry, both dispatch it.
        await put(a, "x")
        (entry,) = await a.pending(10)
        assert await b.pending(10) == [entry]
        for node in (a, b):
            await node.dispatched([entry.seq], [new_delivery(sub, entry.change.position)])
        assert await b.count_deliveries() == 1
        # Racing: both drain the same entries at once, in batches (each node's batches commit
        # together, so on PostgreSQL one node waits for the other's locks, then skips).
        await asyncio.gather(*(put(a, f"k{i}") for i in range(200)))
        entries = await a.pending(1000)
        assert len(entries) == 200 and await b.pending(1000) == entries
        calls = [
            node.dispatched(
                [p.seq for p in chunk], [new_delivery(sub, p.change.position) for p in chunk]
            )
            for node in (a, b)
            for chunk in (entries[i : i + 20] for i in range(0, 200, 20))
        ]
        await asyncio.gather(*calls)
        assert await a.pending(1000) == []
        claimed = await b.claim(Provider.WEBPUSH, T0, LEASE, 1000)
        assert sorted(positions(claimed)) == list(range(1, 202))


def delivery_for(change: Pending, sub: Subscription) -> NewDelivery:
    """A delivery of the pending entry's change, as the engine builds it."""
    c = change.change
    return replace(
        new_delivery(sub, c.position),
        message=message(c.position, notification_id=c.notification_id),
    )


async def test_a_dispatched_change_supersedes_older_deliveries_of_its_notification(
    store: Store,
) -> None:
    phone = await web_sub(store, endpoint="https://push.example.net/phone")
    laptop = await web_sub(store, endpoint="https://push.example.net/laptop")
    stranger = await web_sub(store, user="u2", endpoint="https://push.example.net/u2")

    async def dispatch(*subs: Subscription) -> Pending:
        """Dispatch the one pending entry, with a delivery to each of `subs`."""
        (entry,) = await store.pending(10)
        await store.dispatched([entry.seq], [delivery_for(entry, s) for s in subs])
        return entry

    def queued(deliveries: list[Delivery]) -> list[tuple[str, int, str]]:
        return sorted(
            (d.message.notification_id, d.message.position, d.subscription_id) for d in deliveries
        )

    a, _ = await put(store, "a")
    await dispatch(phone, laptop)  # position 1
    b, _ = await put(store, "b")
    await dispatch(phone)  # 2: another notification
    # Another user's delivery naming the same notification id, and one of b with a later
    # position than b's next change (neither is superseded).
    await enqueue(
        store,
        replace(new_delivery(stranger, 1), message=message(1, notification_id=a)),
        replace(new_delivery(phone, 10), message=message(10, notification_id=b)),
    )
    (in_flight,) = await store.claim(Provider.WEBPUSH, T0, LEASE, 1)
    assert (in_flight.message.notification_id, in_flight.subscription_id) == (a, phone.id)

    # A state patch with no push of its own (say, a Web Push-only user) still supersedes
    # a's alerts, on every subscription, the claimed one too.
    await store.update("u1", APP, a, StatePatch(read_state=ReadState.READ), None, T0)
    await dispatch()  # 3
    later = T0 + timedelta(days=1)
    assert queued(await store.claim(Provider.WEBPUSH, later, 0, 100)) == sorted(
        [
            (a, 1, stranger.id),
            (b, 2, phone.id),
            (b, 10, phone.id),
        ]
    )
    # The claimed one was sent anyway; its late outcome is ignored.
    await store.settle([outcome(in_flight, Settle.DONE, sent=True)], T0)
    assert await state(store, phone) == DeliveryState()

    # A replace queues again; the delete's tombstone supersedes that.
    await put(store, "a")
    await dispatch(phone, laptop)  # 4
    await store.delete("u1", APP, a, None, T0)
    await dispatch()  # 5
    # Of b: the change at 6 supersedes 2, not 10.
    await store.update("u1", APP, b, StatePatch(read_state=ReadState.READ), None, T0)
    entry = await dispatch(laptop)  # 6
    assert queued(await store.claim(Provider.WEBPUSH, later, 0, 100)) == sorted(
        [
            (a, 1, stranger.id),
            (b, 6, laptop.id),
            (b, 10, phone.id),
        ]
    )
    assert entry.change.position == 6

    # Changes of one notification dispatched in one batch transaction: each supersedes what the
    # earlier calls queued.
    await store.update("u1", APP, b, StatePatch(read_state=ReadState.UNREAD), None, T0)
    await store.update("u1", APP, b, StatePatch(read_state=ReadState.READ), None, T0)
    e7, e8 = await store.pending(10)
    await asyncio.gather(
        store.dispatched([e7.seq], [delivery_for(e7, phone)]),
        store.dispatched([e8.seq], [delivery_for(e8, laptop)]),
    )
    assert queued(await store.claim(Provider.WEBPUSH, later, 0, 100)) == sorted(
        [
            (a, 1, stranger.id),
            (b, 8, laptop.id),
            (b, 10, phone.id),
        ]
    )


async def test_an_expiry_supersedes(store: Store) -> None:
    sub = await web_sub(store)
    await put(store, "e", expiration_date_time=T0 + timedelta(minutes=1))
    (created,) = await store.pending(10)
    await store.dispatched([created.seq], [delivery_for(created, sub)])
    assert await store.count_deliveries() == 1
    assert await store.sweep(T0 + timedelta(minutes=2), T0 - timedelta(days=1), 10) == 1
    (expired,) = await store.pending(10)
    assert expired.change.kind is ChangeKind.EXPIRED
    await store.dispatched([expired.seq])
    assert await store.count_deliveries() == 0


async def test_superseding_reaches_across_nodes(durable_backend: Backend) -> None:
    async with two_nodes(durable_backend) as (a, b):
        sub = await web_sub(a)
        n, _ = await put(a, "n")
        (first,) = await a.pending(10)
        await a.dispatched([first.seq], [delivery_for(first, sub)])
        await b.update("u1", APP, n, StatePatch(read_state=ReadState.READ), None, T0)
        (second,) = await b.pending(10)
        await b.dispatched([second.seq], [delivery_for(second, sub)])
        assert positions(await a.claim(Provider.WEBPUSH, T0, LEASE, 10)) == [2]


@pytest.mark.postgres
async def test_superseding_sees_what_a_racing_node_queued(postgres: Backend) -> None:
    """Node A removes entry 1 and queues its delivery; node B, dispatching entries 1 and 2,
    waits for A's lock on entry 1, skips it, and supersedes A's delivery (which committed after
    B's call began) by 2."""
    import asyncpg

    b = postgres.make()
    assert isinstance(b, PostgresStore)
    await b.open()
    a = await asyncpg.connect(b.url, server_settings=b._server_settings)
    try:
        sub = await web_sub(b)
        n, _ = await put(b, "n")
        await b.update("u1", APP, n, StatePatch(read_state=ReadState.READ), None, T0)
        e1, e2 = await b.pending(10)
        d1, d2 = delivery_for(e1, sub), delivery_for(e2, sub)
        async with a.transaction():
            await a.execute("DELETE FROM outbox WHERE seq = $1", e1.seq)
            await a.execute(
                "INSERT INTO deliveries (subscription_id, user_id, app, provider, message,"
                " notification_id, position, expires, due, created)"
                " VALUES ($1, 'u1', $2, 'webPush', $3, $4, 1, $5, $6, $6)",
                sub.id,
                APP,
                msgspec.json.encode(d1.message).decode(),
                n,
                d1.message.expires,
                T0,
            )
            racing = asyncio.ensure_future(b.dispatched([e1.seq, e2.seq], [d1, d2]))
            await asyncio.sleep(0.3)
            assert not racing.done()  # waiting for A's lock on entry 1
        await racing
        assert positions(await b.claim(Provider.WEBPUSH, T0, LEASE, 10)) == [2]
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_a_post_is_handed_over_at_commit_as_pending_reads_it(postgres: Backend) -> None:
    """`on_outboxed` (PostgreSQL): after a put commits, and before its `on_commit` callbacks,
    its entry as `pending` reads it, if every earlier change of its user has been dispatched;
    `whole` when that is every entry of the commit. A put behind an undispatched change of its
    user, or one that logs EXPIRED first, is left to `pending` alone."""
    store = postgres.make()
    await store.open()
    calls: list[tuple[str, list[Pending], bool]] = []

    async def take(entries: list[Pending], whole: bool) -> None:
        calls.append(("take", entries, whole))

    async def handed_by(write: Awaitable[object]) -> list[tuple[str, list[Pending], bool]]:
        calls.clear()
        await write
        return list(calls)

    def pending_of(entries: list[Pending], read: list[Pending]) -> list[Pending]:
        return [e for e in read if e.seq in {h.seq for h in entries}]

    try:
        store.on_outboxed(take)
        store.on_commit(lambda: calls.append(("commit", [], False)))
        await web_sub(store, "pushed")
        handed = [await handed_by(put(store, "a", user=u)) for u in ("pushed", "plain")]
        read = await store.pending(10)
        assert handed[0] == [("take", [read[0]], True), ("commit", [], False)]
        assert handed[1] == [("take", [read[1]], True), ("commit", [], False)]
        assert read[0].pushable and not read[1].pushable
        assert [e.change.kind for e in read] == [ChangeKind.CREATED] * 2

        # Behind its user's undispatched entry: not handed over; the commit still signals.
        assert await handed_by(put(store, "b", user="pushed")) == [("commit", [], False)]
        await store.dispatched([e.seq for e in await store.pending(10)])

        # A replacement, once its user's entries are dispatched.
        ((_, replaced, whole), _) = await handed_by(put(store, "a", user="pushed"))
        assert whole and replaced == pending_of(replaced, await store.pending(10))
        assert replaced[0].change.kind is ChangeKind.UPDATED and replaced[0].change.replaced
        await store.dispatched([e.seq for e in await store.pending(10)])

        # A put over an expired notification logs EXPIRED, then CREATED: neither is handed over.
        soon = T0 + timedelta(minutes=1)
        assert len(await handed_by(put(store, "x", user="plain", expiration_date_time=soon))) == 2
        await store.dispatched([e.seq for e in await store.pending(10)])
        lapsed = put(store, "x", user="plain", at=T0 + timedelta(minutes=2))
        assert await handed_by(lapsed) == [("commit", [], False)]
        kinds = [e.change.kind for e in await store.pending(10)]
        assert kinds == [ChangeKind.EXPIRED, ChangeKind.CREATED]
    finally:
        await store.close()


@pytest.mark.postgres
async def test_posts_of_one_batch_are_handed_over_in_seq_order(postgres: Backend) -> None:
    """Concurrent puts share writer batches: each batch hands over its entries ascending by seq,
    two puts of one user in one batch both (neither is behind an undispatched entry of an
    earlier commit), and together they are what `pending` reads. A batch of more than 4 puts
    (a load the dispatcher reads in bulk) hands over none."""
    store = postgres.make()
    await store.open()
    handed: list[Pending] = []

    async def take(entries: list[Pending], whole: bool) -> None:
        assert [e.seq for e in entries] == sorted(e.seq for e in entries)
        handed.extend(entries)

    try:
        store.on_outboxed(take)
        await asyncio.gather(*(put(store, user=f"u{i % 2}") for i in range(4)))
        read = await store.pending(100)
        assert len(read) == 4
        assert handed and all(e in read for e in handed)
        assert len({e.seq for e in handed}) == len(handed)
        await store.dispatched([e.seq for e in read])
        handed.clear()
        await asyncio.gather(*(put(store, user=f"v{i}") for i in range(200)))
        assert len(await store.pending(300)) == 200
        assert len(handed) < 200  # the writers' batches were not all of 4 puts or fewer
    finally:
        await store.close()
