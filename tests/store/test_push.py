"""The Store contract for push delivery: the delivery queue (dispatched, claim, settle), the
subscriptions' delivery state and seen position, `Change.replaced`, and push credentials."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest

from herald.errors import HeraldError
from herald.model import (
    ApnsChannel,
    ChangeKind,
    Delivery,
    DeliveryState,
    DevicePlatform,
    FcmChannel,
    Message,
    NewDelivery,
    Payload,
    Pending,
    Priority,
    Provider,
    PushKind,
    ReadState,
    Settle,
    Settlement,
    StatePatch,
    Subscription,
    UserActionState,
    VisualContent,
)
from herald.store import Store
from herald.store.schema import migrations
from herald.store.settlement import MAX_ERROR, clean_error
from herald.store.sqlite import SqliteStore

from .conftest import Backend
from .test_contract import APP, OTHER_APP, T0, put
from .test_devices import CHANNELS, LATER, subscription, web_push

replace = msgspec.structs.replace
LEASE = 30.0
SOON = T0 + timedelta(seconds=LEASE)


def message(position: int = 1, expires: datetime = T0 + timedelta(days=7), **kw: object) -> Message:
    fields: dict[str, object] = {
        "kind": PushKind.ALERT,
        "notification_id": f"n{position}",
        "app_notification_id": f"a{position}",
        "position": position,
        "expires": expires,
    }
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


def new_delivery(
    sub: Subscription,
    position: int = 1,
    due: datetime = T0,
    provider: Provider = Provider.WEBPUSH,
    **kw: object,
) -> NewDelivery:
    return NewDelivery(
        subscription_id=sub.id,
        user_id=sub.user_id,
        app=sub.app,
        provider=provider,
        message=message(position, **kw),
        due=due,
    )


async def web_sub(
    store: Store, user: str = "u1", endpoint: str = "https://push.example.net/1", **kw: object
) -> Subscription:
    sub = subscription(user=user, channel=web_push(endpoint), platform=DevicePlatform.WEBPUSH)
    sub = replace(sub, **kw)
    stored, created = await store.add_subscription(sub, 100, T0)
    assert created
    return stored


async def outbox_entries(store: Store, keys: list[tuple[str, int]]) -> list[int]:
    """Outbox entries for these (user_id, position) pairs, written behind the store's back and
    without changes behind them (so `pending` skips them and they supersede nothing): the
    queue tests choose any positions they like, again and again."""
    if isinstance(store, SqliteStore):
        assert store._conn is not None
        sql = "INSERT INTO outbox (user_id, position) VALUES (?, ?) RETURNING seq"
        return [store._conn.execute(sql, key).fetchall()[0][0] for key in keys]
    from herald.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    async with store._acquire() as conn:
        rows = await conn.fetch(
            "INSERT INTO outbox (user_id, position)"
            " SELECT * FROM unnest($1::text[], $2::bigint[]) RETURNING seq",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    return [r[0] for r in rows]


async def enqueue(store: Store, *deliveries: NewDelivery) -> None:
    """Queue these deliveries, whatever their positions (see `outbox_entries`)."""
    keys = sorted({(d.user_id, d.message.position) for d in deliveries})
    await store.dispatched(await outbox_entries(store, keys), deliveries)


async def state(store: Store, sub: Subscription) -> DeliveryState:
    got = await store.get_subscription(sub.id, T0)
    assert got is not None
    return got.delivery


def positions(claimed: list[Delivery]) -> list[int]:
    return [d.message.position for d in claimed]


# -- dispatched --------------------------------------------------------------------------------


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
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
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
    finally:
        await a.close()
        await b.close()


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
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        sub = await web_sub(a)
        n, _ = await put(a, "n")
        (first,) = await a.pending(10)
        await a.dispatched([first.seq], [delivery_for(first, sub)])
        await b.update("u1", APP, n, StatePatch(read_state=ReadState.READ), None, T0)
        (second,) = await b.pending(10)
        await b.dispatched([second.seq], [delivery_for(second, sub)])
        assert positions(await a.claim(Provider.WEBPUSH, T0, LEASE, 10)) == [2]
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_superseding_sees_what_a_racing_node_queued(postgres: Backend) -> None:
    """Node A removes entry 1 and queues its delivery; node B, dispatching entries 1 and 2,
    waits for A's lock on entry 1, skips it, and supersedes A's delivery (which committed after
    B's call began) by 2."""
    import asyncpg

    from herald.store.postgres import PostgresStore

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


# -- claim -------------------------------------------------------------------------------------


async def test_claim_returns_due_deliveries_in_order_and_leases_them(store: Store) -> None:
    sub = await web_sub(store)
    await store.seen(sub.id, 7)
    dues = [T0 + timedelta(seconds=s) for s in (5, -10, 0, -10, 60)]
    await enqueue(store, *(new_delivery(sub, i + 1, due) for i, due in enumerate(dues)))
    assert await store.next_due(Provider.WEBPUSH) == T0 - timedelta(seconds=10)
    assert await store.next_due(Provider.FCM) is None

    first = await store.claim(Provider.WEBPUSH, T0, LEASE, 2)
    # Earliest due first; equal dues in the order they were queued (id).
    assert positions(first) == [2, 4]
    assert first[0].id < first[1].id
    d = first[0]
    assert (d.subscription_id, d.user_id, d.app, d.provider) == (
        sub.id,
        "u1",
        APP,
        Provider.WEBPUSH,
    )
    assert d.channel == sub.push_channel
    assert d.message == message(2)
    assert d.attempts == 1
    assert d.seen_position == 7
    assert d.created.tzinfo is not None

    # Only what is due: the one due at T0 (inclusive), not those due later.
    rest = await store.claim(Provider.WEBPUSH, T0, LEASE, 10)
    assert positions(rest) == [3]
    assert await store.claim(Provider.WEBPUSH, T0, LEASE, 10) == []
    assert await store.claim(Provider.APNS, T0 + timedelta(days=1), LEASE, 10) == []
    # Leased until now + lease: the next due is the one due at +5 s.
    assert await store.next_due(Provider.WEBPUSH) == T0 + timedelta(seconds=5)
    assert positions(await store.claim(Provider.WEBPUSH, T0 + timedelta(seconds=5), 60, 10)) == [1]
    # Nothing is claimed twice before its lease ends ...
    assert await store.claim(Provider.WEBPUSH, SOON - timedelta(microseconds=1), LEASE, 10) == []
    # ... and everything comes back after it (a crashed node's claims), counting attempts.
    again = await store.claim(Provider.WEBPUSH, SOON, LEASE, 10)
    assert positions(again) == [2, 3, 4]  # all due at SOON now: in id order
    assert [d.attempts for d in again] == [2, 2, 2]
    assert await store.count_deliveries() == 5
    assert await store.claim(Provider.WEBPUSH, T0, LEASE, 0) == []


async def test_claim_sees_the_subscriptions_current_channel(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1))
    moved = replace(sub, push_channel=web_push("https://push.example.net/new"))
    await store.update_subscription(moved, T0)
    await store.seen(sub.id, 3)
    (d,) = await store.claim(Provider.WEBPUSH, T0, LEASE, 10)
    assert d.channel == moved.push_channel
    assert d.seen_position == 3


@pytest.mark.parametrize("case", ["deleted", "expired", "gone", "other_provider", "no_channel"])
async def test_claim_purges_what_can_no_longer_be_sent(store: Store, case: str) -> None:
    doomed = await web_sub(store, endpoint="https://push.example.net/doomed")
    fine = await web_sub(store, endpoint="https://push.example.net/fine")
    # The doomed subscription's deliveries come first; the limit still fills with good ones.
    await enqueue(
        store,
        *(new_delivery(doomed, i, T0 - timedelta(seconds=10)) for i in range(1, 4)),
        *(new_delivery(fine, i, T0) for i in range(4, 7)),
    )
    now = T0
    if case == "deleted":  # deleted after fan-out: its deliveries are orphans
        await store.delete_subscription("u1", APP, doomed.id)
        await enqueue(store, new_delivery(doomed, 1, T0 - timedelta(seconds=10)))
    elif case == "expired":
        now = T0 + timedelta(minutes=1)
        await store.update_subscription(replace(doomed, expiration_date_time=now), T0)
    elif case == "gone":
        claimed = await store.claim(Provider.WEBPUSH, T0, 0, 1)
        assert claimed[0].subscription_id == doomed.id
        await store.settle([outcome(claimed[0], Settle.GONE)], T0)
        assert await store.count_deliveries() == 3
        await enqueue(store, new_delivery(doomed, 1, T0 - timedelta(seconds=10)))  # a race
    elif case == "other_provider":
        apns = ApnsChannel(device_token="ab" * 32)
        await store.update_subscription(replace(doomed, push_channel=apns), T0)
    else:
        await store.update_subscription(replace(doomed, push_channel=None), T0)
    claimed = await store.claim(Provider.WEBPUSH, now, LEASE, 2)
    assert positions(claimed) == [4, 5]
    assert {d.subscription_id for d in claimed} == {fine.id}
    assert await store.count_deliveries() == 3  # the doomed ones were deleted
    assert positions(await store.claim(Provider.WEBPUSH, now, LEASE, 10)) == [6]


async def test_claim_purges_expired_messages(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(
        store,
        new_delivery(sub, 1, T0 - timedelta(seconds=2), expires=T0 - timedelta(seconds=1)),
        new_delivery(sub, 2, T0 - timedelta(seconds=1), expires=T0),  # expires <= now
        new_delivery(sub, 3, T0, expires=T0 + timedelta(microseconds=1)),
    )
    assert positions(await store.claim(Provider.WEBPUSH, T0, LEASE, 10)) == [3]
    assert await store.count_deliveries() == 1


async def test_claim_purges_only_due_deliveries_and_only_its_provider(store: Store) -> None:
    sub = await web_sub(store)
    later = T0 + timedelta(hours=1)
    await enqueue(
        store,
        new_delivery(sub, 1, later),
        new_delivery(sub, 2, T0, provider=Provider.APNS),  # the channel is no APNS one
    )
    await store.delete_subscription("u1", APP, sub.id)
    assert await store.count_deliveries() == 0  # deleted with the subscription
    await enqueue(store, new_delivery(sub, 1, later), new_delivery(sub, 2, T0, Provider.APNS))
    assert await store.claim(Provider.WEBPUSH, T0, LEASE, 10) == []
    assert await store.count_deliveries() == 2  # not due yet / another queue
    assert await store.claim(Provider.APNS, T0, LEASE, 10) == []
    assert await store.count_deliveries(Provider.APNS) == 0


async def test_every_provider_has_its_own_queue(store: Store) -> None:
    subs = []
    for i, (platform, channel) in enumerate(CHANNELS):
        sub = subscription(channel=channel, platform=platform, at=T0 + timedelta(seconds=i))
        subs.append((await store.add_subscription(sub, 10, T0))[0])
    providers = [Provider.WEBPUSH, Provider.APNS, Provider.FCM, Provider.WNS]
    await enqueue(
        store,
        *(
            new_delivery(s, i, provider=p)
            for i, (s, p) in enumerate(zip(subs, providers, strict=True))
        ),
    )
    for i, (s, p) in enumerate(zip(subs, providers, strict=True)):
        assert await store.count_deliveries(p) == 1
        (d,) = await store.claim(p, T0, LEASE, 10)
        assert (d.message.position, d.channel, d.provider) == (i, s.push_channel, p)


async def test_a_message_round_trips_exactly(store: Store) -> None:
    sub = await web_sub(store)
    plus_two = timezone(timedelta(hours=2))
    full = Message(
        kind=PushKind.FALLBACK,
        notification_id="n1",
        app_notification_id="order-17",
        position=12,
        group_name="orders",
        payload=Payload(raw_content="r\u00e9\x00w", visual_content=VisualContent(title="t")),
        priority=Priority.HIGH,
        read_state=ReadState.READ,
        user_action_state=UserActionState.DISMISSED,
        display_time_to_live=60,
        expires=datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=plus_two),
    )
    await enqueue(store, replace(new_delivery(sub, 1), message=full))
    (d,) = await store.claim(Provider.WEBPUSH, T0, LEASE, 1)
    assert d.message == full
    assert d.message.expires.utcoffset() == timedelta(hours=2)
    assert d.message.expires.microsecond == 678901


async def test_concurrent_claims_never_return_one_delivery_twice(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, *(new_delivery(sub, i, T0 - timedelta(seconds=i % 7)) for i in range(500)))
    results = await asyncio.gather(
        *(store.claim(Provider.WEBPUSH, T0, LEASE, 30) for _ in range(20))
    )
    ids = [d.id for claimed in results for d in claimed]
    assert len(ids) == len(set(ids)) == 500
    assert await store.claim(Provider.WEBPUSH, T0, LEASE, 30) == []


async def test_two_nodes_claiming_one_queue_never_share_a_delivery(
    durable_backend: Backend,
) -> None:
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        sub = await web_sub(a)
        await enqueue(a, *(new_delivery(sub, i) for i in range(500)))
        results = await asyncio.gather(
            *(s.claim(Provider.WEBPUSH, T0, LEASE, 25) for _ in range(10) for s in (a, b))
        )
        ids = [d.id for claimed in results for d in claimed]
        assert len(ids) == len(set(ids)) == 500
        # Leases hold across nodes too, and end for both.
        assert await b.claim(Provider.WEBPUSH, T0, LEASE, 10) == []
        late = await asyncio.gather(a.claim(Provider.WEBPUSH, SOON, LEASE, 300),
                                    b.claim(Provider.WEBPUSH, SOON, LEASE, 300))  # fmt: skip
        again = [d.id for claimed in late for d in claimed]
        assert sorted(again) == sorted(ids)
        assert {d.attempts for claimed in late for d in claimed} == {2}
    finally:
        await a.close()
        await b.close()


async def test_queued_deliveries_survive_a_restart(durable_backend: Backend) -> None:
    first = durable_backend.make()
    await first.open()
    sub = await web_sub(first)
    await enqueue(first, *(new_delivery(sub, i) for i in range(1, 4)))
    (leased,) = await first.claim(Provider.WEBPUSH, T0, LEASE, 1)
    await first.close()  # crashed with one in flight

    second = durable_backend.make()
    await second.open()
    try:
        assert await second.count_deliveries(Provider.WEBPUSH) == 3
        assert await second.next_due(Provider.WEBPUSH) == T0
        assert positions(await second.claim(Provider.WEBPUSH, T0, LEASE, 10)) == [2, 3]
        (back,) = await second.claim(Provider.WEBPUSH, SOON, LEASE, 1)
        assert (back.id, back.attempts, back.message) == (leased.id, 2, leased.message)
    finally:
        await second.close()


# -- settle ------------------------------------------------------------------------------------


async def claim_all(store: Store, now: datetime = T0) -> list[Delivery]:
    return await store.claim(Provider.WEBPUSH, now, LEASE, 1000)


def outcome(d: Delivery, settle: Settle, **kw: object) -> Settlement:
    fields: dict[str, object] = {
        "id": d.id,
        "subscription_id": d.subscription_id,
        "settle": settle,
        "attempts": d.attempts,
        "channel_key": d.channel.key,
    }
    fields.update(kw)
    return Settlement(**fields)  # type: ignore[arg-type]


async def test_settle_done(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, *(new_delivery(sub, i) for i in range(1, 4)))
    d1, d2, d3 = await claim_all(store)
    await store.settle([outcome(d1, Settle.RETRY, due=T0, error="503")], T0)
    assert await state(store, sub) == DeliveryState(consecutive_failures=1, last_error="503")
    # Not sent (no longer needed): removed, the subscription is left as it is.
    await store.settle([outcome(d2, Settle.DONE)], T0)
    assert await state(store, sub) == DeliveryState(consecutive_failures=1, last_error="503")
    at = T0 + timedelta(seconds=3)
    await store.settle([outcome(d3, Settle.DONE, sent=True)], at)
    assert await state(store, sub) == DeliveryState(last_delivered_date_time=at)
    assert positions(await claim_all(store)) == [1]  # only the retried one is left
    assert await store.count_deliveries() == 1


async def test_settle_retry(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1))
    (d,) = await claim_all(store)
    due = T0 + timedelta(minutes=5)
    await store.settle([outcome(d, Settle.RETRY, due=due, error="timeout")], T0)
    await store.settle([outcome(d, Settle.RETRY, due=due, error="HTTP 503")], T0)
    assert await state(store, sub) == DeliveryState(consecutive_failures=2, last_error="HTTP 503")
    assert await store.next_due(Provider.WEBPUSH) == due
    assert await store.claim(Provider.WEBPUSH, due - timedelta(microseconds=1), LEASE, 10) == []
    (again,) = await store.claim(Provider.WEBPUSH, due, LEASE, 10)
    assert (again.id, again.attempts) == (d.id, 2)


async def test_settle_drop(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1), new_delivery(sub, 2))
    d1, d2 = await claim_all(store)
    await store.settle([outcome(d1, Settle.DROP, error="400 bad payload")], T0)
    assert await state(store, sub) == DeliveryState(
        consecutive_failures=1, last_error="400 bad payload"
    )
    assert await store.count_deliveries() == 1
    assert positions(await claim_all(store, SOON)) == [2]


async def test_settle_gone_drops_every_delivery_of_the_subscription(store: Store) -> None:
    sub = await web_sub(store)
    other = await web_sub(store, endpoint="https://push.example.net/other")
    await enqueue(
        store,
        new_delivery(sub, 1),
        new_delivery(other, 2),
        new_delivery(sub, 3, T0 + timedelta(hours=1)),  # not even claimed yet
        new_delivery(sub, 4),
    )
    d1, d2, d4 = await claim_all(store)
    at = T0 + timedelta(seconds=1)
    await store.settle([outcome(d1, Settle.GONE, error="410")], at)
    assert await state(store, sub) == DeliveryState(
        consecutive_failures=1, last_error="410", gone_date_time=at
    )
    assert await store.count_deliveries() == 1
    # A late outcome for a delivery GONE removed is ignored: the subscription stays as it is.
    await store.settle([outcome(d4, Settle.DONE, sent=True)], at)
    assert (await state(store, sub)).consecutive_failures == 1
    assert await store.claim(Provider.WEBPUSH, T0 + timedelta(days=1), LEASE, 10) == [
        replace(d2, attempts=2)
    ]
    # The subscription itself stays (its live stream works) but gets no more pushes.
    got = await store.get_subscription(sub.id, T0)
    assert got is not None and got.delivery.gone_date_time == at
    assert got in await store.list_subscriptions("u1", APP, T0)
    assert [s.id for s in await store.push_targets([("u1", APP)], T0)] == [other.id]


async def fetch(store: Store, sub: Subscription) -> Subscription:
    got = await store.get_subscription(sub.id, T0)
    assert got is not None
    return got


async def test_settle_applies_outcomes_in_order_in_one_call(store: Store) -> None:
    a = await web_sub(store, endpoint="https://push.example.net/a")
    b = await web_sub(store, endpoint="https://push.example.net/b")
    c = await web_sub(store, endpoint="https://push.example.net/c")
    await enqueue(store, *(new_delivery(s, i) for i, s in enumerate((a, a, b, b, c, c))))
    a1, a2, b1, b2, c1, c2 = await claim_all(store)
    later = T0 + timedelta(hours=1)
    await store.settle(
        [
            outcome(a1, Settle.RETRY, due=later, error="e1"),
            outcome(a2, Settle.DONE, sent=True),  # resets what the retry counted
            outcome(b1, Settle.DONE, sent=True),
            outcome(b2, Settle.DROP, error="e2"),  # counts after the delivery
            outcome(c1, Settle.RETRY, due=later, error="e3"),
            outcome(c2, Settle.GONE, error="e4"),  # takes c1 with it
            outcome(c1, Settle.DONE, sent=True),  # c1 is gone: ignored
            replace(outcome(a2, Settle.DROP, error="unknown"), id=10**12),
        ],
        T0,
    )
    assert await state(store, a) == DeliveryState(last_delivered_date_time=T0)
    assert await state(store, b) == DeliveryState(
        last_delivered_date_time=T0, consecutive_failures=1, last_error="e2"
    )
    assert await state(store, c) == DeliveryState(
        consecutive_failures=2, last_error="e4", gone_date_time=T0
    )
    assert positions(await store.claim(Provider.WEBPUSH, later, LEASE, 10)) == [0]
    assert await store.count_deliveries() == 1


async def test_settle_ignores_unknown_deliveries(store: Store) -> None:
    sub = await web_sub(store)
    await store.settle([], T0)
    assert sub.push_channel is not None
    key = sub.push_channel.key
    unknown = [
        Settlement(
            id=id, subscription_id=sub.id, settle=s, attempts=1, channel_key=key, error="x", due=T0
        )
        for s in Settle
        for id in (10**12, -1, 2**63, 2**80)  # not even a 64-bit integer: no row has it
    ]
    await store.settle(unknown, T0)
    assert await state(store, sub) == DeliveryState()


async def test_many_settles_at_once(store: Store) -> None:
    subs = [await web_sub(store, f"u{i}", f"https://push.example.net/{i}") for i in range(10)]
    await enqueue(store, *(new_delivery(s, i) for i in range(20) for s in subs))
    claimed = await claim_all(store)
    assert len(claimed) == 200
    await asyncio.gather(
        *(
            store.settle([outcome(d, Settle.DONE, sent=True)], T0)
            if d.message.position % 2
            else store.settle([outcome(d, Settle.RETRY, due=SOON, error="503")], T0)
            for d in claimed
        )
    )
    assert await store.count_deliveries() == 100
    for s in subs:
        delivery = await state(store, s)
        assert delivery.last_delivered_date_time == T0
        assert delivery.consecutive_failures <= 10


async def test_a_settlement_applies_only_to_the_claim_it_answers(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1))
    (first,) = await store.claim(Provider.WEBPUSH, T0, 0, 1)  # its lease ends at once ...
    (second,) = await store.claim(Provider.WEBPUSH, T0, LEASE, 1)  # ... and it is claimed again
    assert (second.id, first.attempts, second.attempts) == (first.id, 1, 2)
    # The first claim's outcomes come late: each is ignored.
    for settle in Settle:
        await store.settle([outcome(first, settle, due=T0, error="late", sent=True)], T0)
    assert await state(store, sub) == DeliveryState()
    assert await store.count_deliveries() == 1
    assert await store.claim(Provider.WEBPUSH, T0, LEASE, 1) == []  # still leased
    await store.settle(
        [
            outcome(second, Settle.RETRY, due=T0, error="503"),
            outcome(first, Settle.GONE, error="late"),  # in the same call too
        ],
        T0,
    )
    assert await state(store, sub) == DeliveryState(consecutive_failures=1, last_error="503")
    (third,) = await store.claim(Provider.WEBPUSH, T0, LEASE, 1)
    await store.settle([outcome(second, Settle.DONE, sent=True)], T0)
    assert await state(store, sub) == DeliveryState(consecutive_failures=1, last_error="503")
    await store.settle([outcome(third, Settle.DONE, sent=True)], T0)
    assert await state(store, sub) == DeliveryState(last_delivered_date_time=T0)
    assert await store.count_deliveries() == 0


@pytest.mark.parametrize("settle", list(Settle))
async def test_a_settlement_for_a_replaced_channel_leaves_the_subscription_alone(
    store: Store, settle: Settle
) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1), new_delivery(sub, 2))
    old, other = await claim_all(store)
    moved = replace(sub, push_channel=web_push("https://push.example.net/new"))
    await store.update_subscription(moved, T0)
    await store.settle([outcome(old, settle, due=SOON, error="410", sent=True)], T0)
    # The device's fresh state stays as it is; the delivery itself is settled as its claim says.
    assert await state(store, sub) == DeliveryState()
    assert await store.count_deliveries() == (2 if settle is Settle.RETRY else 1)
    # A GONE for the old channel neither marks the subscription gone nor takes its others.
    assert [s.id for s in await store.push_targets([("u1", APP)], T0)] == [sub.id]
    assert other.id in [d.id for d in await claim_all(store, SOON)]
    # Outcomes for the channel it has now count.
    assert moved.push_channel is not None
    late = replace(outcome(other, Settle.DROP, error="400"), attempts=2)
    await store.settle([replace(late, channel_key=moved.push_channel.key)], T0)
    assert await state(store, sub) == DeliveryState(consecutive_failures=1, last_error="400")


async def test_a_late_settlement_from_another_node_is_ignored(durable_backend: Backend) -> None:
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        sub = await web_sub(a)
        await enqueue(a, new_delivery(sub, 1), new_delivery(sub, 2))
        stalled = await a.claim(Provider.WEBPUSH, T0, LEASE, 10)
        retaken = await b.claim(Provider.WEBPUSH, SOON, LEASE, 10)  # a's lease ran out
        assert [d.id for d in retaken] == [d.id for d in stalled]
        await a.settle([outcome(d, Settle.GONE, error="410") for d in stalled], SOON)
        assert await state(b, sub) == DeliveryState()
        assert await b.count_deliveries() == 2
        await b.settle([outcome(d, Settle.DONE, sent=True) for d in retaken], SOON)
        assert await state(a, sub) == DeliveryState(last_delivered_date_time=SOON)
        assert await a.count_deliveries() == 0
    finally:
        await a.close()
        await b.close()


async def test_settle_stores_any_error_text_safely(store: Store) -> None:
    """PostgreSQL rejects NUL in text: one odd error must not fail the settle (or its batch)."""
    errors = [
        "nul\x00in\x00it",
        "line\nbreak\ttab\x1b[31mred\x7f",
        "x" * 1000,
        "lone \ud800 surrogate",
        "caf\u00e9 \u2603 ok",
    ]
    subs = [await web_sub(store, endpoint=f"https://push.example.net/{i}") for i in range(5)]
    await enqueue(store, *(new_delivery(s, 1) for s in subs))
    claimed = {d.subscription_id: d for d in await claim_all(store)}
    settles = [Settle.RETRY, Settle.DROP, Settle.GONE, Settle.RETRY, Settle.DROP]
    await asyncio.gather(
        *(
            store.settle([outcome(claimed[s.id], settle, due=SOON, error=error)], T0)
            for s, settle, error in zip(subs, settles, errors, strict=True)
        ),
        store.settle([outcome(claimed[subs[0].id], Settle.RETRY, due=SOON, error="\x00")], T0),
    )
    got = [(await state(store, s)).last_error for s in subs]
    assert got == ["", "line break tab[31mred", "x" * MAX_ERROR, "lone  surrogate", errors[4]]
    assert [(await state(store, s)).consecutive_failures for s in subs] == [2, 1, 1, 1, 1]


def test_clean_error() -> None:
    assert clean_error(None) is None
    assert clean_error("HTTP 503: try later") == "HTTP 503: try later"
    assert clean_error("a\r\nb\x00c\u200bd") == "a  bcd"  # U+200B is a format character
    assert clean_error(ValueError("bad")) == "bad"
    assert len(clean_error("\u00e9" * 400) or "") == MAX_ERROR


# -- delivery state and seen position ---------------------------------------------------------


async def failing(store: Store, sub: Subscription) -> Subscription:
    """Give `sub` a delivery history: a delivery, then two failures and gone."""
    await enqueue(store, *(new_delivery(sub, i) for i in range(3)))
    d1, d2, d3 = await claim_all(store)
    await store.settle([outcome(d1, Settle.DONE, sent=True)], T0)
    await store.settle([outcome(d2, Settle.DROP, error="x"), outcome(d3, Settle.GONE)], T0)
    got = await fetch(store, sub)
    assert got.delivery == DeliveryState(
        last_delivered_date_time=T0, consecutive_failures=2, gone_date_time=T0
    )
    return got


async def test_registering_again_resets_the_delivery_state(store: Store) -> None:
    sub = await failing(store, await web_sub(store))
    await store.seen(sub.id, 5)
    later = T0 + timedelta(hours=1)
    again = subscription(channel=sub.push_channel, platform=DevicePlatform.WEBPUSH, at=later)
    stored, created = await store.add_subscription(again, 10, later)
    assert not created and stored.id == sub.id
    assert stored.delivery == DeliveryState()
    assert stored.seen_position == 5  # the same device
    assert await fetch(store, sub) == stored
    assert [s.id for s in await store.push_targets([("u1", APP)], T0)] == [sub.id]


async def test_changing_the_channel_resets_the_delivery_state(store: Store) -> None:
    sub = await failing(store, await web_sub(store))
    await store.seen(sub.id, 5)
    # The same channel (other fields changed): the history is kept.
    renamed = await store.update_subscription(replace(sub, display_name="renamed"), T0)
    assert renamed.delivery == sub.delivery and renamed.seen_position == 5
    assert await fetch(store, sub) == renamed
    # Another channel: fresh state; the seen position is the device's and stays.
    fcm = FcmChannel(registration_token="tok")
    moved = await store.update_subscription(replace(renamed, push_channel=fcm), T0)
    assert moved.delivery == DeliveryState() and moved.seen_position == 5
    assert await fetch(store, sub) == moved


async def test_a_new_subscription_starts_fresh(store: Store) -> None:
    sub = subscription(channel=web_push(), platform=DevicePlatform.WEBPUSH)
    dirty = replace(sub, delivery=DeliveryState(consecutive_failures=3), seen_position=9)
    stored, created = await store.add_subscription(dirty, 10, T0)
    assert created and stored == sub
    assert await fetch(store, sub) == sub


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


# -- deleting a subscription deletes its deliveries -------------------------------------------


async def test_subscription_deletes_take_their_deliveries(store: Store) -> None:
    keeper = await web_sub(store, endpoint="https://push.example.net/keeper")
    await enqueue(store, new_delivery(keeper, 0))

    async def queued(sub: Subscription) -> None:
        await enqueue(store, new_delivery(sub, 1), new_delivery(sub, 2, T0 + timedelta(days=1)))
        assert await store.count_deliveries() == 3

    # Deleted by the device.
    sub = await web_sub(store)
    await queued(sub)
    await store.delete_subscription("u1", APP, sub.id)
    assert await store.count_deliveries() == 1
    # Its channel taken over by another user (a shared browser).
    sub = await web_sub(store)
    await queued(sub)
    await web_sub(store, user="u2")
    assert await store.count_deliveries() == 1
    # Its channel taken by another subscription of the same user.
    sub = await web_sub(store, endpoint="https://push.example.net/mine")
    await queued(sub)
    mover = await web_sub(store, endpoint="https://push.example.net/mover")
    await store.update_subscription(replace(mover, push_channel=sub.push_channel), T0)
    assert await store.count_deliveries() == 1
    # Expired and swept.
    sub = await web_sub(
        store, endpoint="https://push.example.net/e", expiration_date_time=T0 + timedelta(minutes=1)
    )
    await queued(sub)
    await store.sweep(T0 + timedelta(minutes=2), T0 - timedelta(days=1), 100)
    assert await store.count_deliveries() == 1
    assert [d.subscription_id for d in await claim_all(store)] == [keeper.id]


# -- Change.replaced ---------------------------------------------------------------------------


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


# -- push credentials --------------------------------------------------------------------------


async def test_push_credentials(store: Store) -> None:
    assert await store.get_push_credentials(APP) == {}
    assert await store.put_push_credentials(APP, "apns", b"key-1") == b"key-1"
    assert await store.put_push_credentials(APP, "fcm", b"\x00\xffsa") == b"\x00\xffsa"
    assert await store.put_push_credentials(OTHER_APP, "apns", b"theirs") == b"theirs"
    assert await store.get_push_credentials(APP) == {"apns": b"key-1", "fcm": b"\x00\xffsa"}
    # replace=False keeps what is there and returns it; the default replaces.
    assert await store.put_push_credentials(APP, "apns", b"key-2", replace=False) == b"key-1"
    assert await store.put_push_credentials(APP, "apns", b"key-3") == b"key-3"
    assert await store.put_push_credentials(APP, "wns", b"w", replace=False) == b"w"
    assert await store.get_push_credentials(APP) == {
        "apns": b"key-3",
        "fcm": b"\x00\xffsa",
        "wns": b"w",
    }
    assert await store.delete_push_credentials(APP, "apns")
    assert not await store.delete_push_credentials(APP, "apns")
    assert not await store.delete_push_credentials(APP, "vapid")
    assert await store.get_push_credentials(APP) == {"fcm": b"\x00\xffsa", "wns": b"w"}
    assert await store.get_push_credentials(OTHER_APP) == {"apns": b"theirs"}


async def test_first_time_generation_agrees_on_one_key(durable_backend: Backend) -> None:
    """Concurrent `replace=False` puts, on two nodes: every caller gets the one stored key."""
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
        for round in range(3):
            kind = f"vapid-{round}"
            got = await asyncio.gather(
                *(
                    s.put_push_credentials(APP, kind, f"key-{i}".encode(), replace=False)
                    for i in range(10)
                    for s in (a, b)
                )
            )
            assert len(set(got)) == 1
            assert (await a.get_push_credentials(APP))[kind] == got[0]
    finally:
        await a.close()
        await b.close()


# -- migration ---------------------------------------------------------------------------------


async def test_upgrades_a_schema_2_database(durable_backend: Backend) -> None:
    """Subscriptions from before push delivery open with a fresh delivery state."""
    dialect = "postgres" if durable_backend.name == "postgres" else "sqlite"
    scripts = [script for version, script in migrations(dialect) if version <= 2]
    assert len(scripts) == 2
    channel = '{"type":"webPush","endpoint":"https://e","keys":{"p256dh":"p","auth":"a"}}'
    store = durable_backend.make()
    if durable_backend.name == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        await store.open()  # for its connection settings; then back to schema 2
        async with store._acquire() as conn:
            await conn.execute(
                "DROP TABLE outbox, subscriptions, changes, notifications, feed_heads, apps,"
                " idempotency, deliveries, push_credentials, app_clients, user_names,"
                " schema_version;"
                " DROP FUNCTION herald_put_batch"
            )
            for script in scripts:
                await conn.execute(script)
            await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await conn.execute("INSERT INTO schema_version VALUES (2)")
            await conn.execute(
                "INSERT INTO subscriptions VALUES ('s1', 'u1', $1, 'webPush', NULL, $2,"
                " 'https://e', $3, $4, $4)",
                APP,
                channel,
                LATER,
                T0,
            )
        await store.close()
    else:
        import sqlite3

        from herald.store.rows import to_micros
        from herald.store.sqlite import SqliteStore
        from herald.store.sqlite.connection import statements as _statements

        assert isinstance(store, SqliteStore)
        conn = sqlite3.connect(store._database, isolation_level=None)
        try:
            for script in scripts:
                for statement in _statements(script):
                    conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (2)")
            conn.execute(
                "INSERT INTO subscriptions VALUES ('s1', 'u1', ?, 'webPush', NULL, ?,"
                " 'https://e', ?, ?, ?)",
                (APP, channel, to_micros(LATER), to_micros(T0), to_micros(T0)),
            )
        finally:
            conn.close()
    store = durable_backend.make()
    await store.open()
    try:
        sub = await store.get_subscription("s1", T0)
        assert sub is not None
        assert (sub.delivery, sub.seen_position) == (DeliveryState(), 0)
        assert await store.push_targets([("u1", APP)], T0) == [sub]
        await enqueue(store, new_delivery(sub, 1))
        (d,) = await claim_all(store)
        assert d.channel == sub.push_channel
        # The new put function logs replaces as such.
        await put(store, "x")
        await put(store, "x")
        assert [c.replaced for c in await store.changes("u1", APP, 0, 10)] == [False, True]
    finally:
        await store.close()


async def test_datetimes_of_the_delivery_state_are_utc(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1))
    (d,) = await claim_all(store)
    at = datetime(2030, 1, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
    await store.settle([outcome(d, Settle.DONE, sent=True)], at)
    got = (await state(store, sub)).last_delivered_date_time
    assert got == at and got is not None and got.utcoffset() == timedelta(0)
    assert got.tzinfo is not None and got.astimezone(UTC) == at
