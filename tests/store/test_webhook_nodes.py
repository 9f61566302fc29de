"""On several nodes (PostgreSQL), each webhook is delivered by one node at a time: the node
holding its dispatch shard (`outbound/leases.py`), and none while the lease may have lapsed."""

from __future__ import annotations

import uuid
import zlib
from datetime import UTC, datetime

import pytest

from herald.outbound.leases import Leases
from herald.outbound.webhooks import Delivery
from herald.settings import Settings
from herald.store import SHARDS, Store, Webhook

from .conftest import Backend
from .support import put, two_nodes

pytestmark = pytest.mark.postgres  # SQLite is one process: it holds every shard


async def test_one_node_at_a_time_delivers_a_webhook(postgres: Backend) -> None:
    async with two_nodes(postgres) as (a, b):
        await check_one_node(a, b)


async def check_one_node(a: Store, b: Store) -> None:
    now = datetime.now(UTC)
    hooks = [
        await a.add_webhook(
            Webhook(
                id=str(uuid.uuid4()),
                app="nodes.example.com",
                url="https://hooks.example.net/h",
                secret="whsec_" + "QUJD" * 8,
                kinds=("created",),
                status="active",
                cursor=0,
                created=now,
                last_modified=now,
            ),
            limit=100,
        )
        for _ in range(20)
    ]
    await put(a, "x", app="nodes.example.com", target_host_name="nodes.example.com")  # all due
    leases = [Leases(a, "node-a"), Leases(b, "node-b")]
    for _ in range(2):  # the second round balances: each node holds its share
        for lease in leases:
            await lease.renew()
    held = [lease.shards() for lease in leases]
    assert held[0] and held[1] and not held[0] & held[1]
    settings = Settings()
    nodes = [
        Delivery(a, settings, lambda: now, leases[0]),
        Delivery(b, settings, lambda: now, leases[1]),
    ]
    try:
        started = []
        for node in nodes:
            await node.look()
            # Read before anything else runs: a delivery may end (its URL does not resolve)
            # while the other node looks, and leave `flying`.
            started.append(set(node.flying))
        for hook in hooks:
            shard = zlib.crc32(hook.id.encode()) % SHARDS
            takers = [i for i, ids in enumerate(started) if hook.id in ids]
            assert takers == [0 if shard in held[0] else 1]
        leases[0].valid_until = 0.0  # node a's lease may have run out: it delivers nothing
        for task in list(nodes[0].flying.values()):
            await task
        await nodes[0].look()
        assert nodes[0].flying == {}
    finally:
        for node in nodes:
            await node.close()
