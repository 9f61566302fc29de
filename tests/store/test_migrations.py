"""Schemas at open on every durable backend: a newer one is refused, older ones (as earlier
releases left them) are upgraded."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

import pytest

from herald.errors import HeraldError
from herald.model import ChangeKind, DeliveryState, StatePatch
from herald.store import Store
from herald.store.postgres.schema import digest, functions
from herald.store.rows import to_micros
from herald.store.schema import SchemaTooNew, migrations
from herald.store.sqlite import SqliteStore
from herald.store.sqlite.connection import statements

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
    assert isinstance(store, SqliteStore)
    with sqlite3.connect(store._database) as conn:
        conn.execute("INSERT INTO schema_version VALUES (9999)")
    conn.close()


async def test_upgrades_a_schema_1_database(durable_backend: Backend) -> None:
    """A database written by the previous release opens, keeps its log, and gets an outbox."""
    rows: list[tuple[str, tuple[object, ...]]] = [("changes", ("u0", 1, "created", APP, "n0", T0))]
    if durable_backend.name == "postgres":  # (positions come from the head there)
        rows.append(("feed_heads", ("u0", 1, 0)))
    await old_database(durable_backend, 1, rows)
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


async def test_upgrades_a_schema_2_database(durable_backend: Backend) -> None:
    """Subscriptions from before push delivery open with a fresh delivery state."""
    channel = '{"type":"webPush","endpoint":"https://e","keys":{"p256dh":"p","auth":"a"}}'
    subscription = ("s1", "u1", APP, "webPush", None, channel, "https://e", LATER, T0, T0)
    await old_database(durable_backend, 2, [("subscriptions", subscription)])
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
    assert isinstance(store, SqliteStore)
    conn = sqlite3.connect(store._database, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in statements(data_step):
            conn.execute(statement)
        conn.execute("COMMIT")
    finally:
        conn.close()


# -- PostgreSQL functions (store/postgres/functions) ----------------------------------------

# What the function files read as of each schema version. A change to a function comes with a new
# migration (it may hold only a comment) and a new line here: an older Herald that knows that
# schema version has the same functions, and one that does not refuses the database, rather than
# putting its own older functions back at open (docs/storage.md).
FUNCTIONS = {
    5: {
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    6: {  # unchanged (schema 6 added the cluster-wide tables)
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    7: {  # unchanged (schema 7 added the dispatch shards and leases)
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    8: {  # unchanged (schema 8 added notification preferences and held pushes)
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    9: {  # unchanged (schema 9 added the app-wide change feed and webhooks)
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    10: {  # unchanged (schema 10 added audiences and sends)
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8"
    },
    11: {  # schema 11 added herald_dispatched
        "herald_dispatched": "herald sha256:"
        "afe65b978a16b2e4d92fc6b2bb251b2f4f3c6e4e4a4d57c5accb48e2a459f7eb",
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8",
    },
    12: {  # unchanged (schema 12 added the store's epoch and the skipped ranges)
        "herald_dispatched": "herald sha256:"
        "afe65b978a16b2e4d92fc6b2bb251b2f4f3c6e4e4a4d57c5accb48e2a459f7eb",
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8",
    },
    13: {  # schema 13 added herald_lease
        "herald_dispatched": "herald sha256:"
        "afe65b978a16b2e4d92fc6b2bb251b2f4f3c6e4e4a4d57c5accb48e2a459f7eb",
        "herald_lease": "herald sha256:"
        "2b8eadd948c8c266177886f7e47d6604f464583b77e07ecf81eb7902107d954b",
        "herald_put_batch": "herald sha256:"
        "7ed3073553addee5ba8dc7fc60a026db197cd0cbb3a123e4dd9e4345d8ea4ed8",
    },
    14: {  # schema 14: herald_put_batch answers each put's outbox entry (herald_entry_state)
        "herald_dispatched": "herald sha256:"
        "afe65b978a16b2e4d92fc6b2bb251b2f4f3c6e4e4a4d57c5accb48e2a459f7eb",
        "herald_entry_state": "herald sha256:"
        "420ec5567067ec13637aac07ceefba4a2ff86fe552b4e36fb6a7fe73ea1283bf",
        "herald_lease": "herald sha256:"
        "2b8eadd948c8c266177886f7e47d6604f464583b77e07ecf81eb7902107d954b",
        "herald_put_batch": "herald sha256:"
        "e71512041b5f6b5db9bd6fd37a8af15bdfc89c0e4b70d8b71670e66afc23a23a",
    },
}


def test_a_function_changes_only_with_a_new_schema_version() -> None:
    newest = migrations("postgres")[-1][0]
    files = {name: digest(sql) for name, sql in functions()}
    assert FUNCTIONS.get(newest) == files, (
        "a function in store/postgres/functions changed without a new migration: add one (it"
        " may hold only a comment) and record the functions' digests under its version"
    )


async def _functions(backend: Backend) -> dict[str, list[tuple[str, str | None]]]:
    """Per function of functions/: the arguments and comment of each function of that name in
    the backend's schema (read on a connection of its own)."""
    import asyncpg

    assert backend.dsn is not None
    conn = await asyncpg.connect(backend.dsn)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid),"
            " obj_description(p.oid, 'pg_proc'), p.xmin::text FROM pg_proc p"
            " WHERE p.proname = ANY($1::text[]) AND p.pronamespace ="
            " (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
            [name for name, _ in functions()],
        )
    finally:
        await conn.close()
    found: dict[str, list[tuple[str, str | None]]] = {name: [] for name, _ in functions()}
    for name, arguments, comment, _ in rows:
        found[name].append((arguments, comment))
    return found


_DISPATCHED_ARGS = (
    "p_seqs bigint[], p_sub text[], p_user text[], p_app text[], p_provider text[],"
    " p_message text[], p_nid text[], p_position bigint[], p_expires timestamp with time zone[],"
    " p_due timestamp with time zone[], p_created timestamp with time zone, p_h_sub text[],"
    " p_h_user text[], p_h_app text[], p_h_provider text[], p_h_nid text[], p_h_position"
    " bigint[], p_h_expires timestamp with time zone[], p_h_release timestamp with time zone[]"
)


_LEASE_ARGS = "p_node text, p_ttl double precision, p_shards integer"


def _as_files() -> dict[str, list[tuple[str, str | None]]]:
    """What `_functions` finds once every function is as its file has it."""
    files = dict(functions())
    return {
        "herald_dispatched": [(_DISPATCHED_ARGS, digest(files["herald_dispatched"]))],
        "herald_entry_state": [("p_user text, p_app text", digest(files["herald_entry_state"]))],
        "herald_lease": [(_LEASE_ARGS, digest(files["herald_lease"]))],
        "herald_put_batch": [(_PUT_BATCH_ARGS, digest(files["herald_put_batch"]))],
    }


_PUT_BATCH_ARGS = (
    "p_user text[], p_app text[], p_anid text[], p_new_id text[], p_host text[], p_group text[],"
    " p_priority text[], p_at timestamp with time zone[], p_expires timestamp with time zone[],"
    " p_content bytea[], p_origin text[], p_entries boolean"
)


@pytest.mark.postgres
@pytest.mark.parametrize("version", [None, 1, 2], ids=["new", "schema-1", "schema-2"])
async def test_functions_are_applied_after_the_migrations(
    postgres: Backend, version: int | None
) -> None:
    """A database gets each function as its file has it, marked with the file's digest: a new
    one, and one an earlier release left, whose function is dropped (schema 1: other arguments)
    or replaced (the stand-in fails if it is called)."""
    if version is not None:
        await old_database(postgres, version)
    store = postgres.make()
    await store.open()
    try:
        assert await _functions(postgres) == _as_files()
        assert (await put(store, "x"))[1]
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_function_unlike_its_file_is_replaced_at_open(postgres: Backend) -> None:
    """A function without the file's digest (replaced behind Herald's back, or left by an older
    release) is replaced at the next open, without a migration."""
    store = postgres.make()
    await store.open()
    try:
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        async with store._acquire() as conn:
            # The file's function with another body (an older release's result type differs:
            # a migration drops that one first).
            sql = dict(functions())["herald_put_batch"]
            marked = "#variable_conflict use_column"
            assert marked in sql
            await conn.execute(sql.replace(marked, marked + "\n-- not the file's", 1))
            await conn.execute("COMMENT ON FUNCTION herald_put_batch IS NULL")
    finally:
        await store.close()
    store = postgres.make()
    await store.open()
    try:
        assert (await put(store, "x"))[1]
        assert await _functions(postgres) == _as_files()
    finally:
        await store.close()


@pytest.mark.postgres
async def test_an_up_to_date_function_is_left_alone_at_open(postgres: Backend) -> None:
    """No DDL at the open of an up-to-date database (the function's catalog row is the same)."""

    async def row_version() -> str:
        import asyncpg

        assert postgres.dsn is not None
        conn = await asyncpg.connect(postgres.dsn)
        try:
            found: str = await conn.fetchval(
                "SELECT xmin::text FROM pg_proc WHERE proname = 'herald_put_batch' AND"
                " pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
            )
        finally:
            await conn.close()
        return found

    store = postgres.make()
    await store.open()
    try:
        before = await row_version()
    finally:
        await store.close()
    store = postgres.make()
    await store.open()
    try:
        assert await row_version() == before
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_second_signature_of_a_function_is_refused(postgres: Backend) -> None:
    """Two functions of one name mean a signature changed without a migration dropping the old
    one: the store refuses to open, and changes nothing."""
    store = postgres.make()
    await store.open()
    try:
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        async with store._acquire() as conn:
            await conn.execute(
                "CREATE FUNCTION herald_put_batch(p text) RETURNS int LANGUAGE sql AS 'SELECT 1'"
            )
            await conn.execute("COMMENT ON FUNCTION herald_put_batch(text) IS 'extra'")
    finally:
        await store.close()
    again = postgres.make()
    with pytest.raises(HeraldError, match="2 functions herald_put_batch"):
        await again.open()
    await again.close()
    found = (await _functions(postgres))["herald_put_batch"]
    mark = digest(dict(functions())["herald_put_batch"])
    assert sorted(found) == sorted([("p text", "extra"), (_PUT_BATCH_ARGS, mark)])


# -- databases as earlier releases left them -------------------------------------------------

# herald_put_batch's arguments as the releases of schema 1, and of schemas 2 to 5, created it
# (migrations then held it), and its result. Those databases get a stand-in with that signature
# whose body fails: an upgrade must drop or replace it.
_ARGS_1 = (
    "p_user text[], p_app text[], p_anid text[], p_new_id text[], p_host text[], p_group text[],"
    " p_priority text[], p_at timestamptz[], p_expires timestamptz[], p_content bytea[]"
)
_ARGS = {1: _ARGS_1, 2: f"{_ARGS_1}, p_origin text[]"}
_RESULT = (
    "(o_ord bigint, o_id text, o_version integer, o_created_at timestamptz, o_created boolean)"
)


def old_put_batch(version: int) -> str:
    return (
        f"CREATE FUNCTION herald_put_batch({_ARGS[min(version, 2)]}) RETURNS TABLE {_RESULT}"
        f" LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the put function of schema {version}';"
        " END $$"
    )


async def old_database(
    backend: Backend, version: int, rows: Sequence[tuple[str, tuple[object, ...]]] = ()
) -> None:
    """Make `backend`'s database one that a release of schema `version` left: its migrations,
    on PostgreSQL its `herald_put_batch` (a stand-in), and `rows` (table, values) inserted."""
    dialect = "postgres" if backend.name == "postgres" else "sqlite"
    known = migrations(dialect)
    scripts = [script for v, script in known if v <= version]
    assert [v for v, _ in known if v <= version] == list(range(1, version + 1))
    store = backend.make()
    if dialect == "postgres":
        from herald.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        await store.open()  # for its connection settings; then back to schema `version`
        async with store._acquire() as conn:
            await conn.execute(
                "DROP TABLE outbox, subscriptions, changes, notifications, feed_heads, apps,"
                " idempotency, deliveries, push_credentials, app_clients, user_names,"
                " issuer_keys, redeemed_codes, turns, subscription_removals, nodes,"
                " dispatch_shards, notification_preferences, held_pushes, app_changes_pending,"
                " app_changes, app_changes_horizon, app_feeds, webhooks, audiences,"
                " audience_members, sends, send_recipients, send_failures, store_epoch,"
                " feed_voids, app_feed_voids, schema_version;"
                " DROP FUNCTION herald_put_batch, herald_changes_pending, herald_dispatched,"
                " herald_lease"
            )
            for script in scripts:
                await conn.execute(script)
            await conn.execute(old_put_batch(version))
            await conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
            for table, values in rows:
                marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
                await conn.execute(f"INSERT INTO {table} VALUES ({marks})", *values)
        await store.close()
        return
    assert isinstance(store, SqliteStore)
    conn = sqlite3.connect(store._database, isolation_level=None)
    try:
        for script in scripts:
            for statement in statements(script):
                conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        for table, values in rows:
            stored = [to_micros(v) if isinstance(v, datetime) else v for v in values]
            conn.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(values))})", stored)
    finally:
        conn.close()
