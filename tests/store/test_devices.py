"""The Store contract for devices: the outbox, change origins, commit signals and subscriptions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.model import (
    ApnsChannel,
    ChangeKind,
    DevicePlatform,
    FcmChannel,
    Pending,
    PushChannel,
    ReadState,
    StatePatch,
    Subscription,
    WebPushChannel,
    WebPushKeys,
    WnsChannel,
)
from herald.store import Store
from herald.store.schema import migrations

from .conftest import Backend
from .test_contract import APP, OTHER_APP, T0, content, new_id, put

LATER = T0 + timedelta(days=30)
replace = msgspec.structs.replace


def log_of(pending: list[Pending]) -> list[tuple[str, int, ChangeKind, str, str | None]]:
    return [
        (
            p.change.user_id,
            p.change.position,
            p.change.kind,
            p.change.notification_id,
            p.change.origin,
        )
        for p in pending
    ]


def assert_ascending(pending: list[Pending]) -> None:
    seqs = [p.seq for p in pending]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


# -- outbox ------------------------------------------------------------------------------------


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
    a, b = durable_backend.make(), durable_backend.make()
    await a.open()
    await b.open()
    try:
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
    finally:
        await a.close()
        await b.close()


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


async def test_pruning_the_log_drops_entries_of_pruned_changes(store: Store) -> None:
    await put(store, "old")
    kept, _ = await put(store, "new", at=T0 + timedelta(minutes=5))
    assert len(await store.pending(100)) == 2
    await store.sweep(T0 + timedelta(minutes=6), T0 + timedelta(minutes=1), 100)
    assert log_of(await store.pending(100)) == [("u1", 2, ChangeKind.CREATED, kept, None)]


# -- origin --------------------------------------------------------------------------------------


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


# -- on_commit -----------------------------------------------------------------------------------


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


# -- subscriptions -------------------------------------------------------------------------------


def subscription(
    user: str = "u1",
    app: str = APP,
    channel: PushChannel | None = None,
    platform: DevicePlatform = DevicePlatform.LIVE,
    at: datetime = T0,
    expires: datetime = LATER,
    name: str | None = "laptop",
) -> Subscription:
    return Subscription(
        id=new_id(),
        user_id=user,
        app=app,
        platform=platform,
        display_name=name,
        push_channel=channel,
        expiration_date_time=expires,
        created_date_time=at,
        last_modified_date_time=at,
    )


def web_push(endpoint: str = "https://push.example.net/ep1") -> WebPushChannel:
    return WebPushChannel(endpoint=endpoint, keys=WebPushKeys(p256dh="pk", auth="au"))


CHANNELS: list[tuple[DevicePlatform, PushChannel]] = [
    (DevicePlatform.WEBPUSH, web_push()),
    (DevicePlatform.IOS, ApnsChannel(device_token="ab" * 32)),
    (DevicePlatform.ANDROID, FcmChannel(registration_token="fcm-token")),
    (DevicePlatform.WINDOWS, WnsChannel(channel_uri="https://wns.example.net/ch")),
]


async def test_subscription_crud(store: Store) -> None:
    sub = subscription(channel=web_push(), platform=DevicePlatform.WEBPUSH)
    stored, created = await store.add_subscription(sub, 10, T0)
    assert created and stored == sub
    assert await store.get_subscription(sub.id, T0) == sub
    assert await store.list_subscriptions("u1", APP, T0) == [sub]

    later = T0 + timedelta(hours=1)
    renewed = Subscription(
        id=sub.id,
        user_id="u1",
        app=APP,
        platform=DevicePlatform.IOS,
        display_name=None,
        push_channel=ApnsChannel(device_token="cd" * 32),
        expiration_date_time=LATER + timedelta(days=1),
        created_date_time=later,  # ignored: the creation time is kept
        last_modified_date_time=later,
    )
    updated = await store.update_subscription(renewed, later)
    assert updated.created_date_time == T0
    assert updated == Subscription(
        id=sub.id,
        user_id="u1",
        app=APP,
        platform=DevicePlatform.IOS,
        display_name=None,
        push_channel=ApnsChannel(device_token="cd" * 32),
        expiration_date_time=LATER + timedelta(days=1),
        created_date_time=T0,
        last_modified_date_time=later,
    )
    assert await store.get_subscription(sub.id, later) == updated

    await store.delete_subscription("u1", APP, sub.id)
    assert await store.get_subscription(sub.id, later) is None
    assert await store.list_subscriptions("u1", APP, later) == []
    with pytest.raises(NotFound):
        await store.delete_subscription("u1", APP, sub.id)


async def test_push_channels_round_trip(store: Store) -> None:
    subs = [subscription(channel=ch, platform=p) for p, ch in CHANNELS]
    subs.append(subscription(platform=DevicePlatform.LIVE, name=None))
    subs.append(subscription(platform=DevicePlatform.WEBPUSH))  # live only: no channel
    # Added newest first, listed oldest first.
    subs = [replace(s, created_date_time=T0 + timedelta(seconds=i)) for i, s in enumerate(subs)]
    for sub in reversed(subs):
        assert await store.add_subscription(sub, 10, T0) == (sub, True)
    for sub in subs:
        assert await store.get_subscription(sub.id, T0) == sub
    assert await store.list_subscriptions("u1", APP, T0) == subs


async def test_datetimes_are_stored_in_utc_to_the_microsecond(store: Store) -> None:
    from datetime import timezone

    plus_two = timezone(timedelta(hours=2))
    at = datetime(2030, 3, 4, 5, 6, 7, 999999, tzinfo=plus_two)
    sub = subscription(at=at, expires=at + timedelta(days=1, microseconds=1))
    stored, _ = await store.add_subscription(sub, 10, T0)
    got = await store.get_subscription(sub.id, T0)
    assert got == stored == sub
    assert got is not None and got.created_date_time.utcoffset() == timedelta(0)
    assert got.expiration_date_time == at + timedelta(days=1, microseconds=1)


async def test_subscriptions_are_isolated_by_user_and_app(store: Store) -> None:
    mine = subscription()
    theirs = subscription(user="u2")
    other_app = subscription(app=OTHER_APP)
    for sub in (mine, theirs, other_app):
        await store.add_subscription(sub, 10, T0)
    assert await store.list_subscriptions("u1", APP, T0) == [mine]
    assert await store.list_subscriptions("u2", APP, T0) == [theirs]
    assert await store.list_subscriptions("u1", OTHER_APP, T0) == [other_app]
    for user, app in (("u2", APP), ("u1", OTHER_APP)):
        with pytest.raises(NotFound):
            await store.delete_subscription(user, app, mine.id)
        with pytest.raises(NotFound):
            moved = replace(mine, user_id=user, app=app)
            await store.update_subscription(moved, T0)
    assert await store.get_subscription(mine.id, T0) == mine  # by id alone; callers check owner


async def test_expired_subscriptions_are_absent(store: Store) -> None:
    sub = subscription(expires=T0 + timedelta(minutes=1))
    await store.add_subscription(sub, 10, T0)
    at = T0 + timedelta(minutes=1)
    assert await store.get_subscription(sub.id, at) is None
    assert await store.list_subscriptions("u1", APP, at) == []
    with pytest.raises(NotFound):
        await store.update_subscription(sub, at)
    # delete_subscription takes no time: a subscription that expired by the clock is absent.
    past = datetime(2001, 1, 1, tzinfo=UTC)
    gone = subscription(at=past, expires=past + timedelta(days=1))
    await store.add_subscription(gone, 10, past)
    with pytest.raises(NotFound):
        await store.delete_subscription("u1", APP, gone.id)
    assert await store.get_subscription(gone.id, past) == gone  # not deleted, merely absent


async def test_same_channel_same_user_updates_in_place(store: Store) -> None:
    first = subscription(channel=web_push(), platform=DevicePlatform.WEBPUSH, name="old")
    await store.add_subscription(first, 10, T0)
    later = T0 + timedelta(hours=1)
    again = subscription(
        channel=web_push(), platform=DevicePlatform.WEBPUSH, at=later, expires=LATER, name="new"
    )
    stored, created = await store.add_subscription(again, 10, later)
    assert not created
    assert stored == replace(again, id=first.id, created_date_time=T0)
    assert (stored.display_name, stored.last_modified_date_time) == ("new", later)
    assert await store.list_subscriptions("u1", APP, later) == [stored]
    assert await store.get_subscription(again.id, later) is None


async def test_same_channel_other_user_takes_it_over(store: Store) -> None:
    shared = web_push("https://push.example.net/shared-browser")
    alice = subscription(user="alice", channel=shared, platform=DevicePlatform.WEBPUSH)
    await store.add_subscription(alice, 10, T0)
    bob = subscription(user="bob", channel=shared, platform=DevicePlatform.WEBPUSH)
    stored, created = await store.add_subscription(bob, 10, T0)
    assert created and stored == bob
    assert await store.get_subscription(alice.id, T0) is None
    assert await store.list_subscriptions("alice", APP, T0) == []
    assert await store.list_subscriptions("bob", APP, T0) == [bob]
    # Another app may hold the same key: keys are unique per app.
    elsewhere = subscription(user="carol", app=OTHER_APP, channel=shared)
    assert (await store.add_subscription(elsewhere, 10, T0))[1]
    assert await store.get_subscription(bob.id, T0) == bob


async def test_an_expired_holder_of_the_channel_is_replaced(store: Store) -> None:
    old = subscription(channel=web_push(), expires=T0 + timedelta(minutes=1))
    await store.add_subscription(old, 10, T0)
    at = T0 + timedelta(minutes=5)
    new = subscription(channel=web_push(), at=at)
    stored, created = await store.add_subscription(new, 10, at)
    assert created and stored.id == new.id != old.id
    assert await store.get_subscription(old.id, T0) is None  # deleted, not just expired


async def test_subscription_quota(store: Store) -> None:
    for i in range(3):
        channel = web_push(f"https://push.example.net/{i}")
        await store.add_subscription(subscription(channel=channel), 3, T0)
    with pytest.raises(QuotaExceeded):
        await store.add_subscription(subscription(), 3, T0)
    assert len(await store.list_subscriptions("u1", APP, T0)) == 3
    # Registering a channel the user already has creates nothing, so the quota does not apply.
    again = subscription(channel=web_push("https://push.example.net/1"), name="renamed")
    stored, created = await store.add_subscription(again, 3, T0)
    assert not created and stored.display_name == "renamed"
    # Other users and apps have their own quota.
    assert (await store.add_subscription(subscription(user="u2"), 3, T0))[1]
    assert (await store.add_subscription(subscription(app=OTHER_APP), 3, T0))[1]
    # Expired subscriptions do not count.
    at = T0 + timedelta(days=1)
    await store.add_subscription(subscription(user="u3", expires=at), 1, T0)
    assert (await store.add_subscription(subscription(user="u3", at=at), 1, at))[1]
    with pytest.raises(QuotaExceeded):
        await store.add_subscription(subscription(user="u3", at=at), 1, at)


async def test_a_duplicate_subscription_id_conflicts(store: Store) -> None:
    sub = subscription()
    await store.add_subscription(sub, 10, T0)
    with pytest.raises(Conflict):
        await store.add_subscription(replace(sub, user_id="u2"), 10, T0)
    assert await store.get_subscription(sub.id, T0) == sub


async def test_update_subscription_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.update_subscription(subscription(), T0)


async def test_update_subscription_takes_the_channel_from_its_holder(store: Store) -> None:
    ch1, ch2 = web_push("https://push.example.net/1"), web_push("https://push.example.net/2")
    mine = subscription(channel=ch1)
    mine_too = subscription(channel=ch2)
    theirs = subscription(user="u2", channel=web_push("https://push.example.net/3"))
    for sub in (mine, mine_too, theirs):
        await store.add_subscription(sub, 10, T0)
    # Same user: the other subscription with that channel is deleted.
    moved = await store.update_subscription(replace(mine, push_channel=ch2), T0)
    assert moved.push_channel == ch2
    assert await store.list_subscriptions("u1", APP, T0) == [moved]
    # Another user's: released from it too.
    taken = replace(moved, push_channel=theirs.push_channel)
    assert await store.update_subscription(taken, T0) == taken
    assert await store.get_subscription(theirs.id, T0) is None
    # Its old channel is free again.
    assert (await store.add_subscription(subscription(user="u2", channel=ch2), 10, T0))[1]
    # Dropping the channel (live only) keeps the subscription.
    live = replace(taken, push_channel=None)
    assert await store.update_subscription(live, T0) == live
    assert await store.get_subscription(mine.id, T0) == live


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


# -- migration -----------------------------------------------------------------------------------


async def test_upgrades_a_schema_1_database(durable_backend: Backend) -> None:
    """A database written by the previous release opens, keeps its log, and gets an outbox."""
    await _create_schema_1(durable_backend)
    store = durable_backend.make()
    await store.open()
    try:
        old = await store.changes("u0", APP, 0, 10)
        assert [(c.position, c.kind, c.origin) for c in old] == [(1, ChangeKind.CREATED, None)]
        assert await store.pending(10) == []  # changes from before the outbox are not announced
        nid, created = await put(store, "fresh", user="u0")
        assert created
        await store.update("u0", APP, nid, StatePatch(), None, T0, "dev")
        assert log_of(await store.pending(10)) == [
            ("u0", 2, ChangeKind.CREATED, nid, None),
            ("u0", 3, ChangeKind.UPDATED, nid, "dev"),
        ]
    finally:
        await store.close()


async def _create_schema_1(backend: Backend) -> None:
    """Apply only migration 1 and log one change the way schema 1 did."""
    ((version, script), *_) = migrations("postgres" if backend.name == "postgres" else "sqlite")
    assert version == 1
    created = T0
    store = backend.make()
    if backend.name == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        await store.open()  # for its connection settings; then back to schema 1
        async with store._acquire() as conn:
            await conn.execute(
                "DROP TABLE outbox, subscriptions, changes, notifications, feed_heads, apps,"
                " idempotency, deliveries, push_credentials, app_clients, user_names,"
                " schema_version;"
                " DROP FUNCTION herald_put_batch"
            )
            await conn.execute(script)
            await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await conn.execute("INSERT INTO schema_version VALUES (1)")
            await conn.execute(
                "INSERT INTO changes VALUES ('u0', 1, 'created', $1, 'n0', $2)", APP, created
            )
            await conn.execute("INSERT INTO feed_heads VALUES ('u0', 1, 0)")
        await store.close()
        return
    import sqlite3

    from herald.store.rows import to_micros
    from herald.store.sqlite import SqliteStore
    from herald.store.sqlite.connection import statements as _statements

    assert isinstance(store, SqliteStore)
    conn = sqlite3.connect(store._database, isolation_level=None)
    try:
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO changes VALUES ('u0', 1, 'created', ?, 'n0', ?)",
            (APP, to_micros(created)),
        )
    finally:
        conn.close()
