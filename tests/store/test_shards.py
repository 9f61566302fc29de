"""The `Shards` contract: on PostgreSQL each shard has one owner among the live nodes, shares are
fair, a lapsed or released lease is taken by another node; `pending` reads given shards only. On
SQLite (one process) a node holds every shard."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from herald.store import SHARDS, Store

from .conftest import Backend
from .support import APP, content, new_id, two_nodes

EVERY = frozenset(range(SHARDS))
TTL = 1.0


def assert_one_owner(*held: frozenset[int]) -> None:
    """No shard in two nodes' hands."""
    seen: set[int] = set()
    for shards in held:
        assert not seen & shards, f"shards {sorted(seen & shards)} have two owners"
        seen |= shards


@pytest.mark.postgres
async def test_two_nodes_share_the_shards_with_one_owner_each(postgres: Backend) -> None:
    async with two_nodes(postgres) as (a, b):
        assert await a.lease("A", TTL) == EVERY  # alone: everything
        assert await b.lease("B", TTL) == frozenset()  # all held by a live lease
        held_a = await a.lease("A", TTL)  # B is live: A keeps its share, gives back the rest
        assert len(held_a) == SHARDS // 2
        held_b = await b.lease("B", TTL)
        assert held_a | held_b == EVERY and len(held_b) == SHARDS // 2
        for _ in range(3):  # balanced: renewals change nothing
            assert (await a.lease("A", TTL), await b.lease("B", TTL)) == (held_a, held_b)


@pytest.mark.postgres
async def test_a_lapsed_lease_is_taken_and_its_old_owner_gets_none_of_it(
    postgres: Backend,
) -> None:
    async with two_nodes(postgres) as (a, b):
        await a.lease("A", TTL)
        await b.lease("B", TTL)
        held_a = await a.lease("A", TTL)
        held_b = await b.lease("B", TTL)
        assert len(held_a) == len(held_b) == SHARDS // 2
        await asyncio.sleep(TTL / 2)
        assert await b.lease("B", TTL) == held_b  # A's leases hold yet: nothing to take
        await asyncio.sleep(TTL / 2 + 0.1)  # A stopped renewing (killed, paused): lapsed
        assert await b.lease("B", TTL) == EVERY
        # A comes back: B holds everything under live leases, so A gets nothing now, and its
        # share once B has given it back.
        assert await a.lease("A", TTL) == frozenset()
        held_b = await b.lease("B", TTL)
        assert len(held_b) == SHARDS // 2
        held_a = await a.lease("A", TTL)
        assert held_a == EVERY - held_b


@pytest.mark.postgres
async def test_a_released_node_s_shards_are_taken_at_once(postgres: Backend) -> None:
    async with two_nodes(postgres) as (a, b):
        await a.lease("A", 60.0)
        await b.lease("B", 60.0)
        await a.lease("A", 60.0)
        assert len(await b.lease("B", 60.0)) == SHARDS // 2
        await a.release("A")
        await a.release("A")  # idempotent
        assert await b.lease("B", 60.0) == EVERY  # no waiting for A's 60 s leases


@pytest.mark.postgres
async def test_nodes_leasing_at_once_never_share_a_shard(postgres: Backend) -> None:
    stores = [postgres.make() for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        names = [f"N{i}" for i in range(len(stores))]
        last: list[frozenset[int]] = []
        for _ in range(8):
            last = list(
                await asyncio.gather(*(s.lease(n, TTL) for s, n in zip(stores, names, strict=True)))
            )
            assert_one_owner(*last)
        # Settled: every shard owned, 16 each.
        assert frozenset().union(*last) == EVERY
        assert sorted(len(h) for h in last) == [SHARDS // 4] * 4
    finally:
        for s in stores:
            await s.close()


@pytest.mark.postgres
async def test_pending_reads_only_the_given_shards(postgres: Backend) -> None:
    async with two_nodes(postgres) as (store, _):
        now = datetime.now().astimezone()
        users = [f"user-{i}" for i in range(40)]
        for _ in range(3):
            for user in users:
                await store.put(user, APP, content(), new_id(), now)
        everything = await store.pending(1000)
        assert len(everything) == 120
        found = {}
        for shard in range(SHARDS):
            part = await store.pending(1000, [shard])
            assert [p.seq for p in part] == sorted(p.seq for p in part)
            for p in part:
                assert found.setdefault(p.change.user_id, shard) == shard  # one shard per user
        assert set(found) == set(users)
        assert len(set(found.values())) > 1  # the users are spread over shards
        half = list(range(SHARDS // 2))
        some = await store.pending(1000, half)
        assert {p.seq for p in some} == {p.seq for p in everything if found[p.change.user_id] < 32}
        assert await store.pending(1000, []) == []


async def test_sqlite_s_one_node_holds_every_shard(sqlite_file: Backend) -> None:
    async with two_nodes(sqlite_file) as (a, b):
        assert await a.lease("A", TTL) == EVERY
        await a.release("A")
        assert await a.lease("A", TTL) == EVERY
        await a.put("u", APP, content(), new_id(), datetime.now().astimezone())
        assert len(await a.pending(10)) == 1
        with pytest.raises(ValueError):
            await a.pending(10, [0])


async def test_every_backend_grants_a_lone_node_every_shard(store: Store) -> None:
    assert await store.lease("only", TTL) == EVERY
    await store.release("only")


@pytest.mark.postgres
async def test_a_node_stopped_in_a_lease_call_does_not_hold_up_the_takeover(
    postgres: Backend,
) -> None:
    """A node stopped (SIGSTOP, a paused VM) while it renews its leases: its leases lapse after
    the TTL and another node takes every shard then. The renewal was a transaction of several
    statements; stopped after its first, the node held its heartbeat row until PostgreSQL ended
    its session (15 s), and the other node's renewal waited on that row (CI: 16 s takeover)."""
    from herald.store.postgres import PostgresStore
    from tests.pg import StatementCounter

    assert postgres.dsn is not None
    proxy, url = await StatementCounter.in_front_of(postgres.dsn)
    a = PostgresStore(url, min_size=1)
    b = postgres.make()
    await a.open()
    await b.open()
    stuck: asyncio.Task[frozenset[int]] | None = None
    try:
        assert await a.lease("A", TTL) == EVERY
        proxy.freeze(after=2)  # A stops two statements into its next call (BEGIN, heartbeat)
        stuck = asyncio.create_task(a.lease("A", TTL))
        await asyncio.sleep(TTL + 0.2)  # A's leases lapse
        async with asyncio.timeout(3 * TTL):
            assert await b.lease("B", TTL) == EVERY
    finally:
        proxy.thaw()
        if stuck is not None:
            async with asyncio.timeout(20):
                await asyncio.gather(stuck, return_exceptions=True)
        await a.close()
        await b.close()
        await proxy.close()


@pytest.mark.postgres
async def test_a_renewal_does_not_wait_for_a_pooled_connection(postgres: Backend) -> None:
    """Reads that hold every pooled connection (here blocked by a table lock; in production a
    surge of slow feed reads) must not hold up a lease renewal: a renewal that waited for the
    pool would let the node's leases lapse, and its shards' live delivery stop, until one was
    free (up to the pool's 20 s acquire timeout)."""
    import asyncpg

    assert postgres.dsn is not None
    store = postgres.make()
    await store.open()
    blocker = await asyncpg.connect(postgres.dsn)
    reads: list[asyncio.Task[object]] = []
    try:
        assert await store.lease("A", TTL) == EVERY  # a node leases at its start
        await blocker.execute("BEGIN; LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        now = datetime.now().astimezone()
        reads = [asyncio.create_task(store.get(f"user{i}", APP, new_id(), now)) for i in range(12)]
        await asyncio.sleep(0.5)  # every pooled connection is taken by a read, waiting
        assert not any(r.done() for r in reads)
        async with asyncio.timeout(2 * TTL):
            assert await store.lease("A", TTL) == EVERY
    finally:
        await blocker.close()  # the lock goes: the reads finish
        await asyncio.gather(*reads, return_exceptions=True)
        await store.close()
