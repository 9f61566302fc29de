"""The Store contract for apps with several client ids, deleting an app, principal names, open
properties, and the schema 5 migration (GUID user ids in lower case), on every backend."""

from __future__ import annotations

from datetime import timedelta

import pytest

from herald.errors import Conflict, NotFound, PayloadTooLarge
from herald.model import App, ChangeKind, DevicePlatform, StatePatch, Subscription
from herald.query import Query
from herald.store import Store
from herald.store.schema import migrations

from .conftest import Backend
from .support import remembered
from .test_contract import APP, OTHER_APP, T0, content, new_id, put


def client(client_id: str, host: str = APP, platform: str | None = None, secret: str = "h") -> App:
    return App(
        client_id=client_id,
        host_name=host,
        display_name=host.upper(),
        secret_hash=secret,
        created_date_time=T0 + timedelta(seconds=len(client_id)),
        platform=platform,
    )


def subscription(user: str, app: str = APP) -> Subscription:
    return Subscription(
        id=new_id(),
        user_id=user,
        app=app,
        platform=DevicePlatform.LIVE,
        display_name=None,
        push_channel=None,
        expiration_date_time=T0 + timedelta(days=30),
        created_date_time=T0,
        last_modified_date_time=T0,
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


async def test_open_properties_are_stored_and_merged(store: Store) -> None:
    n, _ = await store.put("u1", APP, content("x", extra=b'{"a":1,"b":[1,2]}'), new_id(), T0)
    assert n.extra == b'{"a":1,"b":[1,2]}'
    stored = await store.get("u1", APP, n.id, T0)
    assert stored is not None and stored.extra == n.extra
    patch = StatePatch(extra=b'{"b":null,"c":"x"}', max_extra_bytes=100)
    after = await store.update("u1", APP, n.id, patch, None, T0)
    assert after.extra == b'{"a":1,"c":"x"}'
    too_big = StatePatch(extra=b'{"d":"' + b"x" * 100 + b'"}', max_extra_bytes=100)
    with pytest.raises(PayloadTooLarge):
        await store.update("u1", APP, n.id, too_big, None, T0)
    cleared = await store.update(
        "u1", APP, n.id, StatePatch(extra=b'{"a":null,"c":null}'), None, T0
    )
    assert cleared.extra is None
    [change] = await store.changes("u1", APP, 2, 10)
    assert change.kind is ChangeKind.UPDATED and change.notification is not None
    assert change.notification.extra is None


async def test_schema_5_lowercases_guid_user_ids(durable_backend: Backend) -> None:
    """A database of schema 4 with feeds under upper-case GUIDs opens with them in lower case,
    except a spelling whose lower-case twin has data too (two logs cannot be merged)."""
    upper = "AAAAAAAA-0000-4000-8000-00000000000A"
    twin = "BBBBBBBB-0000-4000-8000-00000000000B"
    store = durable_backend.make()
    await store.open()
    try:
        for user in (upper, twin, twin.lower(), "Not-A-Guid"):
            await put(store, "x", user=user)
        await store.add_subscription(subscription(upper), 50, T0)
    finally:
        await store.close()
    await _rerun_migration_5(durable_backend)
    store = durable_backend.make()
    await store.open()
    try:
        for user in (upper.lower(), twin, twin.lower(), "Not-A-Guid"):
            assert len(await store.changes(user, APP, 0, 10)) == 1, user
        assert await store.changes(upper, APP, 0, 10) == []
        assert len(await store.list_subscriptions(upper.lower(), APP, T0)) == 1
    finally:
        await store.close()


async def _rerun_migration_5(backend: Backend) -> None:
    """Apply migration 5's data step again, as an upgrade from schema 4 would do it (the test
    wrote upper-case ids through the store, which stores ids as given; the table changes of
    migration 5 are already there)."""
    dialect = "postgres" if backend.name == "postgres" else "sqlite"
    script = dict(migrations(dialect))[5]
    data_step = script[script.index("-- GUID user ids") :]
    store = backend.make()
    if dialect == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        await store.open()
        try:
            async with store._acquire() as conn, conn.transaction():
                await conn.execute(data_step)
        finally:
            await store.close()
        return
    import sqlite3

    from herald.store.sqlite import SqliteStore
    from herald.store.sqlite.connection import statements as _statements

    assert isinstance(store, SqliteStore)
    conn = sqlite3.connect(store._database, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in _statements(data_step):
            conn.execute(statement)
        conn.execute("COMMIT")
    finally:
        conn.close()
