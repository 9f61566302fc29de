"""Schemas at open on every durable backend: a newer one is refused, older ones (as earlier
releases left them) are upgraded."""

from __future__ import annotations

import pytest

from herald.model import ChangeKind, DeliveryState, StatePatch
from herald.store import Store
from herald.store.rows import to_micros
from herald.store.schema import SchemaTooNew, migrations
from herald.store.sqlite import SqliteStore

from .conftest import Backend
from .support import APP, LATER, T0, claim_all, enqueue, log_of, new_delivery, put, subscription


async def test_refuses_a_newer_schema(durable_backend: Backend) -> None:
    backend = durable_backend
    store = backend.make()
    await store.open()
    await _bump_schema_version(backend, store)
    await store.close()
    again = backend.make()
    with pytest.raises(SchemaTooNew, match="newer"):
        await again.open()
    await again.close()


async def _bump_schema_version(backend: Backend, store: Store) -> None:
    if backend.name == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        async with store._acquire() as conn:
            await conn.execute("INSERT INTO schema_version VALUES (9999)")
        return
    import sqlite3

    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store._database) as conn:
        conn.execute("INSERT INTO schema_version VALUES (9999)")
    conn.close()


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
