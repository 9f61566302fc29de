"""Two nodes (two services on one PostgreSQL database) share dispatch: each change is published
by one node only, and each user's changes all by the same node, whichever node committed them.
Before shard leases, both nodes read the same outbox head and published (and worked out pushes
for) the same entries."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from herald.model import Change
from herald.service import Services, build_services, lifespan
from tests.conftest import make_settings
from tests.redis import RedisServer
from tests.store.conftest import Backend
from tests.store.support import APP, content, new_id

pytestmark = pytest.mark.postgres

USERS = 40
POSTS = 600
WAIT = 20.0


def recording(services: Services, node: str, log: list[tuple[str, Change]]) -> None:
    """Record what this node's dispatcher publishes (its broker is the node's own)."""
    publish = services.broker.publish

    async def recorded(change: Change) -> None:
        log.append((node, change))
        await publish(change)

    services.broker.publish = recorded  # type: ignore[method-assign]


async def test_each_change_is_dispatched_by_one_node(postgres: Backend, tmp_path: Path) -> None:
    published: list[tuple[str, Change]] = []
    nodes = {}
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        nodes[name] = build_services(make_settings(tmp_path / name), store=postgres.make())
        recording(nodes[name], name, published)
    async with contextlib.AsyncExitStack() as stack:
        for services in nodes.values():
            await stack.enter_async_context(lifespan(services))
        await asyncio.sleep(2.5)  # B joins: A gives back B's share at its next renewal
        now = datetime.now().astimezone()
        stores = [nodes["A"].store, nodes["B"].store]
        # Both nodes commit, for every user: each one's commit wakes its own dispatcher.
        await asyncio.gather(
            *(
                stores[i % 2].put(f"user-{i % USERS}", APP, content(), new_id(), now)
                for i in range(POSTS)
            )
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while len({(c.user_id, c.position) for _, c in published}) < POSTS:
            assert loop.time() < deadline, "not every change was published"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a late second publish of the same entries would show now
    twice = [
        key for key, n in Counter((c.user_id, c.position) for _, c in published).items() if n > 1
    ]
    assert not twice, f"{len(twice)} changes published by both nodes, e.g. {twice[:3]}"
    by_user: dict[str, set[str]] = {}
    for node, change in published:
        by_user.setdefault(change.user_id, set()).add(node)
    shared = sorted(u for u, n in by_user.items() if len(n) > 1)
    assert not shared, f"users dispatched by both nodes: {shared[:5]}"
    per_node = Counter(node for node, _ in published)
    assert per_node["A"] and per_node["B"], per_node  # shared, not one node doing it all
    print(f"\npublished per node: {dict(per_node)}")


async def test_a_commit_wakes_the_node_that_holds_its_shard(
    postgres: Backend, redis_service: RedisServer, tmp_path: Path
) -> None:
    """B commits changes of users in A's shards: A publishes each within milliseconds (B's
    Redis wake-up), not on its next poll (up to 250 ms later)."""
    import asyncpg

    published: list[tuple[str, Change]] = []
    seen: dict[str, float] = {}  # notification id -> when A published its change
    nodes = {}
    for name in ("A", "B"):
        (tmp_path / name).mkdir()
        settings = make_settings(tmp_path / name, broker="redis", redis_url=redis_service.url)
        nodes[name] = build_services(settings, store=postgres.make())
        recording(nodes[name], name, published)
    a, b = nodes["A"], nodes["B"]
    original = a.broker.publish

    async def timed(change: Change) -> None:
        seen.setdefault(change.notification_id, time.monotonic())
        await original(change)

    a.broker.publish = timed  # type: ignore[method-assign]
    async with contextlib.AsyncExitStack() as stack:
        for services in nodes.values():
            await stack.enter_async_context(lifespan(services))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while len(a.dispatcher.scope() or ()) != 32 or len(b.dispatcher.scope() or ()) != 32:
            assert loop.time() < deadline, "the shards were not shared"
            await asyncio.sleep(0.05)
        held = a.dispatcher.scope() or frozenset()
        db = await asyncpg.connect(postgres.dsn)
        try:
            rows = await db.fetch(
                "SELECT u, (hashtextextended(u, 0) & 63)::int FROM unnest($1::text[]) AS u",
                [f"wake-{i}" for i in range(64)],
            )
        finally:
            await db.close()
        users = [r[0] for r in rows if r[1] in held][:5]
        latencies = []
        for i in range(30):
            await asyncio.sleep(random.uniform(0.0, 0.1))
            now = datetime.now().astimezone()
            note, _ = await b.store.put(users[i % len(users)], APP, content(), new_id(), now)
            committed = time.monotonic()
            while note.id not in seen:
                assert loop.time() < deadline + WAIT, "A never published"
                await asyncio.sleep(0.002)
            latencies.append(seen[note.id] - committed)
    assert all(node == "A" for node, c in published if c.user_id in users)
    median = statistics.median(latencies)
    print(f"\ncommitted on B, published by A: median {median * 1000:.1f} ms")
    assert median < 0.06, latencies
