"""The `Subscriptions` contract on every backend: devices, their push channels (one holder per
channel and app), quotas, expiry, and the delivery state a new channel starts with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from herald.errors import Conflict, NotFound, QuotaExceeded
from herald.model import ApnsChannel, DeliveryState, DevicePlatform, FcmChannel, Subscription
from herald.store import Store

from .support import (
    APP,
    CHANNELS,
    LATER,
    OTHER_APP,
    T0,
    claim_all,
    enqueue,
    failing,
    fetch,
    new_delivery,
    replace,
    subscription,
    web_push,
    web_sub,
)


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


async def test_channel_holder_finds_the_holder_expired_or_not(store: Store) -> None:
    channel = web_push("https://push.example.net/held")
    sub = subscription(channel=channel, expires=T0 + timedelta(minutes=1))
    await store.add_subscription(sub, 10, T0)
    assert await store.channel_holder(APP, channel.key) == sub
    assert await store.channel_holder(OTHER_APP, channel.key) is None  # keys are per app
    assert await store.channel_holder(APP, "https://push.example.net/other") is None
    later = T0 + timedelta(minutes=5)
    assert await store.get_subscription(sub.id, later) is None  # expired...
    assert await store.channel_holder(APP, channel.key) == sub  # ...but still holds it
    taker = subscription(user="u2", channel=channel, at=later)
    await store.add_subscription(taker, 10, later)
    assert await store.channel_holder(APP, channel.key) == taker
    await store.delete_subscription("u2", APP, taker.id)
    assert await store.channel_holder(APP, channel.key) is None


async def test_live_subscriptions_names_the_unexpired_ones_in_one_read(store: Store) -> None:
    kept = subscription()
    deleted = subscription()
    expired = subscription(user="u2", expires=T0 + timedelta(minutes=1))
    for sub in (kept, deleted, expired):
        await store.add_subscription(sub, 10, T0)
    await store.delete_subscription("u1", APP, deleted.id)
    ids = [kept.id, deleted.id, expired.id, "no-such-subscription", kept.id]
    assert await store.live_subscriptions(ids, T0) == {kept.id, expired.id}
    assert await store.live_subscriptions(ids, T0 + timedelta(minutes=1)) == {kept.id}
    assert await store.live_subscriptions([], T0) == set()


async def test_the_removal_count_moves_with_every_removal_and_only_then(store: Store) -> None:
    from herald.model import App

    moves: list[bool] = []
    last = await store.subscription_removals()

    async def moved() -> None:
        nonlocal last
        now = await store.subscription_removals()
        moves.append(now != last)
        last = now

    kept = await web_sub(store, endpoint="https://push.example.net/kept")
    taken = await web_sub(store, endpoint="https://push.example.net/taken")
    expiring = subscription(user="u3", expires=T0 + timedelta(minutes=1))
    await store.add_subscription(expiring, 10, T0)
    await moved()  # adding: no
    await store.update_subscription(replace(kept, display_name="renamed"), T0)
    await moved()  # updating: no
    await store.sweep(T0, T0, 100)
    await moved()  # a sweep that removes no subscription: no
    with pytest.raises(NotFound):
        await store.delete_subscription("u1", APP, "no-such-id")
    await moved()  # a delete of nothing: no
    await store.delete_subscription("u1", APP, kept.id)
    await moved()  # deleted: yes
    await web_sub(store, user="u2", endpoint="https://push.example.net/taken")
    await moved()  # another user took the push channel (the old holder is removed): yes
    await store.sweep(T0 + timedelta(minutes=2), T0, 100)
    await moved()  # expired and swept: yes
    await store.add_app(
        App(
            client_id="c1",
            host_name=APP,
            display_name="app",
            secret_hash="h",
            created_date_time=T0,
            platform=None,
        )
    )
    await store.delete_app(APP)
    await moved()  # the app (and its subscriptions) deleted: yes
    assert moves == [False, False, False, False, True, True, True, True]
    assert await store.get_subscription(taken.id, T0) is None
