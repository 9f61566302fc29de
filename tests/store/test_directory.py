"""The `Directory` contract on every backend: apps and their client ids, deleting an app, user
principal names."""

from __future__ import annotations

from datetime import timedelta

import pytest

from herald.errors import Conflict, NotFound
from herald.model import App, StatePatch
from herald.query import Query
from herald.store import Store

from .support import (
    APP,
    OTHER_APP,
    T0,
    claim_all,
    enqueue,
    new_delivery,
    put,
    remembered,
    subscription,
    web_sub,
)


def client(client_id: str, host: str = APP, platform: str | None = None, secret: str = "h") -> App:
    return App(
        client_id=client_id,
        host_name=host,
        display_name=host.upper(),
        secret_hash=secret,
        created_date_time=T0 + timedelta(seconds=len(client_id)),
        platform=platform,
    )


async def test_apps(store: Store) -> None:
    b = App(
        client_id="cb",
        host_name="b.example",
        display_name="B",
        secret_hash="x",
        created_date_time=T0,
    )
    a = App(
        client_id="ca",
        host_name="a.example",
        display_name="A",
        secret_hash="y",
        created_date_time=T0 + timedelta(microseconds=1),
    )
    await store.add_app(b)
    await store.add_app(a)
    assert await store.get_app("ca") == a
    assert await store.get_app("nope") is None
    assert await store.list_apps() == [a, b]
    with pytest.raises(Conflict):
        await store.add_app(
            App(
                client_id="ca",
                host_name="c.example",
                display_name="C",
                secret_hash="z",
                created_date_time=T0,
            )
        )
    with pytest.raises(Conflict):
        await store.add_app(
            App(
                client_id="cc",
                host_name="a.example",
                display_name="C",
                secret_hash="z",
                created_date_time=T0,
            )
        )


async def test_an_app_has_several_client_ids(store: Store) -> None:
    await store.add_app(client("win", platform="windows"))
    await store.add_client(client("ios-1", platform="iOS"))
    ios = await store.get_app("ios-1")
    assert ios is not None and ios.host_name == APP and ios.platform == "iOS"
    assert ios.display_name == APP.upper()  # the app's, not the (ignored) one added with it
    assert [a.client_id for a in await store.list_apps()] == ["win", "ios-1"]
    with pytest.raises(Conflict):
        await store.add_client(client("win"))  # taken
    with pytest.raises(Conflict):
        await store.add_app(client("ios-1", host=OTHER_APP))  # taken by another app
    with pytest.raises(NotFound):
        await store.add_client(client("x", host="nowhere.example"))
    await store.set_client_secret("ios-1", "rotated")
    rotated = await store.get_app("ios-1")
    assert rotated is not None and rotated.secret_hash == "rotated"
    with pytest.raises(NotFound):
        await store.set_client_secret("nope", "x")
    await store.remove_client("win")
    assert await store.get_app("win") is None
    with pytest.raises(Conflict):
        await store.remove_client("ios-1")  # the last one
    with pytest.raises(NotFound):
        await store.remove_client("win")


async def test_delete_app_removes_its_data_and_nothing_else(store: Store) -> None:
    await store.add_app(client("a1"))
    await store.add_client(client("a2"))
    await store.add_app(client("b1", host=OTHER_APP))
    gone, _ = await put(store, "x", user="u1")
    await put(store, "y", user="u1", app=OTHER_APP, target_host_name=OTHER_APP)
    await store.update("u1", APP, gone, StatePatch(group_name="g"), None, T0)
    await store.add_subscription(subscription("u1"), 50, T0)
    kept_sub, _ = await store.add_subscription(subscription("u1", OTHER_APP), 50, T0)
    await store.put_push_credentials(APP, "vapid", b"k")
    await store.put_push_credentials(OTHER_APP, "vapid", b"k")
    await remembered(store, "a1:u1", "key", "f", 201, b"{}", None, T0 + timedelta(days=1))
    await remembered(store, "b1:u1", "key", "f", 201, b"{}", None, T0 + timedelta(days=1))
    _, head = await store.horizon("u1")

    counts = await store.delete_app(APP)
    assert counts is not None
    assert counts["notifications"] == 1 and counts["changes"] == 2
    assert counts["subscriptions"] == 1 and counts["pushCredentials"] == 1
    assert counts["clientIds"] == 2 and counts["idempotencyKeys"] == 1
    assert await store.delete_app(APP) is None
    assert await store.get_app("a1") is None and await store.get_app("a2") is None
    assert await store.get("u1", APP, gone, T0) is None
    assert await store.changes("u1", APP, 0, 10) == []
    assert await store.list_subscriptions("u1", APP, T0) == []
    assert await store.get_push_credentials(APP) == {}
    assert await store.recall("a1:u1", "key", T0) is None
    # the other app is untouched
    assert await store.get_app("b1") is not None
    assert [c.app for c in await store.changes("u1", None, 0, 10)] == [OTHER_APP]
    assert await store.list_subscriptions("u1", OTHER_APP, T0) == [kept_sub]
    assert await store.get_push_credentials(OTHER_APP) == {"vapid": b"k"}
    assert await store.recall("b1:u1", "key", T0) is not None
    # positions are never reused: a reader at `head` misses nothing that comes next
    later, _ = await put(store, "z", user="u1", app=OTHER_APP, target_host_name=OTHER_APP)
    assert [c.notification_id for c in await store.changes("u1", None, head, 10)] == [later]
    # the host name can be registered again, and starts empty
    await store.add_app(client("c1"))
    assert (await store.list("u1", APP, Query(), T0)).items == []


async def test_principal_names(store: Store) -> None:
    assert await store.user_of("alice@contoso.com") is None
    assert await store.name_user("alice@contoso.com", "a-id", False, T0)
    assert await store.user_of("alice@contoso.com") == "a-id"
    assert await store.name_user("alice@contoso.com", "a-id", False, T0)  # the same: kept
    # a token never moves a name to another user (its claim may be self-chosen)
    assert not await store.name_user("alice@contoso.com", "a-2", False, T0)
    assert await store.user_of("alice@contoso.com") == "a-id"
    assert await store.name_user("alice@contoso.com", "a-id", True, T0)  # pinned
    assert not await store.name_user("alice@contoso.com", "mallory", False, T0)
    assert await store.user_of("alice@contoso.com") == "a-id"
    assert await store.name_user("alice@contoso.com", "a-3", True, T0)  # pinned wins
    assert await store.list_user_names() == [("alice@contoso.com", "a-3", True)]
    assert await store.forget_user_name("alice@contoso.com")
    assert not await store.forget_user_name("alice@contoso.com")
    assert await store.user_of("alice@contoso.com") is None


async def test_delete_app_removes_its_outbox_entries_and_deliveries(store: Store) -> None:
    await store.add_app(client("a1"))
    await store.add_app(client("b1", host=OTHER_APP))
    mine = await web_sub(store)
    theirs = await web_sub(store, app=OTHER_APP)
    await put(store, "x")
    await put(store, "y", app=OTHER_APP, target_host_name=OTHER_APP)
    await enqueue(store, new_delivery(mine, 7), new_delivery(theirs, 8))

    counts = await store.delete_app(APP)
    assert counts is not None
    assert (counts["outbox"], counts["deliveries"]) == (1, 1)
    assert [p.change.app for p in await store.pending(10)] == [OTHER_APP]
    assert await store.count_deliveries() == 1
    assert [d.subscription_id for d in await claim_all(store)] == [theirs.id]
