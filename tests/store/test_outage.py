"""The PostgreSQL store when its database fails under it: a connection lost in the middle of a
write, a server that turned read-only (a failover to a standby), a restart. What a caller sees is
`Unavailable` (503), `ping` (readiness) follows whether writes can succeed, and the store goes on
by itself once the database is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from herald.errors import Unavailable
from herald.model import Content, Payload
from herald.store.postgres import PostgresStore
from tests.pg import Cluster, postgres_url, private_cluster, terminate_backends

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)


def content(text: str = "x") -> Content:
    return Content(
        target_host_name="app.example.com",
        payload=Payload(raw_content=text),
        expiration_date_time=NOW + timedelta(days=1),
    )


async def put(store: PostgresStore, user: str) -> str:
    n, _ = await store.put(user, "app.example.com", content(), str(uuid.uuid4()), NOW)
    return n.id


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    yield from private_cluster()


@pytest.fixture
async def shared() -> AsyncIterator[tuple[PostgresStore, str, str, str]]:
    """A store on a fresh schema of the shared server, its backends named for terminating."""
    url = postgres_url()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    name = f"herald-store-{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    store = PostgresStore(url, server_settings={"search_path": schema, "application_name": name})
    await store.open()
    try:
        yield store, url, name, schema
    finally:
        await store.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def test_a_write_whose_connection_dies_mid_statement_is_503_and_not_retried(
    shared: tuple[PostgresStore, str, str, str],
) -> None:
    """The put waits on a lock held here; its backend is terminated while it waits. Its outcome
    is unknown to the store (here: not applied), so it must answer 503, not 201 and not 500,
    and must not send it again; the next put goes through on a new connection."""
    store, url, name, schema = shared
    user = f"u-{uuid.uuid4()}"
    await put(store, user)  # the user's head row exists
    blocker = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM feed_heads WHERE user_id = $1 FOR UPDATE", user)
        waiting = asyncio.create_task(put(store, user))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert await terminate_backends(url, name) >= 1
        with pytest.raises(Unavailable, match="may or may not have been applied"):
            await waiting
        await tx.rollback()
        count = await blocker.fetchval(
            "SELECT count(*) FROM notifications WHERE user_id = $1", user
        )
        assert count == 1  # not applied, and not sent again
    finally:
        await blocker.close()
    await put(store, user)
    await store.ping()


async def test_a_read_only_server_is_503_and_not_ready_until_writable(cluster: Cluster) -> None:
    """After a failover to a standby, or with default_transaction_read_only on, the server
    refuses writes: each one is a 503, and `ping` says not ready, until it is writable again."""
    store = PostgresStore(cluster.url)
    await store.open()
    admin = await asyncpg.connect(cluster.url)
    try:
        await put(store, "u1")
        await store.ping()
        await _read_only(admin, True)
        with pytest.raises(Unavailable):
            await put(store, "u1")
        with pytest.raises(Unavailable, match="read-only|writes are failing"):
            await store.ping()
        await _read_only(admin, False)
        await put(store, "u1")
        await store.ping()
    finally:
        await admin.close()
        await store.close()


async def test_the_store_resumes_after_a_restart_and_ping_follows(cluster: Cluster) -> None:
    store = PostgresStore(cluster.url)
    await store.open()
    try:
        await put(store, "u1")
        await asyncio.to_thread(cluster.stop, "fast")
        with pytest.raises(Unavailable):
            await put(store, "u1")
        with pytest.raises(Unavailable):
            await store.ping()
        with pytest.raises(Unavailable):
            await store.get("u1", "app.example.com", "nope", NOW)
        await asyncio.to_thread(cluster.start)
        await store.ping()  # probes the writers: this is what brings readiness back
        await put(store, "u1")
        assert len(await store.changes("u1", None, 0, 10)) == 2
    finally:
        await store.close()


async def _read_only(admin: asyncpg.Connection, on: bool) -> None:
    await admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
    await admin.execute("SELECT pg_reload_conf()")
    await asyncio.sleep(0.2)  # backends apply the reload at their next command


async def test_an_op_waiting_on_a_row_lock_holds_up_no_post(
    shared: tuple[PostgresStore, str, str, str],
) -> None:
    """A node frozen mid-transaction keeps its row locks until PostgreSQL ends its session
    (`idle_in_transaction_session_timeout`). Another node's ops needing those rows wait as long;
    its posts must not wait with them. (CI: a node SIGSTOPped inside a push settle held the
    other node's posts over 10 s: its second writer waited for the first's ops transaction.)"""
    store, url, _, schema = shared
    n1, n2 = await put(store, "u1"), await put(store, "u2")
    frozen = await asyncpg.connect(url, server_settings={"search_path": schema})
    tx = frozen.transaction()
    await tx.start()
    try:
        # As a node stopped inside a transaction that changed u1's feed.
        await frozen.execute("SELECT 1 FROM feed_heads WHERE user_id = 'u1' FOR UPDATE")
        held = asyncio.create_task(store.delete("u1", "app.example.com", n1, None, NOW))
        await asyncio.sleep(0.3)  # a writer's ops transaction now waits on the lock
        other = asyncio.create_task(store.delete("u2", "app.example.com", n2, None, NOW))
        await asyncio.sleep(0.3)  # and the other writer has taken this op
        async with asyncio.timeout(5):
            await asyncio.gather(*(put(store, f"u{i}") for i in range(3, 13)))
        assert not held.done()
    finally:
        await tx.rollback()
        await frozen.close()
    async with asyncio.timeout(5):
        await asyncio.gather(held, other)
