"""The `DeliveryQueue` contract on every backend: claims (leased, in due order, never shared),
settlements (bound to their claim and channel), and what survives a restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from herald.model import (
    ApnsChannel,
    DeliveryState,
    Message,
    Payload,
    Priority,
    Provider,
    PushKind,
    ReadState,
    Settle,
    Settlement,
    UserActionState,
    VisualContent,
)
from herald.store import Store
from herald.store.settlement import MAX_ERROR, clean_error

from .conftest import Backend
from .support import (
    APP,
    CHANNELS,
    LEASE,
    SOON,
    T0,
    claim_all,
    enqueue,
    message,
    new_delivery,
    outcome,
    positions,
    replace,
    state,
    subscription,
    two_nodes,
    web_push,
    web_sub,
)


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
    async with two_nodes(durable_backend) as (a, b):
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
    async with two_nodes(durable_backend) as (a, b):
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


async def test_datetimes_of_the_delivery_state_are_utc(store: Store) -> None:
    sub = await web_sub(store)
    await enqueue(store, new_delivery(sub, 1))
    (d,) = await claim_all(store)
    at = datetime(2030, 1, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
    await store.settle([outcome(d, Settle.DONE, sent=True)], at)
    got = (await state(store, sub)).last_delivered_date_time
    assert got == at and got is not None and got.utcoffset() == timedelta(0)
    assert got.tzinfo is not None and got.astimezone(UTC) == at
