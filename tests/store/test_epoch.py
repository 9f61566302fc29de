"""The PostgreSQL store's epoch (store/postgres/epoch.py): on a new history every head and the app
feed's seqs move past what the lost one may have issued, once, and those positions are `lost`.

A real failover is tests/test_failover.py. Here the *stored* epoch is changed by hand instead, a
stand-in for the new timeline a promotion gives the *live* one (to a connection's check the two
look alike: stored and live differ), and the store's connections are ended so that new ones check,
as a failover ends them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from herald.store.postgres import PostgresStore
from herald.store.postgres.epoch import GAP
from tests.pg import postgres_url, terminate_backends
from tests.store.support import APP, T0, content, new_id

pytestmark = pytest.mark.postgres


class Place:
    """A fresh schema of the shared server, stores on it named for terminating, and an admin
    connection to it."""

    def __init__(self, url: str, schema: str, admin: asyncpg.Connection) -> None:
        self.url, self.schema, self.admin = url, schema, admin
        self.name = f"herald-epoch-{uuid.uuid4().hex[:8]}"
        self.stores: list[PostgresStore] = []

    async def store(self) -> PostgresStore:
        settings = {"search_path": self.schema, "application_name": self.name}
        store = PostgresStore(self.url, min_size=1, server_settings=settings)
        await store.open()
        self.stores.append(store)
        return store

    async def new_history(self) -> None:
        """The stand-in for a failover: another stored timeline, and every connection ended."""
        await self.admin.execute(f"UPDATE {self.schema}.store_epoch SET timeline = timeline + 1")
        assert await terminate_backends(self.url, self.name) >= 1
        await asyncio.sleep(0.1)  # the pools notice their connections closed


@pytest.fixture
async def place() -> AsyncIterator[Place]:
    url = postgres_url()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE SCHEMA {schema}")
    p = Place(url, schema, admin)
    try:
        yield p
    finally:
        for store in p.stores:
            await store.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def put(store: PostgresStore, user: str, times: int = 1) -> None:
    for _ in range(times):
        await store.put(user, APP, content(), new_id(), T0)


async def test_a_new_history_moves_every_head_past_what_it_may_have_lost(place: Place) -> None:
    store = await place.store()
    crossed: list[int] = []
    store.on_history(lambda: crossed.append(1))
    await put(store, "u1", 3)
    await put(store, "u2")
    assert not await store.lost("u1", 2)
    await place.new_history()

    assert await store.horizon("u1") == (0, 3 + GAP)
    assert await store.heads(["u1", "u2", "nobody"]) == {"u1": 3 + GAP, "u2": 1 + GAP, "nobody": 0}
    assert crossed == [1]  # this process's streams are told
    lost: Callable[[str, int], object] = store.lost
    assert [await lost("u1", p) for p in (3, 4, 3 + GAP - 1, 3 + GAP)] == [
        False,
        True,
        True,
        False,  # the head: handed out as a starting point (`ready`, `latest`), never lost
    ]
    assert [await lost("u2", p) for p in (1, 2)] == [False, True]
    await put(store, "u1")
    assert [c.position for c in await store.changes("u1", None, 3, 10)] == [3 + GAP + 1]

    # A second failover: the ranges of both are lost.
    await place.new_history()
    assert await store.horizon("u1") == (0, 3 + 2 * GAP + 1)
    assert await lost("u1", 4) and await lost("u1", 3 + GAP + 2)
    assert not await lost("u1", 3 + GAP + 1)
    assert crossed == [1, 1]


async def test_only_the_first_connection_to_find_the_new_history_moves_the_heads(
    place: Place,
) -> None:
    """Two nodes reconnect at once: the heads move once, not once per node or connection."""
    a, b = await place.store(), await place.store()
    await put(a, "u1")
    await place.new_history()
    found = await asyncio.gather(*(s.horizon("u1") for s in (a, b, a, b)))
    assert found == [(0, 1 + GAP)] * 4
    assert await b.lost("u1", 2) and await a.lost("u1", 2)


async def test_a_store_opened_on_a_new_history_moves_the_heads_at_open(place: Place) -> None:
    store = await place.store()
    await put(store, "u1", 2)
    await store.close()
    place.stores.clear()
    await place.admin.execute(f"UPDATE {place.schema}.store_epoch SET system_identifier = 1")
    reopened = await place.store()
    assert await reopened.horizon("u1") == (0, 2 + GAP)
    assert await reopened.lost("u1", 3)


async def test_the_app_feed_skips_seqs_on_a_new_history(place: Place) -> None:
    store = await place.store()
    await store.enable_feed(APP, T0)
    await put(store, "u1", 2)
    page = await store.app_changes(APP, 0, 10)
    assert [seq for seq, _ in page.entries] == [1, 2]
    await place.new_history()
    assert await store.feed_bounds() == (0, 2)
    assert [await store.feed_lost(s) for s in (2, 3, 2 + GAP - 1)] == [False, True, True]
    await put(store, "u1")
    page = await store.app_changes(APP, 2, 10)
    assert [seq for seq, _ in page.entries] == [2 + GAP + 1]
    # Two more failovers, the second before any new seq: each skips its own range.
    await place.new_history()
    await store.feed_bounds()  # a connection of the new history
    await place.new_history()
    assert await store.feed_bounds() == (0, 2 + GAP + 1)
    assert await store.feed_lost(2 + GAP + 2) and await store.feed_lost(2 + 3 * GAP)
    await put(store, "u1")
    page = await store.app_changes(APP, 2 + GAP + 1, 10)
    assert [seq for seq, _ in page.entries] == [2 + 3 * GAP + 2]


async def test_the_first_open_records_the_epoch_and_moves_nothing(place: Place) -> None:
    store = await place.store()
    await put(store, "u1")
    assert await store.horizon("u1") == (0, 1)
    row = await place.admin.fetchrow(f"SELECT timeline, moves FROM {place.schema}.store_epoch")
    assert row is not None and row["timeline"] >= 1 and row["moves"] == 0
    assert not await store.lost("u1", 1)
