"""`Preferences`: each user's notification preferences per app, and the pushes held during quiet
hours (store/contract.py), on every backend."""

from __future__ import annotations

import asyncio
from datetime import time, timedelta

import pytest

from herald.errors import PreconditionFailed
from herald.model import (
    App,
    DevicePlatform,
    NewDelivery,
    Provider,
    ReadState,
    StatePatch,
    UserActionState,
)
from herald.preferences import HeldPush, HeldSummary, NotificationPreferences, QuietHours
from herald.store import Store

from .conftest import Backend
from .support import APP, OTHER_APP, T0, claim_all, message, put, two_nodes, web_sub

QUIET = NotificationPreferences(
    muted_groups=("promo",),
    muted_platforms=(DevicePlatform.IOS,),
    quiet_hours=QuietHours(
        time_zone="Europe/Berlin", start=time(22), end=time(7), allow_high_priority=True
    ),
)
END = T0 + timedelta(hours=2)


def summary_of(held: HeldSummary) -> NewDelivery:
    """A stand-in for the release job's summary: the count goes in the app notification id."""
    return NewDelivery(
        subscription_id=held.subscription_id,
        user_id=held.user_id,
        app=held.app,
        provider=Provider(held.provider),
        message=message(
            held.position,
            expires=held.expires,
            notification_id="summary",
            app_notification_id=f"count={held.count}",
        ),
        due=END,
    )


async def test_preferences_are_versioned_per_user_and_app(store: Store) -> None:
    assert await store.get_preferences("u1", APP) is None
    first = await store.put_preferences("u1", APP, QUIET, None, T0)
    assert (first.preferences, first.version, first.last_modified_date_time) == (QUIET, 1, T0)
    assert await store.get_preferences("u1", APP) == first
    assert await store.get_preferences("u1", OTHER_APP) is None
    assert await store.get_preferences("u2", APP) is None
    later = T0 + timedelta(minutes=1)
    second = await store.put_preferences("u1", APP, NotificationPreferences(), 1, later)
    assert (second.preferences, second.version) == (NotificationPreferences(), 2)
    with pytest.raises(PreconditionFailed):
        await store.put_preferences("u1", APP, QUIET, 1, later)
    assert await store.get_preferences("u1", APP) == second  # unchanged
    with pytest.raises(PreconditionFailed):  # never set: version 0
        await store.put_preferences("u3", APP, QUIET, 5, later)
    assert await store.get_preferences("u3", APP) is None
    assert (await store.put_preferences("u3", APP, QUIET, 0, later)).version == 1


async def test_push_audience_is_push_targets_with_their_preferences(store: Store) -> None:
    a, b = await web_sub(store, "u1"), await web_sub(store, "u2", "https://push.example.net/2")
    await store.put_preferences("u1", APP, QUIET, None, T0)
    await store.put_preferences("u3", APP, QUIET, None, T0)  # no subscription: not read
    pairs = [("u1", APP), ("u2", APP), ("u3", APP)]
    subs, prefs = await store.push_audience(pairs, T0)
    assert subs == await store.push_targets(pairs, T0)
    assert {s.id for s in subs} == {a.id, b.id}
    assert prefs == {("u1", APP): QUIET}
    assert await store.push_audience([], T0) == ([], {})


async def _held(store: Store, user: str = "u1", count: int = 2) -> tuple[list[str], list[int]]:
    """`count` notifications whose alerts to the user's Web Push device are held until END."""
    sub = await web_sub(store, user, f"https://push.example.net/{user}")
    ids = [(await put(store, user=user))[0] for _ in range(count)]
    pending = [p for p in await store.pending(100) if p.change.user_id == user]
    held = [
        HeldPush(
            subscription_id=sub.id,
            user_id=user,
            app=APP,
            provider=Provider.WEBPUSH.value,
            notification_id=p.change.notification_id,
            position=p.change.position,
            expires=T0 + timedelta(days=7),
            release=END,
        )
        for p in pending
    ]
    await store.dispatched([p.seq for p in pending], (), held)
    return ids, [p.seq for p in pending]


async def test_held_pushes_are_released_once_as_one_summary(store: Store) -> None:
    ids, _ = await _held(store, count=3)
    assert await store.count_held("u1", APP) == 3
    assert await claim_all(store, END) == []  # held: not queued
    assert await store.release_held(END - timedelta(seconds=1), 10, summary_of) == []
    await store.update("u1", APP, ids[0], StatePatch(read_state=ReadState.READ), None, T0)
    queued = await store.release_held(END, 10, summary_of)
    assert [(d.user_id, d.message.app_notification_id, d.message.position) for d in queued] == [
        ("u1", "count=2", 3)  # the read one is not counted; the newest position
    ]
    assert await store.count_held("u1", APP) == 0
    claimed = await claim_all(store, END)
    assert [(d.message.notification_id, d.message.app_notification_id) for d in claimed] == [
        ("summary", "count=2")
    ]
    assert await store.release_held(END + timedelta(hours=1), 10, summary_of) == []


async def test_held_pushes_of_notifications_dealt_with_send_nothing(store: Store) -> None:
    ids, _ = await _held(store, count=2)
    await store.update(
        "u1", APP, ids[0], StatePatch(user_action_state=UserActionState.DISMISSED), None, T0
    )
    await store.delete("u1", APP, ids[1], None, T0)
    assert await store.release_held(END, 10, summary_of) == []
    assert await store.count_held("u1", APP) == 0
    assert await claim_all(store, END) == []


async def test_held_pushes_are_queued_only_by_the_call_that_removes_the_entry(
    store: Store,
) -> None:
    _, seqs = await _held(store, count=1)
    again = HeldPush(
        subscription_id="s",
        user_id="u1",
        app=APP,
        provider="webPush",
        notification_id="n",
        position=1,
        expires=END,
        release=END,
    )
    await store.dispatched(seqs, (), [again])  # the entry is gone: nothing held twice
    assert await store.count_held("u1", APP) == 1


async def test_changing_preferences_re_times_held_pushes(store: Store) -> None:
    await _held(store, count=2)
    now = T0 + timedelta(minutes=5)
    await store.put_preferences("u1", APP, NotificationPreferences(), None, now, release=now)
    queued = await store.release_held(now, 10, summary_of)
    assert [d.message.app_notification_id for d in queued] == ["count=2"]


async def test_two_nodes_release_a_held_push_once(durable_backend: Backend) -> None:
    async with two_nodes(durable_backend) as (a, b):
        for user in ("u1", "u2", "u3"):
            await _held(a, user, count=2)
        results = await asyncio.gather(
            *(node.release_held(END, 10, summary_of) for node in (a, b, a, b))
        )
        released = sorted(d.user_id for batch in results for d in batch)
        assert released == ["u1", "u2", "u3"]
        assert len(await claim_all(a, END)) == 3


async def test_delete_app_removes_its_preferences_and_held_pushes(store: Store) -> None:
    for host, client_id in ((APP, "a1"), (OTHER_APP, "b1")):
        await store.add_app(
            App(
                client_id=client_id,
                host_name=host,
                display_name=host,
                secret_hash="h",
                created_date_time=T0,
            )
        )
    await _held(store, count=2)
    await store.put_preferences("u1", APP, QUIET, None, T0)
    await store.put_preferences("u1", OTHER_APP, QUIET, None, T0)
    counts = await store.delete_app(APP)
    assert counts is not None
    assert counts["heldPushes"] == 2 and counts["notificationPreferences"] == 1
    assert await store.count_held("u1", APP) == 0
    assert await store.get_preferences("u1", APP) is None
    assert await store.get_preferences("u1", OTHER_APP) is not None
